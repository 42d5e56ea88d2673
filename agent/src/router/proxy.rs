//! Forwarding one request: read its body (to send it again if a group refuses), pick a group,
//! send, and pass the answer back as it streams; a refusal before the request started (429,
//! 503) or no connection sends it to the next group, at most `max_attempts` in all.

use super::RouterState;
use super::affinity::chunk_keys;
use super::members::lock;
use super::metrics::Outcome;
use super::policy::{Pick, Priority, RequestKey};
use crate::server::error::{error_body, error_response};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

/// Names the group that answered, for clients and tests.
pub const GROUP_HEADER: &str = "x-parallax-group";

/// Why the router answered a request itself.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error(
        "every group of the pool is saturated; low-priority requests are shed until one has room"
    )]
    Saturated,
    #[error("no group of the pool is ready to take requests (waited {waited_s} s)")]
    NoGroup { waited_s: u64 },
    #[error("no group could take the request: {0}")]
    Exhausted(String),
}

impl RouteError {
    fn code(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Saturated => "saturated",
            Self::NoGroup { .. } => "no_group",
            Self::Exhausted(_) => "exhausted",
        }
    }
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        let (status, retry_after) = match self {
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, None),
            Self::Saturated => (StatusCode::TOO_MANY_REQUESTS, Some(1)),
            Self::NoGroup { .. } | Self::Exhausted(_) => (StatusCode::SERVICE_UNAVAILABLE, Some(5)),
        };
        let body = error_body(status, self.to_string(), None, self.code());
        error_response(status, body, retry_after)
    }
}

/// Headers that belong to one connection, not to the request or answer.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    for name in HOP_BY_HOP {
        kept.remove(name);
    }
    kept.remove(header::HOST);
    kept.remove(header::CONTENT_LENGTH);
    kept
}

/// What the policy needs of a request: its priority header and its prompt's chunk keys.
fn request_key(headers: &HeaderMap, body: &[u8]) -> RequestKey {
    let priority = match headers
        .get("x-request-priority")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("high") => Priority::High,
        Some("low") => Priority::Low,
        _ => Priority::Medium,
    };
    let chunks = match serde_json::from_slice::<Value>(body) {
        Ok(json) => {
            let model = json.get("model").and_then(Value::as_str).unwrap_or("");
            chunk_keys(model, &prompt_text(&json))
        }
        Err(_) => Vec::new(),
    };
    RequestKey { chunks, priority }
}

/// The text a request's prompt starts with: a chat's messages (role and text of each) or a
/// completion's first prompt (text, or token ids as bytes).
fn prompt_text(json: &Value) -> Vec<u8> {
    let mut text = Vec::new();
    if let Some(messages) = json.get("messages").and_then(Value::as_array) {
        for message in messages {
            if let Some(role) = message.get("role").and_then(Value::as_str) {
                text.extend_from_slice(role.as_bytes());
                text.push(b'\n');
            }
            match message.get("content") {
                Some(Value::String(content)) => text.extend_from_slice(content.as_bytes()),
                Some(Value::Array(parts)) => {
                    for part in parts.iter().filter_map(|p| p.get("text")?.as_str()) {
                        text.extend_from_slice(part.as_bytes());
                    }
                }
                _ => {}
            }
            text.push(b'\n');
        }
        return text;
    }
    let prompt = match json.get("prompt") {
        Some(Value::Array(prompts)) if prompts.first().is_some_and(|p| !p.is_number()) => {
            prompts.first()
        }
        other => other,
    };
    match prompt {
        Some(Value::String(prompt)) => text.extend_from_slice(prompt.as_bytes()),
        Some(Value::Array(ids)) => {
            for id in ids.iter().filter_map(Value::as_u64) {
                text.extend_from_slice(&(id as u32).to_le_bytes());
            }
        }
        _ => {}
    }
    text
}

/// A request on a group until dropped: the answer's stream carries it to its end.
#[derive(Debug)]
struct InFlight {
    state: Arc<RouterState>,
    url: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.state.groups).finished(&self.url);
    }
}

/// One attempt's result.
enum Attempt {
    /// The answer to pass back.
    Answer(Response),
    /// Refused before starting, or unreachable: the next group may take it. The refusal, if
    /// any, is passed back when no other group can.
    Next(Option<Response>, String),
}

pub async fn forward(State(state): State<Arc<RouterState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let limit = state.config.max_body_bytes;
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        state.metrics.rejected("body_too_large");
        return RouteError::BodyTooLarge { limit }.into_response();
    };
    let key = request_key(&parts.headers, &body);
    let arrived = Instant::now();
    let mut tried: Vec<String> = Vec::new();
    let mut refusal: Option<Response> = None;
    let mut why = String::from("every group refused it");
    while tried.len() < state.config.max_attempts {
        let pick = lock(&state.groups).pick(Instant::now(), &key, &tried);
        let (url, reason) = match pick {
            Pick::Group { url, reason } => (url, reason),
            Pick::Shed => {
                state.metrics.rejected("saturated");
                return RouteError::Saturated.into_response();
            }
            Pick::Nothing if tried.is_empty() => {
                if hold(&state, arrived).await {
                    continue;
                }
                state.metrics.rejected("no_group");
                let waited_s = arrived.elapsed().as_secs();
                return RouteError::NoGroup { waited_s }.into_response();
            }
            Pick::Nothing => break,
        };
        state.metrics.picked(reason.label());
        if !tried.is_empty() {
            state.metrics.retried();
        }
        tried.push(url.clone());
        let guard = InFlight {
            state: state.clone(),
            url: url.clone(),
        };
        match attempt(&state, guard, &parts, body.clone()).await {
            Attempt::Answer(response) => return response,
            Attempt::Next(answer, reason) => {
                refusal = answer.or(refusal);
                why = reason;
            }
        }
    }
    match refusal {
        Some(response) => response,
        None => {
            state.metrics.rejected("exhausted");
            RouteError::Exhausted(why).into_response()
        }
    }
}

/// Holds a request no group can take until one can (true) or the hold times out.
async fn hold(state: &RouterState, arrived: Instant) -> bool {
    let deadline = arrived + state.config.hold_timeout;
    let _held = state.metrics.hold();
    let mut changes = state.changes.subscribe();
    loop {
        if state.available() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, changes.changed()).await {
            Ok(Ok(())) => {}
            _ => return state.available(),
        }
    }
}

/// Sends the request to `guard`'s group.
async fn attempt(
    state: &Arc<RouterState>,
    guard: InFlight,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Attempt {
    let url = guard.url.clone();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let sent = state
        .client
        .request(parts.method.clone(), format!("{url}{path}"))
        .headers(end_to_end(&parts.headers))
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(group = %url, "the group could not be reached: {e}");
            state.metrics.attempt(&url, Outcome::Unreachable);
            if lock(&state.groups).outcome(Instant::now(), &url, false) {
                tracing::warn!(group = %url, "circuit breaker opened");
            }
            return Attempt::Next(None, format!("{url} could not be reached"));
        }
    };
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        state.metrics.attempt(&url, Outcome::Refused);
        {
            // It answered: reachable, so its breaker is satisfied (a trial included).
            let mut groups = lock(&state.groups);
            groups.outcome(Instant::now(), &url, true);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                groups.unready(&url);
            }
        }
        tracing::debug!(group = %url, %status, "the group refused; trying another");
        let answer = buffered(response, &url).await;
        return Attempt::Next(answer, format!("{url} answered {status}"));
    }
    let failed = status.is_server_error();
    state.metrics.attempt(
        &url,
        if failed {
            Outcome::Failed
        } else {
            Outcome::Answered
        },
    );
    // Only a failing group counts against its breaker: a 504 (a request that waited past its
    // deadline in a busy queue) or a 501 says nothing of its health, and a breaker opened on
    // a busy group would pour its load onto the others.
    let broken = matches!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR | StatusCode::BAD_GATEWAY
    );
    if lock(&state.groups).outcome(Instant::now(), &url, !broken) {
        tracing::warn!(group = %url, %status, "circuit breaker opened");
    }
    Attempt::Answer(streamed(response, guard))
}

/// The group's answer as it streams, holding the request's place on the group until its end.
fn streamed(response: reqwest::Response, guard: InFlight) -> Response {
    let mut answer = Response::builder().status(response.status());
    if let Some(headers) = answer.headers_mut() {
        *headers = end_to_end(response.headers());
        if let Ok(value) = HeaderValue::from_str(&guard.url) {
            headers.insert(GROUP_HEADER, value);
        }
    }
    let stream = response.bytes_stream().map(move |chunk| {
        let _on_the_group = &guard;
        chunk
    });
    answer
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| RouteError::Exhausted(e.to_string()).into_response())
}

/// A refusal read whole, to pass back if no other group takes the request.
async fn buffered(response: reqwest::Response, url: &str) -> Option<Response> {
    let status = response.status();
    let mut headers = end_to_end(response.headers());
    let body = response.bytes().await.ok()?;
    if let Ok(value) = HeaderValue::from_str(url) {
        headers.insert(GROUP_HEADER, value);
    }
    let mut answer = Response::new(Body::from(body));
    *answer.status_mut() = status;
    *answer.headers_mut() = headers;
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_text_of_chats_and_completions() {
        let chat = serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        ]});
        assert_eq!(prompt_text(&chat), b"system\nBe brief.\nuser\nHi!\n");
        let text = serde_json::json!({"prompt": ["first", "second"]});
        assert_eq!(prompt_text(&text), b"first");
        let ids = serde_json::json!({"prompt": [1, 258]});
        assert_eq!(prompt_text(&ids), [1, 0, 0, 0, 2, 1, 0, 0]);
        let nested = serde_json::json!({"prompt": [[7]]});
        assert_eq!(prompt_text(&nested), [7, 0, 0, 0]);
    }

    #[test]
    fn priority_comes_from_its_header_and_defaults_to_medium() {
        let mut headers = HeaderMap::new();
        assert_eq!(request_key(&headers, b"{}").priority, Priority::Medium);
        headers.insert("x-request-priority", HeaderValue::from_static("LOW"));
        assert_eq!(request_key(&headers, b"not json").priority, Priority::Low);
        headers.insert("x-request-priority", HeaderValue::from_static("high"));
        assert_eq!(request_key(&headers, b"").priority, Priority::High);
    }
}
