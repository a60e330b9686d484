//! The routes: OpenAI's speech, completions and chat endpoints (`speech_api`, `text_api`), models,
//! voices, health and metrics. Handlers check a request, hand it to the engine thread as a job and
//! stream back what the job's channel carries; a client that goes away drops its channel, which the
//! engine sees within a step.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::api::ApiError;
use crate::guards::{self};

use crate::app::{Engine, Shared};

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/audio/voices", get(voices))
        .route("/v1/audio/speech", post(crate::speech_api::speech))
        .route("/v1/completions", post(crate::text_api::completions))
        .route("/v1/chat/completions", post(crate::text_api::chat))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), guards::authenticate));
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
        .layer(middleware::from_fn_with_state(state.clone(), guards::check_host))
        // Outermost, so that every refusal of an API request is counted, the Host's included.
        .layer(middleware::from_fn_with_state(state.clone(), guards::count_outcome))
        .with_state(state)
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
    let named = state
        .voices
        .iter()
        .map(|(name, v)| json!({ "id": name, "speaker": v.speaker, "context_turns": v.context.len(), "seconds": v.seconds }));
    Json(json!({
        "voices": named.collect::<Vec<_>>(),
        "speaker_ids": "any whole number is a speaker id (\"0\", \"1\", ...); CSM keeps a voice steady only with context turns",
    }))
    .into_response()
}
