//! Signals from the agents' `/metrics`: each scrape of a pool's group leaders is summed into
//! counters and gauges; two scrapes give the last interval's request rate, error rate and p95
//! (from the histogram's bucket deltas). Pure: text in, numbers out. A scrape that failed is a
//! missing sample, never a zero.

use super::Signals;
use std::collections::BTreeMap;

/// What one leader's `/metrics` said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub finished: f64,
    pub errors: f64,
    /// Output tokens generated.
    pub tokens: f64,
    pub waiting: f64,
    pub running: f64,
    /// GPU utilization where reported, else batch utilization.
    pub utilization: f64,
    /// Cumulative count of requests at or below each bucket bound of
    /// `vllm:e2e_request_latency_seconds`.
    pub latency_buckets: BTreeMap<String, f64>,
    /// The signals the agent's `parallax_degraded` marks degraded against its own baseline.
    pub degraded: Vec<String>,
}

/// What a pool's routers say of requests no group could take (summed over the routers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouterReading {
    /// `parallax_router_held_requests`: requests waiting now for a group to be ready.
    pub held: f64,
    /// `parallax_router_rejections_total{reason="no_group"}`: requests that waited in vain.
    pub turned_away: f64,
}

impl RouterReading {
    /// Adds one router's `/metrics` text.
    pub fn add(&mut self, text: &str) {
        for (name, labels, value) in samples(text) {
            match name {
                "parallax_router_held_requests" => self.held += value,
                "parallax_router_rejections_total"
                    if label(labels, "reason") == Some("no_group") =>
                {
                    self.turned_away += value
                }
                _ => {}
            }
        }
    }

    /// Requests that found no group since `before` (a router restart counts from zero).
    pub fn turned_away_since(&self, before: &RouterReading) -> f64 {
        if self.turned_away >= before.turned_away {
            self.turned_away - before.turned_away
        } else {
            self.turned_away
        }
    }
}

/// One scrape of a pool's group leaders: each one's reading, by pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Seconds on any clock.
    pub at: f64,
    pub leaders: BTreeMap<String, Reading>,
}

/// What the leaders did between two scrapes: counters as deltas, gauges as now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interval {
    /// When it ended, and how long it was.
    pub at: f64,
    pub seconds: f64,
    pub finished: f64,
    pub errors: f64,
    pub tokens: f64,
    /// (bucket bound, requests of the interval at or below it), by bound.
    pub latency: Vec<(f64, f64)>,
    pub waiting: f64,
    pub running: f64,
    /// Mean over the leaders.
    pub utilization: f64,
    pub leaders: u32,
    /// Leaders whose agent reports a degraded signal, and the signals.
    pub degraded_leaders: u32,
    pub degraded: Vec<String>,
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

impl Reading {
    /// Reads one leader's `/metrics` text.
    pub fn parse(text: &str) -> Self {
        let mut reading = Self::default();
        let (mut gpu, mut gpus, mut batch) = (0.0, 0u32, None);
        for (name, labels, value) in samples(text) {
            match name {
                "vllm:request_success_total" => reading.finished += value,
                "parallax_request_errors_total" => reading.errors += value,
                "vllm:generation_tokens_total" => reading.tokens += value,
                "vllm:num_requests_waiting" => reading.waiting += value,
                "vllm:num_requests_running" => reading.running += value,
                "parallax_gpu_utilization_ratio" => {
                    gpu += value;
                    gpus += 1;
                }
                "parallax_batch_utilization" => batch = Some(value),
                "parallax_degraded" if value > 0.0 => {
                    reading
                        .degraded
                        .push(label(labels, "signal").unwrap_or("unknown").to_owned());
                }
                "vllm:e2e_request_latency_seconds_bucket" => {
                    if let Some(le) = label(labels, "le") {
                        *reading.latency_buckets.entry(le.to_owned()).or_default() += value;
                    }
                }
                _ => {}
            }
        }
        reading.utilization = if gpus > 0 {
            gpu / f64::from(gpus)
        } else {
            batch.unwrap_or(0.0)
        };
        reading
    }
}

impl Scrape {
    /// Adds one leader's `/metrics` text.
    pub fn add(&mut self, leader: &str, text: &str) {
        self.leaders.insert(leader.to_owned(), Reading::parse(text));
    }

    /// The interval from `before` to this scrape over the leaders `counted` keeps; `None`
    /// when either scrape read none of them.
    pub fn interval(&self, before: &Scrape, counted: impl Fn(&str) -> bool) -> Option<Interval> {
        let seconds = self.at - before.at;
        let was_read = before.leaders.keys().any(|l| counted(l));
        if !was_read || seconds <= 0.0 {
            return None;
        }
        // Counters restart with an agent: a fall is read as a restart, not as negative
        // traffic; a leader new since `before` counts from zero. A leader gone since counts
        // no more (its counts are not taken back).
        let delta = |now: f64, then: f64| if now >= then { now - then } else { now };
        let mut interval = Interval {
            at: self.at,
            seconds,
            ..Interval::default()
        };
        let mut latency: BTreeMap<String, f64> = BTreeMap::new();
        for (leader, now) in self.leaders.iter().filter(|(l, _)| counted(l)) {
            let then = before.leaders.get(leader).cloned().unwrap_or_default();
            interval.leaders += 1;
            interval.finished += delta(now.finished, then.finished);
            interval.errors += delta(now.errors, then.errors);
            interval.tokens += delta(now.tokens, then.tokens);
            interval.waiting += now.waiting;
            interval.running += now.running;
            interval.utilization += now.utilization;
            for (le, count) in &now.latency_buckets {
                let then = then.latency_buckets.get(le).copied().unwrap_or(0.0);
                *latency.entry(le.clone()).or_default() += delta(*count, then);
            }
            if !now.degraded.is_empty() {
                interval.degraded_leaders += 1;
                for signal in &now.degraded {
                    if !interval.degraded.contains(signal) {
                        interval.degraded.push(signal.clone());
                    }
                }
            }
        }
        if interval.leaders == 0 {
            return None;
        }
        interval.utilization /= f64::from(interval.leaders);
        interval.latency = latency
            .into_iter()
            .filter_map(|(le, count)| {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, count))
            })
            .collect();
        interval.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(interval)
    }

    /// The interval from `before` to this scrape as signals; `None` when either saw no leader.
    pub fn since(&self, before: &Scrape, ready: u32) -> Option<Signals> {
        Some(self.interval(before, |_| true)?.signals(ready))
    }
}

/// The series the autoscaler and the rollback judge read.
pub const SERIES: [&str; 9] = [
    "vllm:request_success_total",
    "parallax_request_errors_total",
    "vllm:generation_tokens_total",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "parallax_gpu_utilization_ratio",
    "parallax_batch_utilization",
    "parallax_degraded",
    "vllm:e2e_request_latency_seconds_bucket",
];

/// The PromQL instant query for `SERIES` of `pods` in `namespace`, with the scrape
/// configuration's pod and namespace labels.
pub fn prometheus_query(
    namespace: &str,
    pods: &[&str],
    pod_label: &str,
    namespace_label: &str,
) -> String {
    let quote = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "{{__name__=~\"{}\",{namespace_label}=\"{}\",{pod_label}=~\"{}\"}}",
        SERIES.join("|"),
        quote(namespace),
        pods.iter()
            .map(|p| quote(&regex_escape(p)))
            .collect::<Vec<_>>()
            .join("|")
    )
}

/// `text` as a literal inside a RE2 regular expression.
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// `text` percent-encoded for a URL's query.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Each pod's samples in an instant query's answer, as the Prometheus text its agent would
/// have served (the labels `le` and `signal` kept), so one reader serves both sources.
pub fn prometheus_readings(
    answer: &[u8],
    pod_label: &str,
) -> Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        result: Vec<Sample>,
    }
    #[derive(serde::Deserialize)]
    struct Sample {
        metric: BTreeMap<String, String>,
        value: (f64, String),
    }
    let answer: Answer = serde_json::from_slice(answer)
        .map_err(|e| format!("not a Prometheus query answer: {e}"))?;
    if answer.status != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            answer.status,
            answer.error.unwrap_or_default()
        ));
    }
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for sample in answer.data.map(|d| d.result).unwrap_or_default() {
        let (Some(name), Some(pod)) = (sample.metric.get("__name__"), sample.metric.get(pod_label))
        else {
            continue;
        };
        let labels: Vec<String> = ["le", "signal"]
            .iter()
            .filter_map(|key| Some(format!("{key}=\"{}\"", sample.metric.get(*key)?)))
            .collect();
        let text = texts.entry(pod.clone()).or_default();
        text.push_str(&format!(
            "{name}{{{}}} {}\n",
            labels.join(","),
            sample.value.1
        ));
    }
    Ok(texts)
}

impl Interval {
    /// The autoscaler's view: rates, queue, utilization and the bucket p95 (its upper bound).
    pub fn signals(&self, ready: u32) -> Signals {
        let total = self.latency.last().map_or(0.0, |b| b.1);
        let p95 = (total > 0.0)
            .then(|| {
                self.latency
                    .iter()
                    .find(|(_, count)| *count >= 0.95 * total)
            })
            .flatten()
            .map(|(bound, _)| *bound);
        let requests = self.finished + self.errors;
        Signals {
            at: self.at,
            request_rate: requests / self.seconds,
            queue: self.waiting,
            running: self.running,
            p95_seconds: p95,
            error_rate: if requests > 0.0 {
                self.errors / requests
            } else {
                0.0
            },
            utilization: Some(self.utilization),
            ready,
        }
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
        before.add("a", &text(100.0, 0.0, 0.0, 100.0, 100.0));
        before.add("gone", &text(5000.0, 0.0, 0.0, 5000.0, 5000.0));
        let mut now = Scrape {
            at: 10.0,
            ..Scrape::default()
        };
        // Leader a: 50 more requests, 5 failed; leader b is new: 40 requests, 5 failed. Of the
        // 100 new latencies 80 are fast. The leader that left takes nothing back.
        now.add("a", &text(150.0, 5.0, 20.0, 140.0, 155.0));
        now.add("b", &text(40.0, 5.0, 15.0, 40.0, 45.0));
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
        // One leader's share alone.
        let a = now.interval(&before, |l| l == "a").unwrap();
        assert_eq!((a.finished, a.errors, a.leaders), (50.0, 5.0, 1));
        // An agent that restarted counts from zero.
        let mut restarted = Scrape {
            at: 20.0,
            ..Scrape::default()
        };
        restarted.add("a", &text(7.0, 0.0, 0.0, 7.0, 7.0));
        assert_eq!(
            restarted.interval(&now, |l| l == "a").unwrap().finished,
            7.0
        );
        // A failed scrape is missing, not zero.
        let empty = Scrape {
            at: 20.0,
            ..Scrape::default()
        };
        assert_eq!(empty.since(&now, 2), None);
    }

    #[test]
    fn an_agent_that_reports_a_degraded_signal_is_counted() {
        let mut before = Scrape::default();
        before.add("a", "parallax_degraded{signal=\"latency\"} 0\n");
        let mut now = Scrape {
            at: 15.0,
            ..Scrape::default()
        };
        now.add(
            "a",
            "parallax_degraded{signal=\"latency\"} 1\nparallax_degraded{signal=\"errors\"} 0\n",
        );
        let i = now.interval(&before, |_| true).unwrap();
        assert_eq!(
            (i.degraded_leaders, i.degraded.clone()),
            (1, vec!["latency".to_owned()])
        );
    }

    #[test]
    fn prometheus_answers_read_as_the_agents_would_have_said() {
        let query = prometheus_query("ml", &["llama-0-0", "llama-1.0"], "pod", "namespace");
        assert!(
            query.starts_with("{__name__=~\"vllm:request_success_total|"),
            "{query}"
        );
        assert!(
            query.ends_with(",namespace=\"ml\",pod=~\"llama-0-0|llama-1\\\\.0\"}"),
            "{query}"
        );
        assert_eq!(url_encode("a b{\"}"), "a%20b%7B%22%7D");
        let answer = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"vllm:num_requests_waiting","pod":"llama-0-0","namespace":"ml","model_name":"llama"},"value":[1.5,"35"]},
            {"metric":{"__name__":"vllm:e2e_request_latency_seconds_bucket","pod":"llama-0-0","le":"0.3"},"value":[1.5,"80"]},
            {"metric":{"__name__":"parallax_degraded","pod":"llama-0-0","signal":"latency"},"value":[1.5,"1"]},
            {"metric":{"__name__":"vllm:num_requests_waiting","job":"no pod label"},"value":[1.5,"9"]}
        ]}}"#;
        let texts = prometheus_readings(answer, "pod").unwrap();
        assert_eq!(texts.len(), 1);
        let reading = Reading::parse(&texts["llama-0-0"]);
        assert_eq!(reading.waiting, 35.0);
        assert_eq!(reading.latency_buckets["0.3"], 80.0);
        assert_eq!(reading.degraded, vec!["latency".to_owned()]);
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert_eq!(
            prometheus_readings(error, "pod").unwrap_err(),
            "Prometheus answered error: parse error"
        );
    }
}
