//! Hub models (`hf://ORG/NAME`): the agent's real download code against a hub on loopback
//! (`support::fake_hub`, reached as `HF_ENDPOINT` would point it): what a revision's files are,
//! resuming dropped connections, refusing wrong checksums, tokens, the cache, and `serve`
//! downloading before it is ready.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::{ModelFiles, ModelSource};
use parallax_agent::hub::{Hub, HubConfig, HubError, HubModel, Progress};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use support::fake_hub::{FakeHub, HubFile, files_of};
use support::model_path;
use support::process::{Agent, free_port};
use support::tiny::TinyLlama;

/// An empty folder of its own under the system's temporary folder.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parallax-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(endpoint: &str, cache: &Path) -> HubConfig {
    HubConfig {
        endpoint: endpoint.to_owned(),
        token: None,
        cache: cache.to_owned(),
        offline: false,
        attempts: 5,
        backoff: Duration::from_millis(10),
        log_every: Duration::from_secs(5),
    }
}

fn model(source: &str) -> HubModel {
    HubModel::parse(source).unwrap().unwrap()
}

/// Fetches on a blocking thread (as `serve`'s loading thread does), keeping the progress seen.
async fn fetch(config: HubConfig, source: &str) -> (Result<PathBuf, HubError>, Vec<Progress>) {
    let source = model(source);
    tokio::task::spawn_blocking(move || {
        let seen = Mutex::new(Vec::new());
        let hub = Hub::new(config).unwrap();
        let result = hub.fetch(&source, &|p| seen.lock().unwrap().push(p.clone()));
        (result, seen.into_inner().unwrap())
    })
    .await
    .unwrap()
}

/// Every file under `dir`, by path relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = files_of(dir).into_iter().map(|f| f.name).collect();
    names.sort();
    names
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_download_resumes_dropped_connections_and_is_reused_from_the_cache() {
    let hub = FakeHub::start().await;
    let gguf = std::fs::read(model_path()).unwrap();
    let size = gguf.len();
    hub.add(
        "test-org/smol-GGUF",
        COMMIT,
        vec![
            HubFile::new("smol.Q4_1.gguf", gguf.clone()),
            HubFile::new("README.md", "# smol"),
        ],
        None,
    );
    // The first two tries end early; the third finishes.
    hub.drop_after("smol.Q4_1.gguf", &[5 << 20, 20 << 20]);
    let cache = scratch("gguf");
    let (path, progress) = fetch(config(&hub.url, &cache), "hf://test-org/smol-GGUF").await;
    let path = path.unwrap();
    assert_eq!(
        path,
        cache.join(format!(
            "test-org--smol-GGUF/snapshots/{COMMIT}/smol.Q4_1.gguf"
        ))
    );
    assert!(std::fs::read(&path).unwrap() == gguf, "the bytes differ");
    // Only the weights were fetched, and each retry asked for the rest of the file (bytes in
    // flight when the connection dropped are lost, so at most where it dropped).
    let ranges: Vec<Option<u64>> = hub
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/store/"))
        .map(|s| {
            s.range.as_ref().map(|r| {
                r.strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .unwrap()
                    .parse()
                    .unwrap()
            })
        })
        .collect();
    let [None, Some(first), Some(second)] = ranges[..] else {
        panic!("three requests, the last two resuming: {ranges:?}");
    };
    assert!(first > 0 && first <= 5 << 20, "{ranges:?}");
    assert!(second > first && second <= first + (20 << 20), "{ranges:?}");
    assert!(!hub.seen().iter().any(|s| s.path.ends_with("README.md")));
    let last = progress.last().unwrap();
    assert_eq!(
        (last.files_done, last.files, last.bytes_done, last.bytes),
        (1, 1, size as u64, size as u64)
    );
    // Progress never runs backwards past a resume (the dropped bytes are counted once).
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].bytes_done <= w[1].bytes_done || w[1].bytes_done >= 5 << 20)
    );
    assert!(
        tree(&cache).iter().all(|f| !f.ends_with(".part")),
        "{:?}",
        tree(&cache)
    );
    // The model loads from where it landed.
    let files = ModelFiles::open(&ModelSource::parse(path.to_str().unwrap()).unwrap()).unwrap();
    assert_eq!(files.config.hidden_size, 576);

    // A second start asks the hub for the revision only.
    hub.forget_seen();
    let (again, _) = fetch(config(&hub.url, &cache), "hf://test-org/smol-GGUF").await;
    assert_eq!(again.unwrap(), path);
    let seen: Vec<String> = hub.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, ["/api/models/test-org/smol-GGUF/revision/main"]);
    // With the hub unreachable, or offline, the recorded revision is used.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (cached, _) = fetch(config(&dead, &cache), "hf://test-org/smol-GGUF").await;
    assert_eq!(cached.unwrap(), path);
    let mut offline = config(&dead, &cache);
    offline.offline = true;
    let (cached, _) = fetch(offline.clone(), "hf://test-org/smol-GGUF").await;
    assert_eq!(cached.unwrap(), path);
    let (missing, _) = fetch(offline, "hf://test-org/other").await;
    let err = missing.unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_checksum_is_refused_and_leaves_nothing_behind() {
    let checkpoint = scratch("checksum-model");
    TinyLlama::default().write(&checkpoint);
    let hub = FakeHub::start().await;
    hub.add("org/tiny", COMMIT, files_of(&checkpoint), None);
    let cache = scratch("checksum");

    // Wrong twice: one download again, then a refusal naming the file.
    hub.corrupt("model.safetensors", 2);
    let (result, _) = fetch(config(&hub.url, &cache), "hf://org/tiny").await;
    let err = result.unwrap_err();
    assert!(matches!(err, HubError::Checksum { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("model.safetensors: checksum mismatch"),
        "{err}"
    );
    assert_eq!(err.category(), "corrupt");
    let left = tree(&cache);
    assert!(
        !left.iter().any(|f| f.contains("model.safetensors")),
        "a wrong file stayed: {left:?}"
    );

    // A small file is checked against its git blob hash.
    hub.corrupt("config.json", 2);
    let (result, _) = fetch(config(&hub.url, &cache), "hf://org/tiny").await;
    let err = result.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("config.json: checksum mismatch"),
        "{err}"
    );

    // Wrong once: downloaded again, and right.
    hub.corrupt("model.safetensors", 1);
    let (result, _) = fetch(config(&hub.url, &cache), "hf://org/tiny").await;
    let folder = result.unwrap();
    assert_eq!(
        std::fs::read(folder.join("model.safetensors")).unwrap(),
        std::fs::read(checkpoint.join("model.safetensors")).unwrap()
    );
    let files = ModelFiles::open(&ModelSource::parse(folder.to_str().unwrap()).unwrap()).unwrap();
    assert_eq!(files.config.hidden_size, TinyLlama::default().hidden);
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::remove_dir_all(&checkpoint).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_checkpoint_fetches_what_its_index_names_and_nothing_else() {
    let checkpoint = scratch("sharded-model");
    let tiny = TinyLlama {
        shards: 3,
        ..TinyLlama::default()
    };
    tiny.write(&checkpoint);
    let mut files = files_of(&checkpoint);
    files.push(HubFile::new("consolidated.safetensors", vec![7u8; 4096]));
    files.push(HubFile::new("original/params.json", "{}"));
    files.push(HubFile::new("README.md", "# tiny"));
    let hub = FakeHub::start().await;
    hub.add("org/tiny-sharded", COMMIT, files, None);
    let cache = scratch("sharded");
    let (result, progress) = fetch(config(&hub.url, &cache), "hf://org/tiny-sharded@main").await;
    let folder = result.unwrap();
    let mut expected = tree(&checkpoint);
    expected.push(".parallax-complete.json".into());
    expected.sort();
    assert_eq!(tree(&folder), expected);
    assert_eq!(
        progress.last().unwrap().files,
        tree(&checkpoint).len() as u64
    );
    let files = ModelFiles::open(&ModelSource::parse(folder.to_str().unwrap()).unwrap()).unwrap();
    assert_eq!(files.config.layers, tiny.layers);
    // A revision named by its commit is the same folder.
    let (same, _) = fetch(
        config(&hub.url, &cache),
        &format!("hf://org/tiny-sharded@{COMMIT}"),
    )
    .await;
    assert_eq!(same.unwrap(), folder);
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::remove_dir_all(&checkpoint).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_repositories_need_the_token_and_get_it() {
    let hub = FakeHub::start().await;
    hub.add(
        "org/private",
        COMMIT,
        vec![HubFile::new("m.gguf", vec![1u8; 1000])],
        Some("hf_secret"),
    );
    let cache = scratch("private");
    let (result, _) = fetch(config(&hub.url, &cache), "hf://org/private").await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, HubError::Refused { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    let mut with_token = config(&hub.url, &cache);
    with_token.token = Some("hf_secret".into());
    let (result, _) = fetch(with_token, "hf://org/private").await;
    assert!(result.unwrap().ends_with("m.gguf"));
    let sent: Vec<_> = hub
        .seen()
        .into_iter()
        .filter(|s| s.authorization.is_some())
        .map(|s| s.path)
        .collect();
    assert!(
        sent.contains(&"/api/models/org/private/revision/main".to_owned()),
        "{sent:?}"
    );
    assert!(
        sent.contains(&format!("/org/private/resolve/{COMMIT}/m.gguf")),
        "{sent:?}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_that_match_nothing_say_what_there_is() {
    let hub = FakeHub::start().await;
    hub.add(
        "org/quants",
        COMMIT,
        vec![
            HubFile::new("m-Q4_K_M.gguf", vec![1u8; 100]),
            HubFile::new("m-Q8_0.gguf", vec![2u8; 100]),
        ],
        None,
    );
    hub.add(
        "org/docs",
        COMMIT,
        vec![HubFile::new("README.md", "# none")],
        None,
    );
    let cache = scratch("nothing");
    let cases = [
        (
            "hf://org/quants",
            "name one as hf://org/quants@main/FILE: (m-Q4_K_M.gguf, m-Q8_0.gguf)",
        ),
        (
            "hf://org/quants/m-Q2.gguf",
            "has no file \"m-Q2.gguf\" (m-Q4_K_M.gguf, m-Q8_0.gguf)",
        ),
        ("hf://org/quants@v9", "has no revision \"v9\""),
        (
            "hf://org/docs",
            "no model.safetensors (or index) and no GGUF file",
        ),
        (
            "hf://org/absent",
            "the repository does not exist, or it is private or gated",
        ),
    ];
    for (source, says) in cases {
        let (result, _) = fetch(config(&hub.url, &cache), source).await;
        let err = result.unwrap_err();
        assert!(err.to_string().contains(says), "{source}: {err}");
    }
    // One named file of several is fetched alone.
    let (result, _) = fetch(config(&hub.url, &cache), "hf://org/quants/m-Q8_0.gguf").await;
    assert_eq!(std::fs::read(result.unwrap()).unwrap(), vec![2u8; 100]);
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `serve --model hf://…`: `/ready` reports the download, and the model serves once it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_downloads_a_hub_model_before_it_is_ready() {
    let hub = FakeHub::start().await;
    hub.add(
        "test-org/smol-GGUF",
        COMMIT,
        vec![HubFile::new(
            "smol.Q4_1.gguf",
            std::fs::read(model_path()).unwrap(),
        )],
        None,
    );
    let open = hub.hold("smol.Q4_1.gguf");
    let model_bytes = std::fs::metadata(model_path()).unwrap().len();
    let cache = scratch("serve");
    let port = free_port();
    let mut agent = Agent::spawn_model(
        "hub",
        port,
        "hf://test-org/smol-GGUF",
        &[],
        &[
            ("HF_ENDPOINT", hub.url.clone()),
            ("PARALLAX_MODEL_CACHE", cache.to_string_lossy().into_owned()),
        ],
    );
    let client = parallax_agent::http_client::client();
    let downloading = "downloading hf://test-org/smol-GGUF@main: 0 of 1 files";
    support::http::eventually(
        Duration::from_secs(60),
        "/ready reports the download",
        || {
            let client = client.clone();
            let base = agent.base.clone();
            async move {
                let Ok(answer) = client.get(format!("{base}/ready")).send().await else {
                    return false;
                };
                let status = answer.status().as_u16();
                let body: serde_json::Value = answer.json().await.unwrap_or_default();
                // In words for people, as numbers for the operator's status.
                status == 503
                    && body["status"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(downloading))
                    && body["download"]["model"] == "hf://test-org/smol-GGUF@main"
                    && body["download"]["files"] == 1
                    && body["download"]["bytes"].as_u64() == Some(model_bytes)
            }
        },
    )
    .await;
    let (status, body) = agent.get(&client, "/v1/models").await;
    assert_eq!(status, 503, "{body}");
    open.send(true).unwrap();
    agent.ready(&client, Duration::from_secs(60)).await;
    let answer = client
        .post(format!("{}/v1/completions", agent.base))
        .json(&json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(
        !body["choices"][0]["text"].as_str().unwrap().is_empty(),
        "{body}"
    );
    let log = agent.log();
    assert!(log.contains("downloaded and verified"), "{log}");
    drop(agent);
    std::fs::remove_dir_all(&cache).unwrap();
}
