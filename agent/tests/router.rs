//! The router on loopback sockets in front of stand-in groups (small axum servers whose
//! readiness, load and answers each test sets) and in front of a real agent, with a real HTTP
//! client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::Router as App;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use parallax_agent::router::members::Members;
use parallax_agent::router::{Router, RouterConfig};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::http::TestServer;
use tokio::sync::{Notify, oneshot};

/// A stand-in group leader.
#[derive(Debug, Default)]
struct Group {
    ready: AtomicBool,
    metrics: Mutex<String>,
    /// Answer every request with this status (429, 503, …) instead of serving it.
    refuse: AtomicU16,
    served: AtomicUsize,
    /// A streamed answer sends its second event once this is notified.
    release: Notify,
    /// Streamed answers not yet ended or dropped.
    streams_open: AtomicUsize,
}

/// Counts a streamed answer open until dropped.
struct OpenStream(Arc<Group>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn load_text(running: u32, waiting: u32, kv: f64) -> String {
    format!(
        "vllm:num_requests_running{{model_name=\"m\"}} {running}\n\
         vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n\
         vllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n\
         parallax_batch_limit{{model_name=\"m\"}} 8\n"
    )
}

async fn group_ready(State(group): State<Arc<Group>>) -> StatusCode {
    if group.ready.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn group_metrics(State(group): State<Arc<Group>>) -> String {
    group.metrics.lock().unwrap().clone()
}

async fn group_complete(State(group): State<Arc<Group>>, body: String) -> Response {
    let refuse = group.refuse.load(Ordering::SeqCst);
    if refuse != 0 {
        let status = StatusCode::from_u16(refuse).unwrap();
        return (
            status,
            [("retry-after", "7")],
            "{\"error\":{\"message\":\"no\"}}",
        )
            .into_response();
    }
    group.served.fetch_add(1, Ordering::SeqCst);
    let request: Value = serde_json::from_str(&body).unwrap();
    if request["stream"] == json!(true) {
        group.streams_open.fetch_add(1, Ordering::SeqCst);
        let open = OpenStream(group.clone());
        let events = futures::stream::once(async { "data: {\"n\":1}\n\n".to_owned() }).chain(
            futures::stream::once(async move {
                open.0.release.notified().await;
                "data: {\"n\":2}\n\ndata: [DONE]\n\n".to_owned()
            }),
        );
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(
                events.map(Ok::<_, std::convert::Infallible>),
            ))
            .unwrap();
    }
    axum::Json(json!({"echo": request["prompt"]})).into_response()
}

/// A stand-in group on loopback, ready and idle; the task serves until aborted.
async fn spawn_group() -> (String, Arc<Group>, tokio::task::JoinHandle<()>) {
    let group = Arc::new(Group {
        ready: AtomicBool::new(true),
        metrics: Mutex::new(load_text(0, 0, 0.0)),
        ..Group::default()
    });
    let app = App::new()
        .route("/ready", get(group_ready))
        .route("/metrics", get(group_metrics))
        .route("/v1/completions", post(group_complete))
        .with_state(group.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, group, task)
}

/// A router over `urls` on loopback. Its own loop polls once at start and then only every
/// hour: each test polls when it has changed a group ([`Router::poll`]).
struct TestRouter {
    base: String,
    router: Router,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl TestRouter {
    async fn start(urls: &[String], adjust: impl FnOnce(&mut RouterConfig)) -> Self {
        let mut config = RouterConfig::new(Members::Fixed(urls.to_vec()));
        config.poll_interval = Duration::from_secs(3600);
        config.policy.breaker.failures = 2;
        adjust(&mut config);
        let router = Router::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(router.clone().run(listener, async move {
            let _ = stopped.await;
        }));
        let client = parallax_agent::http_client::client();
        let started = Self {
            base,
            router,
            client,
            _stop: stop,
        };
        started.router.poll().await;
        started
    }

    async fn complete(&self, prompt: &str, priority: Option<&str>) -> (u16, String, Value) {
        let mut request = self
            .client
            .post(format!("{}/v1/completions", self.base))
            .json(&json!({"model": "m", "prompt": prompt}));
        if let Some(priority) = priority {
            request = request.header("x-request-priority", priority);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let group = response
            .headers()
            .get("x-parallax-group")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, group, response.json().await.unwrap())
    }

    /// POSTs `body` to the router's completions.
    async fn post(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn text(&self, path: &str) -> String {
        let response = self.client.get(format!("{}{path}", self.base)).send().await;
        response.unwrap().text().await.unwrap()
    }

    /// Waits until `check` holds for the router's `/metrics`.
    async fn metrics_until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let text = self.text("/metrics").await;
                if check(&text) {
                    return text;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("waited 20 s for {what}"))
    }
}

fn long_prompt(seed: char) -> String {
    std::iter::repeat_n(format!("{seed} shares a long system prompt. "), 12).collect()
}

fn has(metrics: &str, series: &str) -> bool {
    metrics.lines().any(|l| l.starts_with(series))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_where_there_is_room_and_a_prompt_returns_to_its_group() {
    let (a, a_group, _ta) = spawn_group().await;
    let (b, b_group, _tb) = spawn_group().await;
    let groups = [a_group, b_group];
    let router = TestRouter::start(&[a.clone(), b.clone()], |_| {}).await;

    // Idle groups of the same size share short prompts (no prefix to follow) evenly.
    let mut to_a = 0;
    for i in 0..8 {
        let (status, group, _) = router.complete(&format!("hi {i}"), None).await;
        assert_eq!(status, 200);
        to_a += usize::from(group == a);
    }
    assert_eq!(to_a, 4, "round robin over equal free capacity");

    // A long prompt comes back to the group it first went to — b, while a reported a full
    // batch — though both have room again.
    let (a_group, b_group) = (&groups[0], &groups[1]);
    *a_group.metrics.lock().unwrap() = load_text(8, 0, 0.5);
    router.router.poll().await;
    let prompt = long_prompt('x');
    let (_, first, echo) = router.complete(&prompt, None).await;
    assert_eq!(
        first, b,
        "a full batch takes nothing while another group has room"
    );
    assert_eq!(
        echo["echo"],
        json!(prompt),
        "the body reaches the group whole"
    );
    *a_group.metrics.lock().unwrap() = load_text(0, 0, 0.0);
    router.router.poll().await;
    for _ in 0..4 {
        assert_eq!(router.complete(&prompt, None).await.1, b);
    }
    let metrics = router.text("/metrics").await;
    assert!(has(
        &metrics,
        "parallax_router_picks_total{reason=\"affinity\"} 4"
    ));

    // A queue within the slack keeps the prompt on its group; a longer one sends it elsewhere.
    *b_group.metrics.lock().unwrap() = load_text(8, 3, 0.5);
    router.router.poll().await;
    assert_eq!(router.complete(&prompt, None).await.1, b);
    *b_group.metrics.lock().unwrap() = load_text(8, 9, 0.5);
    router.router.poll().await;
    assert_eq!(router.complete(&prompt, None).await.1, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_went_away_or_refuses_is_skipped_and_its_breaker_opens() {
    let (gone, _, gone_task) = spawn_group().await;
    let (busy, busy_group, _tb) = spawn_group().await;
    let (good, good_group, _tg) = spawn_group().await;
    let router = TestRouter::start(&[gone.clone(), busy.clone(), good.clone()], |_| {}).await;
    // The first group stops after the router read it ready; the second refuses everything.
    gone_task.abort();
    let _ = gone_task.await;
    busy_group.refuse.store(429, Ordering::SeqCst);

    for i in 0..6 {
        let (status, group, _) = router.complete(&format!("request {i}"), None).await;
        assert_eq!((status, group.as_str()), (200, good.as_str()));
    }
    assert_eq!(good_group.served.load(Ordering::SeqCst), 6);
    let metrics = router.text("/metrics").await;
    let series = |name: &str, group: &str| format!("{name}{{group=\"{group}\"}}");
    assert!(has(
        &metrics,
        &format!("parallax_router_attempts_total{{group=\"{gone}\",outcome=\"unreachable\"}} 2")
    ));
    assert!(has(
        &metrics,
        &format!("{} 2", series("parallax_router_group_breaker_state", &gone))
    ));
    assert!(has(
        &metrics,
        &format!("{} 0", series("parallax_router_group_breaker_state", &busy))
    ));
    assert!(metrics.contains(&format!(
        "parallax_router_attempts_total{{group=\"{busy}\",outcome=\"refused\"}}"
    )));
    assert!(metrics.contains("parallax_router_retries_total"));

    // When every group refuses, the last refusal is what the client gets, Retry-After and all.
    good_group.refuse.store(429, Ordering::SeqCst);
    let response = router.post(&json!({"prompt": "x"})).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_group_opens_its_breaker_and_a_busy_one_does_not() {
    let (url, group, _t) = spawn_group().await;
    let router = TestRouter::start(std::slice::from_ref(&url), |c| {
        c.hold_timeout = Duration::from_millis(50)
    })
    .await;
    let breaker =
        |state: u8| format!("parallax_router_group_breaker_state{{group=\"{url}\"}} {state}");
    // Requests that waited past their deadline in its queue: passed back, the breaker closed.
    group.refuse.store(504, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(router.post(&json!({"prompt": "x"})).await.status(), 504);
    }
    assert!(has(&router.text("/metrics").await, &breaker(0)));
    // Internal errors: passed back (the request may have started), and two open the breaker.
    group.refuse.store(500, Ordering::SeqCst);
    for _ in 0..2 {
        assert_eq!(router.post(&json!({"prompt": "x"})).await.status(), 500);
    }
    assert!(has(&router.text("/metrics").await, &breaker(2)));
    // Nothing else can take a request within its breaker's cooldown: held, then answered 503.
    assert_eq!(router.post(&json!({"prompt": "x"})).await.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_passes_through_event_by_event() {
    let (url, group, _t) = spawn_group().await;
    let router = TestRouter::start(std::slice::from_ref(&url), |_| {}).await;
    let response = router.post(&json!({"prompt": "x", "stream": true})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    // The group has not sent its second event yet: the first came through on its own.
    assert_eq!(&first[..], b"data: {\"n\":1}\n\n");
    let metrics = router.text("/metrics").await;
    assert!(has(
        &metrics,
        &format!("parallax_router_group_in_flight{{group=\"{url}\"}} 1")
    ));
    group.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"data: {\"n\":2}\n\ndata: [DONE]\n\n");
    let freed = |m: &str| {
        has(
            m,
            &format!("parallax_router_group_in_flight{{group=\"{url}\"}} 0"),
        )
    };
    router
        .metrics_until("the stream's end to free its place", freed)
        .await;

    // A client that goes away mid-stream frees its place, and the group sees it go.
    let response = router.post(&json!({"prompt": "y", "stream": true})).await;
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(group.streams_open.load(Ordering::SeqCst), 1);
    drop(body);
    router
        .metrics_until("a dropped stream to free its place", freed)
        .await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while group.streams_open.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the group's stream ends when the client goes away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_a_waking_pool_and_give_up_when_it_stays_asleep() {
    let (url, group, _t) = spawn_group().await;
    group.ready.store(false, Ordering::SeqCst);
    let router = Arc::new(TestRouter::start(std::slice::from_ref(&url), |_| {}).await);
    let waiting = {
        let router = router.clone();
        tokio::spawn(async move { router.complete("wake up", None).await })
    };
    router
        .metrics_until("the request to be held", |m| {
            has(m, "parallax_router_held_requests 1")
        })
        .await;
    group.ready.store(true, Ordering::SeqCst);
    router.router.poll().await;
    let (status, served_by, _) = waiting.await.unwrap();
    assert_eq!((status, served_by.as_str()), (200, url.as_str()));

    // Nothing ready within the hold: 503 with Retry-After, in OpenAI's error shape.
    group.ready.store(false, Ordering::SeqCst);
    let asleep = TestRouter::start(&[url], |c| c.hold_timeout = Duration::from_millis(50)).await;
    let response = asleep.post(&json!({"prompt": "x"})).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_priority_is_shed_when_every_group_is_saturated_and_bodies_are_bounded() {
    let (url, group, _t) = spawn_group().await;
    *group.metrics.lock().unwrap() = load_text(8, 20, 0.9);
    let router = TestRouter::start(std::slice::from_ref(&url), |c| c.max_body_bytes = 1024).await;
    let (status, _, body) = router.complete("x", Some("low")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("saturated"))
    );
    let (status, group_url, _) = router.complete("x", Some("high")).await;
    assert_eq!((status, group_url), (200, url));

    let (status, _, body) = router.complete(&"x".repeat(2000), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_is_read_and_served_through_the_router() {
    let (agent, engine) = TestServer::start().await;
    let router = TestRouter::start(std::slice::from_ref(&agent.base), |_| {}).await;
    let ready: Value = serde_json::from_str(&router.text("/ready").await).unwrap();
    let seen = &ready["groups"][0];
    assert_eq!(seen["ready"], true, "{ready}");
    assert_eq!(
        seen["load"]["batch_limit"],
        json!(engine.info.max_num_seqs as f64),
        "the agent's batch size is read from its metrics"
    );
    let response = router
        .client
        .post(format!("{}/v1/chat/completions", router.base))
        .json(&json!({
            "model": support::http::MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4);
    // The agent's own refusals come back as they are.
    let (status, _, body) = router.complete("x", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["param"], "model");
}
