//! The engine: a Llama model over a paged KV cache, scheduled by continuous batching. It knows
//! nothing of HTTP or Kubernetes. The tree is the architecture:
//! - [`scheduling`]: which requests run in a step, in which order, with which KV blocks — pure,
//!   generic, no tensors;
//! - [`runtime`]: the engine thread, its handle, requests, events, the step loop (plan → execute
//!   → sample → emit);
//! - [`backend`]: the executors behind one trait (`int8` on the CPU, `candle` on any candle
//!   device); the device is chosen once, at load;
//! - [`model`]: the model's shape, its files, its tokenizer and chat template;
//! - [`sampling`]: choosing a token from logits.

pub mod backend;
pub mod error;
pub mod model;
pub mod parallel;
pub mod runtime;
pub mod sampling;
pub mod scheduling;

pub use backend::{
    BackendConfig, BackendKind, CollectiveKind, DeviceSpec, Executor, KvCacheType, Precision,
};
pub use error::EngineError;
pub use model::loader::{ModelFiles, ModelSource};
pub use model::tokenizer::{Message, TextCodec};
pub use runtime::{
    EngineConfig, EngineHandle, Event, FinishReason, KvCacheSize, NoObserver, RequestStream,
    StepObserver, StepReport, start, start_observed,
};
pub use sampling::SamplingParams;

use std::path::Path;

/// Loads a model onto `backend`, without a tokenizer (see [`load_with_tokenizer`]).
pub fn load(
    source: &ModelSource,
    backend: &BackendConfig,
) -> Result<Box<dyn Executor>, EngineError> {
    backend::load(&mut ModelFiles::open(source)?, backend)
}

/// Loads a model onto `backend` and its tokenizer, from `source` (see [`ModelSource::parse`]).
/// A `dummy` model has no tokenizer of its own and needs `tokenizer_from`.
pub fn load_with_tokenizer(
    source: &ModelSource,
    tokenizer_from: Option<&Path>,
    backend: &BackendConfig,
) -> Result<(Box<dyn Executor>, TextCodec), EngineError> {
    let (mut files, codec) = open_with_tokenizer(source, tokenizer_from)?;
    let executor = backend::load(&mut files, backend)?;
    Ok((executor, codec))
}

/// Opens a model's files and loads its tokenizer (see [`load_with_tokenizer`]); the weights are
/// read when an executor is built from the files.
pub fn open_with_tokenizer(
    source: &ModelSource,
    tokenizer_from: Option<&Path>,
) -> Result<(ModelFiles, TextCodec), EngineError> {
    let files = ModelFiles::open(source)?;
    let codec =
        match (tokenizer_from, source, files.gguf()) {
            (Some(path), _, _) if path.is_dir() => TextCodec::from_dir(path)?,
            (Some(path), _, _) => TextCodec::from_gguf(&model::loader::read_gguf(path)?)?,
            (None, _, Some(content)) => TextCodec::from_gguf(content)?,
            (None, ModelSource::HuggingFace(dir), None) => TextCodec::from_dir(dir)?,
            (None, _, None) => return Err(EngineError::Tokenizer(
                "a dummy model needs --tokenizer (a GGUF file or a directory with tokenizer.json)"
                    .into(),
            )),
        };
    if codec.vocab_size() > files.config.vocab_size {
        return Err(EngineError::Tokenizer(format!(
            "the tokenizer has {} tokens but the model only {}",
            codec.vocab_size(),
            files.config.vocab_size
        )));
    }
    Ok((files, codec))
}
