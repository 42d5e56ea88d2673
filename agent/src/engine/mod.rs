//! The engine: a Llama model over a paged KV cache, scheduled by continuous batching. It knows
//! nothing of HTTP or Kubernetes; the device is chosen once, at load (CPU today).

pub mod admission;
pub mod breaker;
pub mod error;
pub mod kernels;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;

pub use error::EngineError;
pub use loader::{ModelSource, load};
pub use runtime::{
    EngineConfig, EngineHandle, Event, FinishReason, KvCacheSize, NoObserver, RequestStream,
    StepObserver, StepReport, start, start_observed,
};
pub use sampling::SamplingParams;
pub use tokenizer::{Message, TextCodec};

use std::path::Path;

/// Loads a model and its tokenizer from `source` (see [`ModelSource::parse`]). A `dummy` model
/// has no tokenizer of its own and needs `tokenizer_from`.
pub fn load_with_tokenizer(
    source: &ModelSource,
    tokenizer_from: Option<&Path>,
) -> Result<(model::Llama, TextCodec), EngineError> {
    let (model, gguf) = load(source)?;
    let codec =
        match (tokenizer_from, source, gguf) {
            (Some(path), _, _) if path.is_dir() => TextCodec::from_dir(path)?,
            (Some(path), _, _) => TextCodec::from_gguf(&loader::read_gguf(path)?)?,
            (None, _, Some(content)) => TextCodec::from_gguf(&content)?,
            (None, ModelSource::HuggingFace(dir), None) => TextCodec::from_dir(dir)?,
            (None, _, None) => return Err(EngineError::Tokenizer(
                "a dummy model needs --tokenizer (a GGUF file or a directory with tokenizer.json)"
                    .into(),
            )),
        };
    if codec.vocab_size() > model.config.vocab_size {
        return Err(EngineError::Tokenizer(format!(
            "the tokenizer has {} tokens but the model only {}",
            codec.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok((model, codec))
}
