//! `--kv-cache-dtype int8` on the real test model:
//! - quality: teacher-forced over a few hundred tokens of English, the int8 cache's next-token
//!   distributions stay within a small KL divergence of the f32 cache's, the same token leads at
//!   nearly every position, and the text's perplexity moves by under 1 % — while the logits do
//!   differ (the int8 path is the one measured);
//! - the engine's promises hold on it: batched and chunked greedy output equals each prompt alone
//!   (the quantization is per token and head, so it cannot depend on the batch), and a KV pool
//!   small enough to preempt still completes every request identically;
//! - where it is not built (the candle backend, hence CUDA and tensor parallelism), it is refused
//!   by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::backend::{RowOutput, SeqInput, argmax};
use parallax_agent::engine::{
    self, BackendConfig, BackendKind, Executor, KvCacheType, ModelSource,
};
use support::{collect, config, greedy, model_path, prompts, start_on};

/// The int8 backend with int8 keys and values.
fn int8_kv() -> BackendConfig {
    BackendConfig {
        kind: BackendKind::Int8,
        kv_cache: KvCacheType::Int8,
        ..BackendConfig::default()
    }
}

const TEXT: &str = "The lighthouse stood at the end of a narrow spit of rock, and for most of the \
year the only people who saw it up close were the keeper and the men who brought his supplies. \
Every evening at dusk he climbed the spiral stairs, trimmed the wick, polished the great lens \
and lit the lamp, and every morning he put it out again and wrote a line in the log: the \
weather, the ships he had seen, the state of the sea. Over thirty years the log filled eleven \
books. When the light was finally automated, the books were sent to a museum in the town, where \
they sit in a glass case beside a photograph of the keeper and his dog. Visitors rarely read \
them, but the few who do find that the entries change very little from year to year. Fog in \
the morning, clearing by noon. Two fishing boats and a steamer heading north. A gale in the \
night; the glass in the lantern room held. It is a quiet record of a life spent keeping other \
people safe, written by a man who never thought anyone would read it. The museum's curator \
says that children like the dog best, and that older visitors often stand for a long time in \
front of the last book, which ends in the middle of a page with the words: light out at six, \
sea calm, nothing to report.";

/// The log-probabilities of every next token of `tokens`, fed one at a time through a cache of
/// `executor`'s type.
fn teacher_forced(executor: &mut dyn Executor, tokens: &[u32]) -> Vec<Vec<f32>> {
    let block_size = 16;
    let blocks = tokens.len().div_ceil(block_size);
    executor.allocate_kv(blocks, block_size).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    (0..tokens.len() - 1)
        .map(|i| {
            let out = executor
                .execute(&[SeqInput {
                    tokens: &tokens[i..=i],
                    start: i,
                    blocks: &table,
                    output: RowOutput::Logits,
                }])
                .unwrap();
            log_softmax(&out.logits)
        })
        .collect()
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let total: f64 = logits.iter().map(|v| f64::from(v - max).exp()).sum();
    let log_total = total.ln() as f32;
    logits.iter().map(|v| v - max - log_total).collect()
}

#[test]
fn int8_keys_and_values_keep_the_f32_caches_predictions() {
    let source = ModelSource::Gguf(model_path());
    let (mut exact, codec) =
        engine::load_with_tokenizer(&source, None, &BackendConfig::default()).unwrap();
    let (mut int8, _) = engine::load_with_tokenizer(&source, None, &int8_kv()).unwrap();
    assert_eq!(exact.kv_dtype(), "float32");
    assert_eq!(int8.kv_dtype(), "int8");
    // A quarter of f32's bytes, plus a scale per token and head.
    let ratio = int8.kv_block_bytes(16) as f64 / exact.kv_block_bytes(16) as f64;
    assert!((0.25..0.30).contains(&ratio), "{ratio}");

    let tokens = codec.encode(TEXT).unwrap();
    assert!(tokens.len() > 250, "{} tokens", tokens.len());
    let reference = teacher_forced(exact.as_mut(), &tokens);
    let quantized = teacher_forced(int8.as_mut(), &tokens);

    let positions = reference.len() as f64;
    let (mut kl, mut worst_kl, mut agree, mut nll_exact, mut nll_int8) = (0.0, 0f64, 0, 0.0, 0.0);
    let mut largest_difference = 0f32;
    for (i, (p, q)) in reference.iter().zip(&quantized).enumerate() {
        let here: f64 = p
            .iter()
            .zip(q)
            .map(|(lp, lq)| f64::from(lp.exp()) * f64::from(lp - lq))
            .sum();
        kl += here;
        worst_kl = worst_kl.max(here);
        agree += usize::from(argmax(p) == argmax(q));
        let next = tokens[i + 1] as usize;
        nll_exact -= f64::from(p[next]);
        nll_int8 -= f64::from(q[next]);
        largest_difference = p
            .iter()
            .zip(q)
            .fold(largest_difference, |m, (a, b)| m.max((a - b).abs()));
    }
    let mean_kl = kl / positions;
    let agreement = agree as f64 / positions;
    let perplexity_ratio = ((nll_int8 - nll_exact) / positions).exp();
    eprintln!(
        "{} positions: mean KL {mean_kl:.5} nats (worst {worst_kl:.4}), same top token at \
         {:.1} %, perplexity ratio {perplexity_ratio:.4}, largest log-probability difference \
         {largest_difference:.3}",
        reference.len(),
        100.0 * agreement
    );
    assert!(
        largest_difference > 1e-3,
        "the int8 cache changed nothing: is it in use?"
    );
    assert!(mean_kl < 0.01, "mean KL {mean_kl}");
    assert!(worst_kl < 0.1, "worst KL {worst_kl}");
    assert!(agreement >= 0.95, "same top token at {agreement}");
    assert!(
        (0.99..1.01).contains(&perplexity_ratio),
        "perplexity ratio {perplexity_ratio}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_chunked_and_preempted_greedy_output_on_int8_keys_equals_each_prompt_alone() {
    // A 16-token step budget prefills the longer prompts in chunks, mixed with decodes.
    let engine = start_on(int8_kv(), config(16, 512));
    let prompts: Vec<Vec<u32>> = prompts(&engine).into_iter().cycle().take(12).collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(collect(engine.submit(p.clone(), greedy(20)).unwrap()).await);
    }
    drop(engine);
    for (name, engine) in [
        ("batched", start_on(int8_kv(), config(16, 512))),
        // 12 blocks of 16 tokens hold about four of these requests at once.
        ("preempted", start_on(int8_kv(), config(256, 12))),
    ] {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| engine.submit(p.clone(), greedy(20)).unwrap())
            .collect();
        for (i, (stream, expected)) in streams.into_iter().zip(&alone).enumerate() {
            let got = collect(stream).await;
            assert_eq!(got.tokens, expected.tokens, "{name}: prompt {i}");
            assert_eq!(got.tokens.len(), 20);
        }
        if name == "preempted" {
            assert!(
                engine.stats.preemptions_total() > 0,
                "the small pool never preempted"
            );
        }
    }
}

#[test]
fn int8_keys_and_values_are_refused_by_name_where_they_are_not_built() {
    let source = ModelSource::Dummy("smollm2-135m".into());
    for backend in [
        BackendConfig {
            kind: BackendKind::Candle,
            ..int8_kv()
        },
        BackendConfig {
            kind: BackendKind::Auto,
            tensor_parallel_size: 3,
            ..int8_kv()
        },
        BackendConfig {
            kind: BackendKind::Auto,
            device: engine::DeviceSpec::Cuda(0),
            ..int8_kv()
        },
    ] {
        let error = engine::load(&source, &backend).unwrap_err().to_string();
        assert!(
            error.contains("--kv-cache-dtype int8") && error.contains("int8 backend"),
            "{backend:?}: {error}"
        );
    }
}
