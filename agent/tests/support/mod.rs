//! Shared by the engine's integration tests: the test model and small helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use parallax_agent::engine::{
    self, BackendConfig, BackendKind, EngineConfig, EngineHandle, Event, FinishReason, KvCacheSize,
    ModelSource, SamplingParams,
};
use std::path::PathBuf;

/// The test model, fetched by `scripts/fetch-model` (which `scripts/test` runs first).
pub fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("PARALLAX_TEST_MODEL") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "the test model is missing: run scripts/fetch-model (or set PARALLAX_TEST_MODEL)"
    );
    path
}

/// Starts an engine on the test model (the default backend: int8 on the CPU).
pub fn start(config: EngineConfig) -> EngineHandle {
    start_on(BackendConfig::default(), config)
}

/// Starts an engine on the test model with `backend`.
pub fn start_on(backend: BackendConfig, config: EngineConfig) -> EngineHandle {
    let (executor, codec) =
        engine::load_with_tokenizer(&ModelSource::Gguf(model_path()), None, &backend)
            .expect("the test model loads");
    engine::start(executor, codec, config).expect("the engine starts")
}

/// The backends every engine behaviour is tested on: int8, and candle in f32 on the CPU.
pub fn backends() -> [(&'static str, BackendConfig); 2] {
    [
        ("int8", BackendConfig::default()),
        (
            "candle",
            BackendConfig {
                kind: BackendKind::Candle,
                ..BackendConfig::default()
            },
        ),
    ]
}

/// One test per backend from one body, as candle's `test_device!` does: `per_backend!(name)`
/// runs `async fn name(backend: BackendConfig)` as the tests `name::int8` and `name::candle`.
#[macro_export]
macro_rules! per_backend {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn int8() {
                super::$body(super::support::backends()[0].1).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn candle() {
                super::$body(super::support::backends()[1].1).await
            }
        }
    };
}

pub fn config(max_batched_tokens: usize, kv_blocks: usize) -> EngineConfig {
    EngineConfig {
        max_num_seqs: 64,
        max_batched_tokens,
        block_size: 16,
        kv_cache: KvCacheSize::Blocks(kv_blocks),
        ..EngineConfig::default()
    }
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// Everything one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: FinishReason,
    pub completion_tokens: usize,
}

/// Drains a stream to its end.
pub async fn collect(stream: engine::RequestStream) -> Output {
    collect_counted(stream).await.0
}

/// Drains a stream to its end; with the prompt tokens found in the prefix cache.
pub async fn collect_counted(mut stream: engine::RequestStream) -> (Output, usize) {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match stream.next().await.expect("the stream ends with Finished") {
            Event::Started { .. } => {}
            Event::Failed { message } => panic!("the request failed: {message}"),
            Event::Token {
                id, text: piece, ..
            } => {
                tokens.push(id);
                text.push_str(&piece);
            }
            Event::Finished {
                text: rest,
                reason,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                text.push_str(&rest);
                let output = Output {
                    tokens,
                    text,
                    reason,
                    completion_tokens,
                };
                return (output, cached_tokens);
            }
        }
    }
}

/// Prompts of different lengths, as token ids.
pub fn prompts(engine: &EngineHandle) -> Vec<Vec<u32>> {
    [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived a dragon who",
        "1, 2, 3, 4, 5,",
        "def fibonacci(n):",
        "Water boils at",
        "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. Again:",
        "Hello",
        "List three colours:",
    ]
    .iter()
    .map(|p| engine.codec.encode(p).unwrap())
    .collect()
}

pub mod fake_hub;
pub mod http;
pub mod process;
pub mod prometheus;
pub mod tiny;

/// Cosine similarity of two logit rows.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / norm(a) / norm(b)
}
