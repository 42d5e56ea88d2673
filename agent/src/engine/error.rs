//! The engine's error type: one variant per way loading or running can fail.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: not a readable GGUF file ({reason})")]
    InvalidGguf { path: PathBuf, reason: String },

    #[error("{path}: architecture {architecture:?} is not supported (supported: llama)")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },

    #[error("tensor {tensor}: {reason}")]
    UnsupportedTensor { tensor: String, reason: String },

    #[error("the model has no tensor {0}")]
    MissingTensor(String),

    #[error("the model has no {0} (metadata or config.json)")]
    MissingConfig(String),

    #[error("tensor {tensor} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("unknown dummy shape {0:?} (known: smollm2-135m, llama-3.2-1b, llama-3.1-8b)")]
    UnknownShape(String),

    #[error(
        "prompt of {prompt} tokens plus max_tokens {max_tokens} exceeds the context of {context} tokens"
    )]
    ContextExceeded {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },

    #[error(
        "the KV cache has {blocks} blocks of {block_size} tokens; a request needing {needed} blocks can never run"
    )]
    RequestTooLarge {
        blocks: usize,
        block_size: usize,
        needed: usize,
    },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("not supported: {0}")]
    Unsupported(String),

    #[error("{backend} backend: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },

    /// The model, its KV cache and its largest step do not fit the device's memory.
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),

    /// The device failed in a way that leaves it unusable (a CUDA error poisons its context):
    /// the engine stops.
    #[error("device fault: {0}")]
    DeviceFault(String),

    #[error("the engine has stopped")]
    Stopped,
}

impl EngineError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::InvalidGguf { .. }
            | Self::UnsupportedArchitecture { .. }
            | Self::UnsupportedTensor { .. }
            | Self::MissingTensor(_)
            | Self::MissingConfig(_)
            | Self::ShapeMismatch { .. }
            | Self::UnknownShape(_) => "model",
            Self::Unsupported(_) => "unsupported",
            Self::Backend { .. } => "backend",
            Self::DeviceFault(_) => "device",
            Self::DoesNotFit(_) => "memory",
            Self::Tokenizer(_) | Self::Template(_) => "tokenizer",
            Self::ContextExceeded { .. }
            | Self::RequestTooLarge { .. }
            | Self::InvalidRequest(_) => "request",
            Self::Stopped => "stopped",
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
