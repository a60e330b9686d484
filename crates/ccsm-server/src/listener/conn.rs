//! One connection's state as the accept loop sees it (a request under way, a head arriving, idle since
//! when, writes blocked since when), the socket wrapper that notices a head's first bytes and whether
//! writes progress, and the rewrite of hyper's own error answers into OpenAI's error shape.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::ConnectionLimits;
use crate::metrics::Metrics;

#[derive(Clone, Copy)]
struct State {
    /// Requests whose responses are not finished.
    in_flight: usize,
    /// When the connection last had nothing under way (accepted, or a response finished).
    idle_since: Instant,
    /// When the first byte of the next request's head arrived, while it is arriving.
    head_since: Option<Instant>,
    /// hyper has written bytes it has not flushed yet (the end of a response may still be on its way).
    unflushed: bool,
    /// Since when the socket has taken none of the bytes hyper has to send (the client stopped reading).
    write_blocked_since: Option<Instant>,
}

pub struct Conn {
    state: Mutex<State>,
    /// Asked to close if idle (the connection limit was reached).
    shed: AtomicBool,
    changed: Notify,
}

impl Conn {
    pub fn new() -> Self {
        let state = State { in_flight: 0, idle_since: Instant::now(), head_since: None, unflushed: false, write_blocked_since: None };
        Conn { state: Mutex::new(state), shed: AtomicBool::new(false), changed: Notify::new() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state());
        self.changed.notify_one();
    }

    /// Resolves when the state changed (or had changed since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Since when it is idle: nothing under way, nothing left to send, no head arriving.
    pub fn idle_since(&self) -> Option<Instant> {
        let s = *self.state();
        (s.in_flight == 0 && !s.unflushed && s.head_since.is_none()).then_some(s.idle_since)
    }

    /// No request under way and nothing left to send (a head may be arriving).
    pub fn quiet(&self) -> bool {
        let s = *self.state();
        s.in_flight == 0 && !s.unflushed
    }

    pub fn shed(&self) {
        self.shed.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// When the connection must close unless something changes: a head arriving has `header_timeout`
    /// from its first byte, an idle connection `idle_timeout`; output the socket takes none of has
    /// `write_timeout` (so a client that stops reading cannot hold its connection, and its session,
    /// forever); a request under way that is being sent, or generating, has none.
    pub fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let s = *self.state();
        let stalled = s.write_blocked_since.map(|since| since + limits.write_timeout);
        let waiting = match (s.in_flight, s.unflushed, s.head_since) {
            (0, _, Some(head)) => Some(head + limits.header_timeout),
            (0, false, None) => Some(s.idle_since + limits.idle_timeout),
            _ => None,
        };
        stalled.into_iter().chain(waiting).min()
    }

    /// The socket took none of the bytes offered (its send buffer is full).
    fn write_blocked(&self) {
        if self.state().write_blocked_since.is_none() {
            self.update(|s| s.write_blocked_since = Some(Instant::now()));
        }
    }

    /// The socket took bytes: writing progresses.
    fn wrote(&self) {
        if self.state().write_blocked_since.is_some() {
            self.update(|s| s.write_blocked_since = None);
        }
    }

    /// Whether it must close now: its deadline passed, or it was asked to make room while idle.
    pub fn expired(&self, limits: &ConnectionLimits) -> bool {
        (self.shed.load(Ordering::Relaxed) && self.idle_since().is_some()) || self.deadline(limits).is_some_and(|d| d <= Instant::now())
    }
}

/// A request under way on a connection, from its head's arrival until its response is finished.
pub struct InFlight(Arc<Conn>);

impl InFlight {
    pub fn start(conn: Arc<Conn>) -> Self {
        conn.update(|s| {
            s.in_flight += 1;
            s.head_since = None;
        });
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        });
    }
}

/// The socket, noting when a request head starts to arrive and whether writes progress, and answering
/// in OpenAI's error shape where hyper answers a request it cannot parse by itself.
pub struct Tracked {
    stream: TcpStream,
    conn: Arc<Conn>,
    metrics: Arc<Metrics>,
    /// A head started to arrive and nothing was written since: the next write, if no request was
    /// dispatched, is hyper's own answer to a head it could not parse (the only place one can be).
    head_unanswered: bool,
    /// An error answer being written in place of hyper's, and how many of hyper's bytes it replaces.
    rewrite: Option<(Vec<u8>, usize, usize)>,
}

impl Tracked {
    pub fn new(stream: TcpStream, conn: Arc<Conn>, metrics: Arc<Metrics>) -> Self {
        Tracked { stream, conn, metrics, head_unanswered: false, rewrite: None }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Closed with output the client is not taking (cut off at the write deadline, or at shutdown):
        // a reset discards it, where a plain close would leave the kernel holding it (megabytes, on a
        // fast link) for a client that may never read.
        if self.conn.state().write_blocked_since.is_some() {
            let _ = self.stream.set_zero_linger();
        }
    }
}

/// Writes to the socket, noting on `conn` whether it took bytes or none.
fn write_noting(stream: &mut TcpStream, conn: &Conn, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    let polled = Pin::new(stream).poll_write(cx, buf);
    match &polled {
        Poll::Pending => conn.write_blocked(),
        Poll::Ready(Ok(n)) if *n > 0 => conn.wrote(),
        Poll::Ready(_) => {}
    }
    polled
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let starts_head = {
                let s = this.conn.state();
                s.in_flight == 0 && s.head_since.is_none()
            };
            if starts_head {
                this.head_unanswered = true;
                this.conn.update(|s| s.head_since = Some(Instant::now()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewrite.is_none() && std::mem::take(&mut this.head_unanswered) && this.conn.state().in_flight == 0 {
            if let Some((status, head)) = automatic_error(buf) {
                this.rewrite = Some((error_answer(status), 0, head));
                // Never seen by the router's outcome counter: counted here.
                this.metrics.requests_invalid.fetch_add(1, Ordering::Relaxed);
            }
        }
        this.conn.state().unflushed = true;
        let Some((answer, written, replaced)) = &mut this.rewrite else {
            return write_noting(&mut this.stream, &this.conn, cx, buf);
        };
        while *written < answer.len() {
            let n = ready!(write_noting(&mut this.stream, &this.conn, cx, &answer[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let replaced = *replaced;
        this.rewrite = None;
        Poll::Ready(Ok(replaced))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        // hyper flushes once its buffer is written: an answer that ended is now wholly sent.
        if this.conn.state().unflushed {
            this.conn.update(|s| {
                s.unflushed = false;
                if s.in_flight == 0 {
                    s.idle_since = Instant::now();
                }
            });
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// hyper's own answer to a request it could not parse: status 400, 414 or 431 with an empty body
/// (the server's handlers never answer an error without a body). Its status and head length.
fn automatic_error(buf: &[u8]) -> Option<(u16, usize)> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ").or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let status = match rest.get(..4)? {
        b"400 " => 400,
        b"414 " => 414,
        b"431 " => 431,
        _ => return None,
    };
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = buf[..end].to_ascii_lowercase();
    head.windows(21).any(|w| w == b"\r\ncontent-length: 0\r\n").then_some((status, end))
}

/// The error answer, in OpenAI's shape, that replaces hyper's.
fn error_answer(status: u16) -> Vec<u8> {
    let (reason, code, message) = match status {
        414 => ("URI Too Long", "uri_too_long", "the request's URI is too long (at most 65534 bytes)"),
        431 => (
            "Request Header Fields Too Large",
            "headers_too_large",
            "the request's headers are too large or too many (at most 100 headers)",
        ),
        _ => ("Bad Request", "bad_http_request", "the request is not valid HTTP/1.1: its request line or a header could not be parsed"),
    };
    let body = serde_json::json!({ "error": { "message": message, "type": "invalid_request_error", "code": code } }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::io::{Read as _, Write as _};
    use std::time::Duration;

    fn limits() -> ConnectionLimits {
        let s = Duration::from_secs;
        ConnectionLimits { header_timeout: s(10), idle_timeout: s(30), write_timeout: s(5), max_connections: 1, shutdown_timeout: s(1) }
    }

    #[test]
    fn output_the_socket_does_not_take_has_a_deadline() {
        let conn = Arc::new(Conn::new());
        let running = InFlight::start(conn.clone());
        conn.state().unflushed = true;
        assert_eq!(conn.deadline(&limits()), None, "a request being answered has no deadline while it progresses");
        let blocked = Instant::now();
        conn.write_blocked();
        let deadline = conn.deadline(&limits()).expect("a stalled write has a deadline");
        assert!(deadline >= blocked + Duration::from_secs(5) && deadline <= Instant::now() + Duration::from_secs(5));
        conn.write_blocked();
        assert_eq!(conn.deadline(&limits()), Some(deadline), "blocked again: still counted from the first time");
        conn.wrote();
        assert_eq!(conn.deadline(&limits()), None, "bytes taken: no deadline again");
        drop(running);
    }

    /// A connected pair: the server's side wrapped, the client's a plain blocking socket.
    async fn pair() -> (Tracked, std::net::TcpStream, Arc<Conn>, Arc<Metrics>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (conn, metrics) = (Arc::new(Conn::new()), Arc::new(Metrics::default()));
        (Tracked::new(server, conn.clone(), metrics.clone()), client, conn, metrics)
    }

    /// What hyper does with the socket: reads some bytes, writes whole buffers.
    async fn read_some(t: &mut Tracked) -> usize {
        let mut storage = [0u8; 64];
        poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut storage);
            ready!(Pin::new(&mut *t).poll_read(cx, &mut buf))?;
            Poll::Ready(io::Result::Ok(buf.filled().len()))
        })
        .await
        .unwrap()
    }

    async fn write_all(t: &mut Tracked, mut buf: &[u8]) {
        while !buf.is_empty() {
            let n = poll_fn(|cx| Pin::new(&mut *t).poll_write(cx, buf)).await.unwrap();
            buf = &buf[n..];
        }
    }

    /// Everything the client receives until the server's side is dropped.
    fn received(mut client: std::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        got
    }

    #[tokio::test]
    async fn only_the_first_write_after_a_head_with_no_request_dispatched_is_taken_for_hyper_s() {
        let hyper_s = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        // Bytes that look like hyper's answer in the middle of a response (a client's echoed text, a
        // partial write's rest) go out as they are.
        let (mut server, mut client, conn, metrics) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(read_some(&mut server).await > 0);
        let running = InFlight::start(conn.clone());
        write_all(&mut server, b"HTTP/1.1 200 OK\r\n\r\n").await;
        write_all(&mut server, hyper_s).await;
        drop(running);
        write_all(&mut server, hyper_s).await;
        drop(server);
        assert_eq!(received(client), [&b"HTTP/1.1 200 OK\r\n\r\n"[..], hyper_s, hyper_s].concat());
        assert_eq!(metrics.requests_invalid.load(Ordering::Relaxed), 0);

        // hyper's answer to a head it could not parse: rewritten, and counted.
        let (mut server, mut client, _, metrics) = pair().await;
        client.write_all(b"GARBAGE\r\n\r\n").unwrap();
        assert!(read_some(&mut server).await > 0);
        write_all(&mut server, hyper_s).await;
        drop(server);
        assert_eq!(received(client), error_answer(400));
        assert_eq!(metrics.requests_invalid.load(Ordering::Relaxed), 1);
    }
}
