//! The engine on the real test model: batching changes nothing of greedy output, preemption and
//! cancellation lose nothing and leak no blocks, and outputs end as asked. The behaviours that
//! depend on the executor run on every backend from one body each (`per_backend!`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::BackendConfig;
use parallax_agent::engine::runtime::{RequestOptions, RunTime};
use parallax_agent::engine::scheduling::admission::Bin;
use parallax_agent::engine::{EngineError, Event, FinishReason, SamplingParams};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{collect, config, greedy, prompts, start, start_on};

per_backend!(batched_and_chunked_greedy_output_equals_each_prompt_alone);
async fn batched_and_chunked_greedy_output_equals_each_prompt_alone(backend: BackendConfig) {
    // A 16-token budget forces the longer prompts to prefill in chunks, mixed with decodes.
    let engine = start_on(backend, config(16, 512));
    let prompts = prompts(&engine);
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(collect(engine.submit(p.clone(), greedy(24)).unwrap()).await);
    }
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(p.clone(), greedy(24)).unwrap())
        .collect();
    let mut together = Vec::new();
    for s in streams {
        together.push(collect(s).await);
    }
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a.tokens, t.tokens,
            "prompt {i}: batched output differs from the prompt alone"
        );
        assert_eq!(a.tokens.len(), 24);
    }
    assert!(engine.stats.steps.load(Ordering::Relaxed) > 0);
}

per_backend!(a_tiny_kv_pool_preempts_yet_every_request_completes_identically);
async fn a_tiny_kv_pool_preempts_yet_every_request_completes_identically(backend: BackendConfig) {
    let large = start_on(backend, config(256, 512));
    let prompts: Vec<Vec<u32>> = prompts(&large).into_iter().cycle().take(16).collect();
    let mut expected = Vec::new();
    for p in &prompts {
        expected.push(collect(large.submit(p.clone(), greedy(20)).unwrap()).await);
    }
    drop(large);

    // 12 blocks of 16 tokens hold about four of these requests at once.
    let small = start_on(backend, config(256, 12));
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| small.submit(p.clone(), greedy(20)).unwrap())
        .collect();
    let mut got = Vec::new();
    for s in streams {
        got.push(collect(s).await);
    }
    assert_eq!(got, expected);
    assert!(
        small.stats.preemptions_total() > 0,
        "the pool was meant to be too small"
    );
    assert_eq!(
        small.stats.kv_blocks_used.load(Ordering::Relaxed),
        0,
        "every block is free afterwards"
    );
    assert!(small.stats.kv_blocks_peak.load(Ordering::Relaxed) <= 12);
}

per_backend!(cancelled_requests_free_their_blocks);
async fn cancelled_requests_free_their_blocks(backend: BackendConfig) {
    let engine = start_on(backend, config(64, 64));
    let prompts = prompts(&engine);
    let keep = engine.submit(prompts[1].clone(), greedy(40)).unwrap();
    let mut dropped: Vec<_> = prompts[2..5]
        .iter()
        .map(|p| engine.submit(p.clone(), greedy(40)).unwrap())
        .collect();
    // Wait until each dropped request has produced a token, so it holds blocks, then drop it.
    for stream in dropped.iter_mut() {
        assert!(matches!(stream.next().await, Some(Event::Started { .. })));
        assert!(matches!(stream.next().await, Some(Event::Token { .. })));
    }
    drop(dropped);
    let out = collect(keep).await;
    assert_eq!(out.completion_tokens, 40);
    assert_eq!(engine.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
    assert_eq!(engine.stats.running.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_end_at_max_tokens_stop_strings_and_stop_ids() {
    let engine = start(config(256, 256));
    let prompt = engine.codec.encode("1, 2, 3, 4, 5,").unwrap();
    let free = collect(engine.submit(prompt.clone(), greedy(12)).unwrap()).await;
    assert_eq!(
        (free.reason, free.completion_tokens),
        (FinishReason::Length, 12)
    );
    assert_eq!(
        free.text,
        engine.codec.decode(&free.tokens).unwrap(),
        "streamed text is the decoded tokens"
    );

    // Stop at the second token's text: the output is what came before it.
    let second = engine.codec.decode(&free.tokens[..2]).unwrap();
    let first = engine.codec.decode(&free.tokens[..1]).unwrap();
    let stop = second[first.len()..].to_owned();
    assert!(
        !stop.is_empty() && !first.contains(&stop),
        "the test needs a distinct second piece, got {first:?} / {stop:?}"
    );
    let stopped = collect(
        engine
            .submit(
                prompt.clone(),
                SamplingParams {
                    stop: vec![stop.clone()],
                    ..greedy(12)
                },
            )
            .unwrap(),
    )
    .await;
    assert_eq!(
        (stopped.reason, stopped.text.as_str()),
        (FinishReason::Stop, first.as_str())
    );

    // A stop id ends the output at its first occurrence, the stop token included in the ids.
    let stop_id = free.tokens[3];
    let first_at = free.tokens.iter().position(|t| *t == stop_id).unwrap();
    let by_id = collect(
        engine
            .submit(
                prompt,
                SamplingParams {
                    stop_token_ids: vec![stop_id],
                    ..greedy(12)
                },
            )
            .unwrap(),
    )
    .await;
    assert_eq!(by_id.reason, FinishReason::Stop);
    assert_eq!(by_id.tokens, free.tokens[..=first_at]);
}

per_backend!(seeded_sampling_is_reproducible_while_batched);
async fn seeded_sampling_is_reproducible_while_batched(backend: BackendConfig) {
    let engine = start_on(backend, config(256, 256));
    let prompt = engine.codec.encode("Once upon a time").unwrap();
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 50,
        seed: Some(42),
        max_tokens: 16,
        logprobs: 3,
        ..SamplingParams::default()
    };
    let alone = collect(engine.submit(prompt.clone(), params.clone()).unwrap()).await;
    let noise: Vec<_> = (0..3)
        .map(|_| {
            engine
                .submit(engine.codec.encode("Hello there").unwrap(), greedy(16))
                .unwrap()
        })
        .collect();
    let again = collect(engine.submit(prompt, params).unwrap()).await;
    drop(noise);
    assert_eq!(alone.tokens, again.tokens);
}

per_backend!(a_seeded_request_samples_the_same_tokens_on_the_device_as_on_the_host);
/// Without log-probabilities the backend samples the row itself (`RowOutput::Sample`); with
/// them the row comes back and the engine samples it: the same seed gives the same tokens.
async fn a_seeded_request_samples_the_same_tokens_on_the_device_as_on_the_host(
    backend: BackendConfig,
) {
    let engine = start_on(backend, config(256, 256));
    let prompt = engine.codec.encode("Once upon a time").unwrap();
    for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.8, 50, 0.95), (1.2, 0, 0.8)] {
        let on_device = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(9),
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let on_host = SamplingParams {
            logprobs: 1,
            ..on_device.clone()
        };
        let device = collect(engine.submit(prompt.clone(), on_device).unwrap()).await;
        let host = collect(engine.submit(prompt.clone(), on_host).unwrap()).await;
        assert_eq!(device.tokens, host.tokens, "{temperature} {top_k} {top_p}");
        assert_eq!(device.tokens.len(), 24);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_engine_cannot_serve_are_refused_up_front() {
    let engine = start(config(256, 4));
    let prompt = engine.codec.encode("Hello").unwrap();
    let too_long = engine.submit(prompt.clone(), greedy(9000)).unwrap_err();
    assert!(
        matches!(too_long, EngineError::ContextExceeded { context: 8192, .. }),
        "{too_long}"
    );
    let too_big = engine.submit(prompt.clone(), greedy(100)).unwrap_err();
    assert!(
        matches!(too_big, EngineError::RequestTooLarge { blocks: 4, .. }),
        "{too_big}"
    );
    let bad = engine.submit(vec![u32::MAX], greedy(4)).unwrap_err();
    assert!(bad.to_string().contains("outside the vocabulary"), "{bad}");
    let bad = engine
        .submit(
            prompt,
            SamplingParams {
                top_p: 2.0,
                ..greedy(4)
            },
        )
        .unwrap_err();
    assert!(bad.to_string().contains("top_p"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_kv_cache_pauses_admissions_until_it_drains() {
    // 64 blocks of 16 tokens. A 977-token prompt takes 62 (96.9 %, over the 95 % mark) and its
    // 31 new tokens stay within 63, so a block is always free: only the pressure keeps the next
    // request out.
    let engine = start(config(512, 64));
    let prompts = prompts(&engine);
    let long_prompt: Vec<u32> = prompts[1].iter().copied().cycle().take(977).collect();
    let mut long = engine.submit(long_prompt, greedy(31)).unwrap();
    assert!(matches!(long.next().await, Some(Event::Started { .. })));
    support::http::eventually(Duration::from_secs(60), "usage passes 95 %", || async {
        engine.stats.kv_pressure.load(Ordering::Relaxed)
    })
    .await;
    let short = engine.submit(prompts[6].clone(), greedy(4)).unwrap();
    support::http::eventually(Duration::from_secs(10), "the new request waits", || async {
        engine.stats.waiting.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(engine.stats.running.load(Ordering::Relaxed), 1);
    assert!(
        engine.stats.kv_blocks_used.load(Ordering::Relaxed) < 64,
        "a block was free"
    );
    let out = collect(long).await;
    assert_eq!(out.completion_tokens, 31);
    // Drained: admissions resume.
    assert_eq!(collect(short).await.completion_tokens, 4);
    assert!(!engine.stats.kv_pressure.load(Ordering::Relaxed));
    assert_eq!(engine.stats.preemptions_total(), 0);
}

/// Drains a stream; its run time and the time from `since` to its end.
async fn run_time_and_wall(
    mut stream: parallax_agent::engine::RequestStream,
    since: std::time::Instant,
) -> (RunTime, Duration) {
    loop {
        if let Event::Finished { run_time, .. } = stream.next().await.expect("a Finished event") {
            return (run_time, since.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_time_counts_the_steps_a_request_ran_in_not_those_it_sat_out() {
    let engine = start(config(512, 512));
    let prompt = prompts(&engine).swap_remove(0);
    let since = std::time::Instant::now();
    let fast = engine.submit(prompt.clone(), greedy(24)).unwrap();
    let slow = RequestOptions {
        bin: Bin::Slow,
        ..RequestOptions::default()
    };
    let slow = engine.submit_with(prompt, greedy(24), slow).unwrap();
    let (fast, fast_wall) = run_time_and_wall(fast, since).await;
    let (slow, slow_wall) = run_time_and_wall(slow, since).await;
    for (run, wall) in [(fast, fast_wall), (slow, slow_wall)] {
        assert!(
            run.prefill > Duration::ZERO && run.prefill <= run.total,
            "{run:?}"
        );
        assert!(run.total <= wall, "{run:?} against {wall:?}");
    }
    // Beside the fast request the slow one ran about one step in twelve: it sat out about half
    // of the steps between its arrival and its end, and those are not its run time.
    assert!(
        slow.total.as_secs_f64() < 0.8 * slow_wall.as_secs_f64(),
        "{slow:?} against {slow_wall:?}"
    );
}

#[test]
fn a_cuda_device_on_a_build_without_cuda_names_the_feature_and_the_build_script() {
    let backend = BackendConfig {
        device: parallax_agent::engine::DeviceSpec::Cuda(0),
        ..BackendConfig::default()
    };
    let source = parallax_agent::engine::ModelSource::Dummy("smollm2-135m".into());
    let error = parallax_agent::engine::load(&source, &backend).expect_err("no CUDA here");
    let text = error.to_string();
    assert!(
        text.contains("`cuda` cargo feature") && text.contains("scripts/build-cuda"),
        "{text}"
    );
}
