//! What loads the model and sizes the engine: the engine's flags, resolved against the device's
//! hardware profile.

use crate::engine::backend::CollectiveKind;
use crate::engine::backend::profile::HardwareProfile;
use crate::engine::scheduling::admission::{Bin, BinShare, Discipline, EVERY_STEP, QueuePolicy};
use crate::engine::{
    self, BackendConfig, BackendKind, DeviceSpec, EngineConfig, EngineHandle, Executor,
    KvCacheSize, KvCacheType, ModelFiles, ModelSource, NoObserver, Precision, StepObserver,
};
use crate::hub::{Hub, HubConfig, HubModel, Progress};
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What loads the model and sizes the engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file, a Hugging Face directory, a model on the hub (`hf://ORG/NAME[@REVISION]`, a
    /// GGUF one as `hf://ORG/NAME[@REVISION]/FILE.gguf`; downloaded into --model-cache), or
    /// `dummy:<shape>` (smollm2-135m, llama-3.2-1b, llama-3.1-8b) for random weights.
    #[arg(long)]
    pub model: Option<String>,
    /// Where hub models are downloaded (default: $XDG_CACHE_HOME/parallax/models, or
    /// ~/.cache/parallax/models). HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are honoured.
    #[arg(long, env = "PARALLAX_MODEL_CACHE")]
    pub model_cache: Option<PathBuf>,
    /// Where the tokenizer comes from when the model has none (dummy shapes).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Most sequences in one step (default: the hardware profile's — 64 on the CPU, 256 on an
    /// H100; `info` shows it).
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens in one step; longer prompts are prefilled in chunks (default: the hardware
    /// profile's — 512 on the CPU, 8192 on an H100).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV block (default: the hardware profile's, 16).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// KV blocks to allocate (overrides the memory fractions).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// On the CPU: the fraction of the memory available after loading the weights to give the
    /// KV cache (0.1, as vLLM's CPU backend keeps a fixed KV space rather than most of RAM).
    #[arg(long, default_value_t = 0.1)]
    pub kv_memory_fraction: f64,
    /// On a GPU: the fraction of the card for weights, activations and KV cache (vLLM's flag;
    /// default 0.9); the KV cache gets what the weights and the largest step leave of it.
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
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
    /// Split the model over this many ranks (vLLM's flag): on CUDA one GPU each from --device on,
    /// on the CPU one thread each. Needs the candle backend; must divide the model's attention
    /// and KV heads. Default: the agent configuration's, or 1.
    #[arg(long, short = 't')]
    pub tensor_parallel_size: Option<usize>,
    /// How tensor-parallel ranks add up their partial sums: `nccl` on the GPUs, `host` in host
    /// memory (on CUDA a copy there and back each time), `auto` NCCL on CUDA where libnccl.so
    /// opens, else the host. `nccl` at tensor parallel size 1 runs a group of one rank through
    /// NCCL (the path checked on one GPU).
    #[arg(long, value_enum, default_value_t = CollectiveArg::Auto, env = "PARALLAX_COLLECTIVE")]
    pub collective: CollectiveArg,
    /// The element type of cached keys and values (vLLM's flag): `auto`, the backend's own
    /// (f32 on the CPU engine, --dtype on candle's), or `int8`, a scale per token and head — a
    /// quarter of f32's memory, so four times the cached tokens, at near-equal quality (int8
    /// backend only for now).
    #[arg(long, value_enum, default_value_t = KvCacheDtypeArg::Auto)]
    pub kv_cache_dtype: KvCacheDtypeArg,
    /// Replay decode steps from CUDA graphs: a step of up to 256 single-token rows costs the host
    /// one launch instead of one per kernel (each batch size and table width is captured on its
    /// first step). CUDA, whole models only; off by default until measured on a card.
    #[arg(long)]
    pub cuda_graphs: bool,
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
    /// in twelve beside fast ones). Apart from the admission weights of --bin-share. Default:
    /// the hardware profile's — 12:4:1 on the CPU, 1:1:1 on a GPU, where a decode step costs
    /// about the same for one row or a hundred.
    #[arg(long, value_parser = parse_step_weights)]
    pub step_weights: Option<StepWeights>,
    /// With multi-bin: the most prompt tokens a medium or slow request prefills in one step
    /// (fast ones take up to --max-num-batched-tokens), so that a step stays short for the fast
    /// requests that arrive meanwhile (default: the hardware profile's — 16 on the CPU, the
    /// whole step budget on a GPU).
    #[arg(long)]
    pub slow_prefill_chunk: Option<usize>,
    /// Turn off prefix caching (vLLM's flag): by default full KV blocks are shared between
    /// requests whose tokens begin alike, and a repeated prefix is not computed again.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CollectiveArg {
    Auto,
    Host,
    Nccl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Auto,
    Int8,
    Candle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheDtypeArg {
    Auto,
    Int8,
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
    /// The hardware profile of the device these arguments name (the CPU's, or the GPU's by its
    /// name and memory).
    pub fn profile(&self) -> anyhow::Result<HardwareProfile> {
        let facts = engine::backend::gpu_facts(self.device)?;
        Ok(engine::backend::profile::profile(
            self.device,
            facts.as_ref(),
        ))
    }

    /// The engine's configuration: these arguments, then `profile`'s defaults.
    pub fn config(&self, profile: &HardwareProfile) -> anyhow::Result<EngineConfig> {
        let gpu_memory_utilization = self.gpu_memory_utilization.unwrap_or(0.9);
        for (flag, fraction) in [
            ("--kv-memory-fraction", self.kv_memory_fraction),
            ("--gpu-memory-utilization", gpu_memory_utilization),
        ] {
            if !(fraction > 0.0 && fraction <= 1.0) {
                bail!("{flag} must be in (0, 1], got {fraction}");
            }
        }
        if self.tensor_parallel_size == Some(0) {
            bail!("--tensor-parallel-size must be at least 1");
        }
        self.backend().check_cuda_graphs()?;
        let max_num_seqs = self.max_num_seqs.unwrap_or(profile.max_num_seqs);
        let max_batched_tokens = self
            .max_num_batched_tokens
            .unwrap_or(profile.max_batched_tokens);
        let block_size = self.block_size.unwrap_or(profile.block_size);
        let slow_prefill_chunk = self
            .slow_prefill_chunk
            .unwrap_or(profile.slow_prefill_chunk);
        if block_size == 0
            || max_num_seqs == 0
            || max_batched_tokens == 0
            || slow_prefill_chunk == 0
        {
            bail!(
                "--block-size, --max-num-seqs, --max-num-batched-tokens and --slow-prefill-chunk must be positive"
            );
        }
        let kv_cache = match (self.kv_blocks, self.device) {
            (Some(n), _) => KvCacheSize::Blocks(n),
            (None, DeviceSpec::Cpu) => KvCacheSize::MemoryFraction(self.kv_memory_fraction),
            (None, DeviceSpec::Cuda(_)) => KvCacheSize::MemoryFraction(gpu_memory_utilization),
        };
        Ok(EngineConfig {
            max_num_seqs,
            max_batched_tokens,
            block_size,
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
                self.step_weights.map_or(profile.step_weights, |w| w.0)
            } else {
                EVERY_STEP
            },
            slow_prefill_chunk,
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
            tensor_parallel_size: self.tensor_parallel_size(),
            collective: match self.collective {
                CollectiveArg::Auto => CollectiveKind::Auto,
                CollectiveArg::Host => CollectiveKind::Host,
                CollectiveArg::Nccl => CollectiveKind::Nccl,
            },
            precision: match self.dtype {
                DtypeArg::Auto => None,
                DtypeArg::F32 => Some(Precision::F32),
                DtypeArg::F16 => Some(Precision::F16),
                DtypeArg::Bf16 => Some(Precision::Bf16),
            },
            cuda_graphs: self.cuda_graphs,
            kv_cache: match self.kv_cache_dtype {
                KvCacheDtypeArg::Auto => KvCacheType::Auto,
                KvCacheDtypeArg::Int8 => KvCacheType::Int8,
            },
        }
    }

    /// Ranks the model is split over in all (1: whole).
    pub fn tensor_parallel_size(&self) -> usize {
        self.tensor_parallel_size.unwrap_or(1).max(1)
    }

    pub fn model(&self) -> anyhow::Result<&str> {
        self.model.as_deref().context(
            "--model is required (a GGUF file, a Hugging Face directory, hf://ORG/NAME or dummy:<shape>)",
        )
    }

    /// These arguments with a hub model downloaded (what the cache lacks) and named by its local
    /// path; `progress` hears how far the download has come.
    pub fn fetched(&self, progress: &dyn Fn(&Progress)) -> anyhow::Result<Self> {
        let Some(model) = HubModel::parse(self.model()?) else {
            return Ok(self.clone());
        };
        let model = model?;
        let hub = Hub::new(HubConfig::from_env(self.model_cache()?))?;
        let path = hub
            .fetch(&model, progress)
            .with_context(|| format!("fetching {model}"))?;
        let mut fetched = self.clone();
        fetched.model = Some(path.to_string_lossy().into_owned());
        Ok(fetched)
    }

    /// The model's files, downloading a hub model first.
    pub fn source(&self) -> anyhow::Result<ModelSource> {
        Ok(ModelSource::parse(self.fetched(&|_| {})?.model()?)?)
    }

    fn model_cache(&self) -> anyhow::Result<PathBuf> {
        if let Some(cache) = &self.model_cache {
            return Ok(cache.clone());
        }
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .map(|cache| cache.join("parallax").join("models"))
            .context("no cache folder for hub models: give --model-cache (PARALLAX_MODEL_CACHE)")
    }

    /// Loads the model and starts the engine.
    pub fn start(&self) -> anyhow::Result<EngineHandle> {
        self.start_observed(Arc::new(NoObserver))
    }

    /// Loads the model and starts the engine, telling `observer` about every step.
    pub fn start_observed(&self, observer: Arc<dyn StepObserver>) -> anyhow::Result<EngineHandle> {
        self.start_with(observer, engine::backend::load)
    }

    /// Sets the forward pass's threads (once per process).
    pub fn set_threads(&self) -> anyhow::Result<()> {
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
        Ok(())
    }

    /// Loads the model, builds its executor with `build` (the backend, or a group's leader),
    /// and starts the engine, telling `observer` about every step.
    pub fn start_with(
        &self,
        observer: Arc<dyn StepObserver>,
        build: impl FnOnce(&mut ModelFiles, &BackendConfig) -> engine::error::Result<Box<dyn Executor>>,
    ) -> anyhow::Result<EngineHandle> {
        let model = self.model()?;
        self.set_threads()?;
        let profile = self.profile()?;
        let config = self.config(&profile)?;
        let source = self.source()?;
        let started = Instant::now();
        tracing::info!(model, "loading");
        let (mut files, codec) = engine::open_with_tokenizer(&source, self.tokenizer.as_deref())?;
        let executor = build(&mut files, &self.backend())?;
        let handle = engine::start_observed(executor, codec, config, observer)?;
        tracing::info!(
            model,
            backend = handle.info.backend,
            profile = profile.name,
            max_num_seqs = config.max_num_seqs,
            max_num_batched_tokens = config.max_batched_tokens,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::profile::{CPU, GpuFacts, profile};

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        engine: EngineArgs,
    }

    /// The engine arguments of a command line for the dummy 135M model with `args` added.
    fn engine_args(args: &[&str]) -> EngineArgs {
        use clap::Parser;
        let mut argv = vec!["x", "--model", "dummy:smollm2-135m"];
        argv.extend_from_slice(args);
        Wrapper::try_parse_from(argv).unwrap().engine
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
    }

    #[test]
    fn step_weights_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_step_weights("6:3:1"), Ok(StepWeights([6, 3, 1])));
        for bad in ["12:4", "12:4:0", "a:b:c", "1:2:3:4", ""] {
            let error = parse_step_weights(bad).unwrap_err();
            assert!(error.contains("FAST:MEDIUM:SLOW"), "{bad}: {error}");
        }
    }

    #[test]
    fn flags_win_over_the_hardware_profile() {
        let config = |args: &[&str], profile: &HardwareProfile| engine_args(args).config(profile);
        let h100 = profile(
            DeviceSpec::Cuda(0),
            Some(&GpuFacts {
                name: "NVIDIA H100 80GB HBM3".into(),
                total_memory: 80 << 30,
            }),
        );
        let plain = config(&[], &h100).unwrap();
        assert_eq!(
            (
                plain.max_num_seqs,
                plain.max_batched_tokens,
                plain.step_weights
            ),
            (256, 8192, [1, 1, 1])
        );
        let cpu = config(&[], &CPU).unwrap();
        assert_eq!(
            (cpu.max_num_seqs, cpu.max_batched_tokens, cpu.step_weights),
            (64, 512, [12, 4, 1])
        );
        let set = config(&["--max-num-seqs", "8", "--step-weights", "6:2:1"], &h100).unwrap();
        assert_eq!((set.max_num_seqs, set.step_weights), (8, [6, 2, 1]));
        let off = config(&["--weighted-steps", "false"], &CPU).unwrap();
        assert_eq!(off.step_weights, [1, 1, 1]);
        let error = config(&["--slow-prefill-chunk", "0"], &CPU).unwrap_err();
        assert!(
            error.to_string().contains("--slow-prefill-chunk"),
            "{error}"
        );
        let error = config(&["--gpu-memory-utilization", "1.5"], &CPU).unwrap_err();
        assert!(
            error.to_string().contains("--gpu-memory-utilization"),
            "{error}"
        );
    }

    #[test]
    fn cuda_graphs_are_refused_by_name_off_a_single_gpu() {
        let config = |args: &[&str]| {
            let engine = engine_args(&[&["--cuda-graphs"], args].concat());
            assert!(engine.backend().cuda_graphs);
            engine.config(&CPU).map(|_| ())
        };
        let error = config(&[]).unwrap_err().to_string();
        assert!(
            error.contains("--cuda-graphs") && error.contains("--device cuda"),
            "{error}"
        );
        for split in [
            &["--device", "cuda", "--tensor-parallel-size", "2"][..],
            &["--device", "cuda:1", "--collective", "nccl"],
        ] {
            let error = config(split).unwrap_err().to_string();
            assert!(
                error.contains("--cuda-graphs") && error.contains("tensor parallelism"),
                "{error}"
            );
        }
        config(&["--device", "cuda"]).expect("one whole model on one GPU");
    }
}
