//! `bench`: a fixed offline workload through the engine (no HTTP), reporting throughput and
//! latency percentiles.

use super::EngineArgs;
use super::generate::SamplingArgs;
use crate::engine::{self, EngineHandle, Event, SamplingParams};
use anyhow::bail;
use clap::{Args, ValueEnum};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Requests share steps (continuous batching) up to --concurrency at a time.
    Continuous,
    /// One request at a time.
    Sequential,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 40)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value_t = BenchMode::Continuous)]
    pub mode: BenchMode,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One finished request, timed from submission.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttft: f64,
    e2e: f64,
    tpot: Option<f64>,
    output_tokens: usize,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.concurrency == 0 || args.prompt_len == 0 || args.max_tokens == 0 {
        bail!("--requests, --concurrency, --prompt-len and --max-tokens must be positive");
    }
    let params = args.sampling.params(SamplingParams {
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    })?;
    let engine = args.engine.start()?;
    let vocab = engine.info.vocab_size as u64;
    // Deterministic prompts of exactly --prompt-len ids, different per request.
    let prompts: Arc<Vec<Vec<u32>>> = Arc::new(
        (0..args.requests)
            .map(|i| {
                let mut rng = engine::sampling::Rng::new(i as u64 + 1);
                (0..args.prompt_len)
                    .map(|_| (100 + rng.next_u64() % (vocab - 100)) as u32)
                    .collect()
            })
            .collect(),
    );
    let concurrency = if args.mode == BenchMode::Sequential {
        1
    } else {
        args.concurrency
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let timings: Vec<Timing> = runtime.block_on(async {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (engine, next, params, prompts) = (
                    engine.clone(),
                    next.clone(),
                    params.clone(),
                    prompts.clone(),
                );
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(prompt) = prompts.get(i) else { break };
                        out.push(run_one(&engine, prompt.clone(), params.clone()).await?);
                    }
                    Ok::<_, anyhow::Error>(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let wall = started.elapsed().as_secs_f64();
    report(args, &engine, &timings, wall)
}

async fn run_one(
    engine: &EngineHandle,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> anyhow::Result<Timing> {
    let submitted = Instant::now();
    let mut stream = engine.submit(prompt, params)?;
    let mut first = None;
    loop {
        match stream.next().await {
            Some(Event::Started { .. }) => {}
            Some(Event::Failed { message }) => bail!("{message}"),
            Some(Event::Token { .. }) => {
                first.get_or_insert_with(Instant::now);
            }
            Some(Event::Finished {
                completion_tokens, ..
            }) => {
                let end = Instant::now();
                let first = first.unwrap_or(end);
                let tpot = (completion_tokens > 1)
                    .then(|| (end - first).as_secs_f64() / (completion_tokens - 1) as f64);
                return Ok(Timing {
                    ttft: (first - submitted).as_secs_f64(),
                    e2e: (end - submitted).as_secs_f64(),
                    tpot,
                    output_tokens: completion_tokens,
                });
            }
            None => bail!("the engine stopped before the request finished"),
        }
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

fn report(
    args: &BenchArgs,
    engine: &EngineHandle,
    timings: &[Timing],
    wall: f64,
) -> anyhow::Result<()> {
    let output: usize = timings.iter().map(|t| t.output_tokens).sum();
    let prompt = timings.len() * args.prompt_len;
    let stat = |f: fn(&Timing) -> Option<f64>| {
        let mut v: Vec<f64> = timings.iter().filter_map(f).collect();
        [
            percentile(&mut v, 50.0) * 1e3,
            percentile(&mut v, 95.0) * 1e3,
            percentile(&mut v, 99.0) * 1e3,
        ]
    };
    let ttft = stat(|t| Some(t.ttft));
    let tpot = stat(|t| t.tpot);
    let e2e = stat(|t| Some(t.e2e));
    let peak_kv =
        engine.stats.kv_blocks_peak.load(Ordering::Relaxed) as f64 / engine.info.kv_blocks as f64;
    let summary = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "model": args.engine.model,
        "requests": timings.len(),
        "concurrency": if args.mode == BenchMode::Sequential { 1 } else { args.concurrency },
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "duration_s": wall,
        "output_tokens": output,
        "output_tokens_per_s": output as f64 / wall,
        "total_tokens_per_s": (output + prompt) as f64 / wall,
        "ttft_ms": {"p50": ttft[0], "p95": ttft[1], "p99": ttft[2]},
        "tpot_ms": {"p50": tpot[0], "p95": tpot[1], "p99": tpot[2]},
        "e2e_ms": {"p50": e2e[0], "p95": e2e[1], "p99": e2e[2]},
        "kv_blocks": engine.info.kv_blocks,
        "kv_cache_dtype": engine.info.kv_dtype,
        "peak_kv_usage": peak_kv,
        "preemptions": engine.stats.preemptions_total(),
        "steps": engine.stats.steps.load(Ordering::Relaxed),
        "graph_steps": engine.stats.graph_steps.load(Ordering::Relaxed),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} requests, {} in flight, {}-token prompts, {} output tokens each: {:.2} s",
            timings.len(),
            summary["concurrency"],
            args.prompt_len,
            args.max_tokens,
            wall
        );
        println!("output tokens/s  {:.1}", output as f64 / wall);
        println!("total tokens/s   {:.1}", (output + prompt) as f64 / wall);
        for (name, v) in [("TTFT ms", ttft), ("TPOT ms", tpot), ("E2E ms", e2e)] {
            println!(
                "{name:<9} p50 {:.1}  p95 {:.1}  p99 {:.1}",
                v[0], v[1], v[2]
            );
        }
        println!(
            "peak KV usage    {:.1}% of {} {} blocks  preemptions {}",
            peak_kv * 100.0,
            engine.info.kv_blocks,
            engine.info.kv_dtype,
            summary["preemptions"]
        );
    }
    Ok(())
}
