//! Operator metrics in Prometheus text format.

use parallax_crds::{AutoscalingStatus, InferencePoolStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub namespace: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabel {
    pub namespace: String,
    pub pool: String,
    pub signal: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupsLabel {
    pub namespace: String,
    pub pool: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapacityLabel {
    pub namespace: String,
    pub pool: String,
    pub capacity_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub namespace: String,
    pub pool: String,
    pub rule: &'static str,
}

/// Counters and timings of the reconcile loop and leadership.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: Counter,
    pub failures: Family<CategoryLabel, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
    /// The autoscaler's last look at each pool: request rate, queue, p95 (seconds), error
    /// rate, utilization, capacity per group, forecast and its error against naive.
    pub autoscaling_signals: Family<SignalLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Groups the autoscaler wants, by pool.
    pub autoscaling_replicas: Family<PoolLabel, Gauge>,
    /// Scale decisions written, by pool and rule.
    pub autoscaling_decisions: Family<DecisionLabel, Counter>,
    /// GPU-hours of the pools' running pods, by capacity type.
    pub gpu_hours: Family<CapacityLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Revisions rolled back, by the signal that regressed.
    pub rollbacks: Family<SignalLabel, Counter>,
    /// Each pool's groups as its last reconcile saw them: desired, current, ready, updated.
    pub pool_groups: Family<GroupsLabel, Gauge>,
    /// Each pool's tensor-parallel size, once laid out.
    pub pool_tensor_parallel_size: Family<PoolLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("parallax_operator");
        let reconciliations = Counter::default();
        let failures = Family::<CategoryLabel, Counter>::default();
        let duration = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let leader = Gauge::default();
        registry.register(
            "reconciliations",
            "Reconciles started",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let autoscaling_signals = Family::default();
        let autoscaling_replicas = Family::default();
        let autoscaling_decisions = Family::default();
        registry.register(
            "autoscaling_signal",
            "The autoscaler's last look at a pool, by signal: request_rate (req/s), queue, p95_seconds, error_rate, utilization, capacity_per_group (req/s), forecast (req/s at the lead), forecast_mape, naive_mape",
            autoscaling_signals.clone(),
        );
        registry.register(
            "autoscaling_desired_replicas",
            "Groups the autoscaler wants for a pool",
            autoscaling_replicas.clone(),
        );
        registry.register(
            "autoscaling_decisions",
            "Scale decisions written through the scale subresource, by rule",
            autoscaling_decisions.clone(),
        );
        let gpu_hours = Family::default();
        registry.register(
            "gpu_hours",
            "GPU-hours of the pools' running pods, by capacity type (on-demand, spot)",
            gpu_hours.clone(),
        );
        let rollbacks = Family::default();
        registry.register(
            "rollbacks",
            "Revisions judged worse than the last good one and rolled back, by signal (latency, throughput, errors, degraded)",
            rollbacks.clone(),
        );
        let pool_groups = Family::default();
        registry.register(
            "pool_groups",
            "A pool's groups as its last reconcile saw them, by state: desired (spec.replicas), current, ready, updated (on the current template)",
            pool_groups.clone(),
        );
        let pool_tensor_parallel_size = Family::default();
        registry.register(
            "pool_tensor_parallel_size",
            "GPUs each of a pool's groups splits the model over (status.tensorParallelSize)",
            pool_tensor_parallel_size.clone(),
        );
        Self {
            registry,
            rollbacks,
            pool_groups,
            pool_tensor_parallel_size,
            reconciliations,
            failures,
            duration,
            leader,
            gpu_hours,
            autoscaling_signals,
            autoscaling_replicas,
            autoscaling_decisions,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        ReconcileTimer {
            histogram: &self.duration,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, category: &'static str) {
        self.failures
            .get_or_create(&CategoryLabel { category })
            .inc();
    }

    /// The registry in Prometheus text format.
    /// The autoscaler's look at a pool: each signal it has.
    pub fn record_signals(&self, namespace: &str, pool: &str, view: &AutoscalingStatus) {
        for (signal, value) in [
            ("request_rate", view.requests_per_second),
            ("queue", view.queue),
            ("p95_seconds", view.p95_milliseconds.map(|p| p / 1e3)),
            ("utilization", view.utilization),
            ("capacity_per_group", view.capacity_per_group),
            ("forecast", view.forecast_requests_per_second),
            ("forecast_mape", view.forecast_mape),
            ("naive_mape", view.naive_mape),
        ] {
            if let Some(value) = value {
                self.autoscaling_signals
                    .get_or_create(&SignalLabel {
                        namespace: namespace.to_owned(),
                        pool: pool.to_owned(),
                        signal,
                    })
                    .set(value);
            }
        }
    }

    /// The pool's groups and layout as its reconcile just wrote them.
    pub fn pool_observed(
        &self,
        namespace: &str,
        pool: &str,
        desired: i32,
        status: &InferencePoolStatus,
    ) {
        for (state, groups) in [
            ("desired", desired),
            ("current", status.replicas),
            ("ready", status.ready_replicas),
            ("updated", status.updated_replicas),
        ] {
            self.pool_groups
                .get_or_create(&GroupsLabel {
                    namespace: namespace.to_owned(),
                    pool: pool.to_owned(),
                    state,
                })
                .set(i64::from(groups));
        }
        let label = PoolLabel {
            namespace: namespace.to_owned(),
            pool: pool.to_owned(),
        };
        match status.tensor_parallel_size {
            Some(size) => {
                self.pool_tensor_parallel_size
                    .get_or_create(&label)
                    .set(i64::from(size));
            }
            None => {
                self.pool_tensor_parallel_size.remove(&label);
            }
        }
    }

    /// The pool is gone: its series go too.
    pub fn pool_gone(&self, namespace: &str, pool: &str) {
        for state in ["desired", "current", "ready", "updated"] {
            self.pool_groups.remove(&GroupsLabel {
                namespace: namespace.to_owned(),
                pool: pool.to_owned(),
                state,
            });
        }
        self.pool_tensor_parallel_size.remove(&PoolLabel {
            namespace: namespace.to_owned(),
            pool: pool.to_owned(),
        });
    }

    /// A revision of the pool rolled back because `signal` regressed.
    pub fn rolled_back(&self, namespace: &str, pool: &str, signal: &'static str) {
        self.rollbacks
            .get_or_create(&SignalLabel {
                namespace: namespace.to_owned(),
                pool: pool.to_owned(),
                signal,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Observes the reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pools_groups_and_layout_are_exported_until_it_goes() {
        let metrics = Metrics::default();
        let status = InferencePoolStatus {
            replicas: 3,
            ready_replicas: 2,
            updated_replicas: 1,
            tensor_parallel_size: Some(4),
            ..Default::default()
        };
        metrics.pool_observed("ml", "llama", 4, &status);
        let text = metrics.encode();
        for (state, n) in [("desired", 4), ("current", 3), ("ready", 2), ("updated", 1)] {
            let line = format!(
                "parallax_operator_pool_groups{{namespace=\"ml\",pool=\"llama\",state=\"{state}\"}} {n}"
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(text.contains(
            "parallax_operator_pool_tensor_parallel_size{namespace=\"ml\",pool=\"llama\"} 4"
        ));
        metrics.pool_gone("ml", "llama");
        let text = metrics.encode();
        assert!(!text.contains("pool=\"llama\""), "{text}");
    }
}
