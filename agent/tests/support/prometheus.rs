//! Debian's Prometheus (installed by `scripts/install-tools`) in a scratch folder, stopped and
//! removed on drop, and its PromQL API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The installed Prometheus, if `scripts/install-tools` could fetch it.
pub fn binary() -> Option<PathBuf> {
    let binary = root().join(".tools/bin/prometheus");
    if binary.exists() {
        Some(binary)
    } else {
        eprintln!(
            "\n*** SKIPPED: {} is missing (scripts/install-tools could not fetch Debian's prometheus) ***\n",
            binary.display()
        );
        None
    }
}

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub base: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second as job `parallax-agent`.
    pub fn start(binary: &Path, target: &str) -> Self {
        Self::with_config(
            binary,
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: parallax-agent\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
    }

    /// Runs with `config` as its prometheus.yml.
    pub fn with_config(binary: &Path, config: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("parallax-prometheus-{nanos}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let address = format!("127.0.0.1:{}", super::process::free_port());
        let child = Command::new(binary)
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self {
            child,
            dir,
            base: format!("http://{address}"),
        }
    }

    /// Every sample of an instant PromQL query: (labels, value); `None` when it cannot be asked.
    pub async fn query_all(
        &self,
        client: &reqwest::Client,
        promql: &str,
    ) -> Option<Vec<(Value, f64)>> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.base),
            [("query", promql)],
        )
        .ok()?;
        let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
        let result = body["data"]["result"].as_array()?;
        Some(
            result
                .iter()
                .filter_map(|r| {
                    let value = r["value"][1].as_str()?.parse().ok()?;
                    Some((r["metric"].clone(), value))
                })
                .collect(),
        )
    }

    /// The first value of an instant PromQL query, if it has one yet.
    pub async fn query(&self, client: &reqwest::Client, promql: &str) -> Option<(Value, f64)> {
        self.query_all(client, promql).await?.into_iter().next()
    }
}
