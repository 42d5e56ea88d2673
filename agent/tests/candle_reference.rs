//! The candle backend against an independent implementation: candle-transformers' Llama (f32,
//! one sequence, its own KV cache) on tiny checkpoints with known weights. Logits agree at every
//! position — token by token, in chunked prefill and batched with other sequences — and greedy
//! tokens are equal wherever the reference is decisive; with Llama 3.1's `rope_scaling` too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use parallax_agent::engine::backend::{RowOutput, SeqInput};
use parallax_agent::engine::{self, BackendConfig, BackendKind, Executor, ModelSource};
use support::cosine;
use support::tiny::TinyLlama;

/// Largest logit difference allowed, against logits of about ±3: f32 sums in different orders
/// (measured: under 1e-6).
const TOLERANCE: f32 = 1e-5;
/// The reference is decisive where its best logit leads the next by more than this.
const DECISIVE: f32 = 1e-2;

fn candle_backend() -> BackendConfig {
    BackendConfig {
        kind: BackendKind::Candle,
        ..BackendConfig::default()
    }
}

/// Writes `tiny` to a fresh folder; the backend and the reference loaded from it.
fn both(tiny: &TinyLlama, name: &str) -> (Box<dyn Executor>, reference::Llama, reference::Config) {
    let dir = std::env::temp_dir().join(format!("parallax-{}-{name}", std::process::id()));
    tiny.write(&dir);
    let mut executor =
        engine::load(&ModelSource::HuggingFace(dir.clone()), &candle_backend()).unwrap();
    executor.allocate_kv(256, 4).unwrap();
    let config: reference::LlamaConfig =
        serde_json::from_value(tiny.config_json()).expect("candle-transformers reads config.json");
    let config = config.into_config(false);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    // SAFETY: test files written above, read-only.
    #[allow(unsafe_code)]
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
    };
    let model = reference::Llama::load(vb, &config).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    (executor, model, config)
}

/// The reference's logits after each token of `prompt`, fed one at a time.
fn reference_logits(
    model: &reference::Llama,
    config: &reference::Config,
    prompt: &[u32],
) -> Vec<Vec<f32>> {
    let mut cache = reference::Cache::new(true, DType::F32, config, &Device::Cpu).unwrap();
    prompt
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let x = Tensor::new(&[[*t]], &Device::Cpu).unwrap();
            model
                .forward(&x, i, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Blocks of 4 tokens for sequence `s`: shuffled, and apart from other sequences'.
fn blocks(s: u32, len: usize) -> Vec<u32> {
    (0..len.div_ceil(4) as u32)
        .rev()
        .map(|b| s * 16 + b)
        .collect()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 200, 33, 9, 41, 41, 7, 120, 3, 250, 64, 1, 99],
        vec![260, 12, 12, 12, 8, 190, 77, 40, 2],
        vec![
            42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
        ],
    ]
}

/// Every position's logits from the backend three ways — token by token, in chunks of 3, and all
/// prompts batched in chunks of 5 — each against the reference.
fn check_logits(tiny: &TinyLlama, name: &str) {
    let (mut executor, model, config) = both(tiny, name);
    let prompts = prompts();
    let expected: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| reference_logits(&model, &config, p))
        .collect();
    let mut worst = 0f32;
    for (s, (prompt, expected)) in prompts.iter().zip(&expected).enumerate() {
        let table = blocks(s as u32, prompt.len());
        for chunk in [1, 3] {
            for start in (0..prompt.len()).step_by(chunk) {
                let end = (start + chunk).min(prompt.len());
                let out = executor
                    .execute(&[SeqInput {
                        tokens: &prompt[start..end],
                        start,
                        blocks: &table,
                        output: RowOutput::Logits,
                    }])
                    .unwrap();
                let d = max_difference(&out.logits, &expected[end - 1]);
                assert!(
                    d < TOLERANCE,
                    "{name}: prompt {s}, position {}, chunk {chunk}: {d}",
                    end - 1
                );
                worst = worst.max(d);
            }
        }
    }
    // Batched: every prompt at once, 5 tokens a step, their tables interleaved.
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| blocks(s as u32 + 8, longest))
        .collect();
    for start in (0..longest).step_by(5) {
        let batch: Vec<SeqInput<'_>> = prompts
            .iter()
            .zip(&tables)
            .filter(|(p, _)| start < p.len())
            .map(|(p, t)| SeqInput {
                tokens: &p[start..(start + 5).min(p.len())],
                start,
                blocks: t,
                output: RowOutput::Logits,
            })
            .collect();
        let out = executor.execute(&batch).unwrap();
        let vocab = tiny.vocab;
        let live: Vec<usize> = (0..prompts.len())
            .filter(|s| start < prompts[*s].len())
            .collect();
        for (row, s) in out.logits.chunks_exact(vocab).zip(live) {
            let end = (start + 5).min(prompts[s].len());
            let d = max_difference(row, &expected[s][end - 1]);
            assert!(
                d < TOLERANCE,
                "{name}: batched prompt {s}, position {}: {d}",
                end - 1
            );
            worst = worst.max(d);
        }
    }
    eprintln!("{name}: largest logit difference {worst:e}");
}

#[test]
fn logits_equal_the_reference_at_every_position() {
    check_logits(&TinyLlama::default(), "plain");
    // An output head of its own, sharded weights, f32 and f16 files.
    for (dtype, shards) in [(DType::F32, 3), (DType::F16, 2)] {
        let tiny = TinyLlama {
            dtype,
            shards,
            tied: false,
            seed: 7,
            ..TinyLlama::default()
        };
        check_logits(&tiny, &format!("untied-{dtype:?}-{shards}-shards"));
    }
}

#[test]
fn llama3_rope_scaling_gives_the_reference_logits() {
    // Scaling that changes most frequencies within the first positions (head_dim 16: wavelengths
    // 6 to 19 000 positions; the original context 32 puts the band between 8 and 32).
    let tiny = TinyLlama {
        rope_scaling: serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        seed: 11,
        ..TinyLlama::default()
    };
    check_logits(&tiny, "llama3");
    // The same checkpoint with config.json as transformers 5 writes it gives the same logits.
    for config in [tiny.config_json(), tiny.config_json_v5()] {
        let dir = std::env::temp_dir().join(format!("parallax-{}-v5", std::process::id()));
        tiny.write(&dir);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut executor =
            engine::load(&ModelSource::HuggingFace(dir.clone()), &candle_backend()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        executor.allocate_kv(16, 4).unwrap();
        let prompt = &prompts()[2];
        let table = blocks(0, prompt.len());
        let out = executor
            .execute(&[SeqInput {
                tokens: prompt,
                start: 0,
                blocks: &table,
                output: RowOutput::Logits,
            }])
            .unwrap();
        let (_, model, reference_config) = both(&tiny, "llama3-v5-reference");
        let expected = reference_logits(&model, &reference_config, prompt);
        let d = max_difference(&out.logits, &expected[prompt.len() - 1]);
        assert!(d < TOLERANCE, "{config}: {d}");
    }
    // The premise: scaling changes the logits (else this test would prove nothing).
    let plain = TinyLlama {
        seed: 11,
        ..TinyLlama::default()
    };
    let (_, model, config) = both(&plain, "llama3-premise-plain");
    let (_, scaled_model, scaled_config) = both(&tiny, "llama3-premise-scaled");
    let prompt = &prompts()[2];
    let a = reference_logits(&model, &config, prompt);
    let b = reference_logits(&scaled_model, &scaled_config, prompt);
    assert!(
        max_difference(&a[20], &b[20]) > 100.0 * TOLERANCE,
        "scaling made no difference"
    );
}

#[test]
fn greedy_tokens_equal_the_reference_where_it_is_decisive() {
    let tiny = TinyLlama {
        seed: 3,
        ..TinyLlama::default()
    };
    let (mut executor, model, config) = both(&tiny, "greedy");
    for (s, prompt) in prompts().into_iter().enumerate() {
        let table = blocks(s as u32, prompt.len() + 24);
        // The reference's greedy continuation, and where it is decisive.
        let mut cache = reference::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
        let mut tokens = prompt.clone();
        let mut decisive = Vec::new();
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut logits: Vec<f32> = model
            .forward(&x, 0, &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for _ in 0..24 {
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            decisive.push(sorted[0] - sorted[1] > DECISIVE);
            let next = engine::backend::argmax(&logits);
            tokens.push(next);
            let x = Tensor::new(&[[next]], &Device::Cpu).unwrap();
            logits = model
                .forward(&x, tokens.len() - 1, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        // The backend, greedy on the device: prefill, then one token a step.
        let mut got = Vec::new();
        let mut out = executor
            .execute(&[SeqInput {
                tokens: &prompt,
                start: 0,
                blocks: &table,
                output: RowOutput::Argmax,
            }])
            .unwrap();
        for i in 0..24 {
            let next = out.argmax[0];
            got.push(next);
            let at = prompt.len() + i;
            out = executor
                .execute(&[SeqInput {
                    tokens: &[next],
                    start: at,
                    blocks: &table,
                    output: RowOutput::Argmax,
                }])
                .unwrap();
        }
        let want = &tokens[prompt.len()..];
        // Equal up to the first place where the reference is not decisive.
        let decided = decisive.iter().take_while(|d| **d).count();
        assert!(
            decided >= 8,
            "prompt {s}: the premise (a decisive reference) fails after {decided}"
        );
        assert_eq!(&got[..decided], &want[..decided], "prompt {s}");
    }
}

#[test]
fn on_the_gguf_test_model_the_candle_and_int8_backends_agree() {
    // The GGUF path (interleaved rotary pairs, dequantized Q4_1) against the int8 engine, which
    // quantizes activations to 8 bits: close, not equal. Two sequences: one prefilled in a chunk
    // then decoded, one prefilled whole; batched, out of order.
    let source = ModelSource::Gguf(support::model_path());
    let mut rows = Vec::new();
    for (name, backend) in support::backends() {
        let (mut executor, codec) = engine::load_with_tokenizer(&source, None, &backend).unwrap();
        executor.allocate_kv(64, 16).unwrap();
        let a = codec
            .encode("The capital of France is Paris. The capital of Germany is")
            .unwrap();
        let b = codec.encode("Hello there, my friend").unwrap();
        let (ta, tb): (Vec<u32>, Vec<u32>) = ((0..8).collect(), (20..28).collect());
        let n = a.len();
        let first = executor
            .execute(&[
                SeqInput {
                    tokens: &a[..n - 1],
                    start: 0,
                    blocks: &ta,
                    output: RowOutput::None,
                },
                SeqInput {
                    tokens: &b,
                    start: 0,
                    blocks: &tb,
                    output: RowOutput::Logits,
                },
            ])
            .unwrap();
        let next = [engine::backend::argmax(&first.logits)];
        let second = executor
            .execute(&[
                SeqInput {
                    tokens: &next,
                    start: b.len(),
                    blocks: &tb,
                    output: RowOutput::Logits,
                },
                SeqInput {
                    tokens: &a[n - 1..],
                    start: n - 1,
                    blocks: &ta,
                    output: RowOutput::Logits,
                },
            ])
            .unwrap();
        let vocab = executor.config().vocab_size;
        let mut all = vec![first.logits];
        all.extend(second.logits.chunks_exact(vocab).map(<[f32]>::to_vec));
        rows.push((name, all));
    }
    let (int8, candle) = (&rows[0].1, &rows[1].1);
    for (k, (x, y)) in int8.iter().zip(candle).enumerate() {
        let c = cosine(x, y);
        eprintln!("row {k}: cosine {c}");
        assert!(c > 0.998, "row {k}: cosine {c}");
        assert_eq!(
            engine::backend::argmax(x),
            engine::backend::argmax(y),
            "row {k}"
        );
    }
}
