//! Failure recovery on the real test model, with a forward pass that fails whenever a chosen
//! ("poisoned") token is in its batch (the `fault-injection` feature): the failing request is
//! isolated by bisection and fails alone, its batch completes with the tokens it would have had
//! without the fault, and repeated failures trip the circuit breaker into one request at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::scheduling::breaker::BreakerConfig;
use parallax_agent::engine::{self, EngineConfig, EngineHandle, Event, ModelSource};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::http::{MODEL, TestServer, sample, server_config};
use support::{collect, greedy, prompts};

/// A token none of the test prompts or their greedy continuations contain.
fn poison(engine: &EngineHandle) -> u32 {
    engine.codec.encode(" Zanzibar").unwrap()[0]
}

fn poisoned_engine(poison_token: u32, breaker: BreakerConfig) -> EngineHandle {
    let (executor, codec) = engine::load_with_tokenizer(
        &ModelSource::Gguf(support::model_path()),
        None,
        &engine::BackendConfig::default(),
    )
    .unwrap();
    engine::start(
        executor,
        codec,
        EngineConfig {
            poison_token: Some(poison_token),
            breaker,
            ..support::config(512, 2048)
        },
    )
    .unwrap()
}

/// The first event after the request started.
async fn started(stream: &mut engine::RequestStream) -> usize {
    match stream.next().await {
        Some(Event::Started { batch_size, .. }) => batch_size,
        other => panic!("expected Started, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_request_fails_alone_and_its_batch_completes_unchanged() {
    let clean = support::start(support::config(512, 2048));
    let prompts = prompts(&clean);
    let poison_token = poison(&clean);
    let mut expected = Vec::new();
    for p in &prompts {
        let out = collect(clean.submit(p.clone(), greedy(24)).unwrap()).await;
        assert!(
            !p.contains(&poison_token) && !out.tokens.contains(&poison_token),
            "the poison must not occur in the others' prompts or outputs"
        );
        expected.push(out);
    }
    drop(clean);

    let engine = poisoned_engine(poison_token, BreakerConfig::default());
    let mut streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(p.clone(), greedy(24)).unwrap())
        .collect();
    // Once they run, the poisoned request joins their batch.
    for stream in &mut streams {
        started(stream).await;
    }
    let mut poisoned_prompt = prompts[0].clone();
    poisoned_prompt.push(poison_token);
    let mut poisoned = engine.submit(poisoned_prompt, greedy(8)).unwrap();
    match poisoned.next().await {
        Some(Event::Failed { message }) => assert!(message.contains("failed"), "{message}"),
        other => panic!("the poisoned request should fail, got {other:?}"),
    }
    assert!(poisoned.next().await.is_none(), "Failed is the last event");

    for (stream, expected) in streams.into_iter().zip(&expected) {
        let out = collect(stream).await;
        assert_eq!(
            out.tokens, expected.tokens,
            "a request of the poisoned batch changed"
        );
    }
    assert_eq!(engine.stats.isolated_requests.load(Ordering::Relaxed), 1);
    assert!(engine.stats.failed_steps.load(Ordering::Relaxed) >= 1);
    assert_eq!(engine.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_trip_the_breaker_into_one_request_at_a_time_until_it_closes() {
    let probe = support::start(support::config(64, 64));
    let poison_token = poison(&probe);
    let prompts = prompts(&probe);
    drop(probe);
    let engine = poisoned_engine(
        poison_token,
        BreakerConfig {
            threshold: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(2),
        },
    );
    for _ in 0..2 {
        let mut bad = engine.submit(vec![poison_token], greedy(4)).unwrap();
        assert!(matches!(bad.next().await, Some(Event::Failed { .. })));
    }
    // Open: requests submitted together run one at a time.
    let mut streams: Vec<_> = prompts[..3]
        .iter()
        .map(|p| engine.submit(p.clone(), greedy(2)).unwrap())
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(started(stream).await, 1, "single-request mode");
        if i == 0 {
            assert_eq!(
                engine.stats.breaker_state.load(Ordering::Relaxed),
                1,
                "open"
            );
        }
    }
    for stream in streams {
        collect(stream).await;
    }
    // After the cool-down, a clean step closes it and requests batch again.
    support::http::eventually(Duration::from_secs(10), "the cool-down passes", || async {
        let mut s = engine.submit(prompts[0].clone(), greedy(1)).unwrap();
        started(&mut s).await;
        collect(s).await;
        engine.stats.breaker_state.load(Ordering::Relaxed) == 2
    })
    .await;
    let mut streams: Vec<_> = prompts[..4]
        .iter()
        .map(|p| engine.submit(p.clone(), greedy(8)).unwrap())
        .collect();
    let mut largest = 0;
    for stream in &mut streams {
        largest = largest.max(started(stream).await);
    }
    for stream in streams {
        collect(stream).await;
    }
    assert!(largest > 1, "batches again after closing");
    assert_eq!(
        engine.stats.breaker_state.load(Ordering::Relaxed),
        0,
        "closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_the_poisoned_request_gets_a_500_and_the_others_complete() {
    let probe = support::start(support::config(64, 64));
    let poison_token = poison(&probe);
    drop(probe);
    let config = EngineConfig {
        poison_token: Some(poison_token),
        ..support::config(512, 2048)
    };
    let (server, _engine) = TestServer::start_with(server_config(), config).await;
    let server = std::sync::Arc::new(server);
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let prompt = if i == 3 {
                    json!([1, 2, poison_token])
                } else {
                    json!(format!("Story number {i}:"))
                };
                server
                    .post_json(
                        "/v1/completions",
                        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "ignore_eos": true}),
                    )
                    .await
            })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let (status, body): (u16, Value) = request.await.unwrap();
        if i == 3 {
            assert_eq!(status, 500, "{body}");
            assert_eq!(body["error"]["code"], "engine_failure");
        } else {
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["usage"]["completion_tokens"], 12);
        }
    }
    let text = server.metrics().await;
    assert_eq!(
        sample(&text, "parallax_isolated_requests_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "vllm:request_success_total",
            &[("finished_reason", "error")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fault_ends_every_request_with_its_reason_and_turns_readiness_off() {
    // A device failure (a CUDA error poisons its context) is nobody's request: nothing is
    // retried on it, every request in flight ends with an explicit error, and the engine stops.
    let probe = support::start(support::config(64, 64));
    let fault_token = poison(&probe);
    drop(probe);
    let config = EngineConfig {
        device_fault_token: Some(fault_token),
        ..support::config(512, 2048)
    };
    let (server, engine) = TestServer::start_with(server_config(), config).await;
    assert_eq!(server.get("/ready").await.0, 200);
    let mut bystander = engine
        .submit(
            engine.codec.encode("Once upon a time").unwrap(),
            greedy(200),
        )
        .unwrap();
    started(&mut bystander).await;
    let mut culprit = engine.submit(vec![1, 2, fault_token], greedy(4)).unwrap();
    for stream in [&mut culprit, &mut bystander] {
        loop {
            match stream.next().await {
                Some(Event::Failed { message }) => {
                    assert!(message.contains("device failed"), "{message}");
                    break;
                }
                Some(Event::Token { .. } | Event::Started { .. }) => {}
                other => panic!("expected Failed, got {other:?}"),
            }
        }
    }
    support::http::eventually(Duration::from_secs(10), "the engine stops", || async {
        !engine.is_running()
    })
    .await;
    let (status, body) = server.get("/ready").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("device failed") && body.contains("injected device fault"),
        "{body}"
    );
    assert!(engine.fault().is_some());
    // New work is refused, not queued forever.
    let (status, body) = server
        .post_json(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert!(status >= 500, "{status}: {body}");
}
