//! Tensor parallelism in one process (a thread per rank) on the CPU: the test model split three
//! ways (its 9 heads and 3 KV heads allow 1, 3 or 9), and a generated model whose 8 heads and 4
//! KV heads allow 2, 4 and 8 (KV heads replicated), against the same model whole. Logits agree within a stated tolerance
//! (an all-reduce adds partial sums in another order than one rank's matmul), and greedy tokens
//! are equal wherever the whole model is decisive — batched, chunked and preempted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::backend::{RowOutput, SeqInput};
use parallax_agent::engine::{
    self, BackendConfig, BackendKind, CollectiveKind, EngineConfig, EngineHandle, Event, Executor,
    ModelSource, SamplingParams,
};
use support::tiny::TinyLlama;

/// Largest logit difference allowed between a split and a whole model (logits of about ±20 on
/// the test model; measured differences stay under 1e-4).
const TOLERANCE: f32 = 2e-3;
/// The whole model is decisive where its best token leads the next by more than this (nats).
const DECISIVE: f32 = 0.05;

fn candle(tensor_parallel_size: usize) -> BackendConfig {
    BackendConfig {
        kind: BackendKind::Candle,
        tensor_parallel_size,
        ..BackendConfig::default()
    }
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Two steps over three sequences: prefill chunks (one whole prompt, one in two chunks) then
/// decode rows; every row's logits.
fn steps(executor: &mut dyn Executor, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    executor.allocate_kv(64, 16).unwrap();
    let tables: Vec<Vec<u32>> = (0..prompts.len() as u32)
        .map(|s| (0..4).map(|b| 60 - s * 4 - b).collect())
        .collect();
    let half = prompts[1].len() / 2;
    let first = executor
        .execute(&[
            SeqInput {
                tokens: &prompts[0],
                start: 0,
                blocks: &tables[0],
                output: RowOutput::Logits,
            },
            SeqInput {
                tokens: &prompts[1][..half],
                start: 0,
                blocks: &tables[1],
                output: RowOutput::None,
            },
            SeqInput {
                tokens: &prompts[2],
                start: 0,
                blocks: &tables[2],
                output: RowOutput::Logits,
            },
        ])
        .unwrap();
    let second = executor
        .execute(&[
            SeqInput {
                tokens: &[42],
                start: prompts[0].len(),
                blocks: &tables[0],
                output: RowOutput::Logits,
            },
            SeqInput {
                tokens: &prompts[1][half..],
                start: half,
                blocks: &tables[1],
                output: RowOutput::Logits,
            },
            SeqInput {
                tokens: &[7],
                start: prompts[2].len(),
                blocks: &tables[2],
                output: RowOutput::Logits,
            },
        ])
        .unwrap();
    let vocab = executor.config().vocab_size;
    first
        .logits
        .chunks_exact(vocab)
        .chain(second.logits.chunks_exact(vocab))
        .map(<[f32]>::to_vec)
        .collect()
}

/// Split `source` `world` ways and compare every row's logits with the whole model's.
fn split_logits_agree(source: &ModelSource, world: usize, prompts: &[Vec<u32>]) {
    let mut whole = engine::load(source, &candle(1)).unwrap();
    let mut split = engine::load(source, &candle(world)).unwrap();
    assert!(
        split
            .describe()
            .contains(&format!("tensor parallel {world}")),
        "{}",
        split.describe()
    );
    let (a, b) = (
        steps(whole.as_mut(), prompts),
        steps(split.as_mut(), prompts),
    );
    assert_eq!(a.len(), 5);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| max_difference(x, y))
        .fold(0.0, f32::max);
    eprintln!("TP {world}: largest logit difference {worst:e}");
    assert!(worst < TOLERANCE, "TP {world}: {worst}");
}

/// Submits `prompt` for `n` greedy tokens, with each step's margin between the best two
/// log-probabilities (collect with [`stream::collect`]).
fn greedy_with_margins(engine: &EngineHandle, prompt: Vec<u32>, n: usize) -> engine::RequestStream {
    engine
        .submit(
            prompt,
            SamplingParams {
                max_tokens: n,
                ignore_eos: true,
                logprobs: 2,
                ..SamplingParams::default()
            },
        )
        .unwrap()
}

mod stream {
    use super::*;

    pub struct Collected {
        pub tokens: Vec<u32>,
        pub margins: Vec<f32>,
    }

    pub async fn collect(mut stream: engine::RequestStream) -> Collected {
        let (mut tokens, mut margins) = (Vec::new(), Vec::new());
        while let Some(event) = stream.next().await {
            match event {
                Event::Token {
                    id, top_logprobs, ..
                } => {
                    tokens.push(id);
                    margins.push(top_logprobs[0].1 - top_logprobs[1].1);
                }
                Event::Failed { message } => panic!("{message}"),
                Event::Finished { .. } => break,
                Event::Started { .. } => {}
            }
        }
        Collected { tokens, margins }
    }
}

#[test]
fn the_test_model_split_three_ways_gives_the_whole_models_logits() {
    let source = ModelSource::Gguf(support::model_path());
    let (whole, codec) = engine::load_with_tokenizer(&source, None, &candle(1)).unwrap();
    drop(whole);
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived a dragon who",
        "def fibonacci(n):",
    ]
    .iter()
    .map(|p| codec.encode(p).unwrap())
    .collect();
    split_logits_agree(&source, 3, &prompts);
}

#[test]
fn a_generated_model_split_two_and_four_ways_gives_the_whole_models_logits() {
    let tiny = TinyLlama {
        heads: 8,
        kv_heads: 4,
        hidden: 128,
        ffn: 256,
        tied: false,
        dtype: candle_core::DType::F32,
        seed: 5,
        ..TinyLlama::default()
    };
    let dir = std::env::temp_dir().join(format!("parallax-{}-tp", std::process::id()));
    tiny.write(&dir);
    let source = ModelSource::HuggingFace(dir.clone());
    let prompts = vec![
        vec![
            5, 17, 200, 33, 9, 41, 41, 7, 120, 3, 250, 64, 1, 99, 20, 21, 22,
        ],
        vec![260, 12, 12, 12, 8, 190, 77, 40, 2, 3, 4, 5],
        vec![42],
    ];
    for world in [2, 4] {
        split_logits_agree(&source, world, &prompts);
    }
    // Past the KV head count: 8 ranks of one query head each, two to a copy of a KV head.
    split_logits_agree(&source, 8, &prompts);
    // 8 heads and 4 KV heads do not split 3 ways: refused by name.
    let error = engine::load(&source, &candle(3)).unwrap_err().to_string();
    assert!(
        error.contains("tensor parallel size 3")
            && error.contains("8 attention heads")
            && error.contains("4 KV heads"),
        "{error}"
    );
    // Nor does the int8 backend split.
    let int8 = BackendConfig {
        kind: BackendKind::Int8,
        ..candle(2)
    };
    let error = engine::load(&source, &int8).unwrap_err().to_string();
    assert!(error.contains("candle backend"), "{error}");
    // Sums through NCCL are for CUDA devices: asked for on the CPU, refused by name, at any size.
    for size in [1, 2] {
        let nccl = BackendConfig {
            collective: CollectiveKind::Nccl,
            ..candle(size)
        };
        let error = engine::load(&source, &nccl).unwrap_err().to_string();
        assert!(
            error.contains("--collective nccl") && error.contains("--device cuda"),
            "{error}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_match_the_whole_model_batched_chunked_and_preempted() {
    let source = ModelSource::Gguf(support::model_path());
    let start = |world, config| {
        let (executor, codec) = engine::load_with_tokenizer(&source, None, &candle(world)).unwrap();
        engine::start(executor, codec, config).unwrap()
    };
    let run = |engine: EngineHandle, prompts: Vec<Vec<u32>>, n| async move {
        let streams: Vec<_> = prompts
            .into_iter()
            .map(|p| greedy_with_margins(&engine, p, n))
            .collect();
        let mut out = Vec::new();
        for s in streams {
            out.push(stream::collect(s).await);
        }
        (out, engine.stats.preemptions_total())
    };
    let probe = start(1, support::config(16, 512));
    let prompts = support::prompts(&probe);
    drop(probe);
    // 16-token steps chunk the prompts, all batched; then 5 blocks of 16 tokens (no prefix
    // cache to lend any) for 8 requests of 16 tokens preempt.
    let preempting = EngineConfig {
        prefix_caching: false,
        ..support::config(256, 5)
    };
    let mut compared = 0;
    for (config, workload, n) in [
        (support::config(16, 512), prompts[..5].to_vec(), 12),
        (preempting, prompts.clone(), 16),
    ] {
        let (want, _) = run(start(1, config), workload.clone(), n).await;
        let (got, preempted) = run(start(3, config), workload, n).await;
        if config.max_batched_tokens == 256 {
            assert!(preempted > 0, "the pool was meant to preempt");
        }
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let decided = w.margins.iter().take_while(|m| **m > DECISIVE).count();
            compared += decided;
            assert_eq!(w.tokens[..decided], g.tokens[..decided], "prompt {i}");
        }
    }
    assert!(
        compared >= 40,
        "the premise (a decisive whole model) held for only {compared} tokens"
    );
}
