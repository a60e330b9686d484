//! `POST /v1/audio/speech`: OpenAI's speech API over CSM, audio streamed frame by frame as WAV or PCM
//! bytes, or as SSE events.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ccsm::wav::{SampleFormat, WavSpec};
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::api::ApiError;
use crate::app::{bytes_response, random_seed, sse_response, submit, AppState, Served, Shared, MAX_INPUT_CHARS};
use crate::guards::JsonBody;
use crate::jobs::{Job, SpeechEvent, SpeechJob};
use crate::requests::{self, SpeechRequest, VoiceField};

/// Audio a speech request makes unless it says (`max_audio_ms`).
const DEFAULT_AUDIO_MS: u64 = 10_000;
const MS_PER_FRAME: u64 = 80;
/// Longest conversation id taken.
const MAX_CONVERSATION_ID: usize = 256;

pub async fn speech(State(state): State<Shared>, JsonBody(body): JsonBody) -> Response {
    let run = async {
        let req = requests::speech(&body)?;
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
    if let Some(id) = &req.conversation {
        if id.is_empty() || id.len() > MAX_CONVERSATION_ID || id.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!("conversation must be 1 to {MAX_CONVERSATION_ID} bytes of printable text")));
        }
    }
    let voice_segments = context.len();
    let mut client_context = req.context.clone().unwrap_or_default();
    // A request's recording comes inline, as a data URI; a path would name a file on the server (only
    // the operator's voices may).
    let mut uploads = Vec::new();
    for (i, segment) in client_context.iter_mut().enumerate() {
        let Some(audio) = segment.audio.take() else { continue };
        if !segment.frames.is_empty() {
            return Err(ApiError::invalid(format!("context[{i}]: give frames or audio, not both")));
        }
        let bytes = audio.to_str().and_then(data_uri).ok_or_else(|| {
            ApiError::invalid(format!(
                "context[{i}].audio: a recording comes as a data URI (data:audio/wav;base64,...); paths on the server are not taken (its --voices folder names recordings)"
            ))
        })?;
        uploads.push((context.len() + i, bytes));
    }
    context.extend(client_context);
    let audio_ms = req.max_audio_ms.unwrap_or(DEFAULT_AUDIO_MS);
    if audio_ms == 0 {
        return Err(ApiError::invalid("max_audio_ms must be at least 80 (one frame)"));
    }
    let sampler = req.sampler(random_seed)?;
    let max_frames = audio_ms.div_ceil(MS_PER_FRAME).min(1 << 20) as usize;
    let (events, mut rx) = unbounded_channel();
    let text = req.input.clone();
    let conversation = req.conversation.clone();
    let job =
        SpeechJob { text, speaker, context, uploads, sampler, max_frames, conversation, voice_segments, events, arrived: Instant::now() };
    submit(state, Job::Speech(job))?;
    match rx.recv().await {
        Some(SpeechEvent::Accepted) => {}
        Some(SpeechEvent::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the engine dropped the request")),
    }
    let spec = WavSpec { sample_rate, channels: 1, format: SampleFormat::S16 };
    let header = if format == AudioFormat::Wav { spec.header(None) } else { Vec::new() };
    if sse {
        let pending_header = std::sync::Mutex::new(Some(header));
        return Ok(sse_response(rx, Vec::new(), move |event| {
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

/// The bytes of a `data:audio/...;base64,...` URI (any audio type: the reader tells the format by its content).
fn data_uri(uri: &str) -> Option<Vec<u8>> {
    let rest = uri.strip_prefix("data:")?;
    let (header, payload) = rest.split_once(',')?;
    if !header.starts_with("audio/") && !header.starts_with("application/octet-stream") || !header.ends_with(";base64") {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(payload.trim()).ok()
}
