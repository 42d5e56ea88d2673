//! The circuit breaker over failed steps, pure (time is passed in). Closed: full batches. After
//! `threshold` failed steps within `window` it opens: single-request mode for `cooldown`. Then it
//! is half-open: full batches again on trial; the next clean step closes it, the next failure
//! opens it again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub threshold: usize,
    pub window: Duration,
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Single-request mode until then.
    Open {
        until: Instant,
    },
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 open, 2 half-open (for a metric).
    pub fn code(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Open { .. } => 1,
            Self::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    failures: VecDeque<Instant>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            failures: VecDeque::new(),
        }
    }

    /// The state now (an open breaker whose cool-down is over is half-open).
    pub fn state(&mut self, now: Instant) -> BreakerState {
        if let BreakerState::Open { until } = self.state
            && now >= until
        {
            self.state = BreakerState::HalfOpen;
        }
        self.state
    }

    /// Whether steps must carry one sequence.
    pub fn single_request(&mut self, now: Instant) -> bool {
        matches!(self.state(now), BreakerState::Open { .. })
    }

    /// A step failed (some of its requests had to be isolated).
    pub fn failure(&mut self, now: Instant) {
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|f| now.saturating_duration_since(*f) > self.config.window)
        {
            self.failures.pop_front();
        }
        let trip = match self.state(now) {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => self.failures.len() >= self.config.threshold,
            BreakerState::Open { .. } => false,
        };
        if trip {
            self.state = BreakerState::Open {
                until: now + self.config.cooldown,
            };
            self.failures.clear();
        }
    }

    /// A step ran clean.
    pub fn success(&mut self, now: Instant) {
        if self.state(now) == BreakerState::HalfOpen {
            self.state = BreakerState::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_open_then_half_open_then_close() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut breaker = Breaker::new(BreakerConfig {
            threshold: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        });
        breaker.failure(s(0));
        breaker.failure(s(10));
        assert_eq!(breaker.state(s(11)), BreakerState::Closed);
        breaker.failure(s(20));
        assert_eq!(breaker.state(s(21)), BreakerState::Open { until: s(50) });
        assert!(breaker.single_request(s(49)));
        // Cool-down over: half-open; a clean step closes it.
        assert_eq!(breaker.state(s(50)), BreakerState::HalfOpen);
        assert!(!breaker.single_request(s(50)));
        breaker.success(s(51));
        assert_eq!(breaker.state(s(52)), BreakerState::Closed);
    }

    #[test]
    fn a_failure_while_half_open_opens_again_and_old_failures_expire() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut breaker = Breaker::new(BreakerConfig::default());
        for t in [0, 1, 2] {
            breaker.failure(s(t));
        }
        assert_eq!(breaker.state(s(40)), BreakerState::HalfOpen);
        breaker.failure(s(40));
        assert_eq!(breaker.state(s(41)), BreakerState::Open { until: s(70) });
        // Failures spread wider than the window never trip it.
        let mut slow = Breaker::new(BreakerConfig::default());
        for t in [0, 61, 122, 183] {
            slow.failure(s(t));
        }
        assert_eq!(slow.state(s(184)), BreakerState::Closed);
    }
}
