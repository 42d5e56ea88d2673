//! The command line: `generate`, `bench` and `check-config`.

use crate::engine::{
    self, EngineConfig, EngineHandle, Event, KvCacheSize, Message, ModelSource, SamplingParams,
};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "parallax-agent", version, about = "Parallax node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Run a fixed offline workload and report throughput and latency.
    Bench(BenchArgs),
    /// Validate an agent configuration file (the operator's ConfigMap key agent.json).
    CheckConfig { file: PathBuf },
}

/// What loads the model and sizes the engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file, a Hugging Face directory, or `dummy:<shape>` (smollm2-135m, llama-3.2-1b,
    /// llama-3.1-8b) for random weights.
    #[arg(long)]
    pub model: String,
    /// Where the tokenizer comes from when the model has none (dummy shapes).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens in one step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks to allocate (overrides --kv-memory-fraction).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Fraction of the memory available after loading the weights to give the KV cache. On CPU
    /// the default is 0.1, as vLLM's CPU backend keeps a fixed KV space rather than most of RAM.
    #[arg(long, default_value_t = 0.1)]
    pub kv_memory_fraction: f64,
    /// Worker threads for the forward pass (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl EngineArgs {
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        if !(self.kv_memory_fraction > 0.0 && self.kv_memory_fraction <= 1.0) {
            bail!(
                "--kv-memory-fraction must be in (0, 1], got {}",
                self.kv_memory_fraction
            );
        }
        if self.block_size == 0 || self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
        }
        let kv_cache = match self.kv_blocks {
            Some(n) => KvCacheSize::Blocks(n),
            None => KvCacheSize::MemoryFraction(self.kv_memory_fraction),
        };
        Ok(EngineConfig {
            max_num_seqs: self.max_num_seqs,
            max_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            kv_cache,
        })
    }

    /// Loads the model and starts the engine.
    pub fn start(&self) -> anyhow::Result<EngineHandle> {
        if let Some(threads) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .context("setting the thread count")?;
        }
        let config = self.config()?;
        let source = ModelSource::parse(&self.model)?;
        let started = Instant::now();
        let (model, codec) = engine::load_with_tokenizer(&source, self.tokenizer.as_deref())?;
        let handle = engine::start(model, codec, config)?;
        eprintln!(
            "loaded {} in {:.1}s: {:.0} MiB of weights, {} KV blocks of {} tokens",
            self.model,
            started.elapsed().as_secs_f64(),
            handle.info.weight_bytes as f64 / (1 << 20) as f64,
            handle.info.kv_blocks,
            handle.info.block_size
        );
        Ok(handle)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// A string that ends the output (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
}

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
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let engine = args.engine.start()?;
    let text = if args.chat {
        engine.codec.chat_prompt(&[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?
    } else {
        args.prompt.clone()
    };
    let prompt = engine.codec.encode(&text)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
    let started = Instant::now();
    let mut stream = engine.submit(prompt, params)?;
    let mut stdout = std::io::stdout().lock();
    let mut first = None;
    while let Some(event) = stream.next_blocking() {
        match event {
            Event::Token { text, .. } => {
                first.get_or_insert_with(Instant::now);
                write!(stdout, "{text}")?;
                stdout.flush()?;
            }
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                writeln!(stdout, "{text}")?;
                let decode = first.map_or(Duration::ZERO, |f| f.elapsed());
                eprintln!(
                    "[{} prompt + {} completion tokens, finish {}, first token {:.0} ms, decode {:.1} tok/s]",
                    prompt_tokens,
                    completion_tokens,
                    reason.as_str(),
                    first.map_or(0.0, |f| (f - started).as_secs_f64() * 1e3),
                    completion_tokens.saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9)
                );
                return Ok(());
            }
        }
    }
    bail!("the engine stopped before the request finished")
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
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
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
        "peak_kv_usage": peak_kv,
        "preemptions": engine.stats.preemptions.load(Ordering::Relaxed),
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
            "peak KV usage    {:.1}%  preemptions {}",
            peak_kv * 100.0,
            summary["preemptions"]
        );
    }
    Ok(())
}
