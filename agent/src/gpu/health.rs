//! A GPU's health from what it reports, over time. Pure: readings and events go in with the
//! time they were seen (seconds on any monotonic clock), the state comes out.
//!
//! healthy ⇄ degraded (clocks held down by heat or power) → unhealthy (a fatal XID, a
//! double-bit ECC error, uncorrected ECC errors rising, a row remap pending or failed, the GPU
//! lost) → probation once nothing fatal was seen for the quiet period → healthy after the
//! probation period; anything fatal during probation makes it unhealthy again. Conditions
//! that persist (a pending remap, a lost GPU) are seen again at every sample, so they hold the
//! GPU unhealthy until they clear.

use super::{Event, Reading, Throttle, xid_description};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A GPU's state, in rising order of concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Healthy,
    Degraded,
    Probation,
    Unhealthy,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Healthy,
        State::Degraded,
        State::Probation,
        State::Unhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Probation => "probation",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// How health is judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// XIDs counted but not fatal: application faults that leave the GPU sound (NVIDIA's
    /// device plugin skips the same ones).
    pub ignored_xids: Vec<u64>,
    /// How long nothing fatal must be seen before an unhealthy GPU goes on probation.
    pub quiet: Duration,
    /// How long probation lasts before the GPU is healthy again.
    pub probation: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ignored_xids: vec![13, 31, 43, 45, 68, 109],
            quiet: Duration::from_secs(60),
            probation: Duration::from_secs(300),
        }
    }
}

/// One GPU's health and what led to it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuHealth {
    state: State,
    /// Why it is not healthy (the latest fault while unhealthy).
    reason: Option<String>,
    /// When it entered its state.
    since: f64,
    /// When something fatal was last seen.
    last_fault: Option<f64>,
    /// The last XID, fatal or not.
    last_xid: Option<u64>,
    /// XIDs seen, by code, fatal or not.
    xids: BTreeMap<u64, u64>,
    /// Uncorrected ECC errors at the last reading.
    uncorrected: Option<u64>,
}

impl GpuHealth {
    pub fn new(now: f64) -> Self {
        Self {
            state: State::Healthy,
            reason: None,
            since: now,
            last_fault: None,
            last_xid: None,
            xids: BTreeMap::new(),
            uncorrected: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    pub fn last_xid(&self) -> Option<u64> {
        self.last_xid
    }

    pub fn xids(&self) -> &BTreeMap<u64, u64> {
        &self.xids
    }

    /// Something the GPU reported.
    pub fn event(&mut self, policy: &Policy, event: &Event, now: f64) {
        match event {
            Event::Xid(code) => {
                *self.xids.entry(*code).or_default() += 1;
                self.last_xid = Some(*code);
                if !policy.ignored_xids.contains(code) {
                    self.fault(now, format!("XID {code}: {}", xid_description(*code)));
                }
            }
            Event::DoubleBitEcc => self.fault(now, "double-bit ECC error".into()),
            Event::Lost(why) => self.fault(now, format!("the GPU cannot be read: {why}")),
        }
        self.tick(policy, now);
    }

    /// A sample of the GPU's readings.
    pub fn reading(&mut self, policy: &Policy, reading: &Reading, now: f64) {
        if let Some(count) = reading.ecc_uncorrected {
            // The first count is history (since the driver loaded); a rise is news.
            if let Some(before) = self.uncorrected.filter(|before| count > *before) {
                self.fault(
                    now,
                    format!("uncorrected ECC errors rose from {before} to {count}"),
                );
            }
            self.uncorrected = Some(count);
        }
        if reading.row_remap_failed == Some(true) {
            self.fault(now, "row remapping failed: the memory has a bad row".into());
        } else if reading.row_remap_pending == Some(true) {
            self.fault(now, "a row remap is pending: the GPU needs a reset".into());
        }
        self.tick(policy, now);
        if matches!(self.state, State::Healthy | State::Degraded) {
            self.throttled(&reading.throttle, now);
        }
    }

    /// Moves on with time alone: out of unhealthy after the quiet period, out of probation
    /// after the probation period.
    pub fn tick(&mut self, policy: &Policy, now: f64) {
        match self.state {
            State::Unhealthy => {
                let quiet_for = now - self.last_fault.unwrap_or(self.since);
                if quiet_for >= policy.quiet.as_secs_f64() {
                    let cause = self.reason.take().unwrap_or_default();
                    self.enter(
                        State::Probation,
                        Some(format!("recovering from {cause}")),
                        now,
                    );
                }
            }
            State::Probation if now - self.since >= policy.probation.as_secs_f64() => {
                self.enter(State::Healthy, None, now);
            }
            _ => {}
        }
    }

    fn fault(&mut self, now: f64, reason: String) {
        self.last_fault = Some(now);
        if self.state == State::Unhealthy {
            self.reason = Some(reason);
        } else {
            self.enter(State::Unhealthy, Some(reason), now);
        }
    }

    fn throttled(&mut self, throttle: &Throttle, now: f64) {
        let why = match (throttle.thermal, throttle.power) {
            (true, true) => Some("clocks held down by heat and power"),
            (true, false) => Some("clocks held down by heat"),
            (false, true) => Some("clocks held down by the power limit"),
            (false, false) => None,
        };
        match why {
            Some(why) if self.reason.as_deref() != Some(why) => {
                self.enter(State::Degraded, Some(why.into()), now);
            }
            None if self.state == State::Degraded => self.enter(State::Healthy, None, now),
            _ => {}
        }
    }

    fn enter(&mut self, state: State, reason: Option<String>, now: f64) {
        self.state = state;
        self.reason = reason;
        self.since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            quiet: Duration::from_secs(60),
            probation: Duration::from_secs(300),
            ..Policy::default()
        }
    }

    #[test]
    fn a_fatal_xid_makes_a_gpu_unhealthy_until_quiet_then_probation_then_healthy() {
        let p = policy();
        let mut gpu = GpuHealth::new(0.0);
        gpu.event(&p, &Event::Xid(79), 10.0);
        assert_eq!(gpu.state(), State::Unhealthy);
        assert_eq!(gpu.reason(), Some("XID 79: GPU has fallen off the bus"));
        gpu.tick(&p, 69.0);
        assert_eq!(gpu.state(), State::Unhealthy, "not yet quiet for 60 s");
        gpu.tick(&p, 70.0);
        assert_eq!(gpu.state(), State::Probation);
        assert_eq!(
            gpu.reason(),
            Some("recovering from XID 79: GPU has fallen off the bus")
        );
        gpu.tick(&p, 369.0);
        assert_eq!(gpu.state(), State::Probation);
        gpu.tick(&p, 370.0);
        assert_eq!((gpu.state(), gpu.reason()), (State::Healthy, None));
        assert_eq!(gpu.xids()[&79], 1);
    }

    #[test]
    fn application_xids_are_counted_and_nothing_more() {
        let p = policy();
        let mut gpu = GpuHealth::new(0.0);
        for code in [13, 31, 43, 45, 68, 109, 13] {
            gpu.event(&p, &Event::Xid(code), 1.0);
        }
        assert_eq!(gpu.state(), State::Healthy);
        assert_eq!(gpu.xids()[&13], 2);
        assert_eq!(gpu.last_xid(), Some(13));
        // The list is the policy's: with 13 fatal, it counts.
        let strict = Policy {
            ignored_xids: vec![31],
            ..policy()
        };
        gpu.event(&strict, &Event::Xid(13), 2.0);
        assert_eq!(gpu.state(), State::Unhealthy);
    }

    #[test]
    fn a_fault_during_probation_starts_over() {
        let p = policy();
        let mut gpu = GpuHealth::new(0.0);
        gpu.event(&p, &Event::DoubleBitEcc, 0.0);
        gpu.tick(&p, 60.0);
        assert_eq!(gpu.state(), State::Probation);
        gpu.event(&p, &Event::Xid(48), 100.0);
        assert_eq!(gpu.state(), State::Unhealthy);
        assert_eq!(gpu.reason(), Some("XID 48: double-bit ECC error"));
        // Quiet is counted from the last fault.
        gpu.tick(&p, 159.0);
        assert_eq!(gpu.state(), State::Unhealthy);
        gpu.tick(&p, 160.0);
        assert_eq!(gpu.state(), State::Probation);
    }

    #[test]
    fn readings_that_mean_bad_memory_hold_a_gpu_unhealthy_while_they_last() {
        let p = policy();
        let mut gpu = GpuHealth::new(0.0);
        let ecc = |n| Reading {
            ecc_uncorrected: Some(n),
            ..Reading::default()
        };
        // Errors from before the agent started are history.
        gpu.reading(&p, &ecc(3), 0.0);
        assert_eq!(gpu.state(), State::Healthy);
        gpu.reading(&p, &ecc(5), 5.0);
        assert_eq!(
            (gpu.state(), gpu.reason()),
            (
                State::Unhealthy,
                Some("uncorrected ECC errors rose from 3 to 5")
            )
        );
        // A pending remap is seen at every sample: no probation while it lasts.
        let pending = Reading {
            ecc_uncorrected: Some(5),
            row_remap_pending: Some(true),
            ..Reading::default()
        };
        for t in [30.0, 60.0, 90.0, 120.0] {
            gpu.reading(&p, &pending, t);
        }
        assert_eq!(gpu.state(), State::Unhealthy);
        assert_eq!(
            gpu.reason(),
            Some("a row remap is pending: the GPU needs a reset")
        );
        gpu.reading(&p, &ecc(5), 179.0);
        assert_eq!(gpu.state(), State::Unhealthy);
        gpu.reading(&p, &ecc(5), 180.0);
        assert_eq!(gpu.state(), State::Probation);
        let failed = Reading {
            row_remap_failed: Some(true),
            ..Reading::default()
        };
        gpu.reading(&p, &failed, 181.0);
        assert_eq!(
            gpu.reason(),
            Some("row remapping failed: the memory has a bad row")
        );
        gpu.event(&p, &Event::Lost("GPU is lost".into()), 182.0);
        assert_eq!(gpu.reason(), Some("the GPU cannot be read: GPU is lost"));
    }

    #[test]
    fn throttling_degrades_and_clears_but_never_makes_unhealthy() {
        let p = policy();
        let mut gpu = GpuHealth::new(0.0);
        let hot = Reading {
            throttle: Throttle {
                thermal: true,
                power: false,
            },
            ..Reading::default()
        };
        gpu.reading(&p, &hot, 1.0);
        assert_eq!(
            (gpu.state(), gpu.reason()),
            (State::Degraded, Some("clocks held down by heat"))
        );
        gpu.reading(&p, &Reading::default(), 2.0);
        assert_eq!(gpu.state(), State::Healthy);
        // Unhealthy wins over throttling, and probation ignores it.
        gpu.event(&p, &Event::Xid(79), 3.0);
        gpu.reading(&p, &hot, 4.0);
        assert_eq!(gpu.state(), State::Unhealthy);
        gpu.reading(&p, &hot, 63.0);
        assert_eq!(gpu.state(), State::Probation);
        assert!(State::Unhealthy > State::Probation && State::Probation > State::Degraded);
    }
}
