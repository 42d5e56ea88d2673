//! Real clients of the server, installed by `scripts/install-tools`: the official `openai`
//! Python client (straight, and through the router in front of the server),
//! `openapi-spec-validator` on `/openapi.json`, and Debian's Prometheus scraping `/metrics` and
//! answering PromQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::http::{MODEL, TestServer, eventually};
use support::prometheus::{self, Prometheus};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test virtualenv's Python, which must have the test requirements.
fn python() -> PathBuf {
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-tools",
        python.display()
    );
    python
}

/// Runs a command to its end (bounded), `input` on its stdin; its exit status and what it printed.
async fn output(
    command: &mut Command,
    input: Option<&str>,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    let output = tokio::time::timeout(
        limit,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the command finishes in time")
    .unwrap()
    .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, printed)
}

/// Runs a command to its end (bounded), returning its output, failing with what it printed.
async fn run(mut command: Command, limit: Duration) -> String {
    let (status, printed) = output(&mut command, None, limit).await;
    assert!(status.success(), "{command:?} failed:\n{printed}");
    printed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_chats_streaming_and_not() {
    let (server, _engine) = TestServer::start().await;
    let mut command = Command::new(python());
    command
        .arg(root().join("agent/tests/clients/openai_client.py"))
        .arg(&server.base)
        .arg(MODEL);
    let printed = run(command, Duration::from_secs(300)).await;
    assert!(printed.contains("ok"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_the_same_through_the_router() {
    use parallax_agent::router::members::Members;
    use parallax_agent::router::{Router, RouterConfig};
    let (server, _engine) = TestServer::start().await;
    let router = Router::new(RouterConfig::new(Members::Fixed(vec![server.base.clone()])));
    // The group is read ready before the client's first request.
    router.poll().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(router.run(listener, std::future::pending()));
    let mut command = Command::new(python());
    command
        .arg(root().join("agent/tests/clients/openai_client.py"))
        .arg(&base)
        .arg(MODEL);
    let printed = run(command, Duration::from_secs(300)).await;
    assert!(printed.contains("ok"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_openapi() {
    let (server, _engine) = TestServer::start().await;
    let (status, document) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    let path = std::env::temp_dir().join(format!("parallax-openapi-{}.json", std::process::id()));
    std::fs::write(&path, document).unwrap();
    let mut command = Command::new(python());
    command.args(["-m", "openapi_spec_validator"]).arg(&path);
    let printed = run(command, Duration::from_secs(120)).await;
    let _ = std::fs::remove_file(&path);
    assert!(printed.contains("OK"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_agent_and_promql_counts_the_generated_tokens() {
    let Some(binary) = prometheus::binary() else {
        return;
    };
    let (server, _engine) = TestServer::start().await;
    let mut generated = 0;
    for prompt in ["One", "Two", "Three"] {
        let (status, body) = server
            .post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "ignore_eos": true}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        generated += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(generated, 15);

    let target = server.base.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&binary, &target);
    let client = parallax_agent::http_client::client();
    eventually(
        Duration::from_secs(60),
        "Prometheus has scraped the agent",
        || async {
            prometheus
                .query(&client, "vllm:generation_tokens_total")
                .await
                .is_some()
        },
    )
    .await;
    let (labels, value) = prometheus
        .query(&client, "vllm:generation_tokens_total")
        .await
        .unwrap();
    assert_eq!(value, generated as f64);
    assert_eq!(labels["model_name"], MODEL);
    assert_eq!(labels["job"], "parallax-agent");
    // Histograms arrive whole: PromQL can take a quantile of them.
    let (_, count) = prometheus
        .query(&client, "sum(vllm:e2e_request_latency_seconds_count)")
        .await
        .expect("the e2e histogram was scraped");
    assert_eq!(count, 3.0);
    let (_, p95) = prometheus
        .query(
            &client,
            "histogram_quantile(0.95, sum by (le) (vllm:e2e_request_latency_seconds_bucket))",
        )
        .await
        .expect("a quantile of the e2e histogram");
    assert!(p95 > 0.0 && p95.is_finite(), "{p95}");

    // Without an OpenMetrics Accept header the classic text format comes, which promtool parses;
    // its only complaint is the colon in vLLM's names, kept on purpose for compatibility.
    let (status, text) = server.get("/metrics").await;
    assert_eq!(status, 200);
    // promtool exits non-zero for lint complaints; what it says is checked below.
    let (_, complaints) = output(
        Command::new(root().join(".tools/bin/promtool")).args(["check", "metrics"]),
        Some(&text),
        Duration::from_secs(60),
    )
    .await;
    assert!(!complaints.contains("error"), "{complaints}");
    for line in complaints.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.starts_with("vllm:") && line.ends_with("metric names should not contain ':'"),
            "promtool: {line}"
        );
    }
}
