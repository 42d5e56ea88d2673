//! GPU health end to end over HTTP, with a scripted GPU source (`--gpu-source sim:FILE`) whose
//! file the test appends events to: a fatal XID turns `/ready` to 503 with the reason and new
//! requests are refused while the one in flight completes; the readings show in the metrics and
//! the `X-GPU-Utilization` header; recovery goes through probation (a smaller batch) to healthy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::io::Write;
use std::time::Duration;
use support::http::{eventually, sample as metric};
use support::process::{Agent, free_port};

const LIMIT: Duration = Duration::from_secs(60);

const SCRIPT: &str = r#"{"gpus": [{"index": 0, "uuid": "GPU-sim-0", "name": "Simulated H100", "memory_bytes": 85899345920, "compute_capability": "9.0", "driver_version": "sim"}]}
{"at": 0, "gpu": 0, "reading": {"utilization_gpu": 87, "utilization_memory": 40, "memory_used_bytes": 42949672960, "memory_free_bytes": 42949672960, "temperature_celsius": 61, "power_watts": 512.5, "power_limit_watts": 700, "sm_clock_mhz": 1980, "ecc_corrected": 2, "ecc_uncorrected": 0}}
"#;

async fn ready(agent: &Agent, client: &reqwest::Client) -> (u16, Value) {
    agent.get(client, "/ready").await
}

async fn metrics(agent: &Agent, client: &reqwest::Client) -> String {
    client
        .get(format!("{}/metrics", agent.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_xid_drains_the_agent_and_it_recovers_through_probation() {
    let script = std::env::temp_dir().join(format!("parallax-gpu-{}.jsonl", std::process::id()));
    std::fs::write(&script, SCRIPT).unwrap();
    let port = free_port();
    let args: Vec<String> = [
        format!("--gpu-source=sim:{}", script.display()),
        "--gpu-sample-interval=0.1".into(),
        "--gpu-quiet-period=3".into(),
        "--gpu-probation=10".into(),
        "--gpu-probation-batch=0.25".into(),
        "--max-num-seqs=8".into(),
    ]
    .into();
    let mut agent = Agent::spawn("gpu", port, &args);
    let client = parallax_agent::http_client::client();
    agent.ready(&client, LIMIT).await;
    let (_, body) = ready(&agent, &client).await;
    assert_eq!(body["gpus"][0]["state"], "healthy", "{body}");
    assert_eq!(body["gpus"][0]["uuid"], "GPU-sim-0");

    // The readings, under Parallax's names and dcgm-exporter's.
    let text = metrics(&agent, &client).await;
    let gpu = [
        ("gpu", "0"),
        ("uuid", "GPU-sim-0"),
        ("model", "Simulated H100"),
    ];
    assert_eq!(
        metric(&text, "parallax_gpu_utilization_ratio", &gpu),
        Some(0.87)
    );
    assert_eq!(
        metric(&text, "parallax_gpu_memory_used_bytes", &gpu),
        Some(42949672960.0)
    );
    assert_eq!(metric(&text, "parallax_gpu_power_watts", &gpu), Some(512.5));
    let dcgm = [
        ("gpu", "0"),
        ("UUID", "GPU-sim-0"),
        ("modelName", "Simulated H100"),
    ];
    assert_eq!(metric(&text, "DCGM_FI_DEV_GPU_UTIL", &dcgm), Some(87.0));
    assert_eq!(metric(&text, "DCGM_FI_DEV_FB_USED", &dcgm), Some(40960.0));
    assert_eq!(metric(&text, "parallax_batch_limit", &[]), Some(8.0));

    // A request in flight when the GPU fails.
    let mut stream = client
        .post(format!("{}/v1/completions", agent.base))
        .json(
            &json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 120,
            "temperature": 0, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["x-gpu-utilization"], "87%");
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));

    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&script)
        .unwrap();
    writeln!(file, r#"{{"gpu": 0, "event": {{"xid": 79}}}}"#).unwrap();
    eventually(LIMIT, "/ready says the GPU is unhealthy", || async {
        let (status, body) = ready(&agent, &client).await;
        status == 503
            && body["status"]
                == "GPU 0 (GPU-sim-0) is unhealthy: XID 79: GPU has fallen off the bus"
            && body["gpus"][0]["state"] == "unhealthy"
            && body["gpus"][0]["last_xid"] == 79
    })
    .await;

    // New work is refused, clearly.
    let refused = client
        .post(format!("{}/v1/completions", agent.base))
        .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "30");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "gpu_unhealthy");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("XID 79"),
        "{body}"
    );
    let text = metrics(&agent, &client).await;
    let unhealthy = [("gpu", "0"), ("state", "unhealthy")];
    assert_eq!(metric(&text, "parallax_gpu_health", &unhealthy), Some(1.0));
    let xid = [("gpu", "0"), ("xid", "79")];
    assert_eq!(
        metric(&text, "parallax_gpu_xid_errors_total", &xid),
        Some(1.0)
    );
    assert_eq!(metric(&text, "DCGM_FI_DEV_XID_ERRORS", &dcgm), Some(79.0));

    // The request in flight finishes with every token it asked for.
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));

    // Quiet for three seconds: probation, ready again on a quarter of the batch.
    eventually(
        LIMIT,
        "the GPU is on probation and the agent ready",
        || async {
            let (status, body) = ready(&agent, &client).await;
            status == 200 && body["gpus"][0]["state"] == "probation"
        },
    )
    .await;
    let text = metrics(&agent, &client).await;
    assert_eq!(metric(&text, "parallax_batch_limit", &[]), Some(2.0));
    let served = client
        .post(format!("{}/v1/completions", agent.base))
        .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);

    // Then healthy, at full batch.
    eventually(LIMIT, "the GPU is healthy again", || async {
        let (_, body) = ready(&agent, &client).await;
        body["gpus"][0]["state"] == "healthy"
    })
    .await;
    eventually(LIMIT, "the batch is whole again", || async {
        metric(&metrics(&agent, &client).await, "parallax_batch_limit", &[]) == Some(8.0)
    })
    .await;
    std::fs::remove_file(&script).unwrap();
}

#[tokio::test]
async fn a_machine_without_nvml_serves_and_says_so_once() {
    let port = free_port();
    let mut agent = Agent::spawn("no-gpu", port, &[]);
    let client = parallax_agent::http_client::client();
    agent.ready(&client, LIMIT).await;
    let (_, body) = ready(&agent, &client).await;
    assert!(body.get("gpus").is_none(), "{body}");
    let answer = client
        .post(format!("{}/v1/completions", agent.base))
        .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.headers()["x-gpu-utilization"],
        "unavailable (no GPU watched)"
    );
    assert_eq!(
        agent.log().matches("GPU health is not watched").count(),
        1,
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn bad_gpu_flags_are_refused_by_name() {
    let port = free_port();
    for (flag, says) in [
        (
            "--gpu-source=cuda",
            "--gpu-source must be auto, nvml, none or sim:FILE",
        ),
        (
            "--gpu-probation-batch=0",
            "--gpu-probation-batch must be a share",
        ),
        (
            "--gpu-source=sim:/nonexistent/gpus.jsonl",
            "reading the GPU script",
        ),
    ] {
        let mut agent = Agent::spawn("bad-gpu", port, &[flag.to_owned()]);
        let status = agent.ended(LIMIT).await;
        assert!(!status.success());
        assert!(agent.log().contains(says), "{flag}: {}", agent.log());
    }
}
