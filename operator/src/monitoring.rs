//! The agents' PodMonitor: one per pool, made where the cluster serves the Prometheus Operator's
//! `monitoring.coreos.com/v1` PodMonitor. Whether it does is asked of API discovery at start and
//! again every minute, so a Prometheus Operator installed after Parallax is found without a
//! restart; a change reconciles every pool. The chart turns the whole thing on or off
//! (`monitoring.enabled`) and passes the labels a Prometheus selects its monitors by.

use crate::children::ChildBuilder;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList;
use kube::Client;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// The API group and version the Prometheus Operator serves its monitors under.
pub const GROUP_VERSION: &str = "monitoring.coreos.com/v1";

/// `monitoring.coreos.com/v1` `PodMonitor`.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor"),
        "podmonitors",
    )
}

/// What the operator's PodMonitors look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMonitorSettings {
    /// Labels on each PodMonitor besides the pool's (a Prometheus's `podMonitorSelector`).
    pub labels: BTreeMap<String, String>,
    /// How often Prometheus scrapes each agent (a Prometheus duration).
    pub interval: String,
}

impl Default for PodMonitorSettings {
    fn default() -> Self {
        Self {
            labels: BTreeMap::new(),
            interval: "15s".into(),
        }
    }
}

impl PodMonitorSettings {
    /// From `PARALLAX_POD_MONITORS` (`auto`, the default: where the CRD is served; `off`),
    /// `PARALLAX_POD_MONITOR_LABELS` (a JSON object of strings) and
    /// `PARALLAX_POD_MONITOR_INTERVAL`, read through `var`. `None` when off; an error names the
    /// variable that is wrong.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        match var("PARALLAX_POD_MONITORS").as_deref().map(str::trim) {
            None | Some("" | "auto") => {}
            Some("off") => return Ok(None),
            Some(other) => {
                return Err(format!(
                    "PARALLAX_POD_MONITORS is {other:?}: it is auto or off"
                ));
            }
        }
        let mut settings = Self::default();
        if let Some(text) = var("PARALLAX_POD_MONITOR_LABELS").filter(|t| !t.trim().is_empty()) {
            settings.labels = serde_json::from_str(&text).map_err(|e| {
                format!("PARALLAX_POD_MONITOR_LABELS is not a JSON object of strings: {e}")
            })?;
        }
        if let Some(interval) = var("PARALLAX_POD_MONITOR_INTERVAL").filter(|t| !t.is_empty()) {
            if !is_duration(&interval) {
                return Err(format!(
                    "PARALLAX_POD_MONITOR_INTERVAL is {interval:?}: it is a Prometheus duration such as 15s or 1m"
                ));
            }
            settings.interval = interval;
        }
        Ok(Some(settings))
    }
}

/// A Prometheus duration as a PodMonitor's `interval` takes it: one or more number-unit pairs,
/// largest unit first (`30s`, `1m30s`, `500ms`).
fn is_duration(text: &str) -> bool {
    const UNITS: [&str; 7] = ["y", "w", "d", "h", "m", "s", "ms"];
    let mut rest = text;
    let mut last = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        // The longest unit that matches: `ms` before `m`.
        let Some(unit) = UNITS
            .iter()
            .enumerate()
            .filter(|(_, u)| rest.starts_with(**u))
            .max_by_key(|(_, u)| u.len())
            .map(|(i, u)| (i, u.len()))
        else {
            return false;
        };
        if last.is_some_and(|previous| unit.0 <= previous) {
            return false;
        }
        last = Some(unit.0);
        rest = &rest[unit.1..];
    }
    last.is_some()
}

/// Labels agent and router pods both carry: the pool's name, and which of the two they are.
const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
const NAME_LABEL: &str = "app.kubernetes.io/name";

/// The name of a pool's PodMonitor.
pub fn name(pool: &str) -> String {
    format!("{pool}-agents")
}

impl ChildBuilder<'_> {
    /// The PodMonitor that has Prometheus scrape every agent and router of the pool at
    /// `/metrics`, with the pool's name as the `pool` label the chart's dashboards and rules
    /// select by (the Prometheus Operator adds `namespace` and `pod`). Both carry the pool's name
    /// as `app.kubernetes.io/instance`; routers carry no pool label (they are no group's).
    pub fn pod_monitor(&self, settings: &PodMonitorSettings) -> DynamicObject {
        let mut object = DynamicObject::new(&name(&self.name), &resource())
            .within(&self.namespace)
            .data(json!({"spec": {
                "selector": {
                    "matchLabels": {INSTANCE_LABEL: self.name},
                    "matchExpressions": [{
                        "key": NAME_LABEL,
                        "operator": "In",
                        "values": ["parallax-agent", "parallax-router"],
                    }],
                },
                "podMetricsEndpoints": [{
                    "port": "http",
                    "path": "/metrics",
                    "interval": settings.interval,
                    "relabelings": [{
                        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                        "targetLabel": "pool",
                    }],
                }],
            }}));
        object.metadata = self.meta(name(&self.name));
        let labels = object.metadata.labels.get_or_insert_default();
        for (key, value) in &settings.labels {
            labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
        object
    }
}

/// Whether the cluster serves PodMonitors, by API discovery: an unknown group is a no.
pub async fn served(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(GROUP_VERSION).await {
        Ok(APIResourceList { resources, .. }) => {
            Ok(resources.iter().any(|r| r.name == resource().plural))
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Asks discovery again every `every` (the caller asked at start) and publishes whether
/// PodMonitors are served; a failed discovery keeps the last answer. Runs until the receivers
/// are gone.
pub async fn discover(client: Client, every: Duration, served_now: watch::Sender<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = served_now.closed() => return,
        }
        match served(&client).await {
            Ok(yes) => {
                served_now.send_if_modified(|was| {
                    let changed = *was != yes;
                    if changed {
                        info!(served = yes, "the cluster's PodMonitor API changed");
                    }
                    *was = yes;
                    changed
                });
            }
            Err(error) => warn!(%error, "API discovery of {GROUP_VERSION} failed"),
        }
    }
}

/// What reconcile does about a pool's PodMonitor.
#[derive(Debug, Clone)]
pub struct PodMonitors {
    /// `None` when the operator makes none.
    pub settings: Option<PodMonitorSettings>,
    /// Whether the cluster serves PodMonitors, as discovery last said.
    pub served: watch::Receiver<bool>,
}

/// A pool's PodMonitor, as things stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// Apply it.
    Yes(&'a PodMonitorSettings),
    /// Monitors are turned off: remove the pool's if there is one.
    Removed,
    /// The cluster has no PodMonitor API: nothing to do.
    NotServed,
}

impl PodMonitors {
    /// Makes none, and asks nothing.
    pub fn off() -> Self {
        Self {
            settings: None,
            served: watch::channel(false).1,
        }
    }

    pub fn wanted(&self) -> Wanted<'_> {
        match (*self.served.borrow(), &self.settings) {
            (false, _) => Wanted::NotServed,
            (true, Some(settings)) => Wanted::Yes(settings),
            (true, None) => Wanted::Removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn settings_come_from_the_environment_and_bad_ones_are_named() {
        assert_eq!(
            PodMonitorSettings::from_env(env(&[])),
            Ok(Some(PodMonitorSettings::default()))
        );
        assert_eq!(
            PodMonitorSettings::from_env(env(&[("PARALLAX_POD_MONITORS", "off")])),
            Ok(None)
        );
        let set = PodMonitorSettings::from_env(env(&[
            ("PARALLAX_POD_MONITORS", "auto"),
            (
                "PARALLAX_POD_MONITOR_LABELS",
                r#"{"release": "kube-prometheus-stack"}"#,
            ),
            ("PARALLAX_POD_MONITOR_INTERVAL", "1m30s"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(set.labels["release"], "kube-prometheus-stack");
        assert_eq!(set.interval, "1m30s");
        for (key, value) in [
            ("PARALLAX_POD_MONITORS", "yes"),
            ("PARALLAX_POD_MONITOR_LABELS", r#"{"release": 1}"#),
            ("PARALLAX_POD_MONITOR_INTERVAL", "15"),
        ] {
            let error = PodMonitorSettings::from_env(env(&[(key, value)])).unwrap_err();
            assert!(error.starts_with(key), "{error}");
        }
    }

    #[test]
    fn intervals_are_prometheus_durations() {
        for good in ["15s", "1m", "1m30s", "500ms", "1h", "2d12h"] {
            assert!(is_duration(good), "{good}");
        }
        for bad in ["", "15", "s", "1.5s", "30s1m", "15 s", "1x", "1s1s"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }

    #[test]
    fn a_pool_is_monitored_only_where_the_api_is_served_and_monitors_are_on() {
        let (tx, rx) = watch::channel(false);
        let on = PodMonitors {
            settings: Some(PodMonitorSettings::default()),
            served: rx.clone(),
        };
        let off = PodMonitors {
            settings: None,
            served: rx,
        };
        assert_eq!(on.wanted(), Wanted::NotServed);
        assert_eq!(off.wanted(), Wanted::NotServed);
        tx.send(true).unwrap();
        assert_eq!(on.wanted(), Wanted::Yes(&PodMonitorSettings::default()));
        assert_eq!(off.wanted(), Wanted::Removed);
    }
}
