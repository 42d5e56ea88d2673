//! The degradation watch, pure (time is passed in). Work is summed in fixed windows; each closed
//! window is compared with the mean of the windows before it (the rolling baseline):
//! - latency: p95 of seconds per output token of the requests that finished, up more than 20 %;
//! - throughput: tokens per second of engine busy time (so that less demand is not a fall), down
//!   more than 15 %;
//! - errors: requests failed by the server over all requests, above 1 % (no baseline needed).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchConfig {
    pub window: Duration,
    /// Closed windows the baseline averages.
    pub baseline_windows: usize,
    /// Windows needed before latency and throughput are judged.
    pub min_baseline: usize,
    pub latency_rise: f64,
    pub throughput_fall: f64,
    pub error_rate: f64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            baseline_windows: 20,
            min_baseline: 3,
            latency_rise: 0.20,
            throughput_fall: 0.15,
            error_rate: 0.01,
        }
    }
}

/// What is degraded now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    pub latency: bool,
    pub throughput: bool,
    pub errors: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    p95_latency: Option<f64>,
    throughput: Option<f64>,
}

#[derive(Debug, Clone, Default)]
struct Window {
    per_token: Vec<f64>,
    busy: f64,
    tokens: u64,
    requests: u64,
    errors: u64,
}

#[derive(Debug, Clone)]
pub struct DegradationWatch {
    config: WatchConfig,
    started: Instant,
    current: Window,
    history: VecDeque<Summary>,
    flags: Flags,
    /// The last closed window over its baseline: latency and throughput ratios, error rate.
    ratios: (Option<f64>, Option<f64>, f64),
}

fn p95(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[((values.len() - 1) as f64 * 0.95).round() as usize])
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

impl DegradationWatch {
    pub fn new(config: WatchConfig, now: Instant) -> Self {
        Self {
            config,
            started: now,
            current: Window::default(),
            history: VecDeque::new(),
            flags: Flags::default(),
            ratios: (None, None, 0.0),
        }
    }

    /// A request finished: its end-to-end time and output tokens.
    pub fn request(&mut self, now: Instant, seconds: f64, tokens: usize) {
        self.roll(now);
        self.current.requests += 1;
        if tokens > 0 {
            self.current.per_token.push(seconds / tokens as f64);
        }
    }

    /// A request failed in the server or engine.
    pub fn error(&mut self, now: Instant) {
        self.roll(now);
        self.current.requests += 1;
        self.current.errors += 1;
    }

    /// An engine step: its busy time and the tokens it computed.
    pub fn step(&mut self, now: Instant, busy: Duration, tokens: usize) {
        self.roll(now);
        self.current.busy += busy.as_secs_f64();
        self.current.tokens += tokens as u64;
    }

    pub fn flags(&mut self, now: Instant) -> Flags {
        self.roll(now);
        self.flags
    }

    /// Latency and throughput of the last closed window over their baselines, and its error
    /// rate.
    pub fn ratios(&mut self, now: Instant) -> (Option<f64>, Option<f64>, f64) {
        self.roll(now);
        self.ratios
    }

    /// Closes every window that has ended by `now`.
    fn roll(&mut self, now: Instant) {
        while now.saturating_duration_since(self.started) >= self.config.window {
            self.started += self.config.window;
            let mut window = std::mem::take(&mut self.current);
            let summary = Summary {
                p95_latency: p95(&mut window.per_token),
                throughput: (window.busy > 0.0).then(|| window.tokens as f64 / window.busy),
            };
            let error_rate = if window.requests == 0 {
                0.0
            } else {
                window.errors as f64 / window.requests as f64
            };
            let judged = self.history.len() >= self.config.min_baseline;
            let baseline_latency = mean(self.history.iter().filter_map(|s| s.p95_latency));
            let baseline_throughput = mean(self.history.iter().filter_map(|s| s.throughput));
            let latency = summary
                .p95_latency
                .zip(baseline_latency)
                .map(|(now, base)| now / base);
            let throughput = summary
                .throughput
                .zip(baseline_throughput)
                .map(|(now, base)| now / base);
            self.ratios = (latency, throughput, error_rate);
            self.flags = Flags {
                latency: judged && latency.is_some_and(|r| r > 1.0 + self.config.latency_rise),
                throughput: judged
                    && throughput.is_some_and(|r| r < 1.0 - self.config.throughput_fall),
                errors: error_rate > self.config.error_rate,
            };
            // A window that had nothing to say does not move the baseline.
            if summary.p95_latency.is_some() || summary.throughput.is_some() {
                self.history.push_back(summary);
                if self.history.len() > self.config.baseline_windows {
                    self.history.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(watch: &mut DegradationWatch, from: Instant, windows: u32, per_token: f64, tps: f64) {
        let window = watch.config.window;
        for w in 0..windows {
            let t = from + window * w;
            for i in 0..20 {
                watch.request(t + Duration::from_millis(i * 100), per_token * 10.0, 10);
            }
            // One second busy at `tps` tokens per second.
            watch.step(
                t + Duration::from_secs(5),
                Duration::from_secs(1),
                tps as usize,
            );
        }
    }

    #[test]
    fn latency_throughput_and_errors_are_flagged_against_the_rolling_baseline() {
        let t0 = Instant::now();
        let config = WatchConfig::default();
        let w = config.window;
        let mut watch = DegradationWatch::new(config, t0);
        steady(&mut watch, t0, 5, 0.020, 100.0);
        assert_eq!(
            watch.flags(t0 + w * 5),
            Flags::default(),
            "steady is healthy"
        );
        // Latency up 10 %: within bounds. Then up 50 %.
        steady(&mut watch, t0 + w * 5, 1, 0.022, 100.0);
        assert!(!watch.flags(t0 + w * 6).latency);
        steady(&mut watch, t0 + w * 6, 1, 0.030, 100.0);
        let flags = watch.flags(t0 + w * 7);
        assert!(
            flags.latency && !flags.throughput && !flags.errors,
            "{flags:?}"
        );
        // Throughput down 30 %.
        steady(&mut watch, t0 + w * 7, 1, 0.020, 70.0);
        let flags = watch.flags(t0 + w * 8);
        assert!(flags.throughput && !flags.latency, "{flags:?}");
        let (_, throughput, _) = watch.ratios(t0 + w * 8);
        assert!(throughput.is_some_and(|r| r < 0.85), "{throughput:?}");
        // One error in twenty requests: 5 % > 1 %.
        steady(&mut watch, t0 + w * 8, 1, 0.020, 100.0);
        watch.error(t0 + w * 8 + Duration::from_secs(1));
        let flags = watch.flags(t0 + w * 9);
        assert!(flags.errors && !flags.throughput, "{flags:?}");
        // Recovered.
        steady(&mut watch, t0 + w * 9, 1, 0.020, 100.0);
        assert_eq!(watch.flags(t0 + w * 10), Flags::default());
    }

    #[test]
    fn nothing_is_judged_before_there_is_a_baseline_and_idle_windows_are_not_a_fall() {
        let t0 = Instant::now();
        let config = WatchConfig::default();
        let w = config.window;
        let mut watch = DegradationWatch::new(config, t0);
        steady(&mut watch, t0, 1, 0.020, 100.0);
        steady(&mut watch, t0 + w, 1, 0.200, 10.0);
        assert_eq!(
            watch.flags(t0 + w * 2),
            Flags::default(),
            "one window is no baseline"
        );
        // Hours of nothing: no throughput to compare, nothing flagged.
        assert_eq!(watch.flags(t0 + w * 500), Flags::default());
    }
}
