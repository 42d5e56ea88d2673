//! Bins, priorities, batching headers and admission control, over HTTP on the real test model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::StreamExt;
use parallax_agent::engine::EngineConfig;
use parallax_agent::server::ServerConfig;
use serde_json::{Value, json};
use std::sync::Arc;
use support::http::{MODEL, TestServer, sample, server_config, sse_events};

fn engine(max_num_seqs: usize) -> EngineConfig {
    EngineConfig {
        max_num_seqs,
        ..support::config(512, 2048)
    }
}

fn millis(headers: &reqwest::header::HeaderMap, name: &str) -> f64 {
    let value = headers[name].to_str().unwrap();
    value
        .strip_suffix("ms")
        .unwrap_or_else(|| panic!("{name}: {value}"))
        .parse()
        .unwrap()
}

fn completion(max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
           "ignore_eos": true, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_say_how_the_request_was_placed() {
    let (server, _engine) = TestServer::start().await;
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .header("X-Request-Priority", "high")
        .header("X-Task-Class", "story")
        .json(&completion(8))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers().clone();
    assert!(["fast", "medium", "slow"].contains(&h["x-bin"].to_str().unwrap()));
    let complexity: u8 = h["x-complexity"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&complexity));
    assert!(millis(&h, "x-queue-time") >= 0.0);
    assert!(millis(&h, "x-predicted-time") > 0.0);
    let processing = millis(&h, "x-processing-time");
    assert!(processing > 0.0 && processing < 60_000.0, "{processing}");
    assert_eq!(h["x-batch-size"], "1");
    assert_eq!(h["x-gpu-utilization"], "unavailable (no GPU watched)");

    // A stream sends what is known with its headers, the rest in the usage chunk.
    let mut body = completion(8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = server.post("/v1/completions", &body).await;
    let h = response.headers().clone();
    assert!(h.contains_key("x-bin") && h.contains_key("x-queue-time"));
    assert!(!h.contains_key("x-processing-time"));
    let events = sse_events(&response.text().await.unwrap());
    let placement = &events.last().unwrap()["usage"]["parallax"];
    assert!(
        placement["processing_time_ms"].as_f64().unwrap() > 0.0,
        "{placement}"
    );
    assert_eq!(placement["bin"], h["x-bin"].to_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_scheduling_headers_are_refused_by_name() {
    let (server, _engine) = TestServer::start().await;
    for (header, value) in [
        ("X-Request-Priority", "urgent"),
        ("X-Batch-Preference", "always"),
        ("X-Max-Wait-Time", "a while"),
        ("X-Request-Timeout", "-3s"),
    ] {
        let response = server
            .client
            .post(server.url("/v1/completions"))
            .header(header, value)
            .json(&completion(4))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{header}: {value}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], header, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_queue_bound_gets_429s_and_every_accepted_request_completes() {
    let config = ServerConfig {
        max_queue_requests: 4,
        ..server_config()
    };
    let (server, _engine) = TestServer::start_with(config, engine(2)).await;
    let server = Arc::new(server);
    let flood: Vec<_> = (0..24)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move {
                let response = server.post("/v1/completions", &completion(8)).await;
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                let body: Value = response.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for request in flood {
        let (status, retry_after, body) = request.await.unwrap();
        match status {
            200 => {
                accepted += 1;
                assert_eq!(body["usage"]["completion_tokens"], 8);
            }
            429 => {
                refused += 1;
                assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
                assert_eq!(body["error"]["type"], "rate_limit_exceeded");
                assert_eq!(body["error"]["code"], "queue_full");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(refused > 0, "the flood was not refused at all");
    // At least the queue's four places were taken (arriving together, none had started).
    assert!(accepted >= 4, "{accepted} accepted");
    let text = server.metrics().await;
    assert_eq!(
        sample(
            &text,
            "parallax_rejections_total",
            &[("reason", "queue_full")]
        ),
        Some(f64::from(refused))
    );
    assert_eq!(
        sample(
            &text,
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        Some(f64::from(accepted))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_engine_saturated_high_priority_requests_wait_less_than_low_ones() {
    // One sequence at a time, so every request queues.
    let (server, _engine) = TestServer::start_with(server_config(), engine(1)).await;
    let server = Arc::new(server);
    // Occupy the engine first so that all the others queue together.
    let blocker = {
        let server = server.clone();
        tokio::spawn(async move { server.post("/v1/completions", &completion(24)).await })
    };
    support::http::eventually(std::time::Duration::from_secs(30), "the engine is busy", || {
        let server = server.clone();
        async move {
            sample(&server.metrics().await, "vllm:num_requests_running", &[]) == Some(1.0)
        }
    })
    .await;
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let server = server.clone();
            let priority = if i % 2 == 0 { "low" } else { "high" };
            tokio::spawn(async move {
                let response = server
                    .client
                    .post(server.url("/v1/completions"))
                    .header("X-Request-Priority", priority)
                    .json(&completion(4))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                (priority, millis(response.headers(), "x-queue-time"))
            })
        })
        .collect();
    let (mut high, mut low) = (Vec::new(), Vec::new());
    for request in requests {
        let (priority, queued) = request.await.unwrap();
        if priority == "high" {
            &mut high
        } else {
            &mut low
        }
        .push(queued);
    }
    assert_eq!(blocker.await.unwrap().status(), 200);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&high) < mean(&low),
        "high waited {:.0} ms on average, low {:.0} ms",
        mean(&high),
        mean(&low)
    );
    // Weighted fair queueing at high 4 : low 1 — most of the first six to start are high (five
    // when all twelve arrive before the first is admitted), and low ones are not starved.
    let mut order: Vec<(f64, bool)> = high.iter().map(|q| (*q, true)).collect();
    order.extend(low.iter().map(|q| (*q, false)));
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let high_first = order[..6].iter().filter(|(_, high)| *high).count();
    assert!(high_first >= 4, "{high:?} vs {low:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_its_deadline_ends_with_an_explicit_error() {
    let (server, engine) = TestServer::start_with(server_config(), engine(1)).await;
    let mut long = completion(2000);
    long["stream"] = json!(true);
    let busy = server.post("/v1/completions", &long).await;
    let mut chunks = busy.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .header("X-Request-Timeout", "100ms")
        .json(&completion(4))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_timeout", "{body}");
    drop(chunks);
    support::http::eventually(
        std::time::Duration::from_secs(30),
        "both requests are gone",
        || async {
            engine
                .stats
                .running
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
                && engine
                    .stats
                    .waiting
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_preference_disable_runs_alone_and_enable_joins_a_batch() {
    let (server, _engine) = TestServer::start().await;
    let mut long = completion(48);
    long["stream"] = json!(true);
    let busy = server.post("/v1/completions", &long).await;
    let mut chunks = busy.bytes_stream();
    chunks.next().await.unwrap().unwrap();

    // `disable` waits for the running request to finish, then runs alone.
    let alone = server
        .client
        .post(server.url("/v1/completions"))
        .header("X-Batch-Preference", "disable")
        .json(&completion(4))
        .send()
        .await
        .unwrap();
    assert_eq!(alone.status(), 200);
    assert_eq!(alone.headers()["x-batch-size"], "1");
    // By then the long request had finished: it was not batched with it.
    let mut rest = Vec::new();
    while let Some(chunk) = chunks.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8(rest).unwrap().contains("[DONE]"));

    // `enable` with nothing else running waits its max wait, then runs.
    let enabled = server
        .client
        .post(server.url("/v1/completions"))
        .header("X-Batch-Preference", "enable")
        .header("X-Max-Wait-Time", "30ms")
        .json(&completion(4))
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status(), 200);
    assert!(millis(enabled.headers(), "x-queue-time") >= 29.0);
}
