//! The request and response bodies of the OpenAI API as this server speaks it, and its error shape
//! `{"error": {"message", "type", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// A failed request: status, OpenAI error type and code, and a message that says what to change.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, message: message.into(), retry_after: None }
    }

    /// 400: the request is malformed or asks for what this server does not do.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing or wrong API key (Authorization: Bearer KEY)",
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", message)
    }

    pub fn busy(waiting: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            format!("the server is at capacity and its queue is full ({waiting} requests waiting); retry later"),
        );
        e.retry_after = Some(1);
        e
    }

    /// 400: even alone, at the smallest cache layout, the request needs more than the whole budget.
    pub fn over_budget(smallest: usize, budget: usize) -> Self {
        Self::invalid(format!(
            "this request needs {smallest} bytes of caches at the smallest layout, more than the server's budget of {budget}: ask for less output or a shorter prompt"
        ))
    }

    pub fn loading() -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", "loading", "Loading model");
        e.retry_after = Some(1);
        e
    }

    pub fn stopped() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", "engine_stopped", "the engine has stopped; restart the server")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "message": self.message, "type": self.kind, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// A string or a list of strings (OpenAI's `prompt` and `stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Sampling and length settings shared by completions and chat.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TextSettings {
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens` in chat.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    /// How many choices: only 1.
    pub n: Option<u32>,
    /// llama-server's extension: keep generating past end-of-text (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    #[allow(dead_code)] // one model per server: any name is accepted
    pub model: Option<String>,
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub settings: TextSettings,
}

/// The content of a chat message: a string, or parts of which the text ones are joined.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    #[allow(dead_code)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub settings: TextSettings,
}

/// A voice: a name, or `{"id": name}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum VoiceField {
    Name(String),
    Id { id: String },
}

/// `POST /v1/audio/speech`, with the extensions a client sends through its extra body.
#[derive(Clone, Debug, Deserialize)]
pub struct SpeechRequest {
    #[allow(dead_code)]
    pub model: Option<String>,
    pub input: String,
    pub voice: Option<VoiceField>,
    pub response_format: Option<String>,
    pub stream_format: Option<String>,
    pub speed: Option<f64>,
    pub instructions: Option<String>,
    pub seed: Option<u64>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub max_audio_ms: Option<u64>,
    /// Context turns said before the input (`[{"speaker", "text", "frames"}]`), after the voice's own.
    pub context: Option<Vec<ccsm::csm::Segment>>,
}

/// Token counts of a response.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
    }
}

/// Parses a JSON body, answering what is wrong in OpenAI's error shape.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not a valid request: {e}")))
}
