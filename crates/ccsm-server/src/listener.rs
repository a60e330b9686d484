//! The accept loop: HTTP/1.1 connections served by hyper with the limits `axum::serve` lacks. A
//! request's head must arrive within `header_timeout` of its first byte; a connection with no request
//! under way closes after `idle_timeout`, and one whose output the client stops taking after
//! `write_timeout`; at most `max_connections` are open (when that is reached, the idle ones are closed
//! first, so a new client — a health probe — is not locked out); and on shutdown the server stops
//! accepting, closes connections with no request under way (a half-sent head is dropped), lets running
//! requests — those whose head arrived, their bodies still arriving included — finish within
//! `shutdown_timeout`, then closes what is left.

mod conn;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_service::Service as _;

use crate::metrics::Metrics;
use conn::{Conn, InFlight, Tracked};

/// What the server is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Stop accepting; let running requests finish within the shutdown deadline.
    Draining,
    /// Close every connection now.
    Closing,
}

/// Connection limits (`ccsm-infer serve --header-timeout ...`).
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// A request's head must arrive within this of its first byte.
    pub header_timeout: Duration,
    /// A connection with no request under way (kept alive, or never used) closes after this.
    pub idle_timeout: Duration,
    /// A connection whose socket takes none of its pending output for this long closes (the client
    /// stopped reading).
    pub write_timeout: Duration,
    /// Connections open at once (kept below the process's open-files limit).
    pub max_connections: usize,
    /// After a shutdown signal, how long running requests may take to finish.
    pub shutdown_timeout: Duration,
}

/// File descriptors kept for everything but connections: stdio, the listener, the runtime's, model files.
const RESERVED_FILES: u64 = 32;

/// The process's open-files limit (Linux's `/proc/self/limits`), when it can be read.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// `max_connections` within the open-files limit: past it, accepting fails and nothing, not even
/// `/health`, gets through.
pub fn connections_within_files(max_connections: usize) -> usize {
    match open_files_limit() {
        Some(files) => max_connections.min(files.saturating_sub(RESERVED_FILES).max(1) as usize),
        None => max_connections,
    }
}

/// The open connections, so that idle ones can be closed when a new one needs the room.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Closes the connection idle the longest, if one is idle.
    fn shed_idle(&self) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = open.values().filter_map(|c| c.idle_since().map(|t| (t, c))).min_by_key(|(t, _)| *t).map(|(_, c)| c) {
            conn.shed();
        }
    }
}

/// Serves `app` on `listener` until `phase` leaves `Serving`, then shuts down as it says. `metrics`
/// counts the requests hyper answers by itself (ones it cannot parse).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry::default());
    let (to_connections, connections_phase) = watch::channel(Phase::Serving);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|p| *p != Phase::Serving) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE): make room, then try again.
                tracing::warn!("accepting a connection failed: {e}");
                registry.shed_idle();
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match room(&slots, &registry, &mut phase).await {
                Some(p) => p,
                None => break,
            },
        };
        let (id, conn) = registry.add();
        let (app, limits, registry, phase) = (app.clone(), limits.clone(), registry.clone(), connections_phase.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            connection(stream, app, &conn, &limits, phase, metrics).await;
            // Out of the registry before its slot is free, so that shedding never picks a closed one.
            registry.remove(id);
            drop(permit);
        });
    }
    drop(listener);
    let all = limits.max_connections as u32;
    if *phase.borrow() == Phase::Draining {
        let _ = to_connections.send(Phase::Draining);
        let drained = tokio::select! {
            done = tokio::time::timeout(limits.shutdown_timeout, slots.acquire_many(all)) => done.is_ok(),
            _ = phase.wait_for(|p| *p == Phase::Closing) => false,
        };
        if !drained {
            let running = all as usize - slots.available_permits();
            eprintln!("shutdown: {running} connection(s) still busy after the {:?} deadline: cancelling them", limits.shutdown_timeout);
        }
    }
    let _ = to_connections.send(Phase::Closing);
    // Every connection ends at once now; wait briefly so their sockets are closed before exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), slots.acquire_many(all)).await;
    Ok(())
}

/// A slot for a new connection when all are taken: idle connections are closed to make one.
async fn room(slots: &Arc<Semaphore>, registry: &Registry, phase: &mut watch::Receiver<Phase>) -> Option<OwnedSemaphorePermit> {
    loop {
        registry.shed_idle();
        tokio::select! {
            permit = slots.clone().acquire_owned() => return permit.ok(),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = phase.wait_for(|p| *p != Phase::Serving) => return None,
        }
    }
}

/// One connection, until hyper ends it, a deadline passes, or shutdown closes it.
async fn connection(
    stream: TcpStream,
    app: Router,
    conn: &Arc<Conn>,
    limits: &ConnectionLimits,
    mut phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
) {
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        // Counted from the head's arrival until the response's body is dropped (sent or abandoned).
        let guard = InFlight::start(service_conn.clone());
        let mut app = app.clone();
        let response = app.call(request.map(Body::new));
        async move {
            let response = response.await.unwrap_or_else(|e: Infallible| match e {});
            Ok::<_, Infallible>(response.map(move |body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &guard;
                    frame
                }))
            }))
        }
    });
    let io = TokioIo::new(Tracked::new(stream, conn.clone(), metrics));
    let served = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(io, service);
    tokio::pin!(served);
    loop {
        if conn.expired(limits) {
            return;
        }
        let deadline = conn.deadline(limits);
        tokio::select! {
            _ = served.as_mut() => return,
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline.unwrap_or_else(Instant::now))), if deadline.is_some() => {}
            _ = conn.changed() => {}
            changed = phase.changed() => match changed.map(|_| *phase.borrow()) {
                Ok(Phase::Serving) => {}
                // Nothing running (idle, or a head still arriving): close now.
                Ok(Phase::Draining) if conn.quiet() => return,
                Ok(Phase::Draining) => {
                    // No new requests on this connection; hyper closes it once the running one is sent.
                    served.as_mut().graceful_shutdown();
                }
                Ok(Phase::Closing) | Err(_) => return,
            },
        }
    }
}
