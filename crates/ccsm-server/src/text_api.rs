//! `POST /v1/completions` and `POST /v1/chat/completions`: a checked request becomes a job; its events
//! become one answer or SSE chunks, with logprobs in each API's shape when asked for.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::unbounded_channel;

use crate::api::ApiError;
use crate::app::{random_seed, request_id, sse_response, submit, unix_now, AppState, Engine, Served, Shared, MAX_TEXT_BODY_BYTES};
use crate::guards::JsonBody;
use crate::jobs::{Job, ShownToken, TextEvent, TextJob};
use crate::requests::{self, TextOptions};
use crate::text_tools::{Prompt, TextTools};

#[derive(Clone, Copy, PartialEq, Eq)]
enum TextApi {
    Completion,
    Chat,
}

/// The loaded text model's tools, or why text requests cannot be served now.
fn text_tools(state: &AppState) -> Result<Arc<TextTools>, ApiError> {
    if state.served != Served::Text {
        return Err(ApiError::invalid("this server runs a speech model: use /v1/audio/speech"));
    }
    match state.engine.get() {
        Engine::Loading => Err(ApiError::loading()),
        Engine::Stopped => Err(ApiError::stopped()),
        Engine::Ready => state.engine.text().ok_or_else(|| ApiError::internal("the text model's tokenizer is missing")),
    }
}

pub async fn completions(State(state): State<Shared>, JsonBody(body): JsonBody<MAX_TEXT_BODY_BYTES>) -> Response {
    let run = async move {
        let tools = text_tools(&state)?;
        let (prompt, options) = requests::completion(&body, tools.vocab, random_seed)?;
        drop(body);
        // `echo`: the answer's text starts with the prompt as sent.
        let echoed = options.echo.then(|| prompt.clone());
        text(&state, tools, Prompt::Plain(prompt), echoed, options, TextApi::Completion).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat(State(state): State<Shared>, JsonBody(body): JsonBody<MAX_TEXT_BODY_BYTES>) -> Response {
    let run = async move {
        let tools = text_tools(&state)?;
        let (messages, options) = requests::chat(&body, tools.vocab, random_seed)?;
        drop(body);
        text(&state, tools, Prompt::Chat(messages), None, options, TextApi::Chat).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Runs a text job: tokenizes its prompt, waits for its admission (errors before it are 4xx), then
/// streams SSE chunks or answers with the whole completion.
async fn text(
    state: &AppState,
    tools: Arc<TextTools>,
    prompt: Prompt,
    echoed: Option<String>,
    options: TextOptions,
    api: TextApi,
) -> Result<Response, ApiError> {
    let prompt = tokio::task::spawn_blocking(move || tools.encode(&prompt))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))??;
    let (events, mut rx) = unbounded_channel();
    let shape = Shape { api, logprobs: options.logprobs.is_some(), echoed, include_usage: options.include_usage };
    let stream = options.stream;
    submit(state, Job::Text(TextJob { prompt, options, events, arrived: Instant::now() }))?;
    match rx.recv().await {
        Some(TextEvent::Accepted) => {}
        Some(TextEvent::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the engine dropped the request")),
    }
    let id = request_id(if api == TextApi::Chat { "chatcmpl" } else { "cmpl" });
    let head = Head { id, model: state.model_id.clone(), created: unix_now() };
    if stream {
        return Ok(streamed(rx, head, shape));
    }
    let mut text = shape.echoed.clone().unwrap_or_default();
    let mut tokens = Vec::new();
    loop {
        match rx.recv().await {
            // The scored prompt's tokens come before the answer's.
            Some(TextEvent::Prompt(mut prompt)) => {
                prompt.append(&mut tokens);
                tokens = prompt;
            }
            Some(TextEvent::Delta { text: d, tokens: t }) => {
                text.push_str(&d);
                tokens.extend(t);
            }
            Some(TextEvent::Done { finish, usage }) => {
                let logprobs = shape.logprobs(&tokens, &mut 0);
                let choice = match api {
                    TextApi::Completion => json!({ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.name() }),
                    TextApi::Chat => json!({
                        "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": logprobs, "finish_reason": finish.name()
                    }),
                };
                let object = if api == TextApi::Chat { "chat.completion" } else { "text_completion" };
                let Head { id, model, created } = head;
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

struct Head {
    id: String,
    model: String,
    created: u64,
}

/// How a request's answer is shaped.
struct Shape {
    api: TextApi,
    logprobs: bool,
    /// The prompt, when `echo` puts it first.
    echoed: Option<String>,
    /// Streamed: the last chunk carries the usage.
    include_usage: bool,
}

impl Shape {
    /// The `logprobs` member of a choice (null unless asked for). `offset`: characters of the answer's
    /// text before these tokens (completions' `text_offset`), advanced past them.
    fn logprobs(&self, tokens: &[ShownToken], offset: &mut usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.api {
            TextApi::Completion => completion_logprobs(tokens, offset),
            TextApi::Chat => chat_logprobs(tokens),
        }
    }

    /// A chunk's `choices[0]`.
    fn chunk_choice(&self, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        match self.api {
            TextApi::Completion => json!({ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish }),
            TextApi::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({ "role": "assistant", "content": text }) };
                json!({ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
        }
    }
}

/// The SSE answer: a chunk per event (the echoed prompt first), usage in the last (unless
/// `stream_options.include_usage` is false), then `[DONE]`.
fn streamed(rx: tokio::sync::mpsc::UnboundedReceiver<TextEvent>, head: Head, shape: Shape) -> Response {
    let object = if shape.api == TextApi::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choice: Value, usage: Option<Value>| {
        let mut c = json!({ "id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [choice] });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c.to_string()
    };
    let mut offset = 0;
    let mut first = Vec::new();
    // Echoed without logprobs, the prompt goes first; with them, once the engine has scored it.
    if let (Some(prompt), false) = (&shape.echoed, shape.logprobs) {
        first.push(chunk(shape.chunk_choice(prompt, Value::Null, None), None));
    }
    sse_response(rx, first, move |event| match event {
        TextEvent::Prompt(tokens) => {
            let logprobs = shape.logprobs(&tokens, &mut offset);
            vec![chunk(shape.chunk_choice(shape.echoed.as_deref().unwrap_or_default(), logprobs, None), None)]
        }
        TextEvent::Delta { text, tokens } => {
            let logprobs = shape.logprobs(&tokens, &mut offset);
            vec![chunk(shape.chunk_choice(&text, logprobs, None), None)]
        }
        TextEvent::Done { finish, usage } => {
            let usage = shape.include_usage.then(|| json!(usage));
            vec![chunk(shape.chunk_choice("", Value::Null, Some(finish.name())), usage), "[DONE]".into()]
        }
        TextEvent::Failed(e) => vec![e.body().to_string(), "[DONE]".into()],
        TextEvent::Accepted => Vec::new(),
    })
}

/// A token's bytes as a string (a piece of a character shows as U+FFFD; `bytes` has it exactly).
fn piece(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Characters a token adds to the text: those that begin in its bytes (control tokens add none).
fn chars_of(token: &ShownToken) -> usize {
    if token.special {
        0
    } else {
        token.bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count()
    }
}

/// Completions' shape: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.
fn completion_logprobs(tokens: &[ShownToken], offset: &mut usize) -> Value {
    let (mut text, mut logprobs, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        text.push(piece(&t.bytes));
        logprobs.push(json!(t.logprob));
        tops.push(match t.logprob {
            None => Value::Null,
            Some(_) => {
                let mut top = Map::new();
                for (bytes, logprob) in &t.top {
                    top.entry(piece(bytes)).or_insert(json!(logprob));
                }
                Value::Object(top)
            }
        });
        offsets.push(*offset);
        *offset += chars_of(t);
    }
    json!({ "tokens": text, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
}

/// Chat's shape: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}`.
fn chat_logprobs(tokens: &[ShownToken]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> =
                t.top.iter().map(|(bytes, logprob)| json!({ "token": piece(bytes), "logprob": logprob, "bytes": bytes })).collect();
            json!({ "token": piece(&t.bytes), "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top })
        })
        .collect();
    json!({ "content": content, "refusal": null })
}
