//! The routes: OpenAI's speech, completions and chat endpoints, models, voices, health and metrics.
//! Handlers check a request, hand it to the engine thread as a job and stream back what the job's
//! channel carries; a client that goes away drops its channel, which the engine sees within a step.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use ccsm::chat::Message;
use ccsm::csm::Segment;
use ccsm::sampling::SamplerConfig;
use ccsm::wav::{SampleFormat, WavSpec};
use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{parse_body, ApiError, ChatRequest, CompletionRequest, MessageContent, SpeechRequest, TextSettings, VoiceField};
use crate::jobs::{Job, SpeechEvent, SpeechJob, TextEvent, TextJob, TextPrompt};
use crate::metrics::Metrics;

/// Longest speech input, in characters (OpenAI's limit).
pub const MAX_INPUT_CHARS: usize = 4096;
/// Largest request body: text requests are small; speech context frames can be large.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Longest text prompt (all messages together), in bytes: tokenizing runs on the engine thread.
const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Longest stop sequence, in bytes.
const MAX_STOP_BYTES: usize = 256;
/// Audio a speech request makes unless it says (`max_audio_ms`).
const DEFAULT_AUDIO_MS: u64 = 10_000;
const MS_PER_FRAME: u64 = 80;

/// A speaker with the context turns that set its voice (`--voices DIR`: one NAME.json each).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Voice {
    pub speaker: u32,
    #[serde(default)]
    pub context: Vec<Segment>,
}

/// Where the engine thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Loading,
    Ready,
    /// Its loop ended (it failed): nothing more can be served.
    Stopped,
}

/// The engine thread's state, shared with the handlers.
#[derive(Default)]
pub struct EngineState(std::sync::atomic::AtomicU8);

impl EngineState {
    pub fn get(&self) -> Engine {
        match self.0.load(Ordering::Acquire) {
            0 => Engine::Loading,
            1 => Engine::Ready,
            _ => Engine::Stopped,
        }
    }

    pub fn set(&self, state: Engine) {
        self.0.store(state as u8, Ordering::Release);
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
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/audio/voices", get(voices))
        .route("/v1/audio/speech", post(speech))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "this endpoint takes another method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Equal strings, in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if !state.api_keys.is_empty() {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        // Every key is compared, so the time does not tell which one nearly matched.
        let ok = given.is_some_and(|g| state.api_keys.iter().fold(false, |ok, key| ok | constant_time_eq(g.as_bytes(), key.as_bytes())));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<Shared>) -> Response {
    match state.engine.get() {
        Engine::Ready => Json(json!({ "status": "ok" })).into_response(),
        Engine::Loading => ApiError::loading().into_response(),
        Engine::Stopped => ApiError::stopped().into_response(),
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn models(State(state): State<Shared>) -> Response {
    Json(json!({ "object": "list", "data": [{ "id": state.model_id, "object": "model", "created": 0, "owned_by": "ccsm" }] }))
        .into_response()
}

async fn voices(State(state): State<Shared>) -> Response {
    let named = state.voices.iter().map(|(name, v)| json!({ "id": name, "speaker": v.speaker, "context_turns": v.context.len() }));
    Json(json!({
        "voices": named.collect::<Vec<_>>(),
        "speaker_ids": "any whole number is a speaker id (\"0\", \"1\", ...); CSM keeps a voice steady only with context turns",
    }))
    .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none: different for every request.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_now());
    h.finish()
}

fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{prefix}-{:x}-{}", unix_now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Hands a job to the engine, or refuses it: 503 while loading, 429 with Retry-After when the queue is full.
fn submit(state: &AppState, job: Job) -> Result<(), ApiError> {
    match state.engine.get() {
        Engine::Ready => {}
        Engine::Loading => return Err(ApiError::loading()),
        Engine::Stopped => return Err(ApiError::stopped()),
    }
    let waiting = state.metrics.waiting.fetch_add(1, Ordering::AcqRel);
    if waiting >= state.max_queue {
        state.metrics.waiting.fetch_sub(1, Ordering::AcqRel);
        state.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::busy(waiting));
    }
    let sent = state.jobs.lock().unwrap_or_else(|p| p.into_inner()).send(job);
    sent.map_err(|_| {
        state.metrics.waiting.fetch_sub(1, Ordering::AcqRel);
        ApiError::internal("the engine has stopped")
    })
}

fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let mut err = ApiError::invalid(format!("cannot read the request body: {}", e.body_text()));
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            err = ApiError::new(
                status,
                "invalid_request_error",
                "body_too_large",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            );
        }
        err
    })
}

/// Length and sampling of a text request, checked.
fn text_job_settings(s: &TextSettings) -> Result<(Option<usize>, SamplerConfig, Vec<String>), ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n must be 1: one choice per request"));
    }
    let max_tokens = s.max_completion_tokens.or(s.max_tokens).map(|n| n as usize);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens must be at least 1"));
    }
    let stop = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(format!("stop takes up to 4 non-empty strings of at most {MAX_STOP_BYTES} bytes")));
    }
    let config = SamplerConfig {
        temperature: s.temperature.unwrap_or(1.0),
        top_k: s.top_k.filter(|&k| k > 0).map(|k| k as usize),
        top_p: s.top_p.unwrap_or(1.0),
        seed: s.seed.unwrap_or_else(random_seed),
    };
    if !(0.0..=2.0).contains(&config.temperature) {
        return Err(ApiError::invalid(format!("temperature {} must be within 0..=2", config.temperature)));
    }
    config.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok((max_tokens, config, stop))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TextApi {
    Completion,
    Chat,
}

async fn completions(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let req: CompletionRequest = parse_body(&body_of(body)?)?;
        let mut prompts = req.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(ApiError::invalid("prompt must be one string (batches of prompts are separate requests here)"));
        }
        text(&state, TextPrompt::Plain(prompts.remove(0)), &req.settings, TextApi::Completion).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let req: ChatRequest = parse_body(&body_of(body)?)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages must hold at least one message"));
        }
        let messages = req
            .messages
            .into_iter()
            .map(|m| {
                let content = match m.content {
                    None => String::new(),
                    Some(MessageContent::Text(t)) => t,
                    Some(MessageContent::Parts(parts)) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                            return Err(ApiError::invalid(format!("message parts of type '{}' are not supported (text only)", p.kind)));
                        }
                        parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
                    }
                };
                Ok(Message { role: m.role, content })
            })
            .collect::<Result<Vec<_>, _>>()?;
        text(&state, TextPrompt::Chat(messages), &req.settings, TextApi::Chat).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Runs a text job: waits for its admission (errors before it are 4xx), then streams SSE chunks or
/// answers with the whole completion.
async fn text(state: &AppState, prompt: TextPrompt, settings: &TextSettings, api: TextApi) -> Result<Response, ApiError> {
    if state.served != Served::Text {
        return Err(ApiError::invalid("this server runs a speech model: use /v1/audio/speech"));
    }
    let bytes = match &prompt {
        TextPrompt::Plain(p) => p.len(),
        TextPrompt::Chat(messages) => messages.iter().map(|m| m.content.len() + m.role.len()).sum(),
    };
    if bytes > MAX_PROMPT_BYTES {
        return Err(ApiError::invalid(format!("the prompt has {bytes} bytes; at most {MAX_PROMPT_BYTES}")));
    }
    let (max_tokens, sampler, stop) = text_job_settings(settings)?;
    let (events, mut rx) = unbounded_channel();
    let ignore_eos = settings.ignore_eos;
    submit(state, Job::Text(TextJob { prompt, max_tokens, sampler, stop, ignore_eos, events, arrived: Instant::now() }))?;
    match rx.recv().await {
        Some(TextEvent::Accepted) => {}
        Some(TextEvent::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the engine dropped the request")),
    }
    let id = request_id(if api == TextApi::Chat { "chatcmpl" } else { "cmpl" });
    let (model, created) = (state.model_id.clone(), unix_now());
    if settings.stream {
        return Ok(sse_response(rx, move |event| text_chunks(api, &id, &model, created, event)));
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(TextEvent::Delta(d)) => text.push_str(&d),
            Some(TextEvent::Done { finish, usage }) => {
                let choice = match api {
                    TextApi::Completion => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish.name() }),
                    TextApi::Chat => {
                        json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish.name() })
                    }
                };
                let object = if api == TextApi::Chat { "chat.completion" } else { "text_completion" };
                return Ok(Json(
                    json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage }),
                )
                .into_response());
            }
            Some(TextEvent::Failed(e)) => return Err(e),
            Some(TextEvent::Accepted) => {}
            None => return Err(ApiError::internal("the engine dropped the request")),
        }
    }
}

/// The SSE `data:` payloads of one text event.
fn text_chunks(api: TextApi, id: &str, model: &str, created: u64, event: TextEvent) -> Vec<String> {
    let chunk = |delta: serde_json::Value, finish: Option<&str>, usage: Option<serde_json::Value>| {
        let choice = match api {
            TextApi::Completion => json!({ "index": 0, "text": delta, "logprobs": null, "finish_reason": finish }),
            TextApi::Chat => json!({ "index": 0, "delta": delta, "finish_reason": finish }),
        };
        let object = if api == TextApi::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut c = json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice] });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c.to_string()
    };
    let delta = |text: &str| match api {
        TextApi::Completion => json!(text),
        TextApi::Chat => json!({ "role": "assistant", "content": text }),
    };
    match event {
        TextEvent::Delta(d) => vec![chunk(delta(&d), None, None)],
        TextEvent::Done { finish, usage } => {
            let empty = if api == TextApi::Chat { json!({}) } else { json!("") };
            vec![chunk(empty, Some(finish.name()), Some(json!(usage))), "[DONE]".into()]
        }
        TextEvent::Failed(e) => vec![e.body().to_string(), "[DONE]".into()],
        TextEvent::Accepted => Vec::new(),
    }
}

/// A `text/event-stream` response fed by a forwarding task: it ends when the job's events end, and
/// drops the job's channel as soon as the client goes away (so the engine cancels it).
fn sse_response<E: Send + 'static>(mut rx: UnboundedReceiver<E>, format: impl Fn(E) -> Vec<String> + Send + 'static) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    for data in format(event) {
                        if tx.send(Ok(Bytes::from(format!("data: {data}\n\n")))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out));
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// A byte-stream response fed the same way (streamed audio). `format` turns an event into bytes, or
/// into an error that aborts the transfer (so a client can tell a failed stream from a finished one).
fn bytes_response<E: Send + 'static>(
    mut rx: UnboundedReceiver<E>,
    first: Vec<u8>,
    content_type: &'static str,
    format: impl Fn(E) -> Option<std::io::Result<Vec<u8>>> + Send + 'static,
) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(64);
    tokio::spawn(async move {
        if !first.is_empty() && tx.send(Ok(Bytes::from(first))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    if let Some(bytes) = format(event) {
                        let failed = bytes.is_err();
                        if tx.send(bytes.map(Bytes::from)).await.is_err() || failed {
                            return;
                        }
                    }
                }
            }
        }
    });
    ([(header::CONTENT_TYPE, content_type)], Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out))).into_response()
}

async fn speech(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let req: SpeechRequest = parse_body(&body_of(body)?)?;
        speak(&state, req).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AudioFormat {
    Wav,
    Pcm,
}

async fn speak(state: &AppState, req: SpeechRequest) -> Result<Response, ApiError> {
    let Served::Speech { sample_rate } = state.served else {
        return Err(ApiError::invalid("this server runs a text model: use /v1/completions or /v1/chat/completions"));
    };
    let chars = req.input.chars().count();
    if chars == 0 || chars > MAX_INPUT_CHARS {
        return Err(ApiError::invalid(format!("input must be 1 to {MAX_INPUT_CHARS} characters; it has {chars}")));
    }
    let format = match req.response_format.as_deref() {
        None | Some("wav") => AudioFormat::Wav,
        Some("pcm") => AudioFormat::Pcm,
        Some(other) => {
            return Err(ApiError::invalid(format!("response_format '{other}' is not supported: wav or pcm (24 kHz 16-bit mono)")))
        }
    };
    let sse = match req.stream_format.as_deref() {
        None | Some("audio") => false,
        Some("sse") => true,
        Some(other) => return Err(ApiError::invalid(format!("stream_format '{other}' is not supported: audio or sse"))),
    };
    if req.speed.is_some_and(|s| s != 1.0) {
        return Err(ApiError::invalid("speed must be 1.0: CSM speaks at its own pace"));
    }
    if req.instructions.as_deref().is_some_and(|i| !i.is_empty()) {
        tracing::debug!("speech instructions ignored: CSM takes no instructions");
    }
    let voice = match &req.voice {
        None => "0".to_owned(),
        Some(VoiceField::Name(n)) | Some(VoiceField::Id { id: n }) => n.clone(),
    };
    let (speaker, mut context) = match state.voices.get(&voice) {
        Some(v) => (v.speaker, v.context.clone()),
        None => match voice.parse::<u32>() {
            Ok(id) => (id, Vec::new()),
            Err(_) => {
                let known: Vec<&str> = state.voices.keys().map(String::as_str).collect();
                return Err(ApiError::invalid(format!(
                    "unknown voice '{voice}': give a speaker id (\"0\", \"1\", ...) or one of [{}]",
                    known.join(", ")
                )));
            }
        },
    };
    context.extend(req.context.clone().unwrap_or_default());
    let audio_ms = req.max_audio_ms.unwrap_or(DEFAULT_AUDIO_MS);
    if audio_ms == 0 {
        return Err(ApiError::invalid("max_audio_ms must be at least 80 (one frame)"));
    }
    let sampler = SamplerConfig {
        temperature: req.temperature.unwrap_or(0.9),
        top_k: Some(req.top_k.unwrap_or(50).max(1) as usize),
        top_p: 1.0,
        seed: req.seed.unwrap_or_else(random_seed),
    };
    sampler.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let max_frames = audio_ms.div_ceil(MS_PER_FRAME).min(1 << 20) as usize;
    let (events, mut rx) = unbounded_channel();
    let text = req.input.clone();
    submit(state, Job::Speech(SpeechJob { text, speaker, context, sampler, max_frames, events, arrived: Instant::now() }))?;
    match rx.recv().await {
        Some(SpeechEvent::Accepted) => {}
        Some(SpeechEvent::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the engine dropped the request")),
    }
    let spec = WavSpec { sample_rate, channels: 1, format: SampleFormat::S16 };
    let header = if format == AudioFormat::Wav { spec.header(None) } else { Vec::new() };
    if sse {
        let pending_header = std::sync::Mutex::new(Some(header));
        return Ok(sse_response(rx, move |event| {
            match event {
            SpeechEvent::Audio(samples) => {
                let mut bytes = pending_header.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
                bytes.extend(spec.encode(&samples));
                vec![json!({ "type": "speech.audio.delta", "audio": base64::engine::general_purpose::STANDARD.encode(bytes) }).to_string()]
            }
            SpeechEvent::Done { usage } => vec![json!({
                "type": "speech.audio.done",
                "usage": { "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens }
            })
            .to_string()],
            SpeechEvent::Failed(e) => vec![json!({ "type": "error", "error": e.body()["error"] }).to_string()],
            SpeechEvent::Accepted => Vec::new(),
        }
        }));
    }
    let content_type = if format == AudioFormat::Wav { "audio/wav" } else { "audio/pcm" };
    // Audio goes out frame by frame as it is decoded; a WAV starts with a header of unknown length.
    Ok(bytes_response(rx, header, content_type, move |event| match event {
        SpeechEvent::Audio(samples) => Some(Ok(spec.encode(&samples))),
        SpeechEvent::Failed(e) => {
            tracing::error!("speech failed after its audio started: {}", e.message);
            Some(Err(std::io::Error::other(e.message)))
        }
        _ => None,
    }))
}
