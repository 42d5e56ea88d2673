//! Multi-pod tensor-parallel groups: the agent binary itself, one process per pod rank, on
//! loopback — as the operator starts them (`serve` with the group's rank, size and leader). The
//! test model (9 attention heads, 3 KV heads) splits three ways: three processes of one rank
//! each sum their partials in the same order as one process of three ranks, so their answers
//! must be the same tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::process::{Agent, free_port};

/// A group of `pods` processes of one rank each, the leader first — each told its place by the
/// environment, as the operator's pods are.
fn group(pods: usize) -> Vec<Agent> {
    let group_port = free_port();
    let size = pods.to_string();
    (0..pods)
        .map(|rank| {
            let env = [
                ("PARALLAX_RANK", rank.to_string()),
                ("PARALLAX_WORLD_SIZE", size.clone()),
                ("PARALLAX_LEADER_ADDRESS", format!("127.0.0.1:{group_port}")),
            ];
            let args = ["-t", &size, "--group-port", &group_port.to_string()].map(String::from);
            Agent::spawn_with(&format!("rank{rank}"), free_port(), &args, &env)
        })
        .collect()
}

async fn complete(client: &reqwest::Client, base: &str, prompt: &str, max_tokens: u32) -> String {
    let answer: Value = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({
            "model": "smollm2",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
        .to_owned()
}

const LOADING: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_processes_answers_as_one_process_of_three_ranks() {
    let client = parallax_agent::http_client::client();
    let mut whole = Agent::spawn("whole", free_port(), &["-t", "3"].map(String::from));
    let mut pods = group(3);
    whole.ready(&client, LOADING).await;
    for pod in &mut pods {
        pod.ready(&client, LOADING).await;
    }
    // Workers answer health and readiness, and send requests to their leader.
    let (status, body) = pods[1].get(&client, "/v1/models").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_group_leader", "{body}");
    let (status, _) = pods[2].get(&client, "/health").await;
    assert_eq!(status, 200);

    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away,",
        "1, 2, 3, 4,",
    ];
    // Concurrently, so that the steps batch several sequences.
    let ask = |base: String| {
        let client = client.clone();
        async move {
            let answers = prompts.map(|p| {
                let (client, base) = (client.clone(), base.clone());
                tokio::spawn(async move { complete(&client, &base, p, 24).await })
            });
            let mut texts = Vec::new();
            for answer in answers {
                texts.push(answer.await.unwrap());
            }
            texts
        }
    };
    let (one, three) = tokio::join!(ask(whole.base.clone()), ask(pods[0].base.clone()));
    assert_eq!(one, three);
    assert!(one.iter().all(|t| !t.is_empty()), "{one:?}");
    let log = pods[0].log();
    assert!(log.contains("tensor parallel 3"), "{log}");
    // Rank 0 timed its all-reduces: two a layer a step (30 layers).
    let metrics = client
        .get(format!("{}/metrics", pods[0].base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| support::http::sample(&metrics, name, &[]).unwrap();
    let steps = value("parallax_engine_steps_total");
    assert!(steps > 0.0);
    assert_eq!(
        value("parallax_tensor_parallel_all_reduces_total"),
        60.0 * steps
    );
    assert!(value("parallax_tensor_parallel_all_reduce_seconds_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_mid_request_fails_the_request_and_readiness_and_its_group_ends() {
    let client = parallax_agent::http_client::client();
    let mut pods = group(3);
    for pod in &mut pods {
        pod.ready(&client, LOADING).await;
    }
    let mut stream = client
        .post(format!("{}/v1/completions", pods[0].base))
        .json(&json!({
            "model": "smollm2",
            "prompt": "Once upon a time",
            "max_tokens": 4000,
            "ignore_eos": true,
            "temperature": 0,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Tokens flow: the group is mid-request. Then rank 2's process dies.
    let first = stream.chunk().await.unwrap().expect("a first event");
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    let began = Instant::now();
    pods[2].child.kill().unwrap();
    let mut rest = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream did not end: {rest}");
    assert!(
        rest.contains("engine_failure") && rest.contains("worker process 2"),
        "the stream ends with the group's failure: {rest}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "no rank waited out a deadline: {:?}",
        began.elapsed()
    );
    // The leader is no longer ready and says why; new requests are refused.
    let (status, body) = pods[0].get(&client, "/ready").await;
    assert_eq!(status, 503);
    assert!(
        body.to_string().contains("worker process 2 went away"),
        "{body}"
    );
    let answer = client
        .post(format!("{}/v1/completions", pods[0].base))
        .json(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    // The surviving worker ends (failing: its pod restarts, and the operator recreates the group).
    let status = pods[1].ended(Duration::from_secs(30)).await;
    assert!(!status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_ends_its_workers() {
    let client = parallax_agent::http_client::client();
    let mut pods = group(3);
    for pod in &mut pods {
        pod.ready(&client, LOADING).await;
    }
    pods[0].child.kill().unwrap();
    for pod in &mut pods[1..] {
        let status = pod.ended(Duration::from_secs(30)).await;
        assert!(!status.success(), "{status}");
        assert!(pod.log().contains("the leader went away"), "{}", pod.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_leader_never_comes_is_not_ready_and_says_why() {
    let client = parallax_agent::http_client::client();
    // A leader address nobody listens on: the worker keeps trying (the leader's pod may start
    // later) and is not ready meanwhile.
    let mut worker = Agent::spawn(
        "orphan",
        free_port(),
        &[
            "-t",
            "3",
            "--group-size",
            "3",
            "--group-rank",
            "1",
            "--group-leader",
            &format!("127.0.0.1:{}", free_port()),
        ]
        .map(String::from),
    );
    let until = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(answer) = client.get(format!("{}/ready", worker.base)).send().await {
            assert_eq!(answer.status(), 503);
            break answer.json::<Value>().await.unwrap();
        }
        assert!(Instant::now() < until, "{}", worker.log());
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.to_string().contains("joining the group"), "{body}");
}
