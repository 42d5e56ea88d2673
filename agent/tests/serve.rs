//! `parallax-agent serve` on the real test model, through a real HTTP client on a loopback
//! socket: answers, streams, concurrency, cancellation, validation, metrics, readiness and
//! shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::StreamExt;
use parallax_agent::server::openapi::ROUTES;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::http::{
    MODEL, TestServer, eventually, load_into, sample, samples, server_config, sse_events,
};

/// The text, finish reason and usage of a plain (non-streamed) answer.
fn plain_parts(api: &str, body: &Value) -> (String, String, Value) {
    let choice = &body["choices"][0];
    let text = if api == "chat" {
        choice["message"]["content"].as_str().unwrap().to_owned()
    } else {
        choice["text"].as_str().unwrap().to_owned()
    };
    (
        text,
        choice["finish_reason"].as_str().unwrap().to_owned(),
        body["usage"].clone(),
    )
}

/// The same, put together from a stream's chunks.
fn streamed_parts(api: &str, events: &[Value]) -> (String, String, Value) {
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = Value::Null;
    for event in events {
        if !event["usage"].is_null() {
            usage = event["usage"].clone();
            // Parallax's extension (the request's placement) is not part of OpenAI's usage.
            if let Some(usage) = usage.as_object_mut() {
                usage.remove("parallax");
            }
        }
        for choice in event["choices"].as_array().unwrap() {
            let piece = if api == "chat" {
                &choice["delta"]["content"]
            } else {
                &choice["text"]
            };
            text.push_str(piece.as_str().unwrap_or(""));
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = reason.to_owned();
            }
        }
    }
    (text, finish, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_concatenate_to_the_plain_answer_with_the_same_usage() {
    let (server, engine) = TestServer::start().await;
    let chat_prompt = engine
        .codec
        .chat_prompt(&[parallax_agent::engine::Message {
            role: "user".into(),
            content: "Name three colours.".into(),
        }])
        .unwrap();
    let cases = [
        (
            "completion",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}),
            engine.codec.encode("Once upon a time").unwrap().len(),
        ),
        (
            "chat",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}],
                   "max_tokens": 20, "temperature": 0}),
            engine.codec.encode(&chat_prompt).unwrap().len(),
        ),
    ];
    for (api, path, body, prompt_tokens) in cases {
        let (status, plain) = server.post_json(path, &body).await;
        assert_eq!(status, 200, "{api}: {plain}");
        let (text, finish, usage) = plain_parts(api, &plain);
        assert!(!text.is_empty(), "{api}: empty answer");
        assert_eq!(usage["prompt_tokens"], prompt_tokens, "{api}");
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=20).contains(&completion), "{api}: {usage}");
        assert_eq!(
            finish == "length",
            completion == 20,
            "{api}: {finish} after {completion}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            prompt_tokens as u64 + completion
        );
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0, "{api}");

        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        streaming["stream_options"] = json!({"include_usage": true});
        let response = server.post(path, &streaming).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = sse_events(&response.text().await.unwrap());
        // The same prompt again: its whole blocks (16 tokens each, the last token computed
        // again) come from the prefix cache, and the usage says so.
        let (streamed_text, streamed_finish, mut streamed_usage) = streamed_parts(api, &events);
        let cached = &mut streamed_usage["prompt_tokens_details"]["cached_tokens"];
        assert_eq!(*cached, (prompt_tokens - 1) / 16 * 16, "{api}");
        *cached = json!(0);
        assert_eq!(
            (streamed_text, streamed_finish, streamed_usage),
            (text, finish, usage),
            "{api}"
        );
        let object = if api == "chat" {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        assert!(
            events
                .iter()
                .all(|e| e["object"] == object && e["model"] == MODEL)
        );
        let id = &events[0]["id"];
        assert!(events.iter().all(|e| &e["id"] == id), "one id per stream");
        if api == "chat" {
            assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        }
        // Only the last chunk carries usage; it has no choices.
        let last = events.last().unwrap();
        assert_eq!(last["choices"].as_array().unwrap().len(), 0);
        assert!(
            events[..events.len() - 1]
                .iter()
                .all(|e| e["usage"].is_null())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_probabilities_come_in_each_apis_shape() {
    let (server, _engine) = TestServer::start().await;
    let (status, body) = server
        .post_json(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                    "temperature": 0, "logprobs": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 4);
    let tokens: String = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, body["choices"][0]["text"].as_str().unwrap());
    for (i, top) in logprobs["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        let chosen = logprobs["token_logprobs"][i].as_f64().unwrap();
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (chosen - best).abs() < 1e-4 && chosen <= 0.0,
            "{chosen} vs {best}"
        );
    }

    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        content
            .iter()
            .all(|t| t["top_logprobs"].as_array().unwrap().len() == 2
                && t["bytes"].is_array()
                && t["logprob"].as_f64().unwrap() <= 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_requests_succeed_and_the_metrics_count_them() {
    let (server, engine) = TestServer::start().await;
    let server = std::sync::Arc::new(server);
    let requests: Vec<_> = (0..32)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let stream = i % 2 == 0;
                let body = json!({"model": MODEL, "prompt": format!("Count to {i}:"),
                                  "max_tokens": 8, "ignore_eos": true, "temperature": 0,
                                  "stream": stream});
                if stream {
                    let mut streaming = body.clone();
                    streaming["stream_options"] = json!({"include_usage": true});
                    let response = server.post("/v1/completions", &streaming).await;
                    assert_eq!(response.status(), 200);
                    streamed_parts("completion", &sse_events(&response.text().await.unwrap())).2
                } else {
                    let (status, body) = server.post_json("/v1/completions", &body).await;
                    assert_eq!(status, 200, "{body}");
                    body["usage"].clone()
                }
            })
        })
        .collect();
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    for request in requests {
        let usage = request.await.unwrap();
        assert_eq!(usage["completion_tokens"], 8);
        prompt_tokens += usage["prompt_tokens"].as_u64().unwrap();
        cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
    }

    let text = server.metrics().await;
    let model = [("model_name", MODEL)];
    let value = |name: &str| sample(&text, name, &model).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(
        sample(
            &text,
            "vllm:request_success_total",
            &[("model_name", MODEL), ("finished_reason", "length")]
        ),
        Some(32.0)
    );
    assert_eq!(value("vllm:generation_tokens_total"), 32.0 * 8.0);
    assert_eq!(value("vllm:prompt_tokens_total"), prompt_tokens as f64);
    // Each request looked its prompt up in the prefix cache once (nothing was preempted).
    assert_eq!(
        value("vllm:prefix_cache_queries_total"),
        prompt_tokens as f64
    );
    assert_eq!(value("vllm:prefix_cache_hits_total"), cached_tokens as f64);
    for reason in [
        "token_budget",
        "sequence_cap",
        "blocks",
        "kv_pressure",
        "resting_bin",
        "exclusive",
        "held",
        "shared_prefix",
    ] {
        let labels = [("model_name", MODEL), ("reason", reason)];
        assert!(
            sample(&text, "parallax_admission_stalls_total", &labels).is_some(),
            "{reason}"
        );
    }
    for bin in ["fast", "medium"] {
        let bound = sample(&text, "parallax_bin_bound_seconds", &[("bin", bin)]);
        assert!(bound.is_some_and(|b| b > 0.0), "{bin}: {bound:?}");
    }
    for histogram in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ] {
        assert_eq!(value(&format!("{histogram}_count")), 32.0, "{histogram}");
    }
    // Seven gaps between eight tokens, per request.
    assert_eq!(value("vllm:inter_token_latency_seconds_count"), 32.0 * 7.0);
    // The same latencies by bin and priority: each class counts the requests admitted in it.
    let admitted = samples(&text, "parallax_admissions_total");
    assert!(!admitted.is_empty());
    for (histogram, per_request) in [
        ("parallax_time_to_first_token_seconds", 1.0),
        ("parallax_e2e_request_latency_seconds", 1.0),
        ("parallax_request_queue_time_seconds", 1.0),
        ("parallax_inter_token_latency_seconds", 7.0),
    ] {
        let counts = samples(&text, &format!("{histogram}_count"));
        assert_eq!(counts.len(), admitted.len(), "{histogram}: {counts:?}");
        for (labels, requests) in &admitted {
            let count = counts.iter().find(|(l, _)| l == labels).map(|c| c.1);
            assert_eq!(
                count,
                Some(requests * per_request),
                "{histogram}{{{labels}}}"
            );
        }
    }
    assert_eq!(value("parallax_tensor_parallel_size"), 1.0);
    // Every request's tokens went through steps; steps carried at least one sequence each.
    let steps = value("parallax_step_duration_seconds_count");
    assert_eq!(steps, engine.stats.steps.load(Ordering::Relaxed) as f64);
    assert!(
        value("parallax_batch_size_sum") >= 32.0 * 8.0 && steps < 32.0 * 8.0,
        "batching"
    );
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("vllm:num_requests_waiting"), 0.0);
    // The degradation watch is exported from the start (no baseline yet: nothing degraded).
    for signal in ["latency", "throughput", "errors"] {
        assert_eq!(
            sample(&text, "parallax_degraded", &[("signal", signal)]),
            Some(0.0)
        );
    }
    assert_eq!(value("vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(
        sample(
            &text,
            "vllm:cache_config_info",
            &[("block_size", "16"), ("num_gpu_blocks", "2048")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_request() {
    let (server, engine) = TestServer::start().await;
    let response = server
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                    "max_tokens": 4000, "ignore_eos": true, "stream": true}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(engine.stats.running.load(Ordering::Relaxed), 1);
    drop(chunks);

    eventually(
        Duration::from_secs(30),
        "the request is dropped",
        || async {
            let text = server.metrics().await;
            let model = [("model_name", MODEL)];
            sample(&text, "vllm:num_requests_running", &model) == Some(0.0)
                && sample(&text, "vllm:kv_cache_usage_perc", &model) == Some(0.0)
                && sample(
                    &text,
                    "vllm:request_success_total",
                    &[("finished_reason", "abort")],
                ) == Some(1.0)
        },
    )
    .await;
    assert_eq!(engine.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
    assert!(engine.stats.generation_tokens.load(Ordering::Relaxed) < 4000);

    // A client waiting for a whole (non-streamed) answer that gives up cancels it too.
    let gave_up = server
        .client
        .post(server.url("/v1/completions"))
        .timeout(Duration::from_millis(300))
        .json(&json!({"model": MODEL, "prompt": "Hi", "max_tokens": 4000, "ignore_eos": true}))
        .send()
        .await;
    assert!(gave_up.is_err(), "the answer cannot have come in 300 ms");
    eventually(
        Duration::from_secs(30),
        "the abandoned request is dropped",
        || async {
            let text = server.metrics().await;
            sample(&text, "vllm:num_requests_running", &[]) == Some(0.0)
                && sample(
                    &text,
                    "vllm:request_success_total",
                    &[("finished_reason", "abort")],
                ) == Some(2.0)
        },
    )
    .await;
    assert_eq!(engine.stats.kv_blocks_used.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_answers_with_its_status_and_param() {
    let (server, _engine) = TestServer::start().await;
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let completion = |extra: Value| {
        let mut body = json!({"model": MODEL, "prompt": "Hi"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (
            "/v1/completions",
            completion(json!({"temperature": 2.5})),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            completion(json!({"temperature": -1})),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            completion(json!({"top_p": 0})),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            completion(json!({"top_p": 1.5})),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            completion(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            completion(json!({"max_tokens": "ten"})),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            completion(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            completion(json!({"stop": [""]})),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            completion(json!({"stop": 5})),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            completion(json!({"n": 0})),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            completion(json!({"n": 129})),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            completion(json!({"n": 2, "best_of": 1})),
            400,
            Some("best_of"),
        ),
        (
            "/v1/completions",
            completion(json!({"best_of": 2, "stream": true})),
            400,
            Some("best_of"),
        ),
        (
            "/v1/completions",
            completion(json!({"presence_penalty": 3})),
            400,
            Some("presence_penalty"),
        ),
        (
            "/v1/completions",
            completion(json!({"frequency_penalty": -2.5})),
            400,
            Some("frequency_penalty"),
        ),
        (
            "/v1/completions",
            completion(json!({"repetition_penalty": 0})),
            400,
            Some("repetition_penalty"),
        ),
        (
            "/v1/completions",
            completion(json!({"logit_bias": {"5": 200}})),
            400,
            Some("logit_bias"),
        ),
        (
            "/v1/completions",
            completion(json!({"logit_bias": {"x": 1}})),
            400,
            Some("logit_bias"),
        ),
        (
            "/v1/completions",
            completion(json!({"min_tokens": 20})),
            400,
            Some("min_tokens"),
        ),
        (
            "/v1/completions",
            completion(json!({"min_tokens": -1})),
            400,
            Some("min_tokens"),
        ),
        (
            "/v1/completions",
            completion(json!({"stop_token_ids": [-1]})),
            400,
            Some("stop_token_ids"),
        ),
        (
            "/v1/completions",
            completion(json!({"prompt": []})),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            completion(json!({"prompt": ["a", ""]})),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            completion(json!({"prompt": ["a", "b"], "n": 65})),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            completion(json!({"stream": true, "stream_options": {"continuous_usage_stats": true}})),
            400,
            Some("stream_options"),
        ),
        (
            "/v1/completions",
            completion(json!({"logprobs": 21})),
            400,
            Some("logprobs"),
        ),
        (
            "/v1/completions",
            completion(json!({"echo": true})),
            400,
            Some("echo"),
        ),
        (
            "/v1/completions",
            completion(json!({"logit_bias": {"50256": -100}})),
            400,
            Some("logit_bias"),
        ),
        (
            "/v1/completions",
            completion(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
        ),
        (
            "/v1/completions",
            completion(json!({"prompt": [1, 99999999]})),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            completion(json!({"prompt": ""})),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            completion(json!({"max_tokens": 9000})),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            completion(json!({"model": "gpt-4"})),
            404,
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logprobs": true, "top_logprobs": 30})),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function"}]})),
            400,
            Some("tools"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_object"}})),
            400,
            Some("response_format"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": []})),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            400,
            Some("messages[0].content[0].type"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_completion_tokens": 10000})),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"model": "nope"})),
            404,
            Some("model"),
        ),
    ];
    for (path, body, status, param) in &cases {
        let (got, answer) = server.post_json(path, body).await;
        assert_eq!(got, *status, "{path} {body}: {answer}");
        let error = &answer["error"];
        assert_eq!(error["param"].as_str(), *param, "{path} {body}: {answer}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["code"].is_string());
    }
    // The context error says both numbers.
    let (_, answer) = server
        .post_json("/v1/completions", &completion(json!({"max_tokens": 9000})))
        .await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("8192") && message.contains("9000"),
        "{message}"
    );

    // Malformed JSON: 400 without a param.
    for raw in [
        "{\"model\": ",
        "not json",
        "{\"model\": \"smollm2\", \"prompt\": \"x\"} trailing",
    ] {
        let response = server
            .client
            .post(server.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{raw}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_json", "{raw}");
        assert!(answer["error"]["param"].is_null());
    }
    // Oversized body: 413 in the same shape (this server's limit is 64 KiB).
    let huge = completion(json!({"prompt": "word ".repeat(20_000)}));
    let (status, answer) = server.post_json("/v1/completions", &huge).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "request_too_large");

    // Every refusal was counted; nothing ran.
    let text = server.metrics().await;
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("parallax_request_errors_total"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(refused, (cases.len() + 1 + 3 + 1) as f64);
    assert_eq!(
        sample(&text, "vllm:generation_tokens_total", &[]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_model_is_loaded() {
    let server = TestServer::unloaded(server_config()).await;
    assert_eq!(server.get("/health").await.0, 200);
    let (status, body) = server.get("/ready").await;
    assert_eq!((status, body.contains("loading")), (503, true), "{body}");
    let (status, answer) = server
        .post_json("/v1/completions", &json!({"model": MODEL, "prompt": "Hi"}))
        .await;
    assert_eq!(status, 503);
    assert_eq!(answer["error"]["code"], "model_loading");
    assert!(
        sample(&server.metrics().await, "parallax_model_loaded", &[]) == Some(0.0),
        "not loaded yet"
    );

    load_into(&server.server, support::config(512, 256));
    assert_eq!(server.get("/ready").await.0, 200);
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 8192);
}

/// Starts a streamed completion of `max_tokens`, begins the shutdown once its first chunk is in,
/// and returns every event of the stream.
async fn stream_through_shutdown(server: &mut TestServer, max_tokens: usize) -> Vec<Value> {
    let response = server
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
                    "ignore_eos": true, "stream": true}),
        )
        .await;
    let mut chunks = response.bytes_stream();
    let mut body = String::from_utf8(chunks.next().await.unwrap().unwrap().to_vec()).unwrap();
    server.begin_shutdown();
    while let Some(chunk) = chunks.next().await {
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    sse_events(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let (mut server, _engine) = TestServer::start().await;
    let events = stream_through_shutdown(&mut server, 24).await;
    assert_eq!(streamed_parts("completion", &events).1, "length");
    server.stopped().await.unwrap();
    // No longer listening.
    assert!(
        server
            .client
            .get(server.url("/health"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_at_the_shutdown_deadline_end_with_an_explicit_error() {
    let config = parallax_agent::server::ServerConfig {
        shutdown_timeout: Duration::from_millis(200),
        ..server_config()
    };
    let (mut server, engine) = TestServer::start_with(config, support::config(512, 2048)).await;
    let events = stream_through_shutdown(&mut server, 4000).await;
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "server_shutting_down", "{last}");
    server.stopped().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the engine drops the request",
        || async {
            engine.stats.running.load(Ordering::Relaxed) == 0
                && engine.stats.kv_blocks_used.load(Ordering::Relaxed) == 0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_the_server_answers() {
    let (server, _engine) = TestServer::start().await;
    let (status, text) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    let document: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let documented: BTreeSet<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let routes: BTreeSet<&str> = ROUTES.iter().map(|r| r.path).collect();
    assert_eq!(documented, routes);
    for route in ROUTES {
        let request = match route.method {
            "get" => server.client.get(server.url(route.path)),
            _ => server.client.post(server.url(route.path)).body("{}"),
        };
        let status = request.send().await.unwrap().status().as_u16();
        assert!(
            status != 404 && status != 405,
            "{} {} answers {status}",
            route.method,
            route.path
        );
    }
    // The request schemas list every field the handlers accept.
    let completion = &document["components"]["schemas"]["CompletionRequest"]["properties"];
    for field in [
        "model",
        "prompt",
        "max_tokens",
        "stream",
        "stream_options",
        "logprobs",
        "stop",
    ] {
        assert!(completion.get(field).is_some(), "CompletionRequest.{field}");
    }
    // …vLLM's extensions among them, and bounds no looser than validation's.
    let schemas = &document["components"]["schemas"];
    for field in [
        "min_tokens",
        "repetition_penalty",
        "stop_token_ids",
        "add_special_tokens",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "max_completion_tokens",
        "best_of",
    ] {
        assert!(completion.get(field).is_some(), "CompletionRequest.{field}");
        assert!(
            schemas["ChatCompletionRequest"]["properties"]
                .get(field)
                .is_some()
                || field == "best_of",
            "ChatCompletionRequest.{field}"
        );
    }
    assert_eq!(schemas["TokenId"]["minimum"], 0);
    assert_eq!(
        schemas["ContentPart"]["properties"]["type"]["enum"],
        json!(["text"])
    );
    assert_eq!(schemas["ContentPart"]["required"], json!(["type", "text"]));
    assert_eq!(completion["n"]["maximum"], 128);
    assert_eq!(completion["top_p"]["exclusiveMinimum"], 0);
    assert_eq!(
        schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"],
        1
    );
    assert_eq!(
        schemas["CompletionRequest"]["required"],
        json!(["prompt"]),
        "model may be left out"
    );
    // Unknown paths answer 404 in OpenAI's shape.
    let (status, body) = server.get("/v1/embeddings").await;
    assert_eq!(status, 404);
    assert!(body.contains("invalid_request_error"));
}
