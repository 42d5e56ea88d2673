//! Prefix caching and work-conserving bins on the real test model: the cache changes no greedy
//! token, a prompt shared by requests that arrive together is computed once, eviction under
//! pressure keeps every answer right and every reference count returns to zero, and a batch of
//! long requests fills the batch limit whatever the slow bin's share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::runtime::RequestOptions;
use parallax_agent::engine::scheduling::admission::Bin;
use parallax_agent::engine::{EngineConfig, EngineHandle, Event};
use std::sync::atomic::Ordering;
use support::{Output, collect, collect_counted, config, greedy, prompts, start};

fn without_cache(mut config: EngineConfig) -> EngineConfig {
    config.prefix_caching = false;
    config
}

/// A long system prompt (about `words` tokens) followed by each of `questions`.
fn shared_prefix_prompts(engine: &EngineHandle, words: usize, questions: usize) -> Vec<Vec<u32>> {
    let system: String = (0..words)
        .map(|i| ["alpha ", "river ", "stone ", "light "][i % 4])
        .collect();
    (0..questions)
        .map(|q| {
            let text = format!("{system}\nQuestion {q}: what is {q} plus {}?", q * 7);
            engine.codec.encode(&text).unwrap()
        })
        .collect()
}

/// Every prompt's greedy output, submitted together.
async fn together(engine: &EngineHandle, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Output> {
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(p.clone(), greedy(max_tokens)).unwrap())
        .collect();
    let mut out = Vec::new();
    for s in streams {
        out.push(collect(s).await);
    }
    out
}

/// Prompt tokens the engine computed (looked up but not found in the cache).
fn computed(engine: &EngineHandle) -> u64 {
    engine.stats.prefix_queries.load(Ordering::Relaxed)
        - engine.stats.prefix_hits.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_caching_changes_no_greedy_token() {
    let reference = start(without_cache(config(64, 512)));
    let mut prompts = prompts(&reference);
    prompts.extend(shared_prefix_prompts(&reference, 60, 2));
    let expected = together(&reference, &prompts, 12).await;
    assert_eq!(reference.stats.prefix_hits.load(Ordering::Relaxed), 0);
    drop(reference);

    let engine = start(config(64, 512));
    for (p, want) in prompts.iter().zip(&expected) {
        let (first, first_cached) =
            collect_counted(engine.submit(p.clone(), greedy(12)).unwrap()).await;
        let (again, cached) = collect_counted(engine.submit(p.clone(), greedy(12)).unwrap()).await;
        assert_eq!((&first, &again), (want, want), "{} prompt tokens", p.len());
        assert!(first_cached <= cached);
        // Whole blocks of 16, at least the last token computed again.
        assert_eq!(cached, (p.len() - 1) / 16 * 16, "{} prompt tokens", p.len());
    }
    // Batched, with chunked prefill (64-token steps), on a warm cache.
    assert_eq!(together(&engine, &prompts, 12).await, expected);
    assert!(engine.stats.prefix_hits.load(Ordering::Relaxed) > 0);
    assert_eq!(engine.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_prompt_shared_by_16_requests_arriving_together_is_computed_once() {
    let reference = start(without_cache(config(512, 1024)));
    let prompts = shared_prefix_prompts(&reference, 250, 16);
    let expected = together(&reference, &prompts, 4).await;
    drop(reference);

    let engine = start(config(512, 1024));
    assert_eq!(together(&engine, &prompts, 4).await, expected);
    // The common prefix's whole blocks, computed by one request and found by the other 15.
    let common = prompts[0]
        .iter()
        .zip(&prompts[1])
        .take_while(|(a, b)| a == b)
        .count();
    let shared_blocks = common / 16 * 16;
    let total: usize = prompts.iter().map(Vec::len).sum();
    assert!(common > 240, "{common} common tokens");
    assert_eq!(
        engine.stats.prefix_hits.load(Ordering::Relaxed) as usize,
        15 * shared_blocks,
        "every request but the first found the prefix"
    );
    assert_eq!(computed(&engine) as usize, total - 15 * shared_blocks);
    assert_eq!(engine.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_pressure_keeps_answers_right_and_references_return_to_zero() {
    let reference = start(without_cache(config(256, 512)));
    let mut distinct = shared_prefix_prompts(&reference, 40, 3);
    distinct.extend(prompts(&reference));
    // Each prompt twice, in an order that makes cached blocks come and go.
    let workload: Vec<Vec<u32>> = distinct
        .iter()
        .chain(distinct.iter().rev())
        .cloned()
        .collect();
    let mut expected = Vec::new();
    for p in &workload {
        expected.push(collect(reference.submit(p.clone(), greedy(16)).unwrap()).await);
    }
    drop(reference);

    // 12 blocks of 16 tokens: a few requests at once, cached blocks evicted all the time.
    let small = start(config(256, 12));
    let streams: Vec<_> = workload
        .iter()
        .map(|p| small.submit(p.clone(), greedy(16)).unwrap())
        .collect();
    // One request given up half-way, while its blocks may be shared.
    let mut cancelled = small.submit(workload[0].clone(), greedy(16)).unwrap();
    assert!(matches!(
        cancelled.next().await,
        Some(Event::Started { .. })
    ));
    drop(cancelled);
    let mut got = Vec::new();
    for s in streams {
        got.push(collect(s).await);
    }
    assert_eq!(got, expected);
    let stats = &small.stats;
    assert!(
        stats.preemptions_total() > 0,
        "the pool was meant to be too small"
    );
    assert!(stats.prefix_hits.load(Ordering::Relaxed) > 0);
    assert_eq!(
        stats.kv_blocks_used.load(Ordering::Relaxed),
        0,
        "every reference returned"
    );
    assert!(stats.kv_blocks_cached.load(Ordering::Relaxed) <= 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_eight_identical_long_requests_run_together_with_the_default_bins() {
    // The default configuration (64 sequences; slow share 4–16) with every request slow.
    let engine = start(config(512, 2048));
    let prompt = prompts(&engine)[1].clone();
    let slow = RequestOptions {
        bin: Bin::Slow,
        ..RequestOptions::default()
    };
    let mut streams: Vec<_> = (0..48)
        .map(|_| {
            engine
                .submit_with(prompt.clone(), greedy(16), slow)
                .unwrap()
        })
        .collect();
    let mut largest = 0;
    for s in &mut streams {
        match s.next().await {
            Some(Event::Started { batch_size, .. }) => largest = largest.max(batch_size),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(largest, 48, "every request in one batch, not 16");
    for s in streams {
        assert_eq!(collect(s).await.completion_tokens, 16);
    }
}
