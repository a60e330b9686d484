//! The server's error shape, OpenAI's `{"error": {"message", "type", "code"}}`, and the JSON body
//! parsing every endpoint shares: an object, `null` members taken as not given, fields named in errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

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

    /// 400 for a field this server does not honour.
    pub fn unsupported(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "unsupported_parameter", format!("{field}: {message}"))
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

/// A request body: a JSON object whose `null` members are dropped (`null` means "not given", as
/// OpenAI's clients send it for unset fields).
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not a valid request: it is not valid JSON ({e})")))?;
    match value {
        Value::Object(mut map) => {
            map.retain(|_, v| !v.is_null());
            Ok(map)
        }
        other => Err(ApiError::invalid(format!("the request body must be a JSON object, not {}", describe(&other)))),
    }
}

/// Refuses the members of `map` not in `known`, naming the first and listing what the endpoint takes.
pub fn only_known(map: &Map<String, Value>, endpoint: &str, known: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(field) => {
            Err(ApiError::unsupported(field, format_args!("unknown or unsupported field for {endpoint}; it takes {}", known.join(", "))))
        }
        None => Ok(()),
    }
}

/// The typed request of a checked body; a value of the wrong type is a 400 naming its field.
pub fn typed<T: serde::de::DeserializeOwned>(map: Map<String, Value>) -> Result<T, ApiError> {
    typed_at("", Value::Object(map))
}

/// Takes member `field` out of `map`, typed (`None` when absent): each member is deserialized once, by
/// value, so a body is never copied.
pub fn take<T: serde::de::DeserializeOwned>(map: &mut Map<String, Value>, field: &str) -> Result<Option<T>, ApiError> {
    map.remove(field).map(|v| typed_at(field, v)).transpose()
}

/// `value` as a `T`; an error names where in it (after `field`) the wrong value is.
fn typed_at<T: serde::de::DeserializeOwned>(field: &str, value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match inner.as_str() {
            "." => field.to_owned(),
            p if p.starts_with('[') || field.is_empty() => format!("{field}{p}"),
            p => format!("{field}.{p}"),
        };
        let message = humane(&e.into_inner().to_string());
        ApiError::invalid(if path.is_empty() { message } else { format!("{path}: {message}") })
    })
}

/// serde's words for the expected kinds of values, in the API's terms rather than Rust's (an integer
/// type's name becomes its range, which is what a client can act on).
fn humane(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, plain) in [
        ("expected u32", "expected a whole number from 0 to 4294967295".to_owned()),
        ("expected u64", format!("expected a whole number from 0 to {}", u64::MAX)),
        ("expected f32", "expected a number".to_owned()),
        ("expected f64", "expected a number".to_owned()),
        ("expected a sequence", "expected a list".to_owned()),
        ("expected a map", "expected an object".to_owned()),
        ("invalid type: sequence", "invalid type: list".to_owned()),
        ("invalid type: map", "invalid type: object".to_owned()),
    ] {
        m = m.replace(rust, &plain);
    }
    m
}

/// "a string", "a list", ... for messages.
pub fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Probe {
        n: Option<u32>,
        list: Option<Vec<String>>,
    }

    #[test]
    fn errors_name_the_field_in_the_apis_words() {
        let e = typed::<Probe>(object(br#"{"n": -1, "list": null}"#).unwrap()).unwrap_err();
        assert_eq!(e.message, "n: invalid value: integer `-1`, expected a whole number from 0 to 4294967295");
        // Out of range the other way: the message must not claim the number is negative.
        let e = typed::<Probe>(object(br#"{"n": 5000000000}"#).unwrap()).unwrap_err();
        assert_eq!(e.message, "n: invalid value: integer `5000000000`, expected a whole number from 0 to 4294967295");
        let mut map = object(br#"{"list": ["a", {}], "n": 2}"#).unwrap();
        let e = take::<Vec<String>>(&mut map, "list").unwrap_err();
        assert_eq!(e.message, "list[1]: invalid type: object, expected a string");
        assert_eq!(take::<u32>(&mut map, "n").unwrap(), Some(2));
        assert!(map.is_empty(), "taken members leave the map");
        let e = typed::<Probe>(object(br#"{"list": ["a", 5]}"#).unwrap()).unwrap_err();
        assert!(e.message.starts_with("list[1]: invalid type: integer `5`"), "{}", e.message);
        assert!(object(b"[1]").unwrap_err().message.contains("must be a JSON object, not a list"));
        let map = object(br#"{"n": 1, "min_p": 0.1}"#).unwrap();
        let e = only_known(&map, "/v1/completions", &["n"]).unwrap_err();
        assert!(e.message.starts_with("min_p: unknown or unsupported field for /v1/completions"), "{}", e.message);
    }
}
