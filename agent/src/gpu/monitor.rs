//! Runs a [`GpuSource`] on its own thread — a sample every interval, events as they come —
//! and keeps what it says for the rest of the agent: each GPU's last reading and health, the
//! reason the agent is not fit to serve, and the engine's batch limit while a GPU is on
//! probation.

use super::health::{GpuHealth, Policy, State};
use super::{Event, GpuInfo, GpuSource, Reading};
use crate::engine::runtime::EngineStats;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How the monitor runs.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    pub policy: Policy,
    /// Time between samples.
    pub sample_every: Duration,
    /// The share of the engine's batch admitted while a GPU is on probation.
    pub probation_batch: f64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            sample_every: Duration::from_secs(5),
            probation_batch: 0.25,
        }
    }
}

/// One GPU's health as `/ready` and the operator see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuStatus {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_xid: Option<u64>,
}

/// A GPU as the metrics see it.
#[derive(Debug, Clone)]
pub struct GpuView {
    pub info: GpuInfo,
    pub reading: Option<Reading>,
    pub state: State,
    pub xids: BTreeMap<u64, u64>,
    pub last_xid: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    readings: Vec<Option<Reading>>,
    health: Vec<GpuHealth>,
}

/// What the monitor knows, shared.
#[derive(Debug)]
pub struct GpuWatch {
    source: String,
    inventory: Vec<GpuInfo>,
    config: MonitorConfig,
    origin: Instant,
    inner: Mutex<Inner>,
    /// The engine to slow down on probation, once it is loaded, and its full batch.
    engine: OnceLock<(Arc<EngineStats>, usize)>,
}

impl GpuWatch {
    /// Watches `source` (named `name` in logs) on a thread of its own until the watch is dropped.
    pub fn start(name: &str, source: Box<dyn GpuSource>, config: MonitorConfig) -> Arc<Self> {
        let inventory = source.inventory().to_vec();
        for gpu in &inventory {
            tracing::info!(
                source = name,
                index = gpu.index,
                uuid = %gpu.uuid,
                name = %gpu.name,
                memory_gib = format!("{:.1}", gpu.memory_bytes as f64 / f64::from(1u32 << 30)),
                compute_capability = %gpu.compute_capability,
                driver = %gpu.driver_version,
                "GPU"
            );
        }
        let watch = Arc::new(Self::new(name, inventory, config));
        let weak = Arc::downgrade(&watch);
        let spawned = std::thread::Builder::new()
            .name("gpu-monitor".into())
            .spawn(move || run(source, &weak));
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start the GPU monitor");
        }
        watch
    }

    fn new(name: &str, inventory: Vec<GpuInfo>, config: MonitorConfig) -> Self {
        let count = inventory.len();
        Self {
            source: name.to_owned(),
            inventory,
            config,
            origin: Instant::now(),
            inner: Mutex::new(Inner {
                readings: vec![None; count],
                health: (0..count).map(|_| GpuHealth::new(0.0)).collect(),
            }),
            engine: OnceLock::new(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Each GPU's health.
    pub fn statuses(&self) -> Vec<GpuStatus> {
        let inner = self.inner();
        self.inventory
            .iter()
            .zip(&inner.health)
            .map(|(info, health)| GpuStatus {
                index: info.index,
                uuid: info.uuid.clone(),
                name: info.name.clone(),
                state: health.state(),
                reason: health.reason().map(str::to_owned),
                last_xid: health.last_xid(),
            })
            .collect()
    }

    /// Each GPU with its last reading, for the metrics.
    pub fn views(&self) -> Vec<GpuView> {
        let inner = self.inner();
        self.inventory
            .iter()
            .zip(inner.readings.iter().zip(&inner.health))
            .map(|(info, (reading, health))| GpuView {
                info: info.clone(),
                reading: reading.clone(),
                state: health.state(),
                xids: health.xids().clone(),
                last_xid: health.last_xid(),
            })
            .collect()
    }

    /// The worst state of the agent's GPUs.
    pub fn state(&self) -> State {
        self.inner()
            .health
            .iter()
            .map(GpuHealth::state)
            .max()
            .unwrap_or(State::Healthy)
    }

    /// Why the agent must not take work: its unhealthy GPUs and what happened to them. Asked
    /// for every request: nothing is built while every GPU is fit.
    pub fn unhealthy(&self) -> Option<String> {
        let inner = self.inner();
        let sick: Vec<String> = self
            .inventory
            .iter()
            .zip(&inner.health)
            .filter(|(_, health)| health.state() == State::Unhealthy)
            .map(|(info, health)| {
                format!(
                    "GPU {} ({}) is unhealthy: {}",
                    info.index,
                    info.uuid,
                    health.reason().unwrap_or("unknown")
                )
            })
            .collect();
        (!sick.is_empty()).then(|| sick.join("; "))
    }

    /// The mean utilization of the GPUs that report one, in percent.
    pub fn utilization(&self) -> Option<f64> {
        let inner = self.inner();
        let (sum, count) = inner
            .readings
            .iter()
            .filter_map(|r| r.as_ref()?.utilization_gpu)
            .fold((0.0, 0u32), |(sum, n), u| (sum + u, n + 1));
        (count > 0).then(|| sum / f64::from(count))
    }

    /// Lets the monitor limit `stats`'s engine (a batch of `max_num_seqs` at full health).
    pub fn limit_engine(&self, stats: Arc<EngineStats>, max_num_seqs: usize) {
        let _ = self.engine.set((stats, max_num_seqs));
        self.apply_limit();
    }

    /// On probation the engine admits a share of its batch; otherwise all of it.
    fn apply_limit(&self) {
        let Some((stats, full)) = self.engine.get() else {
            return;
        };
        let limit = if self.state() == State::Probation {
            ((*full as f64 * self.config.probation_batch).ceil() as usize).clamp(1, *full)
        } else {
            0
        };
        if stats.batch_limit.swap(limit, Ordering::Relaxed) != limit {
            tracing::info!(
                limit = if limit == 0 { *full } else { limit },
                "engine batch limit for GPU health"
            );
        }
    }

    /// Takes a sample's readings (an `Err` is the event that kept a GPU from reading).
    pub fn record_sample(&self, sample: Vec<Result<Reading, Event>>) {
        self.record_sample_at(sample, self.now());
    }

    fn record_sample_at(&self, sample: Vec<Result<Reading, Event>>, now: f64) {
        self.change(|inner, policy| {
            for (gpu, result) in sample.into_iter().enumerate().take(inner.health.len()) {
                match result {
                    Ok(reading) => {
                        inner.health[gpu].reading(policy, &reading, now);
                        inner.readings[gpu] = Some(reading);
                    }
                    Err(event) => {
                        inner.health[gpu].event(policy, &event, now);
                        inner.readings[gpu] = None;
                    }
                }
            }
        });
    }

    /// Takes events as `(gpu, event)`.
    pub fn record_events(&self, events: Vec<(usize, Event)>) {
        self.record_events_at(events, self.now());
    }

    fn record_events_at(&self, events: Vec<(usize, Event)>, now: f64) {
        self.change(|inner, policy| {
            for (gpu, event) in events {
                if let Some(health) = inner.health.get_mut(gpu) {
                    tracing::warn!(gpu, ?event, "GPU event");
                    health.event(policy, &event, now);
                }
            }
        });
    }

    /// Lets time pass (quiet and probation periods end).
    pub fn tick(&self) {
        self.tick_at(self.now());
    }

    fn tick_at(&self, now: f64) {
        self.change(|inner, policy| {
            for health in &mut inner.health {
                health.tick(policy, now);
            }
        });
    }

    /// Applies `f`, logs the GPUs whose state it changed and updates the engine's limit.
    fn change(&self, f: impl FnOnce(&mut Inner, &Policy)) {
        let changed = {
            let mut inner = self.inner();
            let before: Vec<State> = inner.health.iter().map(GpuHealth::state).collect();
            f(&mut inner, &self.config.policy);
            let mut changed = false;
            for ((info, health), was) in self.inventory.iter().zip(&inner.health).zip(before) {
                if health.state() != was {
                    changed = true;
                    tracing::warn!(
                        gpu = info.index,
                        uuid = %info.uuid,
                        from = was.as_str(),
                        to = health.state().as_str(),
                        reason = health.reason().unwrap_or(""),
                        "GPU health changed"
                    );
                }
            }
            changed
        };
        if changed {
            self.apply_limit();
        }
    }
}

/// The monitor's loop: samples on time, events in between, until the watch is gone.
fn run(mut source: Box<dyn GpuSource>, watch: &Weak<GpuWatch>) {
    let mut next_sample = Instant::now();
    loop {
        let Some(current) = watch.upgrade() else {
            return;
        };
        let now = Instant::now();
        if now >= next_sample {
            current.record_sample(source.sample());
            next_sample = now + current.config.sample_every;
        }
        drop(current);
        // Waits at most a second, so a dropped watch ends the thread soon.
        let wait = next_sample
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let events = source.wait_events(wait);
        let Some(current) = watch.upgrade() else {
            return;
        };
        if !events.is_empty() {
            current.record_events(events);
        }
        current.tick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "H100".into(),
            memory_bytes: 80 << 30,
            compute_capability: "9.0".into(),
            driver_version: "580".into(),
        }
    }

    #[test]
    fn the_agent_is_as_fit_as_its_worst_gpu_and_slows_its_engine_on_probation() {
        let config = MonitorConfig {
            policy: Policy {
                quiet: Duration::from_secs(60),
                probation: Duration::from_secs(3600),
                ..Policy::default()
            },
            probation_batch: 0.25,
            ..MonitorConfig::default()
        };
        let watch = GpuWatch::new("test", vec![gpu(0), gpu(1)], config);
        let stats = Arc::new(EngineStats::default());
        watch.limit_engine(stats.clone(), 64);
        assert_eq!(stats.batch_limit.load(Ordering::Relaxed), 0);
        watch.record_sample_at(
            vec![
                Ok(Reading {
                    utilization_gpu: Some(80.0),
                    ..Reading::default()
                }),
                Ok(Reading {
                    utilization_gpu: Some(40.0),
                    ..Reading::default()
                }),
            ],
            0.0,
        );
        assert_eq!(watch.utilization(), Some(60.0));
        assert_eq!(watch.unhealthy(), None);
        watch.record_events_at(vec![(1, Event::Xid(79))], 1.0);
        assert_eq!(watch.state(), State::Unhealthy);
        assert_eq!(
            watch.unhealthy().as_deref(),
            Some("GPU 1 (GPU-1) is unhealthy: XID 79: GPU has fallen off the bus")
        );
        // Quiet for a minute: on probation, a quarter of the batch.
        watch.tick_at(61.0);
        assert_eq!(watch.state(), State::Probation);
        assert_eq!(stats.batch_limit.load(Ordering::Relaxed), 16);
        let statuses = watch.statuses();
        assert_eq!(statuses[1].last_xid, Some(79));
        assert_eq!(statuses[0].state, State::Healthy);
        // A GPU that cannot be read has no reading.
        watch.record_sample_at(
            vec![Err(Event::Lost("gone".into())), Ok(Reading::default())],
            62.0,
        );
        assert!(watch.views()[0].reading.is_none());
        assert_eq!(watch.state(), State::Unhealthy);
    }
}
