//! The router's metrics: what it did with each request, and each group as it sees it.

use super::policy::Groups;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabel {
    group: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

/// How an attempt on a group ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered, not with a 5xx.
    Answered,
    /// It answered 5xx: the request may have started, so it is not retried.
    Failed,
    /// It refused before starting (429, 503): the request tries another group.
    Refused,
    /// No connection or no answer.
    Unreachable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug)]
pub struct RouterMetrics {
    registry: Registry,
    attempts: Family<AttemptLabel, Counter>,
    picks: Family<ReasonLabel, Counter>,
    rejections: Family<ReasonLabel, Counter>,
    retries: Counter,
    held: Gauge,
}

impl RouterMetrics {
    pub fn new(groups: Arc<Mutex<Groups>>) -> Self {
        let mut metrics = Self {
            attempts: Family::default(),
            picks: Family::default(),
            rejections: Family::default(),
            retries: Counter::default(),
            held: Gauge::default(),
            registry: Registry::default(),
        };
        metrics.registry.register(
            "parallax_router_attempts",
            "Requests sent to a group, by how the group answered (answered, failed, refused, unreachable)",
            metrics.attempts.clone(),
        );
        metrics.registry.register(
            "parallax_router_picks",
            "Groups picked, by why (affinity: it was sent the prompt's prefix; capacity: weighted by free batch places and KV cache; least_loaded: every group was full)",
            metrics.picks.clone(),
        );
        metrics.registry.register(
            "parallax_router_rejections",
            "Requests the router answered itself, by why (saturated, no_group, body_too_large, exhausted)",
            metrics.rejections.clone(),
        );
        metrics.registry.register(
            "parallax_router_retries",
            "Requests sent again to another group after one refused or could not be reached",
            metrics.retries.clone(),
        );
        metrics.registry.register(
            "parallax_router_held_requests",
            "Requests held until a group can take them (no group ready, e.g. while the pool wakes)",
            metrics.held.clone(),
        );
        metrics
            .registry
            .register_collector(Box::new(GroupCollector { groups }));
        metrics
    }

    pub fn attempt(&self, group: &str, outcome: Outcome) {
        self.attempts
            .get_or_create(&AttemptLabel {
                group: group.to_owned(),
                outcome: outcome.label(),
            })
            .inc();
    }

    pub fn picked(&self, reason: &'static str) {
        self.picks.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejections.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    /// Counts a held request until the guard drops.
    pub fn hold(&self) -> HeldGuard<'_> {
        self.held.inc();
        HeldGuard(&self.held)
    }

    /// Prometheus text format 0.0.4, and its content type.
    pub fn encode(&self) -> (String, &'static str) {
        crate::server::metrics::encode(&self.registry, false)
    }
}

#[derive(Debug)]
pub struct HeldGuard<'a>(&'a Gauge);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Each group's state at scrape time.
#[derive(Debug)]
struct GroupCollector {
    groups: Arc<Mutex<Groups>>,
}

impl Collector for GroupCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<(String, [i64; 4])> = {
            let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let config = groups.config;
            groups
                .all()
                .iter()
                .map(|g| {
                    (
                        g.url.clone(),
                        [
                            i64::from(g.ready),
                            i64::from(g.in_flight),
                            g.queue(&config).round() as i64,
                            g.breaker.level(),
                        ],
                    )
                })
                .collect()
        };
        let gauges = [
            (
                "parallax_router_group_ready",
                "1 while the group's /ready answers 200",
            ),
            (
                "parallax_router_group_in_flight",
                "Requests this router has on the group now",
            ),
            (
                "parallax_router_group_queue",
                "Requests the router estimates wait for a batch place in the group",
            ),
            (
                "parallax_router_group_breaker_state",
                "The group's circuit breaker: 0 closed, 1 half-open, 2 open",
            ),
        ];
        for (column, (name, help)) in gauges.into_iter().enumerate() {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (group, values) in &rows {
                let label = GroupLabel {
                    group: group.clone(),
                };
                ConstGauge::new(values[column]).encode(metric.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}
