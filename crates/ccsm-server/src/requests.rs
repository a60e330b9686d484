//! The requests of OpenAI's completions, chat and speech APIs as this server takes them: the fields each
//! endpoint honours, the ones it refuses by name (a field answered 200 but ignored would be a lie), and
//! the checked settings a job is made of.

use std::collections::BTreeMap;

use ccsm::chat::Message;
use ccsm::sampling::{LogitAdjustConfig, SamplerConfig, MAX_TOP_LOGPROBS};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::{describe, object, only_known, typed, ApiError};

/// Longest stop sequence, in bytes.
const MAX_STOP_BYTES: usize = 256;

/// Fields both text endpoints take. `model`, `user`, `stream_options` (usage is always in the last
/// chunk), `metadata`, `store` and `service_tier` change nothing here and are accepted as such, as is
/// llama-server's `cache_prompt` (a hint to reuse a cached prompt, which changes no answer: clients
/// written for llama-server send it).
const TEXT_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "user",
    "metadata",
    "store",
    "service_tier",
    "cache_prompt",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "best_of", "suffix"];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "modalities",
];
const SPEECH_FIELDS: &[&str] = &[
    "model",
    "input",
    "voice",
    "response_format",
    "stream_format",
    "speed",
    "instructions",
    "seed",
    "temperature",
    "top_k",
    "max_audio_ms",
    "context",
];

/// A string or a list of strings (OpenAI's `prompt` and `stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `top_k`, an extension: a count of at least 1, or "all" for no limit (the CLI's `--top-k` spelling).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged, expecting = "a count of at least 1, or \"all\"")]
pub enum TopK {
    Count(u64),
    Word(String),
}

impl TopK {
    /// The sampler's limit (`None`: every token).
    fn limit(self) -> Result<Option<usize>, ApiError> {
        match self {
            TopK::Count(0) => Err(ApiError::invalid(
                "top_k 0 would keep no token: send a count of at least 1, or \"all\" for no limit (for greedy decoding send temperature 0)",
            )),
            TopK::Count(k) => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
            TopK::Word(w) if w == "all" => Ok(None),
            TopK::Word(w) => Err(ApiError::invalid(format!("top_k '{w}': send a count of at least 1, or \"all\" for no limit"))),
        }
    }
}

/// Sampling and length fields both text endpoints share.
#[derive(Clone, Debug, Default, Deserialize)]
struct TextFields {
    max_tokens: Option<u32>,
    /// The newer name of `max_tokens` in chat.
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<TopK>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    /// How many choices: only 1.
    n: Option<u32>,
    /// llama-server's extension: keep generating past end-of-text (benchmarks).
    #[serde(default)]
    ignore_eos: bool,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias added to its logit.
    logit_bias: Option<BTreeMap<String, f32>>,
}

#[derive(Debug, Deserialize)]
struct CompletionFields {
    prompt: OneOrMany,
    /// How many top tokens to report at each position (the token itself always).
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
}

#[derive(Debug, Deserialize)]
struct ChatFields {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

/// The content of a chat message: a string, or parts of which the text ones are joined.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(expecting = "a content part {\"type\": \"text\", \"text\": ...}")]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a message {\"role\", \"content\"}")]
struct ChatMessage {
    role: String,
    content: Option<MessageContent>,
}

/// A text request's checked settings.
#[derive(Clone, Debug)]
pub struct TextOptions {
    /// `None`: as many as the session's context allows, up to the server's default.
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub adjust: LogitAdjustConfig,
    pub stop: Vec<String>,
    /// Report logprobs with this many top tokens at each position.
    pub logprobs: Option<usize>,
    /// Completions: the prompt comes first in the answer (with its logprobs when asked).
    pub echo: bool,
    pub stream: bool,
    pub ignore_eos: bool,
}

/// `POST /v1/completions`: the prompt and its settings.
pub fn completion(body: &[u8], seed: impl FnOnce() -> u64) -> Result<(String, TextOptions), ApiError> {
    let map = text_body(body, "/v1/completions", COMPLETION_FIELDS)?;
    let fields: CompletionFields = typed(map.clone())?;
    let mut prompts = fields.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::invalid("prompt must be one string (batches of prompts are separate requests here)"));
    }
    let logprobs = fields.logprobs.map(|n| top_count("logprobs", n)).transpose()?;
    let options = text_options(typed(map)?, logprobs, fields.echo, seed)?;
    Ok((prompts.remove(0), options))
}

/// `POST /v1/chat/completions`: the messages and their settings.
pub fn chat(body: &[u8], seed: impl FnOnce() -> u64) -> Result<(Vec<Message>, TextOptions), ApiError> {
    let mut map = text_body(body, "/v1/chat/completions", CHAT_FIELDS)?;
    if let Some(Value::Array(messages)) = map.get_mut("messages") {
        for m in messages.iter_mut().filter_map(Value::as_object_mut) {
            m.retain(|_, v| !v.is_null());
        }
    }
    let fields: ChatFields = typed(map.clone())?;
    if fields.messages.is_empty() {
        return Err(ApiError::invalid("messages must hold at least one message"));
    }
    let logprobs = match (fields.logprobs, fields.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::invalid("top_logprobs needs logprobs: true")),
        (false, None) => None,
        (true, n) => Some(top_count("top_logprobs", n.unwrap_or(0))?),
    };
    let messages = fields.messages.into_iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<Vec<_>, _>>()?;
    Ok((messages, text_options(typed(map)?, logprobs, false, seed)?))
}

/// A text body's members, the unknown and the unsupported refused by name.
fn text_body(body: &[u8], endpoint: &str, own: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let map = object(body)?;
    let known: Vec<&str> = TEXT_FIELDS.iter().chain(own).copied().collect();
    only_known(&map, endpoint, &known)?;
    for (field, value) in &map {
        let empty_list = value.as_array().is_some_and(Vec::is_empty);
        let refused = match field.as_str() {
            "tools" | "functions" if !empty_list => Some("tool and function calling are not supported by this server; leave it out"),
            "tool_choice" | "function_call" if value != "none" => {
                Some("tool and function calling are not supported by this server; leave it out")
            }
            "response_format" if value.get("type").and_then(Value::as_str) != Some("text") => {
                Some("only {\"type\": \"text\"}: this server cannot constrain its output to JSON; leave it out")
            }
            "best_of" if value != 1 => Some("must be 1: one completion is generated per request"),
            "suffix" if value != "" => Some("text after an insertion point is not supported; leave it out"),
            "modalities" if value.as_array().is_none_or(|m| m.iter().any(|x| x != "text")) => Some("only [\"text\"]"),
            _ => None,
        };
        if let Some(why) = refused {
            return Err(ApiError::unsupported(field, why));
        }
    }
    Ok(map)
}

fn top_count(field: &str, n: u32) -> Result<usize, ApiError> {
    if n as usize > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(format!("{field} {n}: at most {MAX_TOP_LOGPROBS}")));
    }
    Ok(n as usize)
}

/// A message with its role checked and its text parts joined.
fn message(i: usize, m: ChatMessage) -> Result<Message, ApiError> {
    let role = match m.role.as_str() {
        "system" | "user" | "assistant" => m.role,
        // OpenAI's newer name for the system's instructions.
        "developer" => "system".to_owned(),
        other => {
            return Err(ApiError::unsupported(
                &format!("messages[{i}].role"),
                format_args!("'{other}' is not supported; roles are system, developer, user and assistant (no tool calling)"),
            ))
        }
    };
    let content = match m.content {
        None => String::new(),
        Some(MessageContent::Text(t)) => t,
        Some(MessageContent::Parts(parts)) => {
            if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].content"),
                    format_args!("parts of type '{}' are not supported (text only)", p.kind),
                ));
            }
            parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
        }
    };
    Ok(Message { role, content })
}

/// Length, sampling and adjustment of a text request, checked.
fn text_options(f: TextFields, logprobs: Option<usize>, echo: bool, seed: impl FnOnce() -> u64) -> Result<TextOptions, ApiError> {
    if f.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n must be 1: one choice per request"));
    }
    let max_tokens = f.max_completion_tokens.or(f.max_tokens).map(|n| n as usize);
    if max_tokens == Some(0) && !echo {
        return Err(ApiError::invalid("max_tokens must be at least 1 (0 only with echo, to score the prompt)"));
    }
    let stop = f.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(format!("stop takes up to 4 non-empty strings of at most {MAX_STOP_BYTES} bytes")));
    }
    let sampler = SamplerConfig {
        temperature: f.temperature.unwrap_or(1.0),
        // OpenAI has no top_k: without it, every token stays.
        top_k: f.top_k.map(TopK::limit).transpose()?.flatten(),
        top_p: f.top_p.unwrap_or(1.0),
        seed: f.seed.unwrap_or_else(seed),
    };
    if !(0.0..=2.0).contains(&sampler.temperature) {
        return Err(ApiError::invalid(format!("temperature {} must be within 0..=2", sampler.temperature)));
    }
    sampler.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut logit_bias = Vec::new();
    for (key, bias) in f.logit_bias.unwrap_or_default() {
        let token = key
            .trim()
            .parse::<u32>()
            .map_err(|_| ApiError::invalid(format!("logit_bias keys are token ids such as \"1234\"; '{key}' is not one")))?;
        logit_bias.push((token, bias));
    }
    let adjust = LogitAdjustConfig {
        logit_bias,
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
    };
    // The ranges here; the ids against the vocabulary on the engine thread, which knows it.
    adjust.validate(usize::MAX).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(TextOptions { max_tokens, sampler, adjust, stop, logprobs, echo, stream: f.stream, ignore_eos: f.ignore_eos })
}

/// A voice: a name, or `{"id": name}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged, expecting = "a voice name or {\"id\": name}")]
pub enum VoiceField {
    Name(String),
    Id { id: String },
}

/// `POST /v1/audio/speech`, with the extensions a client sends through its extra body.
#[derive(Clone, Debug, Deserialize)]
pub struct SpeechRequest {
    pub input: String,
    pub voice: Option<VoiceField>,
    pub response_format: Option<String>,
    pub stream_format: Option<String>,
    pub speed: Option<f64>,
    pub seed: Option<u64>,
    pub temperature: Option<f32>,
    pub top_k: Option<TopK>,
    pub max_audio_ms: Option<u64>,
    /// Context turns said before the input (`[{"speaker", "text", "frames"}]`), after the voice's own.
    pub context: Option<Vec<ccsm::csm::Segment>>,
}

/// Speech's default `top_k` (CSM's).
const SPEECH_TOP_K: usize = 50;

impl SpeechRequest {
    /// The sampler's settings: CSM's defaults (temperature 0.9, top-k 50) unless given.
    pub fn sampler(&self, seed: impl FnOnce() -> u64) -> Result<SamplerConfig, ApiError> {
        let top_k = match self.top_k.clone() {
            None => Some(SPEECH_TOP_K),
            Some(k) => k.limit()?,
        };
        let config =
            SamplerConfig { temperature: self.temperature.unwrap_or(0.9), top_k, top_p: 1.0, seed: self.seed.unwrap_or_else(seed) };
        config.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(config)
    }
}

/// `POST /v1/audio/speech`'s body, the unknown and the unsupported fields refused by name.
pub fn speech(body: &[u8]) -> Result<SpeechRequest, ApiError> {
    let map = object(body)?;
    only_known(&map, "/v1/audio/speech", SPEECH_FIELDS)?;
    if let Some(instructions) = map.get("instructions").filter(|v| *v != "") {
        let what = if instructions.is_string() { "CSM takes no instructions" } else { describe(instructions) };
        return Err(ApiError::unsupported("instructions", format_args!("{what}; set the voice with voice or context instead")));
    }
    typed(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> String {
        completion(body.as_bytes(), || 1).unwrap_err().message
    }

    #[test]
    fn unsupported_fields_are_refused_by_name_and_harmless_ones_pass() {
        assert!(refused(r#"{"prompt": "x", "best_of": 2}"#).starts_with("best_of:"));
        assert!(refused(r#"{"prompt": "x", "suffix": "y"}"#).starts_with("suffix:"));
        assert!(refused(r#"{"prompt": "x", "min_p": 0.1}"#).starts_with("min_p:"));
        assert!(refused(r#"{"prompt": "x", "top_k": 0}"#).contains("\"all\""));
        assert!(refused(r#"{"prompt": "x", "logit_bias": {"a": 1}}"#).contains("token ids"));
        assert!(refused(r#"{"prompt": "x", "presence_penalty": 3}"#).contains("presence_penalty"));
        assert!(refused(r#"{"prompt": 5}"#).contains("prompt: "));
        assert!(!refused(r#"{"prompt": 5}"#).contains("OneOrMany"));
        let (_, o) =
            completion(br#"{"prompt": "x", "best_of": 1, "suffix": null, "user": "u", "top_k": "all", "logprobs": 3, "cache_prompt": false}"#, || 1)
                .unwrap();
        assert_eq!((o.sampler.top_k, o.logprobs), (None, Some(3)));
        let chat = |body: &str| super::chat(body.as_bytes(), || 1).map(|(m, o)| (m, o.logprobs)).map_err(|e| e.message);
        let user = r#""messages": [{"role": "user", "content": "hi", "name": null}]"#;
        assert!(chat(&format!(r#"{{{user}, "tools": [{{"type": "function"}}]}}"#)).unwrap_err().starts_with("tools:"));
        assert!(chat(&format!(r#"{{{user}, "response_format": {{"type": "json_object"}}}}"#)).unwrap_err().starts_with("response_format:"));
        assert!(chat(&format!(r#"{{{user}, "top_logprobs": 2}}"#)).unwrap_err().contains("logprobs: true"));
        assert!(chat(&format!(r#"{{{user}, "echo": true}}"#)).unwrap_err().starts_with("echo:"));
        assert!(chat(r#"{"messages": [{"role": "tool", "content": "x"}]}"#).unwrap_err().starts_with("messages[0].role:"));
        let (messages, logprobs) =
            chat(&format!(r#"{{{user}, "tools": [], "tool_choice": "none", "logprobs": true, "top_logprobs": 2}}"#)).unwrap();
        assert_eq!((messages[0].content.as_str(), logprobs), ("hi", Some(2)));
        assert_eq!(chat(r#"{"messages": [{"role": "developer", "content": "be brief"}]}"#).unwrap().0[0].role, "system");
        assert!(speech(br#"{"input": "hi", "instructions": "whisper"}"#).unwrap_err().message.starts_with("instructions:"));
        assert!(speech(br#"{"input": "hi", "instructions": ""}"#).is_ok());
    }
}
