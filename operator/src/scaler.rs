//! The built-in autoscaler and the rollback judge. Every interval, for each pool that enables
//! either: read its ready group leaders' `/metrics` (at their pod IPs, as Prometheus would).
//!
//! - Autoscaling turns two scrapes into the last interval's signals, lets the reactive rules
//!   and the forecast decide, and writes the decision through the pool's scale subresource —
//!   with an event that names the rule, the signal and its value, and
//!   `ScalingActive`/`ScalingLimited` conditions. Where an HPA (or KEDA, which makes one)
//!   already targets the pool, it stands aside and says so.
//! - The rollback judge keeps a window of each serving revision's leaders; a new revision is
//!   judged against the last good one's window, and one that regressed is written to
//!   `status.rollback.failedRevision`, which makes the reconcile run the last good revision
//!   (`revisions`), with a `RolledBack` condition and event.

use crate::agents::AgentProbe;
use crate::autoscale::forecast::Predictor;
use crate::autoscale::reactive::{self, Rules};
use crate::autoscale::rollback::{self, Outcome, Thresholds, Window};
use crate::autoscale::signals::{self, RouterReading, Scrape};
use crate::autoscale::simulate::combine;
use crate::autoscale::{Capacity, Decision};
use crate::children::{REVISION_ANNOTATION, leader_selector};
use crate::metrics::{CapacityLabel, DecisionLabel, Metrics, PoolLabel};
use crate::placement::CapacityType;
use crate::router::ROUTER_LABEL;
use crate::status::{ConditionStatus, ConditionType, DesiredCondition, Reason, merge_conditions};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use parallax_crds::{AutoscalingStatus, GpuHours, InferencePool};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The largest `/metrics` answer read.
const MAX_METRICS: usize = 4 << 20;

/// The lead a forecast looks beyond a new group's startup.
const LEAD_S: f64 = 300.0;
/// How long an answer of Prometheus that says nothing new is waited past.
const PROMETHEUS_PATIENCE_S: f64 = 60.0;
/// A new group's startup until one is measured.
const STARTUP_S: f64 = 180.0;

/// What the scaler remembers of a pool between looks.
#[derive(Debug)]
struct PoolScaling {
    last: Option<Scrape>,
    rules: reactive::State,
    capacity: Capacity,
    predictor: Predictor,
    /// A scale-up under way: when, and to how many groups.
    scaling_up: Option<(f64, u32)>,
    /// How long new groups took to become ready (mean of the measured ones).
    startup_s: f64,
    /// The last window of each revision the leaders run, for the rollback judge.
    windows: HashMap<String, Window>,
    /// What the routers said at the last look while the pool had no groups.
    routers: Option<RouterReading>,
}

/// A ready group leader.
#[derive(Debug)]
struct Leader {
    pod: String,
    /// Where its agent answers (none needed when Prometheus is read instead).
    ip: Option<String>,
    /// The serving-spec revision it runs.
    revision: Option<String>,
}

impl Default for PoolScaling {
    fn default() -> Self {
        Self {
            last: None,
            rules: reactive::State::default(),
            capacity: Capacity::new(None),
            predictor: Predictor::new(STARTUP_S + LEAD_S),
            scaling_up: None,
            startup_s: STARTUP_S,
            windows: HashMap::new(),
            routers: None,
        }
    }
}

/// The autoscaler's loop and its memory.
pub struct Scaler {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// Reads the agents' `/metrics`.
    agents: AgentProbe,
    origin: Instant,
    pools: HashMap<(String, String), PoolScaling>,
    /// GPU-hours counted since the last status write, by pool: (on-demand, spot), and when the
    /// pass before ran.
    gpu_hours: HashMap<(String, String), (f64, f64)>,
    last_pass: Option<Instant>,
    last_hours_write: Option<Instant>,
    /// How often GPU-hours go to status: every twenty passes (five minutes at 15 s).
    hours_every: Duration,
}

impl std::fmt::Debug for Scaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// A pod that is not going away and is ready.
fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// A ready pod's address.
fn ready_ip(pod: &Pod) -> Option<String> {
    is_ready(pod)
        .then(|| pod.status.as_ref()?.pod_ip.clone())
        .flatten()
}

/// The pool's rules from its spec.
pub fn rules(pool: &InferencePool) -> Rules {
    let spec = &pool.spec.autoscaling;
    Rules {
        up_queue: f64::from(spec.scale_up_queue),
        up_p95_seconds: f64::from(spec.scale_up_p95_milliseconds) / 1e3,
        down_utilization: spec.scale_down_utilization,
        down_window_seconds: f64::from(spec.scale_down_window_seconds),
        emergency_queue: f64::from(spec.emergency_queue),
        emergency_errors: spec.emergency_error_rate,
        target_utilization: spec.target_utilization,
        up_cooldown_seconds: f64::from(spec.scale_up_cooldown_seconds),
        down_cooldown_seconds: f64::from(spec.scale_down_cooldown_seconds),
        min_replicas: pool.spec.min_replicas.max(0) as u32,
        max_replicas: pool.spec.max_replicas.max(0) as u32,
        zero_after_seconds: spec.scale_to_zero_after_seconds.map(f64::from),
        ..Rules::default()
    }
}

impl Scaler {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        agents: AgentProbe,
    ) -> Self {
        Self {
            client,
            recorder,
            metrics,
            agents,
            origin: Instant::now(),
            pools: HashMap::new(),
            gpu_hours: HashMap::new(),
            last_pass: None,
            last_hours_write: None,
            hours_every: Duration::from_secs(300),
        }
    }

    /// Looks at every pool every `interval`, until the task is dropped.
    pub async fn run(mut self, interval: Duration) {
        self.hours_every = interval * 20;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.pass().await {
                debug!(%error, "autoscaling pass did not complete");
            }
        }
    }

    async fn pass(&mut self) -> kube::Result<()> {
        let pools: Api<InferencePool> = Api::all(self.client.clone());
        let pools = pools.list(&ListParams::default()).await?;
        self.count_gpu_hours(&pools.items).await?;
        let mut seen = Vec::new();
        for pool in pools.items {
            let looked_at = pool.spec.autoscaling.enabled || pool.spec.rollback.enabled;
            if !looked_at || pool.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = (pool.namespace().unwrap_or_default(), pool.name_any());
            seen.push(key.clone());
            if let Err(error) = self.look(&pool, &key).await {
                warn!(pool = %key.1, namespace = %key.0, %error, "autoscaling this pool failed");
            }
        }
        self.pools.retain(|key, _| seen.contains(key));
        Ok(())
    }

    async fn look(&mut self, pool: &InferencePool, key: &(String, String)) -> kube::Result<()> {
        if pool.spec.autoscaling.enabled && pool.spec.replicas == 0 {
            return self.wake(pool, key).await;
        }
        let (namespace, name) = key;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let leaders: Vec<Leader> = pods
            .list(&ListParams::default().labels(&leader_selector(name)))
            .await?
            .items
            .iter()
            .filter(|p| is_ready(p))
            .map(|p| Leader {
                pod: p.name_any(),
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                revision: p.annotations().get(REVISION_ANNOTATION).cloned(),
            })
            .collect();
        let mut scrape = Scrape {
            at: self.origin.elapsed().as_secs_f64(),
            ..Scrape::default()
        };
        let prometheus = pool
            .spec
            .autoscaling
            .metrics_source
            .as_ref()
            .map(|s| &s.prometheus);
        match prometheus {
            None => {
                for leader in &leaders {
                    let Some(ip) = &leader.ip else { continue };
                    match self.metrics(ip).await {
                        Ok(text) => scrape.add(&leader.pod, &text),
                        Err(error) => {
                            debug!(pool = %name, %ip, %error, "no metrics from a leader");
                        }
                    }
                }
            }
            Some(source) if !leaders.is_empty() => {
                let pods: Vec<&str> = leaders.iter().map(|l| l.pod.as_str()).collect();
                let query = signals::prometheus_query(
                    namespace,
                    &pods,
                    &source.pod_label,
                    &source.namespace_label,
                );
                let url = format!(
                    "{}/api/v1/query?query={}",
                    source.url.trim_end_matches('/'),
                    signals::url_encode(&query)
                );
                let answer = self
                    .agents
                    .get_url(&url, MAX_METRICS)
                    .await
                    .and_then(|body| signals::prometheus_readings(&body, &source.pod_label));
                match answer {
                    Ok(texts) => {
                        for (pod, text) in
                            texts.iter().filter(|(pod, _)| pods.contains(&pod.as_str()))
                        {
                            scrape.add(pod, text);
                        }
                    }
                    Err(error) => {
                        warn!(pool = %name, url = %source.url, %error, "no metrics from Prometheus")
                    }
                }
            }
            Some(_) => {}
        }
        let mut state = self.pools.remove(key).unwrap_or_default();
        // Prometheus scrapes on its own schedule: an answer that says nothing new waits for the
        // next (up to a minute), so an interval is never read as one without traffic.
        if prometheus.is_some()
            && let Some(last) = &state.last
            && !scrape.leaders.is_empty()
            && last.leaders == scrape.leaders
            && scrape.at - last.at < PROMETHEUS_PATIENCE_S
        {
            self.pools.insert(key.clone(), state);
            return Ok(());
        }
        let previous = state.last.replace(scrape.clone());
        let mut result = Ok(());
        if pool.spec.rollback.enabled
            && let Some(before) = &previous
        {
            result = self
                .judge(pool, &mut state, &leaders, &scrape, before)
                .await;
        }
        if result.is_ok() && pool.spec.autoscaling.enabled {
            result = self
                .autoscale(pool, &mut state, &scrape, previous.as_ref(), leaders.len())
                .await;
        }
        self.pools.insert(key.clone(), state);
        result
    }

    /// A pool at zero groups: its routers' metrics say whether a request waits for one.
    async fn wake(&mut self, pool: &InferencePool, key: &(String, String)) -> kube::Result<()> {
        let (namespace, name) = key;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let routers = pods
            .list(&ListParams::default().labels(&format!("{ROUTER_LABEL}={name}")))
            .await?;
        let mut reading = RouterReading::default();
        let mut read = 0;
        for ip in routers.items.iter().filter_map(ready_ip) {
            match self.metrics(&ip).await {
                Ok(text) => {
                    reading.add(&text);
                    read += 1;
                }
                Err(error) => debug!(pool = %name, %ip, %error, "no metrics from a router"),
            }
        }
        let mut state = self.pools.remove(key).unwrap_or_default();
        // Intervals start afresh once groups serve again.
        state.last = None;
        let decision = if read > 0 {
            let before = state.routers.replace(reading);
            rules(pool).wake(&reading, before.as_ref())
        } else {
            None
        };
        if let Some(decision) = &decision {
            state.scaling_up = Some((self.origin.elapsed().as_secs_f64(), decision.replicas));
            state.routers = None;
        }
        self.pools.insert(key.clone(), state);
        let Some(decision) = decision else {
            return Ok(());
        };
        self.record(pool, &AutoscalingStatus::default(), &decision);
        self.scale(pool, 0, &decision).await
    }

    /// The built-in autoscaler's look at one pool, from the interval since the last scrape.
    async fn autoscale(
        &self,
        pool: &InferencePool,
        state: &mut PoolScaling,
        scrape: &Scrape,
        previous: Option<&Scrape>,
        ready: usize,
    ) -> kube::Result<()> {
        let namespace = pool.namespace().unwrap_or_default();
        let name = pool.name_any();
        // An HPA or KEDA object that scales the pool: stand aside.
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(self.client.clone(), &namespace);
        let external = hpas
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|h| {
                h.spec.as_ref().is_some_and(|s| {
                    s.scale_target_ref.kind == "InferencePool" && s.scale_target_ref.name == name
                })
            });
        if let Some(hpa) = external {
            let message = format!(
                "HorizontalPodAutoscaler {} scales this pool; the built-in autoscaler stands aside",
                hpa.name_any()
            );
            let active = DesiredCondition::new(
                ConditionType::ScalingActive,
                ConditionStatus::False,
                Reason::ExternalAutoscaler,
                message,
            );
            return self
                .conditions(pool, vec![active], serde_json::json!({}), false)
                .await;
        }
        let Some(signals) = previous.and_then(|before| scrape.since(before, ready as u32)) else {
            return Ok(());
        };
        let rules = rules(pool);
        let current = pool.spec.replicas.max(0) as u32;
        state.capacity.observe(&signals);
        // How long new groups take to be ready, measured on each scale-up.
        if let Some((at, target)) = state.scaling_up
            && signals.ready >= target
        {
            state.startup_s = 0.7 * state.startup_s + 0.3 * (signals.at - at);
            state.predictor.set_lead(state.startup_s + LEAD_S);
            state.scaling_up = None;
        }
        state.predictor.observe(signals.at, signals.request_rate);
        let capacity = state.capacity.per_group();
        let predicted = state
            .predictor
            .wanted_rate()
            .and_then(|rate| rules.needed(rate, capacity))
            .map(|n| {
                n.clamp(
                    rules.min_replicas,
                    rules.max_replicas.max(rules.min_replicas),
                )
            });
        let mut decision = rules.decide(&mut state.rules, &signals, current, capacity);
        let wanted = combine(predicted, &decision);
        if wanted != decision.replicas {
            decision = Decision {
                replicas: wanted,
                rule: "predictive",
                why: format!(
                    "{:.1} req/s forecast {:.0} s ahead at {:.0} % utilization",
                    state.predictor.wanted_rate().unwrap_or(0.0),
                    state.startup_s + LEAD_S,
                    rules.target_utilization * 100.0
                ),
                limited: decision.limited,
            };
        }
        if decision.replicas > current {
            state.scaling_up = Some((signals.at, decision.replicas));
        }
        let mape = state.predictor.mape();
        let view = AutoscalingStatus {
            requests_per_second: Some(signals.request_rate),
            queue: Some(signals.queue),
            p95_milliseconds: signals.p95_seconds.map(|p| p * 1e3),
            utilization: signals.utilization,
            capacity_per_group: capacity,
            forecast_requests_per_second: state.predictor.wanted_rate(),
            forecast_mape: mape.map(|m| m.0),
            naive_mape: mape.map(|m| m.1),
            predictive: predicted.is_some(),
        };
        self.record(pool, &view, &decision);
        if decision.replicas != current {
            self.scale(pool, current, &decision).await?;
        }
        let message = format!(
            "{} groups; last look: {:.2} req/s, queue {:.0}, p95 {}, utilization {:.0} %: {} ({})",
            decision.replicas,
            signals.request_rate,
            signals.queue,
            signals
                .p95_seconds
                .map_or("-".to_owned(), |p| format!("{:.0} ms", p * 1e3)),
            signals.utilization.unwrap_or(0.0) * 100.0,
            decision.rule,
            decision.why
        );
        let reason = if predicted.is_some() {
            Reason::PredictiveAndReactive
        } else {
            Reason::ReactiveRules
        };
        let mut desired = vec![DesiredCondition::new(
            ConditionType::ScalingActive,
            ConditionStatus::True,
            reason,
            message,
        )];
        desired.push(if decision.limited {
            DesiredCondition::new(
                ConditionType::ScalingLimited,
                ConditionStatus::True,
                Reason::TooFewOrTooManyReplicas,
                format!(
                    "{}: {} wanted beyond minReplicas {} / maxReplicas {}",
                    decision.rule, decision.why, pool.spec.min_replicas, pool.spec.max_replicas
                ),
            )
        } else {
            DesiredCondition::new(
                ConditionType::ScalingLimited,
                ConditionStatus::False,
                Reason::WithinBounds,
                "the wanted number of groups is within minReplicas and maxReplicas",
            )
        });
        // The last look is written with the conditions, not on every pass: a moving signal
        // alone does not rewrite the pool.
        let view = serde_json::json!({"autoscaling": view});
        self.conditions(pool, desired, view, false).await
    }

    /// The rollback judge's look at one pool: each revision's interval into its window, then
    /// the verdict on a new revision, written to status with a condition and an event.
    async fn judge(
        &self,
        pool: &InferencePool,
        state: &mut PoolScaling,
        leaders: &[Leader],
        scrape: &Scrape,
        before: &Scrape,
    ) -> kube::Result<()> {
        let spec = &pool.spec.rollback;
        let rules = Thresholds {
            window_seconds: f64::from(spec.window_seconds),
            min_requests: f64::from(spec.min_requests),
            latency_increase: spec.latency_increase,
            throughput_decrease: spec.throughput_decrease,
            error_rate: spec.error_rate,
        };
        let mut running: Vec<&str> = leaders
            .iter()
            .filter_map(|l| l.revision.as_deref())
            .collect();
        running.sort_unstable();
        running.dedup();
        for revision in &running {
            let runs = |pod: &str| {
                leaders
                    .iter()
                    .any(|l| l.pod == pod && l.revision.as_deref() == Some(revision))
            };
            if let Some(interval) = scrape.interval(before, runs) {
                state
                    .windows
                    .entry((*revision).to_owned())
                    .or_default()
                    .push(interval, rules.window_seconds);
            }
        }
        let status = pool
            .status
            .as_ref()
            .and_then(|s| s.rollback.clone())
            .unwrap_or_default();
        let asked = pool.spec.serving_revision();
        let (next, outcome) = rollback::step(
            &status,
            &asked,
            running.contains(&asked.as_str()),
            &mut state.windows,
            &rules,
        );
        debug!(pool = %pool.name_any(), ?next, ?outcome, "rollback judge looked");
        let stable = next.stable_revision.clone().unwrap_or_default();
        let condition = match &outcome {
            Outcome::Quiet => None,
            Outcome::Judging(_) => Some(DesiredCondition::new(
                ConditionType::RolledBack,
                ConditionStatus::False,
                Reason::JudgingRevision,
                format!(
                    "judging revision {asked} against revision {stable} over {} s of its traffic",
                    spec.window_seconds
                ),
            )),
            Outcome::Promoted(seen) => Some(DesiredCondition::new(
                ConditionType::RolledBack,
                ConditionStatus::False,
                Reason::RevisionHealthy,
                format!("revision {asked} serves as well as the one before: {seen}"),
            )),
            Outcome::Recovered => Some(DesiredCondition::new(
                ConditionType::RolledBack,
                ConditionStatus::False,
                Reason::RevisionHealthy,
                format!("the spec asks for revision {asked}, the last good one, again"),
            )),
            Outcome::RolledBack { signal, message } => Some(DesiredCondition::new(
                ConditionType::RolledBack,
                ConditionStatus::True,
                match *signal {
                    "latency" => Reason::LatencyRegression,
                    "throughput" => Reason::ThroughputRegression,
                    "errors" => Reason::ErrorRegression,
                    _ => Reason::AgentDegraded,
                },
                format!(
                    "revision {asked} regressed: {message}; the groups run revision {stable} until the spec changes"
                ),
            )),
        };
        let event = match &outcome {
            Outcome::Promoted(seen) => Some((
                EventType::Normal,
                "RevisionHealthy",
                format!("revision {asked} is the last good one now: {seen}"),
            )),
            Outcome::RolledBack { signal, message } => {
                let namespace = pool.namespace().unwrap_or_default();
                self.metrics
                    .rolled_back(&namespace, &pool.name_any(), signal);
                Some((
                    EventType::Warning,
                    "RolledBack",
                    format!(
                        "rolled back from revision {asked} to {stable}: {signal} regressed, {message}"
                    ),
                ))
            }
            _ => None,
        };
        if let Some((type_, reason, note)) = event {
            info!(pool = %pool.name_any(), reason, %note, "rollback judge");
            self.publish(pool, type_, reason, "Rollback", note).await;
        }
        let changed = next != status;
        let patch = serde_json::json!({"rollback": next});
        self.conditions(pool, condition.into_iter().collect(), patch, changed)
            .await
    }

    /// Adds the GPU-hours the pools' running pods used since the last pass, by capacity type;
    /// writes each pool's total to its status every twenty passes.
    async fn count_gpu_hours(&mut self, pools: &[InferencePool]) -> kube::Result<()> {
        let now = Instant::now();
        let elapsed = self
            .last_pass
            .replace(now)
            .map_or(0.0, |before| (now - before).as_secs_f64());
        let pods: Api<Pod> = Api::all(self.client.clone());
        let pods = pods
            .list(&ListParams::default().labels(crate::children::POOL_LABEL))
            .await?;
        for pod in &pods.items {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let Some(pool_name) = pod.labels().get(crate::children::POOL_LABEL) else {
                continue;
            };
            let namespace = pod.namespace().unwrap_or_default();
            let Some(pool) = pools.iter().find(|p| {
                p.name_any() == *pool_name && p.namespace().as_deref() == Some(&namespace)
            }) else {
                continue;
            };
            if !running || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let resource = &pool.spec.resources.gpu_resource_name;
            let gpus: f64 = pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get(resource))
                .filter_map(|q| q.0.parse::<f64>().ok())
                .sum();
            let hours = gpus * elapsed / 3600.0;
            let capacity = CapacityType::of(pod).unwrap_or(CapacityType::OnDemand);
            self.metrics
                .gpu_hours
                .get_or_create(&CapacityLabel {
                    namespace: namespace.clone(),
                    pool: pool_name.clone(),
                    capacity_type: capacity.as_str(),
                })
                .inc_by(hours);
            let pending = self
                .gpu_hours
                .entry((namespace, pool_name.clone()))
                .or_default();
            match capacity {
                CapacityType::OnDemand => pending.0 += hours,
                CapacityType::Spot => pending.1 += hours,
            }
        }
        let due = self
            .last_hours_write
            .is_none_or(|at| now - at >= self.hours_every);
        if !due {
            return Ok(());
        }
        self.last_hours_write = Some(now);
        for ((namespace, name), (on_demand, spot)) in self.gpu_hours.drain() {
            let Some(pool) = pools
                .iter()
                .find(|p| p.name_any() == name && p.namespace().as_deref() == Some(&namespace))
            else {
                continue;
            };
            let before = pool
                .status
                .as_ref()
                .and_then(|s| s.gpu_hours.clone())
                .unwrap_or_default();
            let total = GpuHours {
                on_demand: before.on_demand + on_demand,
                spot: before.spot + spot,
            };
            let api: Api<InferencePool> = Api::namespaced(self.client.clone(), &namespace);
            let patch = serde_json::json!({"status": {"gpuHours": total}});
            if let Err(error) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                debug!(pool = %name, %error, "could not write GPU-hours");
            }
        }
        Ok(())
    }

    /// The pool's signals and the decision as operator metrics.
    fn record(&self, pool: &InferencePool, view: &AutoscalingStatus, decision: &Decision) {
        let namespace = pool.namespace().unwrap_or_default();
        let name = pool.name_any();
        self.metrics.record_signals(&namespace, &name, view);
        self.metrics
            .autoscaling_replicas
            .get_or_create(&PoolLabel {
                namespace: namespace.clone(),
                pool: name.clone(),
            })
            .set(i64::from(decision.replicas));
        if decision.rule != "hold" && decision.replicas != pool.spec.replicas.max(0) as u32 {
            self.metrics
                .autoscaling_decisions
                .get_or_create(&DecisionLabel {
                    namespace,
                    pool: name,
                    rule: decision.rule,
                })
                .inc();
        }
    }

    async fn metrics(&self, ip: &str) -> Result<String, String> {
        let body = self.agents.get(ip, "/metrics", MAX_METRICS).await?;
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    }

    /// Writes `decision` through the scale subresource, with an event.
    async fn scale(
        &self,
        pool: &InferencePool,
        from: u32,
        decision: &Decision,
    ) -> kube::Result<()> {
        let namespace = pool.namespace().unwrap_or_default();
        let pools: Api<InferencePool> = Api::namespaced(self.client.clone(), &namespace);
        let patch = serde_json::json!({"spec": {"replicas": decision.replicas}});
        pools
            .patch_scale(
                &pool.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let (reason, verb) = if decision.replicas > from {
            ("ScaledUp", "up")
        } else {
            ("ScaledDown", "down")
        };
        let note = format!(
            "scaled {verb} from {from} to {} groups: {} ({}){}",
            decision.replicas,
            decision.rule,
            decision.why,
            if decision.limited {
                ", limited by minReplicas/maxReplicas"
            } else {
                ""
            }
        );
        info!(pool = %pool.name_any(), %note, "autoscaling");
        self.publish(pool, EventType::Normal, reason, "Scale", note)
            .await;
        Ok(())
    }

    /// Records an event on the pool; one that cannot be recorded is logged, nothing more.
    async fn publish(
        &self,
        pool: &InferencePool,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &pool.object_ref(&())).await {
            warn!(%error, reason, "could not record event");
        }
    }

    /// `desired` merged into the pool's conditions, written with the status fields of `fields`
    /// when a condition changes or `changed` says the fields did.
    async fn conditions(
        &self,
        pool: &InferencePool,
        desired: Vec<DesiredCondition>,
        fields: serde_json::Value,
        changed: bool,
    ) -> kube::Result<()> {
        let existing = pool
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let merged = merge_conditions(
            &existing,
            &desired,
            pool.metadata.generation,
            &Time(Timestamp::now()),
        );
        let same =
            |a: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
             b: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
                a.len() == b.len()
                    && a.iter().zip(b).all(|(x, y)| {
                        (&x.type_, &x.status, &x.reason, &x.message)
                            == (&y.type_, &y.status, &y.reason, &y.message)
                    })
            };
        if same(&existing, &merged) && !changed {
            return Ok(());
        }
        let pools: Api<InferencePool> =
            Api::namespaced(self.client.clone(), &pool.namespace().unwrap_or_default());
        let mut status = fields;
        status["conditions"] = serde_json::json!(merged);
        let patch = serde_json::json!({ "status": status });
        pools
            .patch_status(
                &pool.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(())
    }
}
