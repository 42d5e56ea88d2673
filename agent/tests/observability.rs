//! The chart's dashboards and recording rules against a live agent: Prometheus scrapes an agent
//! process (watching a scripted GPU) and a router in front of it under a short load, with the
//! labels the pool's PodMonitor gives, loads the committed rule file, and every panel query — the
//! variables substituted — and
//! every recording rule must return data. Queries of the operator's series are listed: the agent
//! cannot give them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use support::process::{Agent, free_port};
use support::prometheus::{self, Prometheus, root};

const GPU_SCRIPT: &str = r#"{"gpus": [{"index": 0, "uuid": "GPU-sim-0", "name": "Simulated H100", "memory_bytes": 85899345920, "compute_capability": "9.0", "driver_version": "sim"}]}
{"at": 0, "gpu": 0, "reading": {"utilization_gpu": 87, "utilization_memory": 40, "memory_used_bytes": 42949672960, "memory_free_bytes": 42949672960, "temperature_celsius": 61, "power_watts": 512.5, "power_limit_watts": 700, "sm_clock_mhz": 1980, "ecc_corrected": 2, "ecc_uncorrected": 0}}
{"at": 0, "gpu": 0, "event": {"xid": 13}}
"#;

/// The router's body limit here, so that one request can exceed it.
const ROUTER_BODY_LIMIT: usize = 4096;

/// A router process in front of one agent, killed when dropped.
struct Router {
    child: std::process::Child,
    base: String,
}

impl Router {
    fn spawn(agent: &str, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_parallax-agent"))
            .args(["route", "--group", agent, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--poll-interval-ms", "100"])
            .args(["--max-body-bytes", &ROUTER_BODY_LIMIT.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the agent binary starts");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits until the router has read its group ready.
    async fn ready(&self, client: &reqwest::Client) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = client.get(format!("{}/ready", self.base)).send().await;
            if let Ok(answer) = answer
                && let Ok(body) = answer.json::<Value>().await
                && body["available"] == true
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "the router never saw its group ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the dashboards and rules, as `scripts/observability.py --queries` prints it.
fn queries() -> Vec<Value> {
    let output = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/observability.py"))
        .args(["--queries", "ml", "llama"])
        .output()
        .expect("python runs the generator");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_recording_rule_has_data_from_a_live_agent() {
    let Some(binary) = prometheus::binary() else {
        return;
    };
    let queries = queries();
    assert!(queries.len() > 40, "{} queries", queries.len());
    let script =
        std::env::temp_dir().join(format!("parallax-obs-gpu-{}.jsonl", std::process::id()));
    std::fs::write(&script, GPU_SCRIPT).unwrap();
    let port = free_port();
    // One waiting place: a burst of requests meets a 429.
    let args: Vec<String> = vec![
        format!("--gpu-source=sim:{}", script.display()),
        "--gpu-sample-interval=0.2".into(),
        "--max-queue-requests=1".into(),
    ];
    let mut agent = Agent::spawn("observability", port, &args);
    let client = parallax_agent::http_client::client();
    agent.ready(&client, Duration::from_secs(60)).await;
    let router_port = free_port();
    let router = Router::spawn(&agent.base, router_port);
    router.ready(&client).await;

    let rules = root().join("charts/parallax/rules/parallax.rules.yaml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: ['{}']\n\
         scrape_configs:\n  - job_name: parallax-agent\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n        labels: {{namespace: ml, pool: llama, pod: llama-0-0}}\n      - targets: ['127.0.0.1:{router_port}']\n        labels: {{namespace: ml, pool: llama, pod: llama-router-0}}\n",
        rules.display()
    );
    let prometheus = Prometheus::with_config(&binary, &config);
    let scraped = Instant::now() + Duration::from_secs(60);
    while prometheus
        .query(&client, "parallax_model_loaded{pool=\"llama\"}")
        .await
        .is_none()
    {
        assert!(
            Instant::now() < scraped,
            "Prometheus never scraped the agent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A short load: repeated prompts (prefix cache hits), chat, a stream, a refused request, and
    // a burst that meets the one-place queue.
    let post = |path: &'static str, body: Value| {
        let client = client.clone();
        let url = format!("{}{path}", agent.base);
        async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let prompt = "The history of the printing press begins in the fifteenth century in Mainz.";
    for _ in 0..4 {
        let status = post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 8}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let chat =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true});
    assert_eq!(post("/v1/chat/completions", chat).await, 200);
    assert_eq!(
        post("/v1/completions", json!({"prompt": "x", "temperature": 9})).await,
        400
    );
    let burst: Vec<_> = (0..6)
        .map(|i| {
            post(
                "/v1/completions",
                json!({"prompt": format!("Count to {i}"), "max_tokens": 24, "ignore_eos": true}),
            )
        })
        .collect();
    let statuses = futures::future::join_all(burst).await;
    assert!(
        statuses.contains(&429),
        "the burst met the queue: {statuses:?}"
    );

    // The router answers one request itself: its body is over the router's limit.
    let oversized = json!({"prompt": "x".repeat(2 * ROUTER_BODY_LIMIT)});
    let refused = client
        .post(format!("{}/v1/completions", router.base))
        .json(&oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);

    // Traffic goes on, through the router, while the queries are asked, so that a minute's
    // rates have something to say (a histogram's quantile of no requests is NaN).
    let steady = {
        let (client, url) = (client.clone(), format!("{}/v1/completions", router.base));
        tokio::spawn(async move {
            loop {
                let body = json!({"prompt": "The history of the printing press", "max_tokens": 4});
                let _ = client.post(&url).json(&body).send().await;
            }
        })
    };

    // Every query answers with data once (rules evaluate every 30 s: up to a minute's wait).
    let (operator, checked): (Vec<&Value>, Vec<&Value>) = queries
        .iter()
        .partition(|q| q["expr"].as_str().unwrap().contains("parallax_operator_"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut missing: Vec<&Value> = checked.clone();
    while !missing.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for q in missing {
            let expr = q["expr"].as_str().unwrap();
            let result = prometheus
                .query_all(&client, expr)
                .await
                .unwrap_or_default();
            if !result.iter().any(|(_, v)| v.is_finite()) {
                still.push(q);
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    steady.abort();
    let missing: Vec<String> = missing
        .iter()
        .map(|q| format!("{} / {}: {}", q["dashboard"], q["panel"], q["expr"]))
        .collect();
    assert!(
        missing.is_empty(),
        "queries without data from a live agent:\n{}\n(agent log:\n{})",
        missing.join("\n"),
        agent.log()
    );
    eprintln!(
        "{} queries had data; {} read the operator's series and are not asked here:\n{}",
        checked.len(),
        operator.len(),
        operator
            .iter()
            .map(|q| format!("  {} / {}", q["dashboard"], q["panel"]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = std::fs::remove_file(script);
}
