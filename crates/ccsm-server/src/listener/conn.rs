//! One connection's state as the accept loop sees it (a request under way, a head arriving, idle since
//! when), the socket wrapper that notices a head's first bytes, and the rewrite of hyper's own error
//! answers into OpenAI's error shape.

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
}

pub struct Conn {
    state: Mutex<State>,
    /// Asked to close if idle (the connection limit was reached).
    shed: AtomicBool,
    changed: Notify,
}

impl Conn {
    pub fn new() -> Self {
        let state = State { in_flight: 0, idle_since: Instant::now(), head_since: None, unflushed: false };
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
    /// from its first byte, an idle connection `idle_timeout`; one with a request under way has none.
    pub fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let s = *self.state();
        match (s.in_flight, s.unflushed, s.head_since) {
            (0, _, Some(head)) => Some(head + limits.header_timeout),
            (0, false, None) => Some(s.idle_since + limits.idle_timeout),
            _ => None,
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

/// The socket, noting when a request head starts to arrive, and answering in OpenAI's error shape
/// where hyper answers a request it cannot parse by itself.
pub struct Tracked {
    stream: TcpStream,
    conn: Arc<Conn>,
    /// An error answer being written in place of hyper's, and how many of hyper's bytes it replaces.
    rewrite: Option<(Vec<u8>, usize, usize)>,
}

impl Tracked {
    pub fn new(stream: TcpStream, conn: Arc<Conn>) -> Self {
        Tracked { stream, conn, rewrite: None }
    }
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
                this.conn.update(|s| s.head_since = Some(Instant::now()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewrite.is_none() {
            if let Some((status, head)) = automatic_error(buf) {
                this.rewrite = Some((error_answer(status), 0, head));
            }
        }
        this.conn.state().unflushed = true;
        let Some((answer, written, replaced)) = &mut this.rewrite else {
            return Pin::new(&mut this.stream).poll_write(cx, buf);
        };
        while *written < answer.len() {
            let n = ready!(Pin::new(&mut this.stream).poll_write(cx, &answer[*written..]))?;
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

    #[test]
    fn only_hyper_s_bodiless_error_answers_are_rewritten() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(automatic_error(hyper), Some((431, hyper.len())));
        assert_eq!(automatic_error(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"), Some((400, 47)));
        // The server's own errors carry a body.
        assert_eq!(automatic_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 80\r\n\r\n{}"), None);
        assert_eq!(automatic_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), None);
        let answer = String::from_utf8(error_answer(414)).unwrap();
        let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "uri_too_long");
        assert!(answer.contains(&format!("content-length: {}\r\n", body.to_string().len())));
    }
}
