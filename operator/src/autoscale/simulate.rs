//! `parallax-operator simulate`: a request trace replayed through the autoscaling policies with
//! a fluid queueing model of groups, for GPU-hours against SLO misses.
//!
//! The model, in steps of 10 s: demand arrives at the trace's rate; each ready group serves up
//! to `replica_rps`; what is not served waits (the queue). A step's p95 end-to-end latency is
//! the unloaded p95 (`base_p95_s`) stretched by utilization as a processor-sharing server's
//! is, `base / (1 − ρ)`, plus the time to drain the queue. A minute misses the SLO when a step
//! in it is above `slo_p95_s`. New groups are ready `startup_s` after they are asked for;
//! removed groups drain for `drain_s`; both count in GPU-hours. Every policy sees only what the
//! operator would: the rate, queue, p95 and utilization of the last minute.

use super::forecast::Predictor;
use super::reactive::{Rules, State};
use super::{Capacity, Signals};
use anyhow::{Context, bail};
use serde::Serialize;
use std::collections::VecDeque;

/// The simulator's clock step, seconds.
const STEP: f64 = 10.0;
/// SLO windows, seconds.
const WINDOW: f64 = 60.0;

/// A trace as a request rate over time.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Seconds each rate holds.
    pub step: f64,
    pub rates: Vec<f64>,
}

impl Trace {
    /// Reads either shape: `timestamp_s,requests_per_s` (a mean rate per window) or
    /// `timestamp_s,input_tokens,output_tokens` (one row per request, binned in 10 s steps).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().context("the trace is empty")?;
        let columns: Vec<&str> = header.split(',').map(str::trim).collect();
        let rows = lines.enumerate().map(|(i, line)| {
            let fields: Vec<f64> = line
                .split(',')
                .map(|f| f.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("line {}: not numbers: {line:?}", i + 2))?;
            if fields.len() != columns.len() || fields.iter().any(|f| !f.is_finite() || *f < 0.0) {
                bail!(
                    "line {}: expected {} non-negative numbers",
                    i + 2,
                    columns.len()
                );
            }
            Ok(fields)
        });
        match columns.as_slice() {
            ["timestamp_s", "requests_per_s"] => {
                let rows: Vec<Vec<f64>> = rows.collect::<anyhow::Result<_>>()?;
                if rows.len() < 2 {
                    bail!("a rate trace needs at least two windows");
                }
                let step = rows[1][0] - rows[0][0];
                if step <= 0.0 {
                    bail!("windows must be in time order");
                }
                Ok(Self {
                    step,
                    rates: rows.iter().map(|r| r[1]).collect(),
                })
            }
            ["timestamp_s", "input_tokens", "output_tokens"] => {
                let mut rates: Vec<f64> = Vec::new();
                for row in rows {
                    let at = row?[0];
                    let bin = (at / STEP) as usize;
                    if rates.len() <= bin {
                        rates.resize(bin + 1, 0.0);
                    }
                    rates[bin] += 1.0 / STEP;
                }
                if rates.is_empty() {
                    bail!("the trace has no request");
                }
                Ok(Self { step: STEP, rates })
            }
            _ => bail!(
                "unknown trace header {header:?}: expected timestamp_s,requests_per_s or timestamp_s,input_tokens,output_tokens"
            ),
        }
    }

    pub fn duration(&self) -> f64 {
        self.step * self.rates.len() as f64
    }

    fn rate_at(&self, t: f64) -> f64 {
        self.rates
            .get((t / self.step) as usize)
            .copied()
            .unwrap_or(0.0)
    }

    pub fn peak(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }
}

/// The simulated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// Requests per second one group serves at full utilization.
    pub replica_rps: f64,
    pub startup_s: f64,
    pub drain_s: f64,
    pub slo_p95_s: f64,
    /// p95 end-to-end latency of an unloaded group.
    pub base_p95_s: f64,
    pub gpus_per_group: u32,
    /// Forecast lead beyond the startup time.
    pub lead_s: f64,
    pub rules: Rules,
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    StaticPeak,
    Reactive,
    Predictive,
    PredictiveReactive,
    /// Knows the trace ahead: provisions at each step for the highest rate until groups asked
    /// for now are ready, and a minute more. No policy can do better with this startup: the
    /// bound the others are measured against.
    Foresight,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::StaticPeak,
        Policy::Reactive,
        Policy::Predictive,
        Policy::PredictiveReactive,
        Policy::Foresight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::StaticPeak => "static-peak",
            Self::Reactive => "reactive",
            Self::Predictive => "predictive",
            Self::PredictiveReactive => "predictive+reactive",
            Self::Foresight => "foresight (bound)",
        }
    }
}

/// One policy's run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub policy: &'static str,
    pub gpu_hours: f64,
    /// Against static-peak provisioning.
    pub saved_fraction: f64,
    pub slo_miss_fraction: f64,
    /// The forecast's MAPE at the lead time over the trace after its first day (the season's
    /// first sight), and a naive last-value forecast's (predictive only).
    pub forecast_mape: Option<f64>,
    pub naive_mape: Option<f64>,
    pub scale_events: u32,
    /// Minutes the predictive part stood down because the naive forecast did better.
    pub fallback_minutes: f64,
    /// A point a minute, for `--plot`.
    #[serde(skip)]
    pub timeline: Vec<Point>,
}

/// One minute of a run: demand, the rate provisioned for, ready capacity (requests per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t: f64,
    pub demand: f64,
    pub forecast: Option<f64>,
    pub capacity: f64,
}

/// The forecast sets the size, up and down; the reactive rules correct it upward when the pool
/// is short now; without a forecast (too little history, or worse than naive) they decide alone.
pub fn combine(predicted: Option<u32>, reactive: &super::Decision) -> u32 {
    match predicted {
        Some(predicted) if matches!(reactive.rule, "scale-up" | "emergency") => {
            predicted.max(reactive.replicas)
        }
        Some(predicted) => predicted,
        None => reactive.replicas,
    }
}

/// Runs `policy` over `trace`.
pub fn run(trace: &Trace, setup: &Setup, policy: Policy) -> Report {
    let rules = &setup.rules;
    let capacity_truth = setup.replica_rps;
    let static_groups = rules
        .needed(trace.peak(), Some(capacity_truth))
        .unwrap_or(1)
        .clamp(
            rules.min_replicas,
            rules.max_replicas.max(rules.min_replicas),
        );
    let start = match policy {
        Policy::StaticPeak => static_groups,
        _ => rules
            .needed(trace.rate_at(0.0), Some(capacity_truth))
            .unwrap_or(1)
            .clamp(
                rules.min_replicas,
                rules.max_replicas.max(rules.min_replicas),
            ),
    };
    // Ready times of the groups, and when removed ones finish draining.
    let mut groups: Vec<f64> = vec![0.0; start as usize];
    let mut draining: Vec<f64> = Vec::new();
    let mut backlog = 0.0;
    let mut state = State::default();
    let mut capacity = Capacity::new(None);
    let mut predictor = Predictor::new(setup.startup_s + setup.lead_s);
    let mut recent: VecDeque<(f64, f64, f64)> = VecDeque::new(); // (rate, utilization, p95)
    let (mut gpu_seconds, mut windows, mut missed, mut events, mut fallback) =
        (0.0, 0u32, 0u32, 0u32, 0.0);
    let mut window_worst: f64 = 0.0;
    let mut timeline = Vec::new();
    let mut t = 0.0;
    while t < trace.duration() {
        let rate = trace.rate_at(t);
        let ready = groups.iter().filter(|r| **r <= t).count() as u32;
        let arrivals = rate * STEP;
        let can_serve = f64::from(ready) * capacity_truth * STEP;
        let served = (backlog + arrivals).min(can_serve);
        backlog = backlog + arrivals - served;
        let utilization = if can_serve > 0.0 {
            if backlog > 0.0 {
                1.0
            } else {
                (arrivals / can_serve).min(1.0)
            }
        } else {
            1.0
        };
        let p95 = if ready == 0 {
            if arrivals > 0.0 { f64::INFINITY } else { 0.0 }
        } else {
            setup.base_p95_s / (1.0 - utilization.min(0.95))
                + backlog / (f64::from(ready) * capacity_truth)
        };
        window_worst = window_worst.max(p95);
        draining.retain(|until| *until > t);
        gpu_seconds +=
            (groups.len() + draining.len()) as f64 * f64::from(setup.gpus_per_group) * STEP;
        t += STEP;
        if (t / WINDOW).fract() < 1e-9 || t >= trace.duration() {
            windows += 1;
            if window_worst > setup.slo_p95_s {
                missed += 1;
            }
            window_worst = 0.0;
        }

        // What the operator would see: the last minute.
        recent.push_back((rate, utilization, p95));
        if recent.len() > (WINDOW / STEP) as usize {
            recent.pop_front();
        }
        let n = recent.len() as f64;
        let signals = Signals {
            at: t,
            request_rate: recent.iter().map(|r| r.0).sum::<f64>() / n,
            queue: backlog,
            // The replay's load is its rate; nothing runs unseen in an idle window.
            running: 0.0,
            p95_seconds: Some(recent.iter().map(|r| r.2).fold(0.0, f64::max)),
            error_rate: 0.0,
            utilization: Some(recent.iter().map(|r| r.1).sum::<f64>() / n),
            ready,
        };
        capacity.observe(&signals);
        predictor.observe(t, rate);
        if (t / WINDOW).fract() < 1e-9 {
            timeline.push(Point {
                t,
                demand: signals.request_rate,
                forecast: predictor.wanted_rate(),
                capacity: f64::from(ready) * capacity_truth,
            });
        }
        let provisioned = groups.len() as u32;
        let clamp = |n: u32| {
            n.clamp(
                rules.min_replicas,
                rules.max_replicas.max(rules.min_replicas),
            )
        };
        let predicted = predictor
            .wanted_rate()
            .and_then(|r| rules.needed(r, capacity.per_group()))
            .map(clamp);
        if predictor.standing_down()
            && matches!(policy, Policy::PredictiveReactive | Policy::Predictive)
        {
            fallback += STEP / 60.0;
        }
        let target = match policy {
            Policy::StaticPeak => provisioned,
            Policy::Foresight => {
                let horizon = setup.startup_s + WINDOW;
                let peak = (0..=(horizon / STEP) as usize)
                    .map(|k| trace.rate_at(t + k as f64 * STEP))
                    .fold(0.0, f64::max);
                // Groups asked for now are ready only after the startup: never fewer than the
                // future needs before then, and no removal the next minutes would regret.
                clamp(rules.needed(peak, Some(capacity_truth)).unwrap_or(1))
            }
            Policy::Reactive => {
                rules
                    .decide(&mut state, &signals, provisioned, capacity.per_group())
                    .replicas
            }
            Policy::Predictive => predicted.unwrap_or(provisioned),
            Policy::PredictiveReactive => {
                let reactive =
                    rules.decide(&mut state, &signals, provisioned, capacity.per_group());
                combine(predicted, &reactive)
            }
        };
        if target > provisioned {
            groups.extend((0..target - provisioned).map(|_| t + setup.startup_s));
            events += 1;
        } else if target < provisioned {
            // Groups still starting go first, then ready ones (which drain).
            groups.sort_by(f64::total_cmp);
            for _ in 0..provisioned - target {
                if let Some(ready_at) = groups.pop()
                    && ready_at <= t
                {
                    draining.push(t + setup.drain_s);
                }
            }
            events += 1;
        }
    }
    let mape = predictor.mape_overall();
    let predictive = matches!(policy, Policy::Predictive | Policy::PredictiveReactive);
    Report {
        policy: policy.name(),
        gpu_hours: gpu_seconds / 3600.0,
        saved_fraction: 0.0,
        slo_miss_fraction: f64::from(missed) / f64::from(windows.max(1)),
        forecast_mape: mape.filter(|_| predictive).map(|m| m.0),
        naive_mape: mape.filter(|_| predictive).map(|m| m.1),
        scale_events: events,
        fallback_minutes: fallback,
        timeline,
    }
}

/// Every policy over `trace`, with savings against static peak.
pub fn compare(trace: &Trace, setup: &Setup) -> Vec<Report> {
    let mut reports: Vec<Report> = Policy::ALL.iter().map(|p| run(trace, setup, *p)).collect();
    let baseline = reports[0].gpu_hours;
    for report in &mut reports {
        report.saved_fraction = if baseline > 0.0 {
            1.0 - report.gpu_hours / baseline
        } else {
            0.0
        };
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            replica_rps: 10.0,
            startup_s: 180.0,
            drain_s: 30.0,
            slo_p95_s: 0.3,
            base_p95_s: 0.1,
            gpus_per_group: 1,
            lead_s: 300.0,
            rules: Rules {
                max_replicas: 1000,
                ..Rules::default()
            },
        }
    }

    #[test]
    fn both_trace_shapes_are_read_and_bad_ones_refused() {
        let rate = Trace::parse("timestamp_s,requests_per_s\n0,10\n600,20\n").unwrap();
        assert_eq!((rate.step, rate.rates.clone()), (600.0, vec![10.0, 20.0]));
        let requests =
            Trace::parse("timestamp_s,input_tokens,output_tokens\n0.5,10,2\n1.0,5,5\n12,1,1\n")
                .unwrap();
        assert_eq!(
            (requests.step, requests.rates.clone()),
            (10.0, vec![0.2, 0.1])
        );
        for bad in [
            "",
            "a,b\n1,2\n",
            "timestamp_s,requests_per_s\n0,x\n600,1\n",
            "timestamp_s,requests_per_s\n0,1\n",
        ] {
            assert!(Trace::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// Eight days of a daily wave with 10-minute windows.
    fn waves() -> Trace {
        let rates = (0..8 * 144)
            .map(|i| {
                let phase = (i % 144) as f64 / 144.0 * std::f64::consts::TAU;
                200.0 + 150.0 * phase.sin()
            })
            .collect();
        Trace { step: 600.0, rates }
    }

    #[test]
    fn scaling_to_demand_saves_gpu_hours_and_the_forecast_keeps_the_slo() {
        let reports = compare(&waves(), &setup());
        let by = |name: &str| reports.iter().find(|r| r.policy == name).unwrap().clone();
        let (fixed, reactive, both) =
            (by("static-peak"), by("reactive"), by("predictive+reactive"));
        assert_eq!(
            fixed.slo_miss_fraction, 0.0,
            "peak provisioning meets the SLO"
        );
        assert_eq!(fixed.scale_events, 0);
        assert_eq!(both.timeline.len(), 8 * 24 * 60, "a point a minute");
        assert!(
            both.timeline
                .iter()
                .skip(1440)
                .all(|p| p.forecast.is_some())
        );
        assert!(both.saved_fraction > 0.3, "{both:?}");
        assert!(both.slo_miss_fraction <= 0.01, "{both:?}");
        assert!(
            both.slo_miss_fraction <= reactive.slo_miss_fraction,
            "{both:?} {reactive:?}"
        );
        let (ours, naive) = (both.forecast_mape.unwrap(), both.naive_mape.unwrap());
        assert!(ours < naive, "forecast {ours} against naive {naive}");
    }
}
