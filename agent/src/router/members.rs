//! Where the groups are and how they are doing: the members come from a fixed list or from DNS
//! (a headless Service's name resolves to every group leader), and each is polled for its
//! readiness (`/ready`, active health) and its load (`/metrics`).

use super::policy::{Groups, Load};
use futures::future::join_all;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the router finds its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// Base URLs, `http://host:port`.
    Fixed(Vec<String>),
    /// Every address `host` resolves to, on `port`, resolved again every few seconds.
    Dns { host: String, port: u16 },
}

impl Members {
    /// The base URLs of the groups now; none when the name does not resolve (a headless
    /// Service without endpoints has no records).
    pub async fn resolve(&self) -> Vec<String> {
        match self {
            Self::Fixed(urls) => urls.clone(),
            Self::Dns { host, port } => {
                let mut urls: Vec<String> =
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(addresses) => addresses.map(|a| format!("http://{a}")).collect(),
                        Err(e) => {
                            tracing::debug!(%host, "no group resolves: {e}");
                            Vec::new()
                        }
                    };
                urls.sort();
                urls.dedup();
                urls
            }
        }
    }
}

/// One group's answers to a poll.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub ready: bool,
    pub load: Option<Load>,
}

/// The largest `/metrics` answer read.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// Asks `url` for its readiness and load, each within `timeout`.
pub async fn read(client: &reqwest::Client, url: &str, timeout: Duration) -> Reading {
    let get = |path: &'static str| {
        let request = client.get(format!("{url}{path}")).timeout(timeout);
        async move {
            let response = request.send().await.ok()?;
            let ok = response.status().is_success();
            let body = if path == "/metrics" && ok {
                let bytes = response.bytes().await.ok()?;
                (bytes.len() <= MAX_METRICS_BYTES)
                    .then(|| String::from_utf8_lossy(&bytes).into_owned())
            } else {
                None
            };
            Some((ok, body))
        }
    };
    let (ready, metrics) = tokio::join!(get("/ready"), get("/metrics"));
    Reading {
        ready: ready.is_some_and(|(ok, _)| ok),
        load: metrics.and_then(|(_, text)| Load::parse(&text?)),
    }
}

/// One poll: the members now (when `members` is given), then every group's reading. Whether
/// what the groups can take may have changed (members, or a group's readiness).
pub async fn poll(
    groups: &Arc<Mutex<Groups>>,
    members: Option<&Members>,
    client: &reqwest::Client,
    timeout: Duration,
) -> bool {
    let urls = match members {
        Some(members) => Some(members.resolve().await),
        None => None,
    };
    let (joined, asked): (bool, Vec<(String, u32)>) = {
        let mut groups = lock(groups);
        let joined = urls.is_some_and(|urls| groups.set_members(&urls));
        let asked = groups
            .all()
            .iter()
            .map(|g| (g.url.clone(), g.in_flight))
            .collect();
        (joined, asked)
    };
    let readings = join_all(asked.iter().map(|(url, _)| read(client, url, timeout))).await;
    let mut groups = lock(groups);
    let mut changed = joined;
    for ((url, in_flight), reading) in asked.iter().zip(readings) {
        if let Some(group) = groups.get_mut(url) {
            if group.ready != reading.ready {
                tracing::info!(group = %url, ready = reading.ready, "group readiness changed");
                changed = true;
            }
            group.read(reading.ready, reading.load, *in_flight);
        }
    }
    changed
}

pub fn lock(groups: &Mutex<Groups>) -> std::sync::MutexGuard<'_, Groups> {
    groups.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn members_are_fixed_urls_or_every_address_of_a_name() {
        let fixed = Members::Fixed(vec!["http://a:1".into()]);
        assert_eq!(fixed.resolve().await, ["http://a:1"]);
        // An address resolves to itself without a resolver; IPv6 in brackets.
        let v4 = Members::Dns {
            host: "127.0.0.1".into(),
            port: 8000,
        };
        assert_eq!(v4.resolve().await, ["http://127.0.0.1:8000"]);
        let v6 = Members::Dns {
            host: "::1".into(),
            port: 8000,
        };
        assert_eq!(v6.resolve().await, ["http://[::1]:8000"]);
    }
}
