//! The endpoints. Each API handler reads the raw body (so that every refusal is in OpenAI's
//! shape, 413 included), validates it into a [`ValidRequest`] and hands it to generation.

use super::AppState;
use super::error::ApiError;
use super::generation;
use super::openapi;
use super::protocol::{ModelCard, ModelList};
use super::validation::{self, ModelLimits, ValidRequest};
use crate::engine::{EngineHandle, TextCodec};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

type Body = Result<Bytes, BytesRejection>;

fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge {
                limit: state.max_body_bytes,
            }
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    })
}

async fn answer(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    arrived: Instant,
    validate: fn(&[u8], &AppState, &EngineHandle) -> Result<ValidRequest, ApiError>,
) -> Response {
    let checked = body_bytes(&state, body).and_then(|bytes| {
        let engine = state.engine()?;
        let request = validate(&bytes, &state, engine)?;
        let scheduling = validation::scheduling(&headers, state.default_max_wait)?;
        Ok((engine.clone(), request, scheduling))
    });
    match checked {
        Ok((engine, request, scheduling)) => {
            generation::respond(state, engine, request, scheduling, arrived).await
        }
        Err(e) => state.refuse(e),
    }
}

/// Parses the body as `R` and checks it with `rules`; fields no API defines are logged and
/// counted (or refused by `rules` under `--strict-request-fields`).
fn check<R: serde::de::DeserializeOwned>(
    bytes: &[u8],
    state: &AppState,
    engine: &EngineHandle,
    rules: fn(&R, &str, &TextCodec, ModelLimits, bool) -> Result<ValidRequest, ApiError>,
) -> Result<ValidRequest, ApiError> {
    let request = rules(
        &validation::parse(bytes)?,
        &state.served_name,
        &engine.codec,
        AppState::limits(engine),
        state.strict_request_fields,
    )?;
    if !request.ignored.is_empty() {
        tracing::warn!(
            fields = ?request.ignored,
            "the request has fields no API defines; they are ignored"
        );
        for field in &request.ignored {
            state.metrics.record_ignored_field(field);
        }
    }
    Ok(request)
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(
        state,
        headers,
        body,
        Instant::now(),
        |bytes, state, engine| check(bytes, state, engine, validation::completion),
    )
    .await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(
        state,
        headers,
        body,
        Instant::now(),
        |bytes, state, engine| check(bytes, state, engine, validation::chat),
    )
    .await
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    match state.engine() {
        Ok(engine) => Json(ModelList {
            object: "list",
            data: vec![ModelCard {
                id: state.served_name.clone(),
                object: "model",
                created: 0,
                owned_by: "parallax",
                max_model_len: engine.info.context_length,
            }],
        })
        .into_response(),
        Err(e) => state.refuse(e),
    }
}

/// Liveness: the process answers, and its engine (once loaded) still runs.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.get() {
        Some(engine) if !engine.is_running() => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "the engine stopped"})),
        )
            .into_response(),
        _ => Json(json!({"status": "ok"})).into_response(),
    }
}

/// Readiness: loaded, running, not shutting down and no GPU unhealthy; with each GPU's health
/// where it is watched (the operator reads it).
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let gpus = state.gpus().map(|g| json!(g.statuses()));
    match state.readiness() {
        Ok(()) => {
            let mut body = json!({"status": "ready"});
            if let Some(gpus) = gpus {
                body["gpus"] = gpus;
            }
            Json(body).into_response()
        }
        Err(why) => {
            let mut body = json!({"status": why});
            if let Some(download) = state.download_now() {
                body["download"] = json!(download);
            }
            if let Some(gpus) = gpus {
                body["gpus"] = gpus;
            }
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format otherwise.
pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (text, content_type) = state.metrics.encode(openmetrics);
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

pub async fn openapi() -> Response {
    Json(openapi::document()).into_response()
}

pub async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {
            "message": format!("no route {}", uri.path()),
            "type": "invalid_request_error",
            "param": null,
            "code": "not_found",
        }})),
    )
        .into_response()
}
