//! What every handler shares: the limits, the engine's state, the app state behind every route, and
//! the helpers that hand a job to the engine thread and stream back its answer.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ccsm::csm::Segment;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::ApiError;
use crate::hosts::HostPolicy;
use crate::jobs::Job;
use crate::metrics::Metrics;
use crate::text_tools::TextTools;

/// Longest speech input, in characters (OpenAI's limit).
pub const MAX_INPUT_CHARS: usize = 4096;
/// Largest request body: speech context frames can be large.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Largest text request body: a prompt of at most `MAX_PROMPT_BYTES` (1 MiB) with room for JSON's
/// escapes and the other fields; a body is held whole while it is parsed.
pub const MAX_TEXT_BODY_BYTES: usize = 2 << 20;

/// A speaker with the context turns that set its voice (`--voices DIR`: one NAME.json each).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Voice {
    /// CSM speaker id the generated speech is said as.
    pub speaker: u32,
    /// Earlier turns (text with their Mimi frames, or a recording the engine encodes on first use) that
    /// condition the voice; may be empty.
    #[serde(default)]
    pub context: Vec<Segment>,
    /// Seconds of the voice's recording, when it has one.
    #[serde(skip)]
    pub seconds: Option<f64>,
}

/// Where the engine thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The model is still loading: requests get 503.
    Loading,
    /// The loop is running and takes requests.
    Ready,
    /// Its loop ended (it failed): nothing more can be served.
    Stopped,
}

/// The engine thread's state, shared with the handlers.
#[derive(Default)]
pub struct EngineState {
    state: std::sync::atomic::AtomicU8,
    /// A text model's tokenizer and template, set before the state turns `Ready`.
    text: OnceLock<Arc<TextTools>>,
}

impl EngineState {
    pub fn get(&self) -> Engine {
        match self.state.load(Ordering::Acquire) {
            0 => Engine::Loading,
            1 => Engine::Ready,
            _ => Engine::Stopped,
        }
    }

    pub fn set(&self, state: Engine) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn text(&self) -> Option<Arc<TextTools>> {
        self.text.get().cloned()
    }

    pub fn set_text(&self, tools: TextTools) {
        let _ = self.text.set(Arc::new(tools));
    }
}

/// Marks the engine stopped when the thread leaves its loop, by return or by panic.
pub struct StopsOnExit(pub Arc<EngineState>);

impl Drop for StopsOnExit {
    fn drop(&mut self) {
        self.0.set(Engine::Stopped);
    }
}

/// What kind of model the server runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Text,
    Speech { sample_rate: u32 },
}

pub struct AppState {
    pub model_id: String,
    pub served: Served,
    pub jobs: Mutex<mpsc::Sender<Job>>,
    pub engine: Arc<EngineState>,
    pub metrics: Arc<Metrics>,
    pub api_keys: Vec<String>,
    pub voices: BTreeMap<String, Voice>,
    /// Requests that may wait for admission before new ones get 429.
    pub max_queue: usize,
    /// The `Host` names requests may be addressed to.
    pub hosts: HostPolicy,
    /// How long a request body may take to arrive.
    pub body_timeout: std::time::Duration,
}

pub type Shared = Arc<AppState>;

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none: different for every request.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_now());
    h.finish()
}

pub fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{prefix}-{:x}-{}", unix_now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Hands a job to the engine, or refuses it: 503 while loading, 429 with Retry-After when the queue is full.
pub fn submit(state: &AppState, job: Job) -> Result<(), ApiError> {
    match state.engine.get() {
        Engine::Ready => {}
        Engine::Loading => return Err(ApiError::loading()),
        Engine::Stopped => return Err(ApiError::stopped()),
    }
    let waiting = state.metrics.waiting.fetch_add(1, Ordering::AcqRel);
    if waiting >= state.max_queue {
        state.metrics.waiting.fetch_sub(1, Ordering::AcqRel);
        return Err(ApiError::busy(waiting));
    }
    let sent = state.jobs.lock().unwrap_or_else(|p| p.into_inner()).send(job);
    sent.map_err(|_| {
        state.metrics.waiting.fetch_sub(1, Ordering::AcqRel);
        ApiError::internal("the engine has stopped")
    })
}

/// A response body fed by a forwarding task: the `first` chunks, then each event's (`format`); it ends
/// when the job's events end or after a chunk that is an error (aborting the transfer, so a client can
/// tell a failed stream from a finished one), and drops the job's channel as soon as the client goes
/// away (so the engine cancels it).
fn forwarded<E: Send + 'static, X>(
    mut rx: UnboundedReceiver<E>,
    first: Vec<Bytes>,
    mut format: impl FnMut(E) -> Vec<Result<Bytes, X>> + Send + 'static,
) -> Body
where
    X: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, X>>(64);
    tokio::spawn(async move {
        for chunk in first {
            if !send(&tx, Ok(chunk)).await {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    for chunk in format(event) {
                        if !send(&tx, chunk).await {
                            return;
                        }
                    }
                }
            }
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// Sends one chunk; whether the stream goes on (the client is there and the chunk was no error).
async fn send<X>(tx: &tokio::sync::mpsc::Sender<Result<Bytes, X>>, chunk: Result<Bytes, X>) -> bool {
    let last = chunk.is_err();
    tx.send(chunk).await.is_ok() && !last
}

/// A `text/event-stream` response: `first` data lines, then each event's.
pub fn sse_response<E: Send + 'static>(
    rx: UnboundedReceiver<E>,
    first: Vec<String>,
    mut format: impl FnMut(E) -> Vec<String> + Send + 'static,
) -> Response {
    let line = |data: String| Bytes::from(format!("data: {data}\n\n"));
    let body = forwarded::<E, Infallible>(rx, first.into_iter().map(line).collect(), move |e| {
        format(e).into_iter().map(|d| Ok(line(d))).collect()
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// A byte-stream response (streamed audio): `first`, then each event's bytes, or an error that aborts
/// the transfer.
pub fn bytes_response<E: Send + 'static>(
    rx: UnboundedReceiver<E>,
    first: Vec<u8>,
    content_type: &'static str,
    format: impl Fn(E) -> Option<std::io::Result<Vec<u8>>> + Send + 'static,
) -> Response {
    let first = if first.is_empty() { Vec::new() } else { vec![Bytes::from(first)] };
    let body = forwarded(rx, first, move |e| format(e).map(|r| r.map(Bytes::from)).into_iter().collect());
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
