//! The rollback judge: a new revision's leaders over a window of traffic against the last good
//! revision's last window. Pure: intervals in, a verdict out.
//!
//! Latency is the window's p95 end-to-end latency, read from the histogram's bucket deltas and
//! interpolated inside a bucket as Prometheus' `histogram_quantile` does. Throughput is output
//! tokens per second per leader over its utilization: what a group would produce at full batch,
//! so a quieter hour does not read as a slower revision. Errors are failed requests over all.

use super::signals::Interval;
use parallax_crds::RollbackStatus;
use std::collections::{HashMap, VecDeque};

/// When a revision counts as worse (the pool's `spec.rollback`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub window_seconds: f64,
    pub min_requests: f64,
    pub latency_increase: f64,
    pub throughput_decrease: f64,
    pub error_rate: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            window_seconds: 300.0,
            min_requests: 50.0,
            latency_increase: 0.2,
            throughput_decrease: 0.15,
            error_rate: 0.01,
        }
    }
}

/// Utilization below which a window says nothing of throughput.
const BUSY_ENOUGH: f64 = 0.05;
/// Share of a window's intervals with a degraded agent that makes the window degraded.
const MOSTLY: f64 = 0.5;

/// The last `seconds` of a revision's intervals.
#[derive(Debug, Clone, Default)]
pub struct Window {
    intervals: VecDeque<Interval>,
}

/// A window summed.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// Seconds the window covers.
    pub seconds: f64,
    pub requests: f64,
    pub error_rate: f64,
    pub p95_seconds: Option<f64>,
    /// Output tokens per second per leader at full utilization; None while the leaders idle.
    pub throughput: Option<f64>,
    /// Share of intervals in which an agent reported a degraded signal, and which signals.
    pub degraded_share: f64,
    pub degraded: Vec<String>,
}

impl Window {
    /// Adds an interval and forgets the oldest ones the last `seconds` do not need.
    pub fn push(&mut self, interval: Interval, seconds: f64) {
        self.intervals.push_back(interval);
        let mut covered: f64 = self.intervals.iter().map(|i| i.seconds).sum();
        while let Some(oldest) = self.intervals.front()
            && covered - oldest.seconds >= seconds - 1e-9
        {
            covered -= oldest.seconds;
            self.intervals.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.intervals.clear();
    }

    pub fn totals(&self) -> Totals {
        let seconds: f64 = self.intervals.iter().map(|i| i.seconds).sum();
        let finished: f64 = self.intervals.iter().map(|i| i.finished).sum();
        let errors: f64 = self.intervals.iter().map(|i| i.errors).sum();
        let requests = finished + errors;
        // Bucket counts summed over the intervals, by bound.
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for (bound, count) in self.intervals.iter().flat_map(|i| &i.latency) {
            match buckets.iter_mut().find(|(b, _)| b == bound) {
                Some((_, sum)) => *sum += count,
                None => buckets.push((*bound, *count)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Tokens per leader-second, and utilization weighted the same way.
        let leader_seconds: f64 = self
            .intervals
            .iter()
            .map(|i| i.seconds * f64::from(i.leaders))
            .sum();
        let tokens: f64 = self.intervals.iter().map(|i| i.tokens).sum();
        let utilization = if leader_seconds > 0.0 {
            self.intervals
                .iter()
                .map(|i| i.utilization * i.seconds * f64::from(i.leaders))
                .sum::<f64>()
                / leader_seconds
        } else {
            0.0
        };
        let throughput = (utilization >= BUSY_ENOUGH && tokens > 0.0)
            .then(|| tokens / leader_seconds / utilization.min(1.0));
        let degraded_intervals = self
            .intervals
            .iter()
            .filter(|i| i.degraded_leaders > 0)
            .count();
        let mut degraded: Vec<String> = self
            .intervals
            .iter()
            .flat_map(|i| i.degraded.iter().cloned())
            .collect();
        degraded.sort();
        degraded.dedup();
        Totals {
            seconds,
            requests,
            error_rate: if requests > 0.0 {
                errors / requests
            } else {
                0.0
            },
            p95_seconds: quantile(0.95, &buckets),
            throughput,
            degraded_share: if self.intervals.is_empty() {
                0.0
            } else {
                degraded_intervals as f64 / self.intervals.len() as f64
            },
            degraded,
        }
    }
}

/// The `q` quantile of cumulative (bound, count) buckets, interpolated linearly inside its
/// bucket; the highest finite bound when it falls in `+Inf`.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            if count <= below {
                return Some(bound);
            }
            return Some(lower + (bound - lower) * (rank - below) / (count - below));
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// What the judge says of a new revision.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough of its traffic read yet.
    Wait(String),
    /// It serves as well as the last good one (or there is none to compare with).
    Good(String),
    /// It serves worse: the signal (`latency`, `throughput`, `errors`, `degraded`) and how.
    Regressed {
        signal: &'static str,
        message: String,
    },
}

/// Judges `candidate` (the new revision's window) against `baseline` (the last good
/// revision's). Errors and a degraded agent count without a baseline; latency and throughput
/// need one of `min_requests`.
pub fn judge(baseline: Option<&Totals>, candidate: &Totals, rules: &Thresholds) -> Verdict {
    if candidate.seconds + 1e-9 < rules.window_seconds {
        return Verdict::Wait(format!(
            "{:.0} s of the new revision's {:.0} s window read",
            candidate.seconds, rules.window_seconds
        ));
    }
    if candidate.requests >= rules.min_requests && candidate.error_rate > rules.error_rate {
        return Verdict::Regressed {
            signal: "errors",
            message: format!(
                "{:.1} % of {:.0} requests failed (more than {:.1} %)",
                candidate.error_rate * 100.0,
                candidate.requests,
                rules.error_rate * 100.0
            ),
        };
    }
    if candidate.degraded_share > MOSTLY {
        return Verdict::Regressed {
            signal: "degraded",
            message: format!(
                "agents reported parallax_degraded ({}) in {:.0} % of the window",
                candidate.degraded.join(", "),
                candidate.degraded_share * 100.0
            ),
        };
    }
    if candidate.requests < rules.min_requests {
        return Verdict::Wait(format!(
            "{:.0} of the {:.0} requests a verdict needs served",
            candidate.requests, rules.min_requests
        ));
    }
    let errors = format!("errors {:.1} %", candidate.error_rate * 100.0);
    let Some(baseline) = baseline.filter(|b| b.requests >= rules.min_requests) else {
        return Verdict::Good(format!(
            "{errors}; no window of the last good revision to compare latency and throughput with"
        ));
    };
    let mut seen = vec![errors];
    if let (Some(then), Some(now)) = (baseline.p95_seconds, candidate.p95_seconds) {
        let rise = now / then - 1.0;
        let words = format!(
            "p95 {:.0} ms against {:.0} ms ({:+.0} %)",
            now * 1e3,
            then * 1e3,
            rise * 100.0
        );
        if rise > rules.latency_increase {
            return Verdict::Regressed {
                signal: "latency",
                message: format!(
                    "{words}, more than {:.0} % up",
                    rules.latency_increase * 100.0
                ),
            };
        }
        seen.push(words);
    }
    if let (Some(then), Some(now)) = (baseline.throughput, candidate.throughput) {
        let fall = 1.0 - now / then;
        let words = format!(
            "{now:.0} output tokens/s per group at full batch against {then:.0} ({:+.0} %)",
            -fall * 100.0
        );
        if fall > rules.throughput_decrease {
            return Verdict::Regressed {
                signal: "throughput",
                message: format!(
                    "{words}, more than {:.0} % down",
                    rules.throughput_decrease * 100.0
                ),
            };
        }
        seen.push(words);
    }
    Verdict::Good(seen.join(", "))
}

/// What one look at a pool's revisions came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing to say (no new revision, or one already rolled back).
    Quiet,
    /// A new revision is being judged.
    Judging(String),
    /// The new revision is the stable one now.
    Promoted(String),
    /// The new revision regressed: the groups go back to the stable one.
    RolledBack {
        signal: &'static str,
        message: String,
    },
    /// The spec asks for the stable revision again after a rollback.
    Recovered,
}

/// One look: the pool's revision status, the revision its spec asks for (`asked`), whether any
/// ready leader runs it, and each revision's window. Returns the status to write and what
/// happened. Windows of revisions that left are dropped here.
pub fn step(
    status: &RollbackStatus,
    asked: &str,
    serving_asked: bool,
    windows: &mut HashMap<String, Window>,
    rules: &Thresholds,
) -> (RollbackStatus, Outcome) {
    let mut next = status.clone();
    let Some(stable) = status.stable_revision.clone() else {
        // The first revision seen serving is the first good one.
        if serving_asked {
            next.stable_revision = Some(asked.to_owned());
            next.current_revision = Some(asked.to_owned());
            next.message = Some(format!(
                "revision {asked} is the first seen; its traffic is the baseline"
            ));
        }
        return (next, Outcome::Quiet);
    };
    windows.retain(|revision, _| *revision == stable || revision == asked);
    if status.failed_revision.as_deref() == Some(asked) {
        next.current_revision = Some(stable);
        return (next, Outcome::Quiet);
    }
    if asked == stable {
        next.current_revision = Some(stable);
        if status.failed_revision.is_some() {
            next.failed_revision = None;
            next.message = Some(format!("the spec asks for revision {asked} again"));
            return (next, Outcome::Recovered);
        }
        return (next, Outcome::Quiet);
    }
    // A new revision: judged from its first interval on.
    if status.current_revision.as_deref() != Some(asked) {
        windows.remove(asked);
        next.current_revision = Some(asked.to_owned());
        next.failed_revision = None;
    }
    let baseline = windows.get(&stable).map(Window::totals);
    let candidate = windows.get(asked).map(Window::totals).unwrap_or(Totals {
        seconds: 0.0,
        requests: 0.0,
        error_rate: 0.0,
        p95_seconds: None,
        throughput: None,
        degraded_share: 0.0,
        degraded: Vec::new(),
    });
    match judge(baseline.as_ref(), &candidate, rules) {
        Verdict::Wait(why) => {
            let why = if serving_asked {
                why
            } else {
                "no group of the new revision is ready yet".to_owned()
            };
            if next.current_revision != status.current_revision {
                next.message = Some(format!("judging revision {asked} against {stable}: {why}"));
            }
            (next, Outcome::Judging(why))
        }
        Verdict::Good(seen) => {
            windows.remove(&stable);
            next.stable_revision = Some(asked.to_owned());
            next.message = Some(format!(
                "revision {asked} serves as well as {stable}: {seen}"
            ));
            (next, Outcome::Promoted(seen))
        }
        Verdict::Regressed { signal, message } => {
            windows.remove(asked);
            next.failed_revision = Some(asked.to_owned());
            next.current_revision = Some(stable.clone());
            next.message = Some(format!(
                "revision {asked} regressed ({signal}: {message}); the groups run revision {stable} until the spec changes"
            ));
            (next, Outcome::RolledBack { signal, message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 15 s interval of one leader: `requests` finished, `failed` failed, their latencies
    /// spread evenly over (0, `slowest`], `tokens` out at `utilization`.
    fn interval(at: f64, requests: f64, failed: f64, slowest: f64, tokens: f64) -> Interval {
        // Buckets every 50 ms, as fine as a histogram needs to tell 20 % apart.
        let mut latency: Vec<(f64, f64)> = (1..=64)
            .map(|k| f64::from(k) * 0.05)
            .map(|b| (b, requests * (b / slowest).min(1.0)))
            .collect();
        latency.push((f64::INFINITY, requests));
        Interval {
            at,
            seconds: 15.0,
            finished: requests,
            errors: failed,
            tokens,
            latency,
            utilization: 0.5,
            leaders: 1,
            ..Interval::default()
        }
    }

    fn window(intervals: impl IntoIterator<Item = Interval>) -> Window {
        let mut w = Window::default();
        for i in intervals {
            w.push(i, 300.0);
        }
        w
    }

    fn steady(from: f64, slowest: f64, tokens: f64, failed: f64) -> Window {
        window((1..=20).map(|k| interval(from + 15.0 * k as f64, 10.0, failed, slowest, tokens)))
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let buckets = [
            (0.1, 50.0),
            (0.2, 90.0),
            (0.4, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p95 = quantile(0.95, &buckets).unwrap();
        assert!((p95 - 0.3).abs() < 1e-9, "{p95}");
        assert_eq!(quantile(0.5, &buckets), Some(0.1));
        assert_eq!(
            quantile(0.99, &[(1.0, 1.0), (f64::INFINITY, 10.0)]),
            Some(1.0)
        );
        assert_eq!(quantile(0.95, &[(1.0, 0.0)]), None);
    }

    #[test]
    fn a_window_keeps_only_its_last_seconds() {
        let w = window((1..=40).map(|k| interval(15.0 * k as f64, 10.0, 0.0, 0.4, 100.0)));
        let t = w.totals();
        assert_eq!(t.seconds, 300.0);
        assert_eq!(t.requests, 200.0);
        // 100 tokens per 15 s at half use: 13.3 tokens/s at full batch.
        assert!((t.throughput.unwrap() - 100.0 / 15.0 / 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_same_service_is_good() {
        let base = steady(0.0, 0.4, 100.0, 0.0).totals();
        let same = steady(600.0, 0.42, 95.0, 0.0).totals();
        let verdict = judge(Some(&base), &same, &Thresholds::default());
        assert!(matches!(verdict, Verdict::Good(_)), "{verdict:?}");
    }

    #[test]
    fn a_slower_revision_regresses_on_latency() {
        let base = steady(0.0, 0.4, 100.0, 0.0).totals();
        let slow = steady(600.0, 0.6, 100.0, 0.0).totals();
        match judge(Some(&base), &slow, &Thresholds::default()) {
            Verdict::Regressed { signal, message } => {
                assert_eq!(signal, "latency");
                assert!(
                    message.contains("p95 570 ms against 380 ms (+50 %)"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        // 19 % slower is within the 20 %.
        let bit = steady(600.0, 0.476, 100.0, 0.0).totals();
        assert!(matches!(
            judge(Some(&base), &bit, &Thresholds::default()),
            Verdict::Good(_)
        ));
    }

    #[test]
    fn fewer_tokens_at_the_same_use_regress_on_throughput() {
        let base = steady(0.0, 0.4, 100.0, 0.0).totals();
        let fewer = steady(600.0, 0.4, 80.0, 0.0).totals();
        match judge(Some(&base), &fewer, &Thresholds::default()) {
            Verdict::Regressed { signal, .. } => assert_eq!(signal, "throughput"),
            other => panic!("{other:?}"),
        }
        // Half the traffic at half the use is the same throughput.
        let mut quiet = steady(600.0, 0.4, 50.0, 0.0);
        for i in &mut quiet.intervals {
            i.utilization = 0.25;
        }
        assert!(matches!(
            judge(Some(&base), &quiet.totals(), &Thresholds::default()),
            Verdict::Good(_)
        ));
    }

    #[test]
    fn errors_and_degraded_agents_regress_without_a_baseline() {
        let failing = steady(0.0, 0.4, 100.0, 0.2).totals();
        match judge(None, &failing, &Thresholds::default()) {
            Verdict::Regressed { signal, message } => {
                assert_eq!(signal, "errors");
                assert!(message.starts_with("2.0 % of 204 requests"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let mut degraded = steady(0.0, 0.4, 100.0, 0.0);
        for i in degraded.intervals.iter_mut().skip(5) {
            i.degraded_leaders = 1;
            i.degraded = vec!["latency".into()];
        }
        match judge(None, &degraded.totals(), &Thresholds::default()) {
            Verdict::Regressed { signal, message } => {
                assert_eq!(signal, "degraded");
                assert!(message.contains("(latency) in 75 %"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Without a baseline, clean service is good, and says what it could not compare.
        match judge(
            None,
            &steady(0.0, 0.4, 100.0, 0.0).totals(),
            &Thresholds::default(),
        ) {
            Verdict::Good(message) => assert!(message.contains("no window"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_verdict_waits_for_its_window_and_its_requests() {
        let base = steady(0.0, 0.4, 100.0, 0.0).totals();
        let short = window((1..=10).map(|k| interval(15.0 * k as f64, 10.0, 0.0, 2.0, 100.0)));
        assert!(matches!(
            judge(Some(&base), &short.totals(), &Thresholds::default()),
            Verdict::Wait(_)
        ));
        let idle = window((1..=20).map(|k| interval(15.0 * k as f64, 1.0, 0.0, 2.0, 10.0)));
        match judge(Some(&base), &idle.totals(), &Thresholds::default()) {
            Verdict::Wait(message) => assert!(message.starts_with("20 of the 50"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_revision_is_judged_then_promoted_or_rolled_back() {
        let rules = Thresholds::default();
        let mut windows: HashMap<String, Window> = HashMap::new();
        // The first revision seen serving is the stable one.
        let (status, outcome) = step(&RollbackStatus::default(), "a", true, &mut windows, &rules);
        assert_eq!(status.stable_revision.as_deref(), Some("a"));
        assert_eq!(outcome, Outcome::Quiet);
        windows.insert("a".into(), steady(0.0, 0.4, 100.0, 0.0));

        // Revision b: judged once its window is full, and good.
        let (judging, outcome) = step(&status, "b", false, &mut windows, &rules);
        assert!(matches!(outcome, Outcome::Judging(ref why) if why.contains("no group")));
        assert_eq!(judging.current_revision.as_deref(), Some("b"));
        windows.insert("b".into(), steady(300.0, 0.41, 100.0, 0.0));
        let (promoted, outcome) = step(&judging, "b", true, &mut windows, &rules);
        assert!(matches!(outcome, Outcome::Promoted(_)), "{outcome:?}");
        assert_eq!(promoted.stable_revision.as_deref(), Some("b"));
        assert!(!windows.contains_key("a"), "the old baseline goes");

        // Revision c serves slower: rolled back to b, and stays so while the spec asks for c.
        let (judging, _) = step(&promoted, "c", true, &mut windows, &rules);
        windows.insert("c".into(), steady(600.0, 0.8, 100.0, 0.0));
        let (rolled, outcome) = step(&judging, "c", true, &mut windows, &rules);
        assert!(
            matches!(
                outcome,
                Outcome::RolledBack {
                    signal: "latency",
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert_eq!(
            (
                rolled.failed_revision.as_deref(),
                rolled.stable_revision.as_deref(),
                rolled.current_revision.as_deref()
            ),
            (Some("c"), Some("b"), Some("b"))
        );
        let (held, outcome) = step(&rolled, "c", false, &mut windows, &rules);
        assert_eq!((held.clone(), outcome), (rolled.clone(), Outcome::Quiet));

        // The spec goes back to b: recovered. Or on to d: d is judged afresh.
        let (back, outcome) = step(&rolled, "b", true, &mut windows, &rules);
        assert_eq!(outcome, Outcome::Recovered);
        assert_eq!(back.failed_revision, None);
        let (next, outcome) = step(&rolled, "d", false, &mut windows, &rules);
        assert!(matches!(outcome, Outcome::Judging(_)));
        assert_eq!(
            (next.current_revision.as_deref(), next.failed_revision),
            (Some("d"), None)
        );
    }
}
