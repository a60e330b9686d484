//! The requests of OpenAI's completions, chat and speech APIs as this server takes them: the fields each
//! endpoint honours, the ones it refuses by name (a field answered 200 but ignored would be a lie), and
//! the checked settings a job is made of.

use std::collections::BTreeMap;

use ccsm::chat::Message;
use ccsm::sampling::{LogitAdjustConfig, SamplerConfig, MAX_TOP_LOGPROBS};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::{describe, object, only_known, take, typed, ApiError};

/// Longest stop sequence, in bytes.
const MAX_STOP_BYTES: usize = 256;
/// Longest text prompt (all messages together), in bytes.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Most messages in a chat: each one is rendered and marked on its own.
pub const MAX_MESSAGES: usize = 4096;
/// Bytes a message counts for beyond its role and content (what a template writes around each), so
/// that many empty messages cost as much as their rendering does.
const MESSAGE_OVERHEAD_BYTES: usize = 32;

/// Fields both text endpoints take. `model`, `user`, `metadata`, `store` and `service_tier` change
/// nothing here and are accepted as such (their types checked), as is llama-server's `cache_prompt` (a
/// hint to reuse a cached prompt, which changes no answer: clients written for llama-server send it).
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
    "conversation",
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

/// Sampling and length fields both text endpoints share (the body's members left once the endpoint's
/// own and the no-op ones are taken out).
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

/// `stream_options`: whether the last chunk carries the usage (it does unless told not to).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {\"include_usage\": true or false}")]
struct StreamOptions {
    include_usage: Option<bool>,
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
    /// Streamed: the last chunk carries the usage (`stream_options.include_usage`, true unless false).
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// `POST /v1/completions`: the prompt and its settings (`vocab`: the model's, for `logit_bias`).
pub fn completion(body: &[u8], vocab: usize, seed: impl FnOnce() -> u64) -> Result<(String, TextOptions), ApiError> {
    let mut map = text_body(body, "/v1/completions", COMPLETION_FIELDS)?;
    let prompt = take::<OneOrMany>(&mut map, "prompt")?.ok_or_else(|| ApiError::invalid("prompt is required"))?;
    let mut prompts = prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::invalid("prompt must be one string (batches of prompts are separate requests here)"));
    }
    let prompt = prompts.remove(0);
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::invalid(format!("the prompt has {} bytes; at most {MAX_PROMPT_BYTES}", prompt.len())));
    }
    let logprobs = take::<u32>(&mut map, "logprobs")?.map(|n| top_count("logprobs", n)).transpose()?;
    let echo = take::<bool>(&mut map, "echo")?.unwrap_or(false);
    let options = text_options(map, vocab, logprobs, echo, seed)?;
    Ok((prompt, options))
}

/// `POST /v1/chat/completions`: the messages and their settings (`vocab`: the model's, for `logit_bias`).
pub fn chat(body: &[u8], vocab: usize, seed: impl FnOnce() -> u64) -> Result<(Vec<Message>, TextOptions), ApiError> {
    let mut map = text_body(body, "/v1/chat/completions", CHAT_FIELDS)?;
    if let Some(Value::Array(messages)) = map.get_mut("messages") {
        // Counted before any is read: rendering and marking work per message.
        if messages.len() > MAX_MESSAGES {
            return Err(ApiError::invalid(format!("messages has {} messages; at most {MAX_MESSAGES}", messages.len())));
        }
        for m in messages.iter_mut().filter_map(Value::as_object_mut) {
            m.retain(|_, v| !v.is_null());
        }
    }
    let messages = take::<Vec<ChatMessage>>(&mut map, "messages")?.ok_or_else(|| ApiError::invalid("messages is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must hold at least one message"));
    }
    let messages = messages.into_iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<Vec<_>, _>>()?;
    let bytes: usize = messages.iter().map(|m| m.content.len() + m.role.len() + MESSAGE_OVERHEAD_BYTES).sum();
    if bytes > MAX_PROMPT_BYTES {
        return Err(ApiError::invalid(format!(
            "the messages count for {bytes} bytes ({MESSAGE_OVERHEAD_BYTES} per message besides its role and content); at most {MAX_PROMPT_BYTES}"
        )));
    }
    let logprobs = match (take::<bool>(&mut map, "logprobs")?.unwrap_or(false), take::<u32>(&mut map, "top_logprobs")?) {
        (false, Some(_)) => return Err(ApiError::invalid("top_logprobs needs logprobs: true")),
        (false, None) => None,
        (true, n) => Some(top_count("top_logprobs", n.unwrap_or(0))?),
    };
    take::<bool>(&mut map, "parallel_tool_calls")?;
    Ok((messages, text_options(map, vocab, logprobs, false, seed)?))
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
                format_args!("'{}' is not supported; roles are system, developer, user and assistant (no tool calling)", shown(other)),
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
                    format_args!("parts of type '{}' are not supported (text only)", shown(&p.kind)),
                ));
            }
            parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
        }
    };
    Ok(Message { role, content })
}

/// A client's string as an error message quotes it: printable, and short.
fn shown(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Checks the types of the fields that change nothing (a wrong one is refused rather than silently
/// accepted); `stream_options.include_usage`, which changes the last chunk.
fn no_op_fields(map: &mut Map<String, Value>) -> Result<bool, ApiError> {
    for field in ["model", "user", "service_tier"] {
        take::<String>(map, field)?;
    }
    for field in ["store", "cache_prompt"] {
        take::<bool>(map, field)?;
    }
    take::<BTreeMap<String, String>>(map, "metadata")?;
    Ok(take::<StreamOptions>(map, "stream_options")?.and_then(|o| o.include_usage).unwrap_or(true))
}

/// A `logit_bias` key: a token id in plain decimal. Other spellings of the same number (`"01"`, `"+1"`,
/// `" 1"`) are refused, so that no id can be named twice. One past `u32` is past every vocabulary.
fn token_id(key: &str) -> Option<u32> {
    let canonical = !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) && (key == "0" || !key.starts_with('0'));
    canonical.then(|| key.parse().unwrap_or(u32::MAX))
}

/// Length, sampling and adjustment of a text request, checked; `map`: the body's members not taken yet.
fn text_options(
    mut map: Map<String, Value>,
    vocab: usize,
    logprobs: Option<usize>,
    echo: bool,
    seed: impl FnOnce() -> u64,
) -> Result<TextOptions, ApiError> {
    let include_usage = no_op_fields(&mut map)?;
    let f: TextFields = typed(map)?;
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
        let token = token_id(&key).ok_or_else(|| {
            ApiError::invalid(format!(
                "logit_bias keys are token ids in plain decimal, such as \"1234\" (no sign, space or leading zero); '{}' is not one",
                shown(&key)
            ))
        })?;
        logit_bias.push((token, bias));
    }
    let presence = f.presence_penalty.unwrap_or(0.0);
    let frequency = f.frequency_penalty.unwrap_or(0.0);
    let adjust = LogitAdjustConfig::new(logit_bias, presence, frequency, vocab).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(TextOptions { max_tokens, sampler, adjust, stop, logprobs, echo, stream: f.stream, include_usage, ignore_eos: f.ignore_eos })
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
    /// A conversation id the client picks (an extension): the turn continues that conversation (its
    /// earlier turns, with the frames they were said with, are the context before this request's),
    /// and is added to it.
    pub conversation: Option<String>,
}

/// Speech's default `top_k` (CSM's).
impl SpeechRequest {
    /// The sampler's settings: CSM's defaults (temperature 0.9, top-k 50) unless given.
    pub fn sampler(&self, seed: impl FnOnce() -> u64) -> Result<SamplerConfig, ApiError> {
        let defaults = SamplerConfig::csm(self.seed.unwrap_or_else(seed));
        let top_k = match self.top_k.clone() {
            None => defaults.top_k,
            Some(k) => k.limit()?,
        };
        let config = SamplerConfig { temperature: self.temperature.unwrap_or(defaults.temperature), top_k, ..defaults };
        config.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(config)
    }
}

/// `POST /v1/audio/speech`'s body, the unknown and the unsupported fields refused by name.
pub fn speech(body: &[u8]) -> Result<SpeechRequest, ApiError> {
    let mut map = object(body)?;
    only_known(&map, "/v1/audio/speech", SPEECH_FIELDS)?;
    take::<String>(&mut map, "model")?;
    if let Some(instructions) = map.get("instructions").filter(|v| *v != "") {
        let what = if instructions.is_string() { "CSM takes no instructions" } else { describe(instructions) };
        return Err(ApiError::unsupported("instructions", format_args!("{what}; set the voice with voice or context instead")));
    }
    typed(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: usize = 1000;

    fn refused(body: &str) -> String {
        completion(body.as_bytes(), VOCAB, || 1).unwrap_err().message
    }

    fn options(body: &str) -> TextOptions {
        completion(body.as_bytes(), VOCAB, || 1).unwrap_or_else(|e| panic!("{body}: {}", e.message)).1
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
        assert_eq!(refused(r#"{"max_tokens": 5}"#), "prompt is required");
        let o =
            options(r#"{"prompt": "x", "best_of": 1, "suffix": null, "user": "u", "top_k": "all", "logprobs": 3, "cache_prompt": false}"#);
        assert_eq!((o.sampler.top_k, o.logprobs), (None, Some(3)));
        let chat = |body: &str| super::chat(body.as_bytes(), VOCAB, || 1).map(|(m, o)| (m, o.logprobs)).map_err(|e| e.message);
        let user = r#""messages": [{"role": "user", "content": "hi", "name": null}]"#;
        assert!(chat(&format!(r#"{{{user}, "tools": [{{"type": "function"}}]}}"#)).unwrap_err().starts_with("tools:"));
        assert!(chat(&format!(r#"{{{user}, "response_format": {{"type": "json_object"}}}}"#)).unwrap_err().starts_with("response_format:"));
        assert!(chat(&format!(r#"{{{user}, "top_logprobs": 2}}"#)).unwrap_err().contains("logprobs: true"));
        assert!(chat(&format!(r#"{{{user}, "echo": true}}"#)).unwrap_err().starts_with("echo:"));
        assert!(chat(r#"{"messages": [{"role": "tool", "content": "x"}]}"#).unwrap_err().starts_with("messages[0].role:"));
        assert!(chat(r#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err().starts_with("messages[0].content:"));
        let (messages, logprobs) =
            chat(&format!(r#"{{{user}, "tools": [], "tool_choice": "none", "logprobs": true, "top_logprobs": 2}}"#)).unwrap();
        assert_eq!((messages[0].content.as_str(), logprobs), ("hi", Some(2)));
        assert_eq!(chat(r#"{"messages": [{"role": "developer", "content": "be brief"}]}"#).unwrap().0[0].role, "system");
        assert!(speech(br#"{"input": "hi", "instructions": "whisper"}"#).unwrap_err().message.starts_with("instructions:"));
        assert!(speech(br#"{"input": "hi", "instructions": ""}"#).is_ok());
        assert!(speech(br#"{"input": "hi", "model": 1}"#).unwrap_err().message.starts_with("model:"));
    }

    #[test]
    fn fields_that_change_nothing_still_have_types() {
        for (field, value) in [
            ("stream_options", "true"),
            ("stream_options", r#"{"include_usage": "yes"}"#),
            ("stream_options", r#"{"obfuscate": true}"#),
            ("metadata", r#"["a"]"#),
            ("metadata", r#"{"k": 1}"#),
            ("cache_prompt", r#""yes""#),
            ("store", "1"),
            ("user", "5"),
            ("model", "{}"),
            ("service_tier", "[]"),
        ] {
            let message = refused(&format!(r#"{{"prompt": "x", "{field}": {value}}}"#));
            assert!(message.starts_with(field), "{field}: {value}: {message}");
        }
        let o = options(r#"{"prompt": "x", "metadata": {"k": "v"}, "store": false, "model": "m", "service_tier": "auto"}"#);
        assert!(o.include_usage);
        assert!(options(r#"{"prompt": "x", "stream": true, "stream_options": {"include_usage": true}}"#).include_usage);
        assert!(!options(r#"{"prompt": "x", "stream": true, "stream_options": {"include_usage": false}}"#).include_usage);
        assert!(options(r#"{"prompt": "x", "stream_options": {}}"#).include_usage);
    }

    #[test]
    fn logit_bias_names_each_token_once_in_plain_decimal() {
        for key in ["01", "+1", " 1", "1 ", "-1", "1.0", "", "0x1", "١", "00"] {
            let message = refused(&format!(r#"{{"prompt": "x", "logit_bias": {{"{key}": 5}}}}"#));
            assert!(message.contains("plain decimal"), "{key:?}: {message}");
        }
        let o = options(r#"{"prompt": "x", "logit_bias": {"0": -100, "1": 100, "999": 1.5}}"#);
        assert_eq!(o.adjust.logit_bias(), &[(0, -100.0), (1, 100.0), (999, 1.5)]);
        // A repeated key is one entry (JSON objects keep the last), never two biases added up.
        assert_eq!(options(r#"{"prompt": "x", "logit_bias": {"1": 100, "1": 100}}"#).adjust.logit_bias(), &[(1, 100.0)]);
        assert!(refused(r#"{"prompt": "x", "logit_bias": {"1000": 1}}"#).contains("vocabulary of 1000"));
        assert!(refused(r#"{"prompt": "x", "logit_bias": {"99999999999999999999": 1}}"#).contains("vocabulary of 1000"));
        let many = |n: usize| {
            let entries: Vec<String> = (0..n).map(|t| format!(r#""{t}": 1"#)).collect();
            format!(r#"{{"prompt": "x", "logit_bias": {{{}}}}}"#, entries.join(", "))
        };
        assert_eq!(options(&many(300)).adjust.logit_bias().len(), 300);
        assert!(refused(&many(301)).contains("at most 300"));
    }

    #[test]
    fn a_chat_is_bounded_by_its_messages_and_their_bytes() {
        let empty = |n: usize| format!(r#"{{"messages": [{}]}}"#, vec![r#"{"role": "user"}"#; n].join(","));
        assert!(super::chat(empty(MAX_MESSAGES).as_bytes(), VOCAB, || 1).is_ok());
        let message = super::chat(empty(MAX_MESSAGES + 1).as_bytes(), VOCAB, || 1).unwrap_err().message;
        assert!(message.contains("at most 4096"), "{message}");
        // Each message counts for its overhead as well as its text.
        let content = "a".repeat(MAX_PROMPT_BYTES / 2 - 100);
        let two = format!(r#"{{"messages": [{{"role": "user", "content": "{content}"}}, {{"role": "user", "content": "{content}"}}]}}"#);
        assert!(super::chat(two.as_bytes(), VOCAB, || 1).is_ok());
        let mut many = vec![format!(r#"{{"role": "user", "content": "{content}"}}"#); 2];
        many.extend(vec![r#"{"role": "user"}"#.to_owned(); 10]);
        let message = super::chat(format!(r#"{{"messages": [{}]}}"#, many.join(",")).as_bytes(), VOCAB, || 1).unwrap_err().message;
        assert!(message.contains("per message"), "{message}");
    }
}
