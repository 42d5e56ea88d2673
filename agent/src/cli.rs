//! The command line: `serve`, `generate`, `bench`, `bench-serve` and `check-config`.

use crate::engine::scheduling::admission::{
    Bin, BinShare, Discipline, EVERY_STEP, QueuePolicy, SLOW_PREFILL_CHUNK,
};
use crate::engine::{
    self, BackendConfig, BackendKind, DeviceSpec, EngineConfig, EngineHandle, Event, KvCacheSize,
    Message, ModelSource, NoObserver, Precision, SamplingParams, StepObserver,
};
use crate::server::prediction::{BinBounds, Binning};
use crate::server::{self, Server, ServerConfig};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use parallax_crds::AgentConfig;
use parallax_crds::inference_pool::KvCacheDtype;
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
    /// Serve the OpenAI-compatible API, health and metrics.
    Serve(ServeArgs),
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Run a fixed offline workload and report throughput and latency.
    Bench(BenchArgs),
    /// Load a running server with Poisson arrivals and report latency and throughput.
    BenchServe(crate::loadgen::LoadArgs),
    /// Validate an agent configuration file (the operator's ConfigMap key agent.json).
    CheckConfig { file: PathBuf },
}

/// What loads the model and sizes the engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file, a Hugging Face directory, or `dummy:<shape>` (smollm2-135m, llama-3.2-1b,
    /// llama-3.1-8b) for random weights.
    #[arg(long)]
    pub model: Option<String>,
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
    /// Which backend runs the model: `int8` (the CPU engine's own kernels), `candle` (candle
    /// tensors on any device), or `auto` (candle on CUDA, int8 on the CPU).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// The device: `cpu`, `cuda` (device 0) or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// The candle backend's weight and activation type (`auto`: bf16 on CUDA, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Admission order: `multi-bin` (bins by predicted time, priorities, aging) or `fcfs`.
    #[arg(long, value_enum, default_value_t = SchedulerKind::MultiBin)]
    pub scheduler: SchedulerKind,
    /// A bin's share of the batch, `BIN=MIN-MAX[:WEIGHT]` (repeatable; defaults fast=32-64:3,
    /// medium=16-32:2, slow=4-16:1, capped by --max-num-seqs).
    #[arg(long = "bin-share", value_parser = parse_bin_share)]
    pub bin_shares: Vec<(Bin, BinShare)>,
    /// With multi-bin: while a faster bin has sequences running, a slower bin's sequences join
    /// only its step weight's share of the steps (see --step-weights). Pays on CPU, where a
    /// step's time grows with its rows; `false` runs every running sequence in every step.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub weighted_steps: bool,
    /// Step weights `FAST:MEDIUM:SLOW`: a slower bin's sequences run `its weight / the leading
    /// bin's` of the steps while a faster bin has sequences running (12:4:1 → slow ones one step
    /// in twelve beside fast ones). Apart from the admission weights of --bin-share.
    #[arg(long, value_parser = parse_step_weights, default_value = "12:4:1")]
    pub step_weights: StepWeights,
    /// With multi-bin: the most prompt tokens a medium or slow request prefills in one step
    /// (fast ones take up to --max-num-batched-tokens), so that a step stays short for the fast
    /// requests that arrive meanwhile.
    #[arg(long, default_value_t = SLOW_PREFILL_CHUNK)]
    pub slow_prefill_chunk: usize,
    /// Turn off prefix caching (vLLM's flag): by default full KV blocks are shared between
    /// requests whose tokens begin alike, and a repeated prefix is not computed again.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Auto,
    Int8,
    Candle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

fn parse_device(text: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(text).map_err(|e| e.to_string())
}

/// Step weights by bin (fast, medium, slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepWeights(pub [u32; 3]);

/// `12:4:1` → step weights.
fn parse_step_weights(text: &str) -> Result<StepWeights, String> {
    let bad =
        || format!("{text:?} is not FAST:MEDIUM:SLOW with positive whole weights (e.g. 12:4:1)");
    let weights: Vec<u32> = text
        .split(':')
        .map(|w| w.trim().parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    match weights[..] {
        [fast, medium, slow] if fast > 0 && medium > 0 && slow > 0 => {
            Ok(StepWeights([fast, medium, slow]))
        }
        _ => Err(bad()),
    }
}

/// `slow=2-4:1` → the slow bin's share.
fn parse_bin_share(text: &str) -> Result<(Bin, BinShare), String> {
    let bad = || format!("{text:?} is not BIN=MIN-MAX[:WEIGHT] (BIN fast, medium or slow)");
    let (bin, rest) = text.split_once('=').ok_or_else(bad)?;
    let bin = match bin.trim() {
        "fast" => Bin::Fast,
        "medium" => Bin::Medium,
        "slow" => Bin::Slow,
        _ => return Err(bad()),
    };
    let (range, weight) = rest.split_once(':').unwrap_or((rest, ""));
    let (min, max) = range.split_once('-').ok_or_else(bad)?;
    let number = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
    let (min, max) = (number(min)?, number(max)?);
    let default_weight = QueuePolicy::multi_bin(usize::MAX).shares[bin as usize].weight;
    let weight = if weight.is_empty() {
        default_weight
    } else {
        weight.trim().parse().map_err(|_| bad())?
    };
    if max == 0 || min > max || weight == 0 {
        return Err(format!(
            "{text:?}: need 0 ≤ MIN ≤ MAX, MAX ≥ 1 and WEIGHT ≥ 1"
        ));
    }
    Ok((bin, BinShare { min, max, weight }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedulerKind {
    Fcfs,
    MultiBin,
}

impl EngineArgs {
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        if !(self.kv_memory_fraction > 0.0 && self.kv_memory_fraction <= 1.0) {
            bail!(
                "--kv-memory-fraction must be in (0, 1], got {}",
                self.kv_memory_fraction
            );
        }
        if self.block_size == 0
            || self.max_num_seqs == 0
            || self.max_num_batched_tokens == 0
            || self.slow_prefill_chunk == 0
        {
            bail!(
                "--block-size, --max-num-seqs, --max-num-batched-tokens and --slow-prefill-chunk must be positive"
            );
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
            discipline: match self.scheduler {
                SchedulerKind::Fcfs => Discipline::Fcfs,
                SchedulerKind::MultiBin => Discipline::MultiBin,
            },
            bin_shares: (!self.bin_shares.is_empty()).then(|| {
                let mut shares = QueuePolicy::multi_bin(usize::MAX).shares;
                for (bin, share) in &self.bin_shares {
                    shares[*bin as usize] = *share;
                }
                shares
            }),
            step_weights: if self.weighted_steps {
                self.step_weights.0
            } else {
                EVERY_STEP
            },
            slow_prefill_chunk: self.slow_prefill_chunk,
            prefix_caching: !self.no_enable_prefix_caching,
            ..EngineConfig::default()
        })
    }

    /// Where and how the model runs.
    pub fn backend(&self) -> BackendConfig {
        BackendConfig {
            kind: match self.backend {
                BackendArg::Auto => BackendKind::Auto,
                BackendArg::Int8 => BackendKind::Int8,
                BackendArg::Candle => BackendKind::Candle,
            },
            device: self.device,
            precision: match self.dtype {
                DtypeArg::Auto => None,
                DtypeArg::F32 => Some(Precision::F32),
                DtypeArg::F16 => Some(Precision::F16),
                DtypeArg::Bf16 => Some(Precision::Bf16),
            },
        }
    }

    pub fn model(&self) -> anyhow::Result<&str> {
        self.model
            .as_deref()
            .context("--model is required (a GGUF file, a Hugging Face directory or dummy:<shape>)")
    }

    /// Loads the model and starts the engine.
    pub fn start(&self) -> anyhow::Result<EngineHandle> {
        self.start_observed(Arc::new(NoObserver))
    }

    /// Loads the model and starts the engine, telling `observer` about every step.
    pub fn start_observed(&self, observer: Arc<dyn StepObserver>) -> anyhow::Result<EngineHandle> {
        let model = self.model()?;
        if let Some(threads) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .context("setting the thread count")?;
            anyhow::ensure!(
                engine::backend::int8::kernels::pool::configure(threads),
                "setting the thread count: the forward pool had already started"
            );
        }
        let config = self.config()?;
        let source = ModelSource::parse(model)?;
        let started = Instant::now();
        tracing::info!(model, "loading");
        let (executor, codec) =
            engine::load_with_tokenizer(&source, self.tokenizer.as_deref(), &self.backend())?;
        let handle = engine::start_observed(executor, codec, config, observer)?;
        tracing::info!(
            model,
            backend = handle.info.backend,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            weights_mib = handle.info.weight_bytes >> 20,
            kv_blocks = handle.info.kv_blocks,
            block_size = handle.info.block_size,
            context = handle.info.context_length,
            "loaded"
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
            Event::Started { .. } => {}
            Event::Failed { message } => bail!("{message}"),
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
                ..
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
        "peak_kv_usage": peak_kv,
        "preemptions": engine.stats.preemptions_total(),
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

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// An agent configuration file (the operator mounts one): model, served name, port, batch
    /// size and KV block size. --model, --port and --served-model-name override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (default 8000).
    #[arg(long)]
    pub port: Option<u16>,
    /// The model's name in the API (default: the model file's name without `.gguf`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds requests in flight may run on after SIGTERM/SIGINT before they are ended.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Most requests waiting to start; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue_requests: usize,
    /// Most prompt tokens waiting to start; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_queue_tokens: usize,
    /// Default X-Max-Wait-Time (milliseconds): how long `X-Batch-Preference: enable` waits for a
    /// batch to join.
    #[arg(long, default_value_t = 50)]
    pub max_wait_ms: u64,
    /// Requests predicted to run under this many milliseconds are in the fast bin (with
    /// --medium-bin-ms). Without both, the bounds adapt to the traffic: the natural breaks of
    /// recent predicted times.
    #[arg(long, requires = "medium_bin_ms")]
    pub fast_bin_ms: Option<u64>,
    /// Requests predicted under this many milliseconds (and not fast) are in the medium bin;
    /// the rest are slow (with --fast-bin-ms).
    #[arg(long, requires = "fast_bin_ms")]
    pub medium_bin_ms: Option<u64>,
}

/// Fixed bounds from two millisecond values, or adaptive ones from none.
fn binning(fast_ms: Option<u64>, medium_ms: Option<u64>) -> anyhow::Result<Binning> {
    match (fast_ms, medium_ms) {
        (None, None) => Ok(Binning::Adaptive),
        (Some(fast), Some(medium)) if fast < medium => Ok(Binning::Fixed(BinBounds {
            fast: Duration::from_millis(fast),
            medium: Duration::from_millis(medium),
        })),
        (Some(_), Some(_)) => bail!("the fast bin's bound must be below the medium bin's"),
        _ => bail!("give both bin bounds (fast and medium) or neither"),
    }
}

/// The last path segment of a model source without `.gguf`.
fn default_served_name(model: &str) -> String {
    let last = model
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(model);
    last.strip_suffix(".gguf").unwrap_or(last).to_owned()
}

impl ServeArgs {
    /// The engine options, the port and the server's configuration (the served name with it),
    /// with the configuration file applied.
    fn resolve(&self) -> anyhow::Result<(EngineArgs, u16, ServerConfig)> {
        let mut engine = self.engine.clone();
        let mut served = self.served_model_name.clone();
        let mut port = self.port;
        let mut server = ServerConfig {
            served_name: String::new(),
            max_body_bytes: self.max_body_bytes,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout.max(0.0)),
            max_queue_requests: self.max_queue_requests,
            max_queue_tokens: self.max_queue_tokens,
            default_max_wait: Duration::from_millis(self.max_wait_ms),
            bins: binning(self.fast_bin_ms, self.medium_bin_ms)?,
        };
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let config: AgentConfig = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a valid agent configuration", path.display())
            })?;
            if config.tensor_parallel_size != 1 {
                bail!(
                    "{}: tensorParallelSize {} is not supported by this agent yet (only 1)",
                    path.display(),
                    config.tensor_parallel_size
                );
            }
            engine.model.get_or_insert(config.model.source);
            served.get_or_insert(config.model.served_name);
            port.get_or_insert(config.port);
            engine.max_num_seqs = usize::try_from(config.batching.max_batch_size)
                .context("batching.maxBatchSize must be positive")?;
            engine.block_size = usize::try_from(config.kv_cache.block_size)
                .context("kvCache.blockSize must be positive")?;
            let bins = &config.batching.bins;
            let count = |n: i32| usize::try_from(n).unwrap_or(0);
            let weight = |n: i32| u32::try_from(n).unwrap_or(1);
            engine.bin_shares = vec![
                (
                    Bin::Fast,
                    BinShare {
                        min: count(bins.fast.min_batch_size),
                        max: count(bins.fast.max_batch_size),
                        weight: weight(bins.fast.weight),
                    },
                ),
                (
                    Bin::Medium,
                    BinShare {
                        min: count(bins.medium.min_batch_size),
                        max: count(bins.medium.max_batch_size),
                        weight: weight(bins.medium.weight),
                    },
                ),
                (
                    Bin::Slow,
                    BinShare {
                        min: count(bins.slow.min_batch_size),
                        max: count(bins.slow.max_batch_size),
                        weight: weight(bins.slow.weight),
                    },
                ),
            ];
            let millis = |ms: i32| u64::try_from(ms).unwrap_or(0);
            server.default_max_wait =
                Duration::from_millis(millis(config.batching.batch_timeout_ms));
            // Flags win over the file.
            if self.fast_bin_ms.is_none() {
                server.bins = binning(
                    bins.fast.max_execution_time_ms.map(millis),
                    bins.medium.max_execution_time_ms.map(millis),
                )
                .context("batching.bins")?;
            }
            engine.no_enable_prefix_caching |= !config.kv_cache.prefix_caching;
            if config.kv_cache.dtype != KvCacheDtype::Auto {
                tracing::warn!(
                    dtype = ?config.kv_cache.dtype,
                    "kvCache.dtype is not supported by this agent yet: the KV cache keeps the engine's own type"
                );
            }
        }
        let model = engine.model()?.to_owned();
        engine.config()?;
        if !(self.shutdown_timeout >= 0.0 && self.shutdown_timeout.is_finite()) {
            bail!("--shutdown-timeout must be a number of seconds ≥ 0");
        }
        server.served_name = served.unwrap_or_else(|| default_served_name(&model));
        Ok((
            engine,
            port.unwrap_or(parallax_crds::agent_config::AGENT_HTTP_PORT),
            server,
        ))
    }
}

pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let (engine, port, server_config) = args.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {}:{port}", args.host))?;
        tracing::info!(address = %listener.local_addr()?, model = %server_config.served_name, "listening");
        let server = Server::new(server_config);
        // The model loads while the server already answers /health (and /ready says 503).
        let loading = {
            let server = server.clone();
            tokio::task::spawn_blocking(move || {
                let handle = engine.start_observed(server.metrics())?;
                server.attach(handle);
                Ok::<_, anyhow::Error>(())
            })
        };
        let serving = server.run(listener, server::termination());
        tokio::pin!(serving);
        tokio::select! {
            served = &mut serving => served?,
            loaded = loading => {
                loaded.context("the loading thread failed")??;
                serving.await?;
            }
        }
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["parallax-agent", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .expect("the arguments parse")
            .command
        {
            Command::Serve(args) => args,
            other => panic!("{other:?}"),
        }
    }

    fn config_file(name: &str, tensor_parallel_size: u32) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("parallax-{name}-{}.json", std::process::id()));
        let config = serde_json::json!({
            "model": {"source": "dummy:smollm2-135m", "format": "auto", "servedName": "small"},
            "tensorParallelSize": tensor_parallel_size,
            "port": 8000,
            "batching": {"maxBatchSize": 48},
            "kvCache": {"blockSize": 32},
        });
        std::fs::write(&path, config.to_string()).expect("the temp folder is writable");
        path
    }

    #[test]
    fn the_configuration_file_sets_what_flags_do_not() {
        let path = config_file("serve-config", 1);
        let file = path.to_string_lossy().into_owned();
        let (engine, port, server) = serve_args(&["--config", &file]).resolve().unwrap();
        assert_eq!(engine.model.as_deref(), Some("dummy:smollm2-135m"));
        assert_eq!((server.served_name.as_str(), port), ("small", 8000));
        assert_eq!((engine.max_num_seqs, engine.block_size), (48, 32));
        // The pool's bins (the API's defaults here) become the batch shares.
        let shares = engine.config().unwrap().bin_shares.unwrap();
        assert_eq!(
            shares[Bin::Slow as usize],
            BinShare {
                min: 4,
                max: 16,
                weight: 1
            }
        );
        assert_eq!(
            shares[Bin::Fast as usize],
            BinShare {
                min: 32,
                max: 64,
                weight: 3
            }
        );
        let (_, port, server) = serve_args(&[
            "--config",
            &file,
            "--port",
            "9000",
            "--served-model-name",
            "x",
        ])
        .resolve()
        .unwrap();
        assert_eq!((server.served_name.as_str(), port), ("x", 9000));
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn bin_shares_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_bin_share("slow=1-2").unwrap(),
            (
                Bin::Slow,
                BinShare {
                    min: 1,
                    max: 2,
                    weight: 1
                }
            )
        );
        assert_eq!(
            parse_bin_share("fast=8-16:5").unwrap(),
            (
                Bin::Fast,
                BinShare {
                    min: 8,
                    max: 16,
                    weight: 5
                }
            )
        );
        for bad in [
            "slow",
            "warm=1-2",
            "slow=3-2",
            "slow=0-0",
            "fast=1-2:0",
            "fast=a-b",
        ] {
            assert!(parse_bin_share(bad).is_err(), "{bad}");
        }
        let args = serve_args(&["--model", "dummy:smollm2-135m", "--bin-share", "slow=1-2"]);
        let shares = args.engine.config().unwrap().bin_shares.unwrap();
        assert_eq!(shares[Bin::Slow as usize].max, 2);
        assert_eq!(
            shares[Bin::Medium as usize],
            BinShare {
                min: 16,
                max: 32,
                weight: 2
            }
        );
    }

    #[test]
    fn step_weights_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_step_weights("6:3:1"), Ok(StepWeights([6, 3, 1])));
        for bad in ["12:4", "12:4:0", "a:b:c", "1:2:3:4", ""] {
            let error = parse_step_weights(bad).unwrap_err();
            assert!(error.contains("FAST:MEDIUM:SLOW"), "{bad}: {error}");
        }
        let config = |extra: &[&str]| {
            let mut args = vec!["--model", "dummy:smollm2-135m"];
            args.extend_from_slice(extra);
            serve_args(&args).engine.config().unwrap().step_weights
        };
        assert_eq!(config(&[]), [12, 4, 1]);
        assert_eq!(config(&["--step-weights", "6:2:1"]), [6, 2, 1]);
        assert_eq!(config(&["--weighted-steps", "false"]), [1, 1, 1]);
        let error = serve_args(&["--model", "dummy:smollm2-135m", "--slow-prefill-chunk", "0"])
            .engine
            .config()
            .unwrap_err();
        assert!(
            error.to_string().contains("--slow-prefill-chunk"),
            "{error}"
        );
    }

    #[test]
    fn serve_refuses_what_it_cannot_do_by_name() {
        let path = config_file("serve-tp", 2);
        let file = path.to_string_lossy().into_owned();
        let error = serve_args(&["--config", &file]).resolve().unwrap_err();
        assert!(
            error.to_string().contains("tensorParallelSize 2"),
            "{error}"
        );
        std::fs::remove_file(path).ok();
        let error = serve_args(&[]).resolve().unwrap_err();
        assert!(error.to_string().contains("--model is required"), "{error}");
        assert_eq!(
            default_served_name("/models/SmolLM2.Q4_1.gguf"),
            "SmolLM2.Q4_1"
        );
    }
}
