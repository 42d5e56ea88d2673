//! Signals from the agents' `/metrics`: each scrape of a pool's group leaders is summed into
//! counters and gauges; two scrapes give the last interval's request rate, error rate and p95
//! (from the histogram's bucket deltas). Pure: text in, numbers out. A scrape that failed is a
//! missing sample, never a zero.

use super::Signals;
use std::collections::BTreeMap;

/// What one scrape of every leader of a pool read, summed over the leaders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Seconds on any clock.
    pub at: f64,
    /// Leaders that answered.
    pub leaders: u32,
    pub finished: f64,
    pub errors: f64,
    pub waiting: f64,
    /// Sum over the leaders of their utilization (GPU where reported, else batch).
    pub utilization_sum: f64,
    /// Cumulative count of requests at or below each bucket bound of
    /// `vllm:e2e_request_latency_seconds`.
    pub latency_buckets: BTreeMap<String, f64>,
}

/// (name, labels, value) of each sample in Prometheus text.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

impl Scrape {
    /// Adds one leader's `/metrics` text.
    pub fn add(&mut self, text: &str) {
        self.leaders += 1;
        let (mut gpu, mut gpus, mut batch) = (0.0, 0u32, None);
        for (name, labels, value) in samples(text) {
            match name {
                "vllm:request_success_total" => self.finished += value,
                "parallax_request_errors_total" => self.errors += value,
                "vllm:num_requests_waiting" => self.waiting += value,
                "parallax_gpu_utilization_ratio" => {
                    gpu += value;
                    gpus += 1;
                }
                "parallax_batch_utilization" => batch = Some(value),
                "vllm:e2e_request_latency_seconds_bucket" => {
                    if let Some(le) = label(labels, "le") {
                        *self.latency_buckets.entry(le.to_owned()).or_default() += value;
                    }
                }
                _ => {}
            }
        }
        self.utilization_sum += if gpus > 0 {
            gpu / f64::from(gpus)
        } else {
            batch.unwrap_or(0.0)
        };
    }

    /// The interval from `before` to this scrape as signals; `None` when either saw no leader.
    pub fn since(&self, before: &Scrape, ready: u32) -> Option<Signals> {
        let seconds = self.at - before.at;
        if self.leaders == 0 || before.leaders == 0 || seconds <= 0.0 {
            return None;
        }
        // Counters restart with an agent: a fall is read as a restart, not as negative traffic.
        let delta = |now: f64, then: f64| if now >= then { now - then } else { now };
        let finished = delta(self.finished, before.finished);
        let errors = delta(self.errors, before.errors);
        let mut buckets: Vec<(f64, f64)> = self
            .latency_buckets
            .iter()
            .filter_map(|(le, count)| {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((
                    bound,
                    delta(
                        *count,
                        before.latency_buckets.get(le).copied().unwrap_or(0.0),
                    ),
                ))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last().map_or(0.0, |b| b.1);
        let p95 = (total > 0.0)
            .then(|| buckets.iter().find(|(_, count)| *count >= 0.95 * total))
            .flatten()
            .map(|(bound, _)| *bound);
        Some(Signals {
            at: self.at,
            request_rate: (finished + errors) / seconds,
            queue: self.waiting,
            p95_seconds: p95,
            error_rate: if finished + errors > 0.0 {
                errors / (finished + errors)
            } else {
                0.0
            },
            utilization: Some(self.utilization_sum / f64::from(self.leaders)),
            ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(finished: f64, errors: f64, waiting: f64, fast: f64, slow: f64) -> String {
        format!(
            "# TYPE vllm:request_success counter
vllm:request_success_total{{finished_reason=\"stop\",model_name=\"m\"}} {finished}
parallax_request_errors_total{{code=\"engine_failure\",model_name=\"m\"}} {errors}
vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}
parallax_batch_utilization{{model_name=\"m\"}} 0.5
vllm:e2e_request_latency_seconds_bucket{{le=\"0.3\",model_name=\"m\"}} {fast}
vllm:e2e_request_latency_seconds_bucket{{le=\"1.0\",model_name=\"m\"}} {slow}
vllm:e2e_request_latency_seconds_bucket{{le=\"+Inf\",model_name=\"m\"}} {slow}
"
        )
    }

    #[test]
    fn two_scrapes_give_rates_errors_and_a_p95_of_the_interval() {
        let mut before = Scrape {
            at: 0.0,
            ..Scrape::default()
        };
        before.add(&text(100.0, 0.0, 0.0, 100.0, 100.0));
        let mut now = Scrape {
            at: 10.0,
            ..Scrape::default()
        };
        // Two leaders: 90 + 10 more requests, 10 failed; of the 100 new latencies 80 fast.
        now.add(&text(150.0, 5.0, 20.0, 140.0, 155.0));
        now.add(&text(40.0, 5.0, 15.0, 40.0, 45.0));
        let s = now.since(&before, 2).unwrap();
        assert_eq!(s.request_rate, (90.0 + 10.0) / 10.0);
        assert_eq!(s.error_rate, 0.1);
        assert_eq!(s.queue, 35.0);
        assert_eq!(
            s.p95_seconds,
            Some(1.0),
            "80 of 100 under 0.3 s: p95 in the 1 s bucket"
        );
        assert_eq!(s.utilization, Some(0.5));
        // A failed scrape is missing, not zero.
        let empty = Scrape {
            at: 20.0,
            ..Scrape::default()
        };
        assert_eq!(empty.since(&now, 2), None);
    }
}
