//! Why a request is refused or fails: one variant per rule, one mapping to an HTTP status and
//! OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).

use super::protocol::{ErrorBody, ErrorResponse};
use crate::engine::EngineError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),

    #[error("{param}: {message}")]
    WrongType { param: String, message: String },

    #[error("unrecognized request argument supplied: {0}")]
    UnknownField(String),

    #[error("{param}: {message}")]
    OutOfRange {
        param: &'static str,
        message: String,
    },

    #[error("{param}: {message}")]
    Unsupported { param: String, message: String },

    #[error(
        "this model's maximum context length is {context} tokens; the request has {prompt} prompt tokens and max_tokens {max_tokens} ({} in all)",
        prompt + max_tokens
    )]
    ContextExceeded {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },

    #[error("the model `{0}` does not exist")]
    UnknownModel(String),

    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },

    #[error("header {header}: {message}")]
    BadHeader {
        header: &'static str,
        message: String,
    },

    #[error("the server is overloaded ({reason}); retry after {retry_after} s")]
    Overloaded {
        reason: &'static str,
        retry_after: u64,
    },

    #[error("the request waited {waited_ms} ms, past its X-Request-Timeout, before it could start")]
    QueueTimeout { waited_ms: u64 },

    #[error("the model is still loading")]
    Loading,

    /// This pod is a tensor-parallel worker: its group's leader serves requests.
    #[error("{0}")]
    NotLeader(String),

    #[error("the server is shutting down")]
    ShuttingDown,

    /// A GPU of this agent is unhealthy: it takes no new work until the GPU recovers.
    #[error("this server takes no new requests: {0}")]
    GpuUnhealthy(String),

    #[error("{0}")]
    Engine(EngineError),

    #[error("{0}")]
    StepFailed(String),

    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_)
            | Self::WrongType { .. }
            | Self::UnknownField(_)
            | Self::OutOfRange { .. }
            | Self::Unsupported { .. }
            | Self::ContextExceeded { .. }
            | Self::BadHeader { .. } => StatusCode::BAD_REQUEST,
            Self::UnknownModel(_) => StatusCode::NOT_FOUND,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::QueueTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Loading | Self::ShuttingDown | Self::NotLeader(_) | Self::GpuUnhealthy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Engine(e) => match e {
                EngineError::ContextExceeded { .. }
                | EngineError::RequestTooLarge { .. }
                | EngineError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
                EngineError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::StepFailed(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The request field at fault.
    pub fn param(&self) -> Option<String> {
        match self {
            Self::WrongType { param, .. }
            | Self::UnknownField(param)
            | Self::Unsupported { param, .. } => Some(param.clone()),
            Self::OutOfRange { param, .. } => Some((*param).to_owned()),
            Self::ContextExceeded { .. } => Some("max_tokens".into()),
            Self::UnknownModel(_) => Some("model".into()),
            Self::BadHeader { header, .. } => Some((*header).to_owned()),
            Self::Engine(
                EngineError::ContextExceeded { .. } | EngineError::RequestTooLarge { .. },
            ) => Some("max_tokens".into()),
            _ => None,
        }
    }

    /// A bounded label for logs and metrics, and the error's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "invalid_json",
            Self::WrongType { .. } => "invalid_type",
            Self::UnknownField(_) => "unknown_parameter",
            Self::OutOfRange { .. } => "invalid_value",
            Self::Unsupported { .. } => "unsupported_parameter",
            Self::ContextExceeded { .. } => "context_length_exceeded",
            Self::UnknownModel(_) => "model_not_found",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BadHeader { .. } => "invalid_header",
            Self::Overloaded { reason, .. } => reason,
            Self::QueueTimeout { .. } => "queue_timeout",
            Self::Loading => "model_loading",
            Self::NotLeader(_) => "not_group_leader",
            Self::ShuttingDown => "server_shutting_down",
            Self::GpuUnhealthy(_) => "gpu_unhealthy",
            Self::Engine(e) => match e {
                EngineError::ContextExceeded { .. } => "context_length_exceeded",
                EngineError::RequestTooLarge { .. } => "kv_cache_too_small",
                EngineError::InvalidRequest(_) => "invalid_value",
                EngineError::Stopped => "engine_stopped",
                _ => "engine_error",
            },
            Self::StepFailed(_) => "engine_failure",
            Self::Internal(_) => "internal_error",
        }
    }

    pub fn body(&self) -> ErrorResponse {
        error_body(self.status(), self.to_string(), self.param(), self.code())
    }
}

/// OpenAI's error body for an answer of `status`: its `type` follows the status.
pub fn error_body(
    status: StatusCode,
    message: String,
    param: Option<String>,
    code: &str,
) -> ErrorResponse {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_exceeded"
    } else if status.is_client_error() {
        "invalid_request_error"
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        "service_unavailable"
    } else {
        "server_error"
    };
    ErrorResponse {
        error: ErrorBody {
            message,
            kind: kind.into(),
            param,
            code: Some(code.into()),
        },
    }
}

/// An error answer: `status`, `body` as JSON, and `Retry-After` where the client may retry.
pub fn error_response(
    status: StatusCode,
    body: ErrorResponse,
    retry_after: Option<u64>,
) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, seconds.into());
    }
    response
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self::Engine(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match self {
            Self::Loading | Self::ShuttingDown | Self::NotLeader(_) => Some(5),
            Self::GpuUnhealthy(_) => Some(30),
            Self::Overloaded { retry_after, .. } => Some(retry_after),
            _ => None,
        };
        error_response(self.status(), self.body(), retry_after)
    }
}
