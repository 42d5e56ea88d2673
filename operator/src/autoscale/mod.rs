//! Autoscaling as pure functions of rules, signal windows and time: the reactive rules, the
//! forecaster and the predictive policy built on it, and the simulator that replays a request
//! trace through them. Nothing here talks to a cluster.

pub mod forecast;
pub mod plot;
pub mod reactive;
pub mod rollback;
pub mod signals;
pub mod simulate;

/// One look at a pool's load over the last interval.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signals {
    /// Seconds on any clock.
    pub at: f64,
    /// Requests arriving per second.
    pub request_rate: f64,
    /// Requests waiting to start, summed over the groups.
    pub queue: f64,
    /// Requests in the groups' batches now, summed over the groups.
    pub running: f64,
    /// p95 end-to-end latency, when requests finished.
    pub p95_seconds: Option<f64>,
    /// Share of requests that failed.
    pub error_rate: f64,
    /// Mean utilization of the ready groups (0–1): GPU utilization where the agents report it,
    /// batch utilization otherwise.
    pub utilization: Option<f64>,
    /// Groups ready now.
    pub ready: u32,
}

/// What a policy wants, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub replicas: u32,
    /// The rule that decided (`scale-up`, `emergency`, `scale-down`, `scale-to-zero`, `wake`,
    /// `predictive`, `hold`).
    pub rule: &'static str,
    /// The signal and its value, in words (`queue 35 > 20`).
    pub why: String,
    /// The bounds cut the wanted number.
    pub limited: bool,
}

/// Requests per second one group serves at full utilization, learned from what the groups do:
/// throughput per ready group over utilization, averaged, once utilization says something.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    estimate: Option<f64>,
}

impl Capacity {
    /// Starts from `prior` requests per second per group, if one is known.
    pub fn new(prior: Option<f64>) -> Self {
        Self { estimate: prior }
    }

    pub fn per_group(&self) -> Option<f64> {
        self.estimate
    }

    /// Learns from one look: only a busy enough pool tells what a group can do.
    pub fn observe(&mut self, signals: &Signals) {
        let Some(utilization) = signals.utilization else {
            return;
        };
        if signals.ready == 0 || utilization < 0.3 || signals.request_rate <= 0.0 {
            return;
        }
        let seen = signals.request_rate / f64::from(signals.ready) / utilization.min(1.0);
        self.estimate = Some(match self.estimate {
            Some(before) => before * 0.9 + seen * 0.1,
            None => seen,
        });
    }
}
