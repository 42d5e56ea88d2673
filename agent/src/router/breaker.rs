//! A circuit breaker per group: passive health from the requests themselves. Consecutive
//! failures (a refused connection, a 5xx) open it for a cooldown; then one trial request
//! half-opens it, and that trial closes it again or reopens it.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before a trial request.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Its one trial request is out (true) or not yet sent.
    HalfOpen {
        trial_out: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    pub state: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    /// Whether a request may be sent at `now`.
    pub fn admits(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { trial_out } => !trial_out,
        }
    }

    /// A request is sent at `now` (after [`Self::admits`]): past the cooldown it is the trial.
    pub fn sent(&mut self, now: Instant) {
        match self.state {
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { trial_out: true };
            }
            BreakerState::HalfOpen { .. } => {
                self.state = BreakerState::HalfOpen { trial_out: true }
            }
            _ => {}
        }
    }

    pub fn succeeded(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// A request failed at `now`: whether this opened the breaker.
    pub fn failed(&mut self, now: Instant, config: &BreakerConfig) -> bool {
        let open = BreakerState::Open {
            until: now + config.cooldown,
        };
        match self.state {
            BreakerState::Closed { failures } if failures + 1 >= config.failures => {
                self.state = open;
                true
            }
            BreakerState::Closed { failures } => {
                self.state = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            BreakerState::HalfOpen { .. } => {
                self.state = open;
                true
            }
            // A request sent before it opened: the cooldown already runs.
            BreakerState::Open { .. } => false,
        }
    }

    pub fn name(&self) -> &'static str {
        match self.state {
            BreakerState::Closed { .. } => "closed",
            BreakerState::HalfOpen { .. } => "half_open",
            BreakerState::Open { .. } => "open",
        }
    }

    /// For the metric: 0 closed, 1 half-open, 2 open.
    pub fn level(&self) -> i64 {
        match self.state {
            BreakerState::Closed { .. } => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig {
        failures: 3,
        cooldown: Duration::from_secs(10),
    };

    #[test]
    fn consecutive_failures_open_it_and_a_success_in_between_resets_the_count() {
        let (mut breaker, now) = (Breaker::default(), Instant::now());
        assert!(!breaker.failed(now, &CONFIG));
        assert!(!breaker.failed(now, &CONFIG));
        breaker.succeeded();
        assert!(!breaker.failed(now, &CONFIG));
        assert!(!breaker.failed(now, &CONFIG));
        assert!(breaker.admits(now));
        assert!(breaker.failed(now, &CONFIG));
        assert!(!breaker.admits(now + Duration::from_secs(9)));
        assert_eq!(breaker.level(), 2);
    }

    #[test]
    fn after_the_cooldown_one_trial_decides() {
        let (mut breaker, now) = (Breaker::default(), Instant::now());
        for _ in 0..3 {
            breaker.failed(now, &CONFIG);
        }
        let later = now + CONFIG.cooldown;
        assert!(breaker.admits(later));
        breaker.sent(later);
        assert_eq!(breaker.level(), 1);
        assert!(!breaker.admits(later), "one trial at a time");
        assert!(breaker.failed(later, &CONFIG), "a failed trial reopens it");
        assert!(!breaker.admits(later + Duration::from_secs(1)));

        let again = later + CONFIG.cooldown;
        breaker.sent(again);
        breaker.succeeded();
        assert!(breaker.admits(again));
        assert_eq!(breaker.level(), 0);
    }
}
