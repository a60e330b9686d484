//! What every request passes before a handler sees it: the `Host` it is addressed to (DNS rebinding),
//! the API key, a JSON body declared as JSON and read within a deadline; and the outcome counted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use crate::api::ApiError;
use crate::app::{Shared, MAX_BODY_BYTES};

/// Refuses requests addressed to a name the server does not answer to (403).
pub async fn check_host(State(state): State<Shared>, request: Request, next: Next) -> Response {
    // An absolute-form URI's authority wins over the Host header (RFC 9112 §3.2.2).
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    // A request without a Host did not come from a browser.
    if let Some(host) = host.filter(|h| !state.hosts.allows(h)) {
        return ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", "host_not_allowed", state.hosts.refusal(&host))
            .into_response();
    }
    next.run(request).await
}

/// Equal strings, in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn authenticate(State(state): State<Shared>, request: Request, next: Next) -> Response {
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

/// Counts the outcome of a request answered with an error status: 429 and 503 as `rejected` (come back
/// later), other 4xx as `invalid`, on every path (a 401 on `/metrics` too); `/health`'s own 503 is its
/// answer (not ready yet), not a refusal. Successes, failures during generation and cancellations are
/// counted by the engine, which sees how they end; hyper's own 400/414/431 by the listener.
pub async fn count_outcome(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let health = request.uri().path() == "/health";
    let response = next.run(request).await;
    let counter = match response.status() {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE if !health => Some(&state.metrics.requests_rejected),
        s if s.is_client_error() => Some(&state.metrics.requests_invalid),
        _ => None,
    };
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::Relaxed);
    }
    response
}

/// A request body declared as JSON (`Content-Type: application/json`), at most `MAX` bytes, read whole
/// within the body deadline. Browsers send `text/plain` and form bodies to any server without asking
/// it first; JSON they send only after a CORS preflight this server never grants.
pub struct JsonBody<const MAX: usize = MAX_BODY_BYTES>(pub Bytes);

impl<const MAX: usize> FromRequest<Shared> for JsonBody<MAX> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, ApiError> {
        let declared = request.headers().get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let essence = declared.as_deref().and_then(|v| v.split(';').next()).map(|v| v.trim().to_ascii_lowercase());
        if essence.as_deref() != Some("application/json") {
            let got = declared.map_or("none".to_owned(), |d| format!("'{}'", d.chars().take(100).collect::<String>()));
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                format!("send the body as JSON with Content-Type: application/json (the request's Content-Type: {got})"),
            ));
        }
        read_body(request, MAX, state.body_timeout).await.map(JsonBody)
    }
}

/// The body, at most `max` bytes, arrived within `deadline` of its start.
async fn read_body(request: Request, max: usize, deadline: Duration) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(request.into_body(), max);
    match tokio::time::timeout(deadline, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("the request body is larger than {max} bytes, this endpoint's limit"),
        )),
        Ok(Err(e)) => Err(ApiError::invalid(format!("cannot read the request body: {e}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "body_timeout",
            format!("the request body did not arrive within {} s (--body-timeout)", deadline.as_secs_f64()),
        )),
    }
}
