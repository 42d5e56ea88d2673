//! Execution backends: the one boundary between scheduling and devices. An [`Executor`] owns a
//! model's weights and its KV memory; each step it takes what every scheduled sequence runs
//! (token ids, positions, block table, what to return) and gives back the logits of the rows that
//! sample, or their greedy token ids where the device can pick them. The scheduler, admission,
//! sampling decisions and block tables above it know nothing of tensors or devices.
//!
//! - [`int8`]: the CPU engine's own int8 kernels (Q4_1/Q8_0 weights, f32 activations).
//! - [`candle`]: a Llama over candle tensors on any candle device — the CPU now, CUDA with the
//!   `cuda` feature — in f32, f16 or bf16.

pub mod candle;
pub mod int8;
pub mod profile;

use super::error::{EngineError, Result};
use super::model::LlamaConfig;
use super::model::loader::ModelFiles;
use super::sampling::Draw;
pub use super::sampling::argmax;
use super::scheduling::blocks::BlockId;

/// What a sequence wants back for the last token it runs in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutput {
    /// Nothing: it is mid-prefill.
    None,
    /// The vocabulary's logits (sampling with temperature, log-probabilities).
    Logits,
    /// The greedy token id alone (picked on the device; nothing vocabulary-wide is copied).
    Argmax,
    /// A token sampled on the device as the draw says (temperature, top-k, top-p and the
    /// request's uniform draw; nothing vocabulary-wide is copied).
    Sample(Draw),
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// Tokens to run now (a prefill chunk, or the one token to decode).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; earlier positions are already in the cache.
    pub start: usize,
    /// Blocks holding positions `0..start + tokens.len()`.
    pub blocks: &'a [BlockId],
    pub output: RowOutput,
}

/// What a step gives back, in batch order: one vocabulary row per `Logits` sequence, one id per
/// `Argmax` or `Sample` sequence (in `argmax`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    pub logits: Vec<f32>,
    pub argmax: Vec<u32>,
    /// A captured CUDA graph ran the step (`--cuda-graphs`).
    pub replayed: bool,
}

/// A model's weights and KV memory on one device.
pub trait Executor: Send + std::fmt::Debug {
    fn config(&self) -> &LlamaConfig;
    /// Which backend runs on which device, in which type (for logs and `info`).
    fn describe(&self) -> String;
    /// Bytes the weights take.
    fn weight_bytes(&self) -> usize;
    /// The element type of the cached keys and values, as vLLM names it (`float32`, `bfloat16`,
    /// `float16`).
    fn kv_dtype(&self) -> &'static str;
    /// Bytes one KV block of `block_size` tokens takes (every layer, keys and values).
    fn kv_block_bytes(&self, block_size: usize) -> usize;
    /// Bytes of memory free for the KV cache now, the weights loaded (host memory on the CPU).
    fn available_memory(&self) -> usize;
    /// The device's own memory, where the backend knows it (a GPU): total and free now.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Runs the largest step the scheduler can form — `tokens` tokens over `sequences`
    /// sequences, every one sampling — once, on a temporary cache of `block_size`-token blocks,
    /// and returns the bytes its activations took at their peak (as far as the device shows it),
    /// plus what CUDA graphs keep where they are on. Where nothing is measured (the CPU), 0.
    fn profile(&mut self, _tokens: usize, _sequences: usize, _block_size: usize) -> Result<usize> {
        Ok(0)
    }
    /// Allocates the KV cache: `blocks` blocks of `block_size` tokens.
    fn allocate_kv(&mut self, blocks: usize, block_size: usize) -> Result<()>;
    /// Runs one step: every sequence's tokens in one forward pass, their keys and values written
    /// through their block tables.
    fn execute(&mut self, batch: &[SeqInput<'_>]) -> Result<StepOutput>;
    /// Where the executor records failures found between steps, if it can have any.
    fn faults(&self) -> Option<FaultFlag> {
        None
    }
    /// Ranks the model is split over, in this process and the group's other pods; 1 for a whole
    /// model.
    fn tensor_parallel_size(&self) -> usize {
        1
    }
}

/// Where an executor records a failure found outside any step (a tensor-parallel rank in another
/// process went away while the engine was idle): the engine's readiness reads it.
pub type FaultFlag = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// A device's memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub total: usize,
    pub free: usize,
}

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// candle on CUDA, int8 on the CPU.
    #[default]
    Auto,
    Int8,
    Candle,
}

/// Which device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    EngineError::InvalidRequest(format!(
                        "device {other:?} is not cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The element type of the candle backend's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

/// Where and how a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendConfig {
    pub kind: BackendKind,
    pub device: DeviceSpec,
    /// `None`: bf16 on CUDA, f32 on the CPU.
    pub precision: Option<Precision>,
    /// Ranks the model is split over in this process (one per GPU from `device` on, or threads
    /// on the CPU); 0 or 1 for the whole model.
    pub tensor_parallel_size: usize,
    /// How the ranks add up their partial sums.
    pub collective: CollectiveKind,
    /// Decode steps replay CUDA graphs (`--cuda-graphs`; one whole model on one GPU).
    pub cuda_graphs: bool,
    /// The element type of the cached keys and values (`--kv-cache-dtype`).
    pub kv_cache: KvCacheType,
}

/// The element type of the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    /// The backend's own activation type (f32 on the int8 backend, `--dtype` on candle's).
    #[default]
    Auto,
    /// int8 with an f32 scale per token and KV head: a quarter of f32's bytes, a little over half
    /// of f16's. The int8 backend's, for now.
    Int8,
}

/// How tensor-parallel ranks add up their partial sums: in host memory (the CPU's threads and
/// processes; on CUDA a copy to the host and back each time), or on the GPUs through NCCL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveKind {
    /// NCCL on CUDA where its library opens, else the host.
    #[default]
    Auto,
    Host,
    /// NCCL, or an error saying why not. At tensor parallel size 1 it still builds a group of
    /// one rank with its communicator: the NCCL path checked on one GPU.
    Nccl,
}

impl BackendConfig {
    /// The backend `auto` means on this device.
    pub fn resolved_kind(&self) -> BackendKind {
        match (self.kind, self.device) {
            // Tensor parallelism runs on the candle backend.
            (BackendKind::Auto, _) if self.tensor_parallel_size > 1 => BackendKind::Candle,
            (BackendKind::Auto, DeviceSpec::Cpu) => BackendKind::Int8,
            (BackendKind::Auto, DeviceSpec::Cuda(_)) => BackendKind::Candle,
            (kind, _) => kind,
        }
    }

    /// The device of tensor-parallel rank `rank`: one GPU each from `device` on, or the CPU.
    pub fn rank_device(&self, rank: usize) -> DeviceSpec {
        match self.device {
            DeviceSpec::Cpu => DeviceSpec::Cpu,
            DeviceSpec::Cuda(first) => DeviceSpec::Cuda(first + rank),
        }
    }

    /// Whether the ranks sum on the GPUs through NCCL: `Ok(false)` for host sums, an error
    /// naming the problem where NCCL is asked for and cannot be had.
    pub fn uses_nccl(&self) -> Result<bool> {
        let cuda = matches!(self.device, DeviceSpec::Cuda(_));
        match self.collective {
            CollectiveKind::Host => Ok(false),
            CollectiveKind::Auto if cuda && !candle::nccl_present() => {
                tracing::warn!(
                    "NCCL is not available (libnccl.so does not open): tensor-parallel sums go \
                     through host memory"
                );
                Ok(false)
            }
            CollectiveKind::Auto => Ok(cuda),
            CollectiveKind::Nccl if !cuda => Err(EngineError::Unsupported(
                "--collective nccl sums on CUDA devices: use it with --device cuda".into(),
            )),
            CollectiveKind::Nccl if !candle::nccl_present() => Err(EngineError::Unsupported(
                "--collective nccl: NCCL is not available (this build has no CUDA support, or \
                 libnccl.so cannot be opened: put NCCL's library folder on LD_LIBRARY_PATH)"
                    .into(),
            )),
            CollectiveKind::Nccl => Ok(true),
        }
    }

    /// Whether `--kv-cache-dtype` can be had here: int8 keys and values are the int8 backend's.
    pub fn check_kv_cache(&self) -> Result<()> {
        if self.kv_cache == KvCacheType::Int8 && self.resolved_kind() != BackendKind::Int8 {
            return Err(EngineError::Unsupported(
                "--kv-cache-dtype int8: int8 keys and values are the int8 backend's (the CPU \
                 engine, --backend int8 or auto on the CPU); the candle backend, and so CUDA and \
                 tensor parallelism, keeps them in --dtype: use --kv-cache-dtype auto there"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether `--cuda-graphs` can be had here: on CUDA, for a whole model (a tensor-parallel
    /// rank's sums are not captured).
    pub fn check_cuda_graphs(&self) -> Result<()> {
        if !self.cuda_graphs {
            return Ok(());
        }
        let why = if self.device == DeviceSpec::Cpu {
            "decode steps are captured on CUDA devices: use it with --device cuda"
        } else if self.tensor_parallel_size > 1 || self.collective == CollectiveKind::Nccl {
            "not with tensor parallelism yet (a rank's sums are not captured): drop \
             --tensor-parallel-size or --collective nccl"
        } else {
            return Ok(());
        };
        Err(EngineError::Unsupported(format!("--cuda-graphs: {why}")))
    }

    pub fn resolved_precision(&self) -> Precision {
        self.precision.unwrap_or(match self.device {
            DeviceSpec::Cpu => Precision::F32,
            DeviceSpec::Cuda(_) => Precision::Bf16,
        })
    }
}

/// Builds the executor `backend` names from the model's files.
pub fn load(files: &mut ModelFiles, backend: &BackendConfig) -> Result<Box<dyn Executor>> {
    backend.check_cuda_graphs()?;
    backend.check_kv_cache()?;
    if backend.tensor_parallel_size > 1 || backend.collective == CollectiveKind::Nccl {
        return crate::engine::parallel::group::in_process(files, backend);
    }
    match (backend.resolved_kind(), backend.device) {
        (BackendKind::Int8, DeviceSpec::Cpu) => {
            Ok(Box::new(int8::Int8Executor::load(files, backend.kv_cache)?))
        }
        (BackendKind::Int8, DeviceSpec::Cuda(_)) => Err(EngineError::Unsupported(
            "the int8 backend runs on the CPU only: use --backend candle (or auto) on CUDA".into(),
        )),
        (_, device) => {
            let mut executor =
                candle::CandleExecutor::load(files, device, backend.resolved_precision())?;
            if backend.cuda_graphs {
                executor.use_cuda_graphs(true)?;
            }
            Ok(Box::new(executor))
        }
    }
}

/// What the GPU `device` names says of itself; `None` for the CPU. An error where this build
/// or machine has no such device.
pub fn gpu_facts(device: DeviceSpec) -> Result<Option<profile::GpuFacts>> {
    match device {
        DeviceSpec::Cpu => Ok(None),
        DeviceSpec::Cuda(_) => candle::gpu_facts(&candle::device(device)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_auto_picks_the_backend_per_device() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["gpu", "cuda:x", "cuda:"] {
            let error = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(error.contains("cpu, cuda or cuda:N"), "{bad}: {error}");
        }
        let on = |device| BackendConfig {
            device,
            ..BackendConfig::default()
        };
        assert_eq!(on(DeviceSpec::Cpu).resolved_kind(), BackendKind::Int8);
        assert_eq!(on(DeviceSpec::Cuda(0)).resolved_kind(), BackendKind::Candle);
        assert_eq!(on(DeviceSpec::Cpu).resolved_precision(), Precision::F32);
        assert_eq!(
            on(DeviceSpec::Cuda(1)).resolved_precision(),
            Precision::Bf16
        );
    }

    #[test]
    fn ranks_sum_through_nccl_only_on_cuda_and_asking_for_it_elsewhere_says_why() {
        let with = |device, collective| BackendConfig {
            device,
            collective,
            ..BackendConfig::default()
        };
        assert!(
            !with(DeviceSpec::Cpu, CollectiveKind::Auto)
                .uses_nccl()
                .unwrap()
        );
        assert!(
            !with(DeviceSpec::Cpu, CollectiveKind::Host)
                .uses_nccl()
                .unwrap()
        );
        assert!(
            !with(DeviceSpec::Cuda(0), CollectiveKind::Host)
                .uses_nccl()
                .unwrap()
        );
        let error = with(DeviceSpec::Cpu, CollectiveKind::Nccl)
            .uses_nccl()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--collective nccl") && error.contains("--device cuda"),
            "{error}"
        );
        // This build (no CUDA) never has NCCL: auto falls back to the host, nccl says why.
        assert_eq!(
            with(DeviceSpec::Cuda(0), CollectiveKind::Auto)
                .uses_nccl()
                .unwrap(),
            candle::nccl_present()
        );
        if !candle::nccl_present() {
            let error = with(DeviceSpec::Cuda(0), CollectiveKind::Nccl)
                .uses_nccl()
                .unwrap_err()
                .to_string();
            assert!(error.contains("NCCL is not available"), "{error}");
        }
    }
}
