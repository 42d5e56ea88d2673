//! A real server on a loopback socket, a real HTTP client, and readers for what it answers.

use super::{config, model_path};
use parallax_agent::engine::{self, EngineConfig, EngineHandle, ModelSource};
use parallax_agent::server::{Server, ServerConfig};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "smollm2";

/// A server on 127.0.0.1 with an ephemeral port.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub server: Server,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

pub fn server_config() -> ServerConfig {
    ServerConfig {
        served_name: MODEL.into(),
        max_body_bytes: 64 << 10,
        shutdown_timeout: Duration::from_secs(30),
        ..ServerConfig::default()
    }
}

/// Loads the test model, reporting steps to `server`'s metrics, and attaches it.
pub fn load_into(server: &Server, engine_config: EngineConfig) -> EngineHandle {
    let (executor, codec) = engine::load_with_tokenizer(
        &ModelSource::Gguf(model_path()),
        None,
        &engine::BackendConfig::default(),
    )
    .expect("the test model loads");
    let handle = engine::start_observed(executor, codec, engine_config, server.metrics())
        .expect("the engine starts");
    server.attach(handle.clone());
    handle
}

impl TestServer {
    /// A server whose model is not loaded yet.
    pub async fn unloaded(config: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = Server::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.clone().run(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            client: parallax_agent::http_client::client(),
            server,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A server with the test model loaded.
    pub async fn start() -> (Self, EngineHandle) {
        Self::start_with(server_config(), config(512, 2048)).await
    }

    pub async fn start_with(
        config: ServerConfig,
        engine_config: EngineConfig,
    ) -> (Self, EngineHandle) {
        let server = Self::unloaded(config).await;
        let engine = load_into(&server.server, engine_config);
        (server, engine)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs and returns status and JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        text
    }

    /// Begins the shutdown; [`TestServer::stopped`] waits for its end.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stopped(&mut self) -> std::io::Result<()> {
        let task = self.task.take().expect("the server runs");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the server stops in time")
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The JSON events of a server-sent event stream, checking it ends with `[DONE]`.
pub fn sse_events(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.trim()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"))
        })
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "the stream ends with [DONE]");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The value of the sample `name{labels…}` in Prometheus text, labels matched as a subset.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse().ok())?
        })
}

/// Every sample of metric `name`: its labels as written (`a="x",b="y"`) and its value.
#[allow(dead_code)]
pub fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let labels = rest.strip_suffix('}')?;
            (metric == name).then(|| Some((labels.to_owned(), value.parse().ok()?)))?
        })
        .collect()
}

/// Waits (polling) until `check` holds, up to `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
