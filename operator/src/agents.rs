//! What the pool's agents say of themselves: a pod that is not ready may be downloading its
//! model (its `/ready` says how far, as numbers in `download`) or have an unhealthy GPU (in
//! `gpus`). The operator reads it straight from the pod's IP, as Prometheus would, so a pool's
//! status can say so without any permission beyond reading pods.

use futures::future::join_all;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use parallax_crds::AGENT_HTTP_PORT;
use serde::Deserialize;
use std::time::Duration;
use tracing::debug;

/// A download under way in one pod, as its agent reports it.
pub type Download = parallax_crds::DownloadProgress;

/// Bytes done rounded down to a hundredth of the whole. Every status write wakes the controller
/// again, so progress moves in steps: at most a hundred writes per download, and between steps a
/// pass changes nothing.
fn in_steps(mut download: Download) -> Download {
    let step = (download.bytes / 100).max(1);
    download.bytes_done = download.bytes_done.min(download.bytes) / step * step;
    download
}

/// A GPU an agent reports unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SickGpu {
    pub index: u32,
    pub uuid: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// What one unready pod's agent says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    pub download: Option<Download>,
    pub sick_gpus: Vec<SickGpu>,
}

/// The largest `/ready` answer read (it is a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// Asks agents how they are coming along.
#[derive(Debug, Clone)]
pub struct AgentProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// The agents' HTTP port; tests point it at a stand-in agent.
    port: u16,
    timeout: Duration,
}

impl Default for AgentProbe {
    fn default() -> Self {
        Self::on_port(AGENT_HTTP_PORT)
    }
}

impl AgentProbe {
    pub fn on_port(port: u16) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            port,
            timeout: Duration::from_secs(2),
        }
    }

    /// What the agents of those `pods` that run but are not ready say, by pod name. A pod that
    /// does not answer in time is left out.
    pub async fn read(&self, pods: &[Pod]) -> Vec<(String, AgentReport)> {
        let asking = pods.iter().filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let running = status.phase.as_deref() == Some("Running");
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = status.pod_ip.as_deref()?;
            if !running || ready || pod.metadata.deletion_timestamp.is_some() {
                return None;
            }
            Some(async move {
                match self.report(ip).await {
                    Ok(report) => Some((pod.name_any(), report)),
                    Err(error) => {
                        debug!(pod = %pod.name_any(), %error, "no answer from the agent");
                        None
                    }
                }
            })
        });
        join_all(asking).await.into_iter().flatten().collect()
    }

    /// The body of `GET path` from the agent at `ip`, at most `limit` bytes, within the
    /// probe's timeout.
    pub async fn get(&self, ip: &str, path: &str, limit: usize) -> Result<Bytes, String> {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        self.get_url(&format!("http://{host}:{}{path}", self.port), limit)
            .await
    }

    /// GETs `url` (http only) and reads at most `limit` bytes of the answer, whatever its
    /// status (an unready agent's `/ready` says why with a 503).
    pub async fn get_url(&self, url: &str, limit: usize) -> Result<Bytes, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let fetch = async {
            let answer = self.client.get(uri).await.map_err(|e| e.to_string())?;
            Limited::new(answer.into_body(), limit)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .map_err(|_| "did not answer in time".to_owned())?
    }

    async fn report(&self, ip: &str) -> Result<AgentReport, String> {
        let body = self.get(ip, "/ready", MAX_ANSWER).await?;
        #[derive(Deserialize)]
        struct Gpu {
            #[serde(flatten)]
            gpu: SickGpu,
            state: String,
        }
        #[derive(Deserialize)]
        struct Ready {
            download: Option<Download>,
            #[serde(default)]
            gpus: Vec<Gpu>,
        }
        let ready: Ready = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(AgentReport {
            download: ready.download.map(in_steps),
            sick_gpus: ready
                .gpus
                .into_iter()
                .filter(|g| g.state == "unhealthy")
                .map(|g| g.gpu)
                .collect(),
        })
    }
}

/// The pool's downloads in one line: each pod's progress, four pods at most.
pub fn summary(downloads: &[(String, Download)]) -> String {
    let mut parts: Vec<String> = downloads
        .iter()
        .take(4)
        .map(|(pod, d)| format!("pod {pod}: {}", d.amounts()))
        .collect();
    if downloads.len() > 4 {
        parts.push(format!("and {} more", downloads.len() - 4));
    }
    let model = downloads.first().map_or("", |(_, d)| d.model.as_str());
    format!("downloading {model}: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_each_pod_and_its_progress() {
        let d = |done: u64| Download {
            model: "hf://org/m@main".into(),
            files_done: 1,
            files: 4,
            bytes_done: done << 30,
            bytes: 4 << 30,
        };
        let pods: Vec<(String, Download)> = (0..6).map(|i| (format!("p-{i}-0"), d(1))).collect();
        assert_eq!(
            summary(&pods[..1]),
            "downloading hf://org/m@main: pod p-0-0: 1 of 4 files, 1.00 of 4.00 GiB (25%)"
        );
        assert!(
            summary(&pods).ends_with("; and 2 more"),
            "{}",
            summary(&pods)
        );
    }

    #[test]
    fn progress_moves_in_hundredths() {
        let at = |done: u64| {
            in_steps(Download {
                model: "m".into(),
                files_done: 0,
                files: 1,
                bytes_done: done,
                bytes: 1000,
            })
            .bytes_done
        };
        assert_eq!(
            [at(0), at(9), at(10), at(19), at(999), at(1000), at(5000)],
            [0, 0, 10, 10, 990, 1000, 1000]
        );
    }
}
