//! `bench-serve`: an HTTP load generator in the manner of vLLM's serving benchmark. Requests
//! arrive as a Poisson process at `--rate` per second (or all at once), at most `--concurrency`
//! in flight, stream from `/v1/completions`, and the report gives request and token throughput
//! with TTFT, TPOT, ITL and end-to-end latency percentiles, and the prompt tokens the server
//! found in its prefix cache. It talks to any OpenAI-compatible server.

use crate::engine::sampling::Rng;
use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The model name to send (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Mean arrivals per second (Poisson); `inf` sends every request at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub rate: f64,
    /// Most requests in flight; an arrival waits for a place (with `--rate inf`, a closed loop
    /// of this many clients).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Words per prompt (about one token each).
    #[arg(long, default_value_t = 40)]
    pub prompt_len: usize,
    /// Words of a prefix common to every prompt (a shared system prompt), before its own
    /// `--prompt-len` words.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// Send the same prompt every time (a repeated request).
    #[arg(long)]
    pub repeat_prompt: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// A mixed workload instead of one `--max-tokens`: `TOKENS:SHARE,…`, e.g. `16:0.8,256:0.2`;
    /// the report then gives latencies per class too.
    #[arg(long)]
    pub mix: Option<String>,
    /// Requests' priorities (the `x-request-priority` header) by share: `PRIORITY:SHARE,…`, e.g.
    /// `high:0.2,medium:0.6,low:0.2`; none sends no header (medium).
    #[arg(long)]
    pub priorities: Option<String>,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// `top_k` of every request (0: not sent).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// `top_p` of every request (1: not sent).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep generating past the end-of-sequence token (vLLM's `ignore_eos`).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Seeds the arrival times and the prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Common words, most one token with their leading space in a Llama-family vocabulary.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people", "water",
    "city", "river", "light", "house", "world", "small", "long", "story", "night", "garden",
    "music", "paper", "window",
];

/// Parses `VALUE:SHARE,…` pairs of `flag` (`--mix`, `--priorities`), shares summing to 1;
/// `valid` says which values are allowed.
fn parse_shares<T: std::str::FromStr>(
    flag: &str,
    text: &str,
    valid: impl Fn(&T) -> bool,
) -> anyhow::Result<Vec<(T, f64)>> {
    let wrong = || {
        anyhow::anyhow!(
            "{flag}: {text:?} is not VALUE:SHARE pairs of allowed values whose shares sum to 1"
        )
    };
    let classes: Vec<(T, f64)> = text
        .split(',')
        .map(|part| {
            let (value, share) = part.split_once(':').ok_or_else(wrong)?;
            let value = value.trim().parse().map_err(|_| wrong())?;
            let share: f64 = share.trim().parse().map_err(|_| wrong())?;
            Ok((value, share))
        })
        .collect::<anyhow::Result<_>>()?;
    let total: f64 = classes.iter().map(|c| c.1).sum();
    if classes.is_empty()
        || classes.iter().any(|c| !valid(&c.0) || c.1 <= 0.0)
        || (total - 1.0).abs() > 1e-6
    {
        return Err(wrong());
    }
    Ok(classes)
}

/// The value whose share of the unit interval holds `draw`.
fn drawn<T>(shares: &[(T, f64)], draw: f64) -> &T {
    let mut cumulative = 0.0;
    for (value, share) in shares {
        cumulative += share;
        if draw < cumulative {
            return value;
        }
    }
    &shares[shares.len() - 1].0
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
struct Measured {
    /// Its `max_tokens`: the class in a mixed workload.
    class: usize,
    ttft: f64,
    e2e: f64,
    /// Gaps between streamed chunks.
    itl: Vec<f64>,
    prompt_tokens: usize,
    /// Of those, found in the server's prefix cache (`usage.prompt_tokens_details`).
    cached_tokens: usize,
    output_tokens: usize,
}

fn words(rng: &mut Rng, count: usize, text: &mut String) {
    for _ in 0..count {
        text.push(' ');
        text.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
    }
}

async fn model_name(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let models: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?
        .error_for_status()?
        .json()
        .await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .context("/v1/models lists no model")
}

async fn one(
    client: reqwest::Client,
    url: String,
    body: Value,
    priority: Option<String>,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let class = body["max_tokens"].as_u64().unwrap_or(0) as usize;
    let mut request = client.post(format!("{url}/v1/completions")).json(&body);
    if let Some(priority) = priority {
        request = request.header("x-request-priority", priority);
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        let status = response.status();
        bail!("{status}: {}", response.text().await.unwrap_or_default());
    }
    let mut measured = Measured {
        class,
        ..Measured::default()
    };
    let mut last: Option<Instant> = None;
    let mut buffer = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                measured.e2e = started.elapsed().as_secs_f64();
                return Ok(measured);
            }
            let value: Value = serde_json::from_str(data)?;
            if let Some(error) = value.get("error") {
                bail!("the server ended the stream: {error}");
            }
            if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
                measured.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                measured.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as usize;
                measured.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            let has_text = value["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => measured.ttft = (now - started).as_secs_f64(),
                    Some(before) => measured.itl.push((now - before).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    bail!("the stream ended without [DONE]")
}

fn percentiles(values: &mut [f64]) -> Value {
    if values.is_empty() {
        return json!({"mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0});
    }
    values.sort_by(f64::total_cmp);
    let at = |p: f64| values[((p / 100.0) * (values.len() - 1) as f64).round() as usize] * 1e3;
    json!({
        "mean": values.iter().sum::<f64>() / values.len() as f64 * 1e3,
        "p50": at(50.0),
        "p95": at(95.0),
        "p99": at(99.0),
    })
}

pub fn run(args: &LoadArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.max_tokens == 0 {
        bail!("--requests and --max-tokens must be positive");
    }
    let mix = match &args.mix {
        Some(text) => parse_shares("--mix", text, |tokens: &usize| *tokens > 0)?,
        None => vec![(args.max_tokens, 1.0)],
    };
    let priorities = match &args.priorities {
        Some(text) => Some(parse_shares("--priorities", text, |name: &String| {
            ["high", "medium", "low"].contains(&name.to_ascii_lowercase().as_str())
        })?),
        None => None,
    };
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be positive (or inf)");
    }
    if args.concurrency == Some(0) {
        bail!("--concurrency must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let url = args.url.trim_end_matches('/').to_owned();
        let client = crate::http_client::builder()
            .timeout(Duration::from_secs_f64(args.timeout))
            .pool_max_idle_per_host(args.requests)
            .build()?;
        let model = match &args.model {
            Some(m) => m.clone(),
            None => model_name(&client, &url).await?,
        };
        // Separate streams for prompts, classes and arrival gaps.
        let mut rng = Rng::new(args.seed.wrapping_add(1));
        let mut prefix = String::from("Continue this text:");
        words(&mut rng, args.shared_prefix, &mut prefix);
        let mut repeated = None;
        let places = std::sync::Arc::new(tokio::sync::Semaphore::new(
            args.concurrency
                .unwrap_or(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let mut class_rng = Rng::new(args.seed ^ 0x5eed_c1a5_5000_0001);
        let mut arrival_rng = Rng::new(args.seed ^ 0x5eed_a441_7a10_0002);
        let mut priority_rng = Rng::new(args.seed ^ 0x5eed_9e10_7100_0003);
        let started = Instant::now();
        let mut at = Duration::ZERO;
        let mut tasks = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            // The class by its share of the mix, the priority by its share.
            let max_tokens = *drawn(&mix, f64::from(class_rng.next_f32()));
            let priority = priorities
                .as_deref()
                .map(|shares| drawn(shares, f64::from(priority_rng.next_f32())).clone());
            let prompt = repeated.clone().unwrap_or_else(|| {
                let mut text = prefix.clone();
                words(&mut rng, args.prompt_len, &mut text);
                text
            });
            if args.repeat_prompt {
                repeated = Some(prompt.clone());
            }
            let mut body = json!({
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": args.temperature,
                "ignore_eos": args.ignore_eos,
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            if args.top_k > 0 {
                body["top_k"] = json!(args.top_k);
            }
            if args.top_p < 1.0 {
                body["top_p"] = json!(args.top_p);
            }
            let (client, url, places) = (client.clone(), url.clone(), places.clone());
            let start_at = tokio::time::Instant::from_std(started + at);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start_at).await;
                let _place = places.acquire_owned().await?;
                one(client, url, body, priority).await
            }));
            if args.rate.is_finite() {
                // Exponential gaps: a Poisson process of the given rate.
                let u = f64::from(arrival_rng.next_f32()).max(1e-9);
                at += Duration::from_secs_f64(-u.ln() / args.rate);
            }
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for task in tasks {
            match task.await? {
                Ok(m) => done.push(m),
                Err(e) => failures.push(e.to_string()),
            }
        }
        let wall = started.elapsed().as_secs_f64();
        report(args, &done, &failures, wall);
        Ok(())
    })
}

fn report(args: &LoadArgs, done: &[Measured], failures: &[String], wall: f64) {
    let output: usize = done.iter().map(|m| m.output_tokens).sum();
    let prompt: usize = done.iter().map(|m| m.prompt_tokens).sum();
    let cached: usize = done.iter().map(|m| m.cached_tokens).sum();
    let mut ttft: Vec<f64> = done.iter().map(|m| m.ttft).collect();
    let mut e2e: Vec<f64> = done.iter().map(|m| m.e2e).collect();
    let mut tpot: Vec<f64> = done
        .iter()
        .filter(|m| m.output_tokens > 1)
        .map(|m| (m.e2e - m.ttft) / (m.output_tokens - 1) as f64)
        .collect();
    let mut itl: Vec<f64> = done.iter().flat_map(|m| m.itl.iter().copied()).collect();
    let summary = json!({
        "url": args.url,
        "rate": if args.rate.is_finite() { json!(args.rate) } else { json!("inf") },
        "requests": args.requests,
        "completed": done.len(),
        "failed": failures.len(),
        "prompt_words": args.prompt_len,
        "max_tokens": args.max_tokens,
        "duration_s": wall,
        "request_throughput": done.len() as f64 / wall,
        "output_tokens_per_s": output as f64 / wall,
        "total_tokens_per_s": (output + prompt) as f64 / wall,
        "concurrency": args.concurrency,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "computed_prompt_tokens": prompt - cached,
        "output_tokens": output,
        "ttft_ms": percentiles(&mut ttft),
        "tpot_ms": percentiles(&mut tpot),
        "itl_ms": percentiles(&mut itl),
        "e2e_ms": percentiles(&mut e2e),
        "first_failures": failures.iter().take(3).collect::<Vec<_>>(),
        "classes": classes(done),
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!(
        "{} of {} requests in {:.1} s at rate {}: {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
        done.len(),
        args.requests,
        wall,
        summary["rate"],
        summary["request_throughput"].as_f64().unwrap_or(0.0),
        summary["output_tokens_per_s"].as_f64().unwrap_or(0.0),
        summary["total_tokens_per_s"].as_f64().unwrap_or(0.0),
    );
    println!(
        "prompt tokens {prompt}: {cached} from the prefix cache, {} computed",
        prompt - cached
    );
    for name in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        let s = &summary[name];
        println!(
            "{name:<8} mean {:>8.1}  p50 {:>8.1}  p95 {:>8.1}  p99 {:>8.1}",
            s["mean"].as_f64().unwrap_or(0.0),
            s["p50"].as_f64().unwrap_or(0.0),
            s["p95"].as_f64().unwrap_or(0.0),
            s["p99"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(classes) = summary["classes"].as_object().filter(|c| c.len() > 1) {
        for (tokens, c) in classes {
            println!(
                "max_tokens {tokens:>5}: {} requests, e2e p50 {:.1} p95 {:.1} ms, ttft p95 {:.1} ms",
                c["completed"],
                c["e2e_ms"]["p50"].as_f64().unwrap_or(0.0),
                c["e2e_ms"]["p95"].as_f64().unwrap_or(0.0),
                c["ttft_ms"]["p95"].as_f64().unwrap_or(0.0),
            );
        }
    }
    for failure in failures.iter().take(3) {
        println!("failed: {failure}");
    }
}

/// Latencies per class (`max_tokens`) of a mixed workload.
fn classes(done: &[Measured]) -> Value {
    let mut by_class = std::collections::BTreeMap::<usize, Vec<&Measured>>::new();
    for m in done {
        by_class.entry(m.class).or_default().push(m);
    }
    by_class
        .into_iter()
        .map(|(class, ms)| {
            let mut e2e: Vec<f64> = ms.iter().map(|m| m.e2e).collect();
            let mut ttft: Vec<f64> = ms.iter().map(|m| m.ttft).collect();
            (
                class.to_string(),
                json!({
                    "completed": ms.len(),
                    "e2e_ms": percentiles(&mut e2e),
                    "ttft_ms": percentiles(&mut ttft),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_draw_and_refuse_what_is_not_allowed() {
        let mix = parse_shares("--mix", "16:0.8,256:0.2", |t: &usize| *t > 0).unwrap();
        assert_eq!(mix, vec![(16, 0.8), (256, 0.2)]);
        assert_eq!(*drawn(&mix, 0.0), 16);
        assert_eq!(*drawn(&mix, 0.79), 16);
        assert_eq!(*drawn(&mix, 0.81), 256);
        assert_eq!(*drawn(&mix, 1.0), 256);
        let valid = |p: &String| ["high", "low"].contains(&p.as_str());
        assert!(parse_shares("--priorities", "high:0.5,low:0.5", valid).is_ok());
        for bad in [
            "high:0.5",
            "urgent:1",
            "high:0.5,low",
            "high:x",
            "",
            "high:-1,low:2",
        ] {
            let error = parse_shares("--priorities", bad, valid).unwrap_err();
            assert!(
                error.to_string().starts_with("--priorities"),
                "{bad}: {error}"
            );
        }
        assert!(parse_shares("--mix", "0:1", |t: &usize| *t > 0).is_err());
    }
}
