//! Request parity with vLLM's OpenAI server, over a real socket with the test model: the
//! sampling extensions change the output as vLLM documents them, `n` and `best_of` return
//! distinct, reproducible choices that share their prompt's KV blocks, prompt lists answer each
//! prompt in order, usage can come in every chunk, `model` may be left out, and fields no API
//! defines are ignored with a count (or refused when strict).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::{self, BackendConfig, ModelSource};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use support::http::{MODEL, TestServer, sample, server_config, sse_events};

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "temperature": 0});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

async fn ok(server: &TestServer, path: &str, body: &Value) -> Value {
    let (status, answer) = server.post_json(path, body).await;
    assert_eq!(status, 200, "{path} {body}: {answer}");
    answer
}

/// The streamed events of a request that succeeds.
async fn streamed(server: &TestServer, path: &str, body: &Value) -> Vec<Value> {
    let response = server.post(path, body).await;
    assert_eq!(response.status(), 200, "{path} {body}");
    sse_events(&response.text().await.unwrap())
}

/// Each choice's text, by index, from a completion's or a chat's chunks.
fn streamed_texts(events: &[Value]) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for choice in events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
    {
        let index = choice["index"].as_u64().unwrap() as usize;
        if texts.len() <= index {
            texts.resize(index + 1, String::new());
        }
        let piece = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str())
            .unwrap_or_default();
        texts[index].push_str(piece);
    }
    texts
}

fn texts(answer: &Value) -> Vec<String> {
    answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "choices in index order: {answer}");
            c["text"]
                .as_str()
                .or(c["message"]["content"].as_str())
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Sampled tokens that repeat an earlier one of the same answer.
fn repeats(answer: &Value) -> usize {
    let tokens: Vec<&str> = answer["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tokens.len() - tokens.iter().collect::<BTreeSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_and_logit_bias_change_what_is_sampled() {
    let (server, engine) = TestServer::start().await;
    let base = |prompt: &str, extra: Value| {
        let mut body = completion(
            json!({"prompt": prompt, "max_tokens": 24, "logprobs": 0, "ignore_eos": true}),
        );
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // Prompts whose greedy continuation repeats itself, and a penalty that should break it.
    let commas = "apple, apple, apple, apple, apple, apple,";
    let words = "apple apple apple apple apple apple apple apple apple apple";
    for (prompt, penalty) in [
        (commas, json!({"repetition_penalty": 1.8})),
        (commas, json!({"frequency_penalty": 2.0})),
        (words, json!({"presence_penalty": 2.0})),
    ] {
        let plain = ok(&server, COMPLETIONS, &base(prompt, json!({}))).await;
        let before = repeats(&plain);
        assert!(
            before >= 5,
            "greedy decoding of {prompt:?} repeats: {plain}"
        );
        let answer = ok(&server, COMPLETIONS, &base(prompt, penalty.clone())).await;
        let after = repeats(&answer);
        assert!(
            after < before,
            "{penalty}: {after} repeats against {before}: {answer}"
        );
        // Streamed, the same tokens.
        let mut body = base(prompt, penalty.clone());
        body["stream"] = json!(true);
        assert_eq!(
            streamed_texts(&streamed(&server, COMPLETIONS, &body).await),
            texts(&answer),
            "{penalty}"
        );
    }
    // A bias of 100 on one token makes greedy decoding pick it every time.
    let token = engine.codec.encode(" banana").unwrap()[0];
    let biased = ok(
        &server,
        COMPLETIONS,
        &base(
            commas,
            json!({"logit_bias": {token.to_string(): 100}, "max_tokens": 5, "max_completion_tokens": 4}),
        ),
    )
    .await;
    let text = engine.codec.token_text(token);
    assert_eq!(texts(&biased)[0], text.repeat(4), "{biased}");
    assert_eq!(
        biased["usage"]["completion_tokens"], 4,
        "max_completion_tokens wins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_tokens_holds_the_end_back_until_reached() {
    let (server, _engine) = TestServer::start().await;
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Answer with one word: is the sky blue?"}],
            "max_tokens": 48, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let short = ok(&server, CHAT, &chat(json!({}))).await;
    assert_eq!(short["choices"][0]["finish_reason"], "stop", "{short}");
    let natural = short["usage"]["completion_tokens"].as_u64().unwrap();
    let min = natural + 10;
    let longer = ok(&server, CHAT, &chat(json!({"min_tokens": min}))).await;
    let generated = longer["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        generated >= min,
        "{generated} tokens with min_tokens {min}: {longer}"
    );
    assert_ne!(texts(&longer), texts(&short));
    let mut body = chat(json!({"min_tokens": min, "stream": true}));
    body["stream_options"] = json!({"include_usage": true});
    let events = streamed(&server, CHAT, &body).await;
    assert_eq!(streamed_texts(&events), texts(&longer));
    assert_eq!(
        events.last().unwrap()["usage"]["completion_tokens"],
        generated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_distinct_reproducible_and_share_their_prompt() {
    let (server, engine) = TestServer::start().await;
    // Three blocks of prompt: the second and third choices find them in the prefix cache.
    let prompt = "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined movable metal type, oil-based ink and a wooden press into a system.";
    let prompt_tokens = engine.codec.encode(prompt).unwrap().len();
    assert!(prompt_tokens >= 32, "{prompt_tokens}");
    let body = json!({"prompt": prompt, "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 12});
    let hits_before =
        sample(&server.metrics().await, "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0);
    let first = ok(&server, COMPLETIONS, &body).await;
    let choices = texts(&first);
    assert_eq!(choices.len(), 3);
    assert_eq!(
        choices.iter().collect::<BTreeSet<_>>().len(),
        3,
        "distinct: {first}"
    );
    assert_eq!(first["model"], MODEL, "model defaults to the served one");
    assert_eq!(
        first["usage"]["prompt_tokens"], prompt_tokens,
        "the prompt counts once"
    );
    let hits =
        sample(&server.metrics().await, "vllm:prefix_cache_hits_total", &[]).unwrap() - hits_before;
    assert!(
        hits >= 2.0 * 32.0,
        "the two later choices start on the first one's cached blocks: {hits} tokens hit"
    );
    let again = ok(&server, COMPLETIONS, &body).await;
    assert_eq!(texts(&again), choices, "the same seed, the same choices");
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    assert_eq!(
        streamed_texts(&streamed(&server, COMPLETIONS, &stream).await),
        choices
    );

    // Chat too, streamed: each choice opens with its role and ends with its own reason.
    let chat = json!({"messages": [{"role": "user", "content": "Name a colour."}], "n": 2,
        "temperature": 1.0, "seed": 3, "max_tokens": 10});
    let plain = ok(&server, CHAT, &chat).await;
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let events = streamed(&server, CHAT, &chat_stream).await;
    assert_eq!(streamed_texts(&events), texts(&plain));
    for index in 0..2 {
        let of = |key: &str| {
            events
                .iter()
                .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
                .filter(|c| c["index"] == index && !c[key].is_null())
                .count()
        };
        assert_eq!(of("finish_reason"), 1, "choice {index}: {events:?}");
        assert!(
            events.iter().any(|e| e["choices"][0]["index"] == index
                && e["choices"][0]["delta"]["role"] == "assistant"),
            "choice {index} opens with its role"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_returns_the_most_likely_candidates() {
    let (server, _engine) = TestServer::start().await;
    let body = |n: u32, best_of: u32| {
        json!({"prompt": "My favourite animal is", "n": n, "best_of": best_of, "temperature": 1.0,
            "seed": 5, "max_tokens": 8, "logprobs": 0})
    };
    // The three candidates, as n = 3 gives them (candidate k samples with seed + k).
    let all = ok(&server, COMPLETIONS, &body(3, 3)).await;
    let score = |choice: &Value| -> f64 {
        choice["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_f64().unwrap())
            .sum()
    };
    let candidates = all["choices"].as_array().unwrap();
    let best = candidates
        .iter()
        .max_by(|a, b| score(a).total_cmp(&score(b)))
        .unwrap();
    let one = ok(&server, COMPLETIONS, &body(1, 3)).await;
    assert_eq!(one["choices"].as_array().unwrap().len(), 1);
    assert_eq!(one["choices"][0]["text"], best["text"], "{one} {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_list_answers_each_prompt_in_order() {
    let (server, engine) = TestServer::start().await;
    let prompts = ["The capital of France is", "1, 2, 3, 4,", "Roses are red,"];
    let mut alone = Vec::new();
    for prompt in prompts {
        let answer = ok(
            &server,
            COMPLETIONS,
            &completion(json!({"prompt": prompt, "max_tokens": 6})),
        )
        .await;
        alone.push(texts(&answer)[0].clone());
    }
    let listed = ok(
        &server,
        COMPLETIONS,
        &completion(json!({"prompt": prompts, "max_tokens": 6})),
    )
    .await;
    assert_eq!(texts(&listed), alone);
    let prompt_tokens: usize = prompts
        .iter()
        .map(|p| engine.codec.encode(p).unwrap().len())
        .sum();
    assert_eq!(listed["usage"]["prompt_tokens"], prompt_tokens);
    // Token lists too, streamed.
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| engine.codec.encode(p).unwrap())
        .collect();
    let events = streamed(
        &server,
        COMPLETIONS,
        &completion(json!({"prompt": ids, "max_tokens": 6, "stream": true})),
    )
    .await;
    assert_eq!(streamed_texts(&events), alone);
    // Each prompt times n: choice p·n + k.
    let both = ok(
        &server,
        COMPLETIONS,
        &json!({"prompt": &prompts[..2], "n": 2, "temperature": 1.0, "seed": 9, "max_tokens": 6}),
    )
    .await;
    assert_eq!(texts(&both).len(), 4);
    let second = ok(
        &server,
        COMPLETIONS,
        &json!({"prompt": prompts[1], "n": 2, "temperature": 1.0, "seed": 9, "max_tokens": 6}),
    )
    .await;
    assert_eq!(texts(&both)[2..], texts(&second)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_options_and_special_tokens_do_what_vllm_says() {
    let (server, engine) = TestServer::start().await;
    let base =
        json!({"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": true, "logprobs": 0});
    let plain = ok(&server, COMPLETIONS, &completion(base.clone())).await;
    let tokens: Vec<String> = plain["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    // A stop token: the output ends where it first comes, without its text.
    let at = 4;
    let stop_id = engine.codec.encode(&tokens[at]).unwrap()[0];
    let first = tokens
        .iter()
        .position(|t| engine.codec.encode(t).unwrap()[0] == stop_id)
        .unwrap();
    let mut body = completion(base.clone());
    body["stop_token_ids"] = json!([stop_id]);
    let stopped = ok(&server, COMPLETIONS, &body).await;
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    assert_eq!(stopped["usage"]["completion_tokens"], first + 1);
    assert_eq!(texts(&stopped)[0], tokens[..first].concat());

    // A stop string, kept in the text only when asked.
    let text = &texts(&plain)[0];
    let word = text.split_whitespace().nth(2).unwrap().to_owned();
    let mut body = completion(base.clone());
    body["stop"] = json!(word);
    let without = texts(&ok(&server, COMPLETIONS, &body).await)[0].clone();
    body["include_stop_str_in_output"] = json!(true);
    let with = texts(&ok(&server, COMPLETIONS, &body).await)[0].clone();
    assert!(!without.contains(&word), "{without:?} {word:?}");
    assert_eq!(with, format!("{without}{word}"));

    // Special tokens: the end-of-sequence token, forced, is text only when not skipped.
    let eos = engine.codec.eos[0];
    let mut body = completion(json!({"prompt": "Hi", "max_tokens": 3, "ignore_eos": true,
        "logit_bias": {eos.to_string(): 100}}));
    assert_eq!(texts(&ok(&server, COMPLETIONS, &body).await)[0], "");
    body["skip_special_tokens"] = json!(false);
    let shown = texts(&ok(&server, COMPLETIONS, &body).await)[0].clone();
    assert_eq!(shown, engine.codec.token_text(eos).repeat(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_usage_stats_put_usage_in_every_chunk() {
    let (server, _engine) = TestServer::start().await;
    let body = completion(
        json!({"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    );
    let events = streamed(&server, COMPLETIONS, &body).await;
    let (last, chunks) = events.split_last().unwrap();
    assert!(last["choices"].as_array().unwrap().is_empty());
    assert_eq!(last["usage"]["completion_tokens"], 8);
    let counts: Vec<u64> = chunks
        .iter()
        .map(|c| {
            c["usage"]["completion_tokens"]
                .as_u64()
                .expect("usage in every chunk")
        })
        .collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert_eq!(counts.last(), Some(&8));
    // Without it, only the last chunk has usage.
    let mut plain = body.clone();
    plain["stream_options"] = json!({"include_usage": true});
    let events = streamed(&server, COMPLETIONS, &plain).await;
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["usage"].is_null())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored_and_counted_or_refused_when_strict() {
    let (server, _engine) = TestServer::start().await;
    let body =
        json!({"prompt": "Hi", "max_tokens": 2, "frobnicate": true, "guided_whatever": {"a": 1}});
    let answer = ok(&server, COMPLETIONS, &body).await;
    assert_eq!(
        answer["usage"]["completion_tokens"]
            .as_u64()
            .map(|n| n <= 2),
        Some(true)
    );
    let metrics = server.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "parallax_request_ignored_fields_total",
            &[("field", "frobnicate")]
        ),
        Some(1.0)
    );
    let strict = parallax_agent::server::ServerConfig {
        strict_request_fields: true,
        ..server_config()
    };
    let (strict, _engine) = TestServer::start_with(strict, support::config(512, 256)).await;
    let (status, refused) = strict.post_json(COMPLETIONS, &body).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "frobnicate");
    assert_eq!(refused["error"]["code"], "unknown_parameter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_special_tokens_adds_the_models_bos_only_when_asked() {
    // A model whose tokenizer asks for a BOS (the test model's does not: nothing to add there,
    // as with vLLM).
    let dir = std::env::temp_dir().join(format!("parallax-{}-bos", std::process::id()));
    support::tiny::TinyLlama::default().write(&dir);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "</s>", "bos_token": "</s>", "add_bos_token": true,
            "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"})
        .to_string(),
    )
    .unwrap();
    let (model, codec) = engine::load_with_tokenizer(
        &ModelSource::HuggingFace(dir.clone()),
        None,
        &BackendConfig::default(),
    )
    .unwrap();
    let server = TestServer::unloaded(server_config()).await;
    let handle = engine::start(model, codec, support::config(64, 64)).unwrap();
    server.server.attach(handle);
    let count = |answer: &Value| answer["usage"]["prompt_tokens"].as_u64().unwrap();
    let with = ok(
        &server,
        COMPLETIONS,
        &json!({"prompt": "hello", "max_tokens": 1}),
    )
    .await;
    let without = ok(
        &server,
        COMPLETIONS,
        &json!({"prompt": "hello", "max_tokens": 1, "add_special_tokens": false}),
    )
    .await;
    assert_eq!(count(&with), count(&without) + 1, "{with} {without}");
    // Chat leaves them to its template unless asked.
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let plain = ok(&server, CHAT, &chat(json!({}))).await;
    let added = ok(&server, CHAT, &chat(json!({"add_special_tokens": true}))).await;
    assert_eq!(count(&added), count(&plain) + 1);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}
