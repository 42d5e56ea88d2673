//! The candle backend: a Llama over candle tensors on any candle device — the CPU here, CUDA in a
//! build with the `cuda` feature — in f32, f16 or bf16 (`--dtype`). Keys and values live in a
//! paged cache of device tensors; attention gathers each sequence's blocks (a fused paged
//! attention kernel is the CUDA build's job). Only the rows that sample come back: logits where
//! they are needed, the greedy token id (argmax on the device) where that is all.

#[cfg(feature = "cuda")]
pub mod cuda;
// The CPU build tests the layout; only the CUDA build replays graphs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod graphs;
mod load;
mod model;

#[cfg(feature = "cuda")]
use super::DeviceMemory;
use super::profile::GpuFacts;
use super::{Executor, Precision, RowOutput, SeqInput, StepOutput};
use crate::engine::backend::DeviceSpec;
use crate::engine::error::{EngineError, Result};
use crate::engine::model::LlamaConfig;
use crate::engine::model::loader::ModelFiles;
use crate::engine::parallel::Shard;
use crate::engine::parallel::collective::Collective;
use crate::engine::parallel::watchdog::GroupWatch;
use crate::engine::sampling::Draw;
use candle_core::{DType, Device, Tensor};
use load::backend_error;
use model::{
    AttentionInputs, Batch, DecodeRows, GatheredInputs, LayerCache, Llama, PagedInputs,
    PrefillChunk,
};
use std::sync::Arc;

/// The candle model, its KV cache and its device.
#[derive(Debug)]
pub struct CandleExecutor {
    model: Llama,
    device: Device,
    spec: DeviceSpec,
    dtype: DType,
    cache: Vec<LayerCache>,
    block_size: usize,
    /// The device's kernels while the gathering path is chosen ([`Self::use_kernels`]).
    set_aside: Option<Box<dyn model::PagedKernels>>,
    /// Decode steps replay CUDA graphs ([`Self::use_cuda_graphs`]).
    cuda_graphs: bool,
    /// The graphs captured over the current KV cache, from its first decode step on.
    #[cfg(feature = "cuda")]
    graphs: Option<cuda::graphs::DecodeGraphs>,
}

/// The cache row of a sequence's `position`, through its block table.
fn slot(blocks: &[u32], block_size: usize, position: usize) -> u32 {
    blocks[position / block_size] * block_size as u32 + (position % block_size) as u32
}

fn u32s(values: Vec<u32>, device: &Device) -> candle_core::Result<Tensor> {
    let n = values.len();
    Tensor::from_vec(values, n, device)
}

/// What the largest step's activations take at least: the residual stream and its norm, the
/// Q/K/V and gate/up products, the attention output, and the logits rows (in the model's type
/// and in f32), with a fifth more for what the libraries keep.
fn activation_estimate(c: &LlamaConfig, tokens: usize, rows: usize, dtype: DType) -> usize {
    let qkv = (c.heads + 2 * c.kv_heads) * c.head_dim;
    let per_token = 3 * c.hidden_size + qkv + c.heads * c.head_dim + 3 * c.intermediate_size;
    let bytes = tokens * per_token * dtype.size_in_bytes()
        + rows * c.vocab_size * (dtype.size_in_bytes() + 4);
    bytes + bytes / 5
}

fn dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

/// The device `spec` names, or an error that says what this build lacks.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::Unsupported(
                    "--device cuda: this build has no CUDA support; build the agent with the \
                     `cuda` cargo feature (scripts/build-cuda), or use --device cpu"
                        .into(),
                ));
            }
            #[cfg(feature = "cuda")]
            if !cuda::driver_present() {
                return Err(EngineError::Unsupported(
                    "--device cuda: no NVIDIA driver here (libcuda.so cannot be opened); use \
                     --device cpu"
                        .into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(backend_error)
        }
    }
}

/// What a GPU says of itself; `None` for the CPU.
pub fn gpu_facts(device: &Device) -> Result<Option<GpuFacts>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let facts = cuda::facts(device).map_err(backend_error)?;
        return Ok(Some(GpuFacts {
            name: facts.name,
            total_memory: facts.total_memory,
        }));
    }
    let _ = device;
    Ok(None)
}

/// Whether NCCL can sum on the GPUs here: the CUDA build, with libnccl openable.
pub fn nccl_present() -> bool {
    #[cfg(feature = "cuda")]
    return cuda::driver_present() && cuda::nccl::present();
    #[cfg(not(feature = "cuda"))]
    false
}

/// A new NCCL unique id for a group (made by global rank 0's process, sent to the others).
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    #[cfg(feature = "cuda")]
    return cuda::nccl::unique_id().map_err(EngineError::DeviceFault);
    #[cfg(not(feature = "cuda"))]
    Err(no_nccl())
}

#[cfg(not(feature = "cuda"))]
fn no_nccl() -> EngineError {
    EngineError::Unsupported("NCCL needs the CUDA build of the agent (scripts/build-cuda)".into())
}

/// Where one process's ranks stand in their group's NCCL communicator.
#[derive(Debug, Clone, Copy)]
pub struct NcclPlace<'a> {
    /// The group's unique id (global rank 0's process made it).
    pub id: &'a [u8],
    /// Global rank of this process's first rank, and the group's size.
    pub first: usize,
    pub world: usize,
    /// How long every rank of the group (in every process) has to join.
    pub join: std::time::Duration,
    /// How long one all-reduce may take on the GPU before the group is failed.
    pub deadline: std::time::Duration,
}

/// Joins this process's ranks — global ranks from `place.first`, one GPU each — to the group's
/// NCCL communicator; from then on their partial sums are added on the GPUs, and `watch` ties
/// the communicators' failures to the group's.
pub fn join_nccl(
    ranks: &mut [CandleExecutor],
    place: NcclPlace<'_>,
    watch: GroupWatch,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let streams = ranks
            .iter()
            .map(|r| {
                Ok(r.device
                    .as_cuda_device()
                    .map_err(backend_error)?
                    .cuda_stream())
            })
            .collect::<Result<Vec<_>>>()?;
        let comms =
            cuda::nccl::init(&streams, &place, &watch.broken).map_err(EngineError::DeviceFault)?;
        cuda::nccl::watch(&comms, watch).map_err(EngineError::DeviceFault)?;
        for (rank, comm) in ranks.iter_mut().zip(comms) {
            rank.model.nccl = Some(comm);
        }
        tracing::info!(
            first = place.first,
            ranks = ranks.len(),
            world = place.world,
            "this process's tensor-parallel ranks sum on their GPUs through NCCL"
        );
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ranks, place, watch);
        Err(no_nccl())
    }
}

impl CandleExecutor {
    /// The whole model on one device.
    pub fn load(files: &mut ModelFiles, spec: DeviceSpec, precision: Precision) -> Result<Self> {
        Self::load_shard(files, spec, precision, Shard::WHOLE, None)
    }

    /// `shard`'s part of the model on one device, its partial sums all-reduced through
    /// `collective` (see [`crate::engine::parallel`]).
    pub fn load_shard(
        files: &mut ModelFiles,
        spec: DeviceSpec,
        precision: Precision,
        shard: Shard,
        collective: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let device = device(spec)?;
        let dtype = dtype(precision);
        #[allow(unused_mut)]
        let mut model = load::build(files, &device, dtype, shard, collective)?;
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let kernels = cuda::Kernels::compile(&device, &model.config, dtype).map_err(|e| {
                EngineError::DeviceFault(format!("compiling the CUDA kernels: {e}"))
            })?;
            model.paged = Some(Box::new(kernels));
        }
        Ok(Self {
            model,
            device,
            spec,
            dtype,
            cache: Vec::new(),
            block_size: 0,
            set_aside: None,
            cuda_graphs: false,
            #[cfg(feature = "cuda")]
            graphs: None,
        })
    }

    /// Replays decode steps from CUDA graphs (`--cuda-graphs`), or stops: graphs need a CUDA
    /// device with the fused kernels and the whole model on it (a tensor-parallel rank's sums are
    /// not captured).
    pub fn use_cuda_graphs(&mut self, on: bool) -> Result<()> {
        if !on {
            self.cuda_graphs = false;
            self.drop_graphs();
            return Ok(());
        }
        let unsupported =
            |why: &str| Err(EngineError::Unsupported(format!("--cuda-graphs: {why}")));
        if !cfg!(feature = "cuda") {
            return unsupported("this build has no CUDA support (build with --features cuda)");
        }
        if !self.device.is_cuda() || self.model.paged.is_none() {
            return unsupported("decode steps are captured on CUDA devices: use --device cuda");
        }
        if self.model.collective.is_some() {
            return unsupported("not with tensor parallelism (a rank's sums are not captured)");
        }
        self.cuda_graphs = true;
        Ok(())
    }

    /// Forgets the captured graphs (they hold the cache's addresses and the block size).
    fn drop_graphs(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.graphs = None;
        }
    }

    /// Whether the device has fused kernels (the CUDA build on a GPU).
    pub fn has_kernels(&self) -> bool {
        self.model.paged.is_some() || self.set_aside.is_some()
    }

    /// Chooses the device's fused kernels (`true`, the default where there are any) or the
    /// gathering path, their reference (`false`).
    pub fn use_kernels(&mut self, on: bool) {
        if on && self.model.paged.is_none() {
            self.model.paged = self.set_aside.take();
        } else if !on && self.model.paged.is_some() {
            self.set_aside = self.model.paged.take();
        }
    }

    /// Samples `rows` (`[n, vocab]` f32 on the host) as `draws` say, through the path a step
    /// takes: on the device with its kernel where it has one, else on the host; and the seconds
    /// the device took (the rows' upload excluded).
    pub fn sample_rows(
        &self,
        rows: &[f32],
        vocab: usize,
        draws: &[Draw],
    ) -> candle_core::Result<(Vec<u32>, f64)> {
        let logits = self.on_device(rows, vocab)?;
        let began = std::time::Instant::now();
        let ids = self.sample(&logits, draws)?;
        Ok((ids, began.elapsed().as_secs_f64()))
    }

    /// Seconds to copy `rows` (`[n, vocab]` f32) from the device to the host, as a step that
    /// samples on the host does.
    pub fn copy_rows_seconds(&self, rows: &[f32], vocab: usize) -> candle_core::Result<f64> {
        let logits = self.on_device(rows, vocab)?;
        let began = std::time::Instant::now();
        let copied: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        std::hint::black_box(copied);
        Ok(began.elapsed().as_secs_f64())
    }

    /// Host rows (`[n, vocab]` f32) as a tensor on the device, the upload finished.
    fn on_device(&self, rows: &[f32], vocab: usize) -> candle_core::Result<Tensor> {
        let logits = Tensor::from_slice(rows, (rows.len() / vocab.max(1), vocab), &self.device)?;
        self.device.synchronize()?;
        Ok(logits)
    }

    /// One token per row of `logits` as `draws` say: by the device's kernel where it has one,
    /// else on the host.
    fn sample(&self, logits: &Tensor, draws: &[Draw]) -> candle_core::Result<Vec<u32>> {
        match &self.model.paged {
            Some(kernels) => kernels.sample_rows(logits, draws),
            None => model::sample_rows_on_host(logits, draws),
        }
    }

    /// The device tensors of one step.
    fn batch(&self, batch: &[SeqInput<'_>]) -> candle_core::Result<Batch> {
        let bs = self.block_size;
        let device = &self.device;
        let (mut ids, mut positions, mut slots, mut last) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for seq in batch {
            ids.extend_from_slice(seq.tokens);
            for i in 0..seq.tokens.len() {
                positions.push((seq.start + i) as u32);
                slots.push(slot(seq.blocks, bs, seq.start + i));
            }
            if seq.output != RowOutput::None {
                last.push((ids.len() - 1) as u32);
            }
        }
        let attention = if self.model.paged.is_some() {
            AttentionInputs::Paged(self.paged_inputs(batch, slots)?)
        } else {
            AttentionInputs::Gathered(self.gathered_inputs(batch, slots)?)
        };
        Ok(Batch {
            ids: u32s(ids, device)?,
            positions: u32s(positions, device)?,
            last: if last.is_empty() {
                None
            } else {
                Some(u32s(last, device)?)
            },
            attention,
        })
    }

    /// The kernels' inputs: each token's slot and sequence, and the block tables padded to the
    /// longest (with block 0, never read: a token reads only up to its own position).
    fn paged_inputs(
        &self,
        batch: &[SeqInput<'_>],
        slots: Vec<u32>,
    ) -> candle_core::Result<PagedInputs> {
        let device = &self.device;
        let longest = batch
            .iter()
            .map(|s| s.blocks.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut tables = Vec::with_capacity(batch.len() * longest);
        let mut token_seq = Vec::with_capacity(slots.len());
        for (s, seq) in batch.iter().enumerate() {
            tables.extend_from_slice(seq.blocks);
            tables.extend(std::iter::repeat_n(0, longest - seq.blocks.len()));
            token_seq.extend(std::iter::repeat_n(s as u32, seq.tokens.len()));
        }
        Ok(PagedInputs {
            slots: u32s(slots, device)?,
            tables: Tensor::from_vec(tables, (batch.len(), longest), device)?,
            token_seq: u32s(token_seq, device)?,
            block_size: self.block_size,
        })
    }

    /// The gathering path's inputs: single-token rows attend together, padded to the longest
    /// context and masked; longer chunks one by one.
    fn gathered_inputs(
        &self,
        batch: &[SeqInput<'_>],
        slots: Vec<u32>,
    ) -> candle_core::Result<GatheredInputs> {
        let bs = self.block_size;
        let device = &self.device;
        let width = self.model.config.kv_width();
        let (mut singles, mut chunks) = (Vec::new(), Vec::new());
        let mut tokens = 0;
        for seq in batch {
            if seq.tokens.len() == 1 {
                singles.push((tokens, seq));
            } else {
                chunks.push((tokens, seq));
            }
            tokens += seq.tokens.len();
        }
        let decode = if singles.is_empty() {
            None
        } else {
            let longest = singles.iter().map(|(_, s)| s.start + 1).max().unwrap_or(1);
            let mut context = Vec::with_capacity(singles.len() * longest);
            let mut mask = Vec::with_capacity(singles.len() * longest);
            for (_, seq) in &singles {
                let len = seq.start + 1;
                for p in 0..longest {
                    // Padding reads a valid row (this sequence's first) and is masked out.
                    context.push(slot(seq.blocks, bs, if p < len { p } else { 0 }));
                    mask.push(if p < len { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            let rows = singles.len();
            Some(DecodeRows {
                tokens: u32s(singles.iter().map(|(t, _)| *t as u32).collect(), device)?,
                context: Tensor::from_vec(context, (rows, longest), device)?,
                mask: Tensor::from_vec(mask, (rows, 1, 1, longest), device)?,
            })
        };
        let prefill = chunks
            .iter()
            .map(|(first, seq)| {
                let context = (0..seq.start + seq.tokens.len())
                    .map(|p| slot(seq.blocks, bs, p))
                    .collect();
                Ok(PrefillChunk {
                    first: *first,
                    count: seq.tokens.len(),
                    start: seq.start,
                    context: u32s(context, device)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Attention outputs come decode rows first, then the chunks: where each token's is.
        let mut at = vec![0u32; tokens];
        let mut next = 0u32;
        for (first, _) in &singles {
            at[*first] = next;
            next += 1;
        }
        for (first, seq) in &chunks {
            for i in 0..seq.tokens.len() {
                at[first + i] = next;
                next += 1;
            }
        }
        let in_order = at.iter().enumerate().all(|(i, a)| *a as usize == i);
        Ok(GatheredInputs {
            slots: u32s(slots, device)?
                .unsqueeze(1)?
                .broadcast_as((tokens, width))?
                .contiguous()?,
            decode,
            prefill,
            order: if in_order {
                None
            } else {
                Some(u32s(at, device)?)
            },
        })
    }

    /// A decode step through its CUDA graph, where graphs are on and can run it: its logits,
    /// and whether a graph ran it (rather than the step that captures one).
    #[cfg(feature = "cuda")]
    fn graph_step(
        &mut self,
        batch: &[SeqInput<'_>],
    ) -> candle_core::Result<Option<(Tensor, bool)>> {
        if !self.cuda_graphs || self.model.paged.is_none() {
            return Ok(None);
        }
        let graphs = match &mut self.graphs {
            Some(graphs) => graphs,
            None => {
                let c = &self.model.config;
                self.graphs.insert(cuda::graphs::DecodeGraphs::new(
                    &self.device,
                    c.vocab_size,
                    self.block_size,
                    graphs::max_width(c.context_length, self.block_size),
                )?)
            }
        };
        if !graphs.working() {
            return Ok(None);
        }
        let Some(plan) = graphs::DecodePlan::of(batch, self.block_size, graphs.max_width()) else {
            return Ok(None);
        };
        graphs.run(&self.model, &self.cache, &plan).map(Some)
    }

    #[cfg(not(feature = "cuda"))]
    fn graph_step(&mut self, _: &[SeqInput<'_>]) -> candle_core::Result<Option<(Tensor, bool)>> {
        Ok(None)
    }

    /// The step's logits (f32, a row per sequence with output), and whether a CUDA graph ran it.
    fn logits(&mut self, batch: &[SeqInput<'_>]) -> candle_core::Result<Option<(Tensor, bool)>> {
        if let Some(graphed) = self.graph_step(batch)? {
            return Ok(Some(graphed));
        }
        let device_batch = self.batch(batch)?;
        Ok(self
            .model
            .forward(&device_batch, &self.cache)?
            .map(|logits| (logits, false)))
    }

    fn step(&mut self, batch: &[SeqInput<'_>]) -> candle_core::Result<StepOutput> {
        let Some((logits, replayed)) = self.logits(batch)? else {
            return Ok(StepOutput::default());
        };
        let outputs: Vec<RowOutput> = batch
            .iter()
            .map(|s| s.output)
            .filter(|o| *o != RowOutput::None)
            .collect();
        let rows_of = |wanted: RowOutput| -> Vec<u32> {
            (0..outputs.len() as u32)
                .filter(|r| outputs[*r as usize] == wanted)
                .collect()
        };
        let full = rows_of(RowOutput::Logits);
        // Rows whose token the device picks: greedy, or sampled as their draw says.
        let (picked, draws): (Vec<u32>, Vec<Draw>) = outputs
            .iter()
            .enumerate()
            .filter_map(|(r, o)| match o {
                RowOutput::Argmax => Some((r as u32, Draw::greedy())),
                RowOutput::Sample(draw) => Some((r as u32, *draw)),
                _ => None,
            })
            .unzip();
        let select = |rows: Vec<u32>| -> candle_core::Result<Tensor> {
            if rows.len() == outputs.len() {
                return Ok(logits.clone());
            }
            let n = rows.len();
            logits.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)
        };
        let mut out = StepOutput {
            replayed,
            ..StepOutput::default()
        };
        if !full.is_empty() {
            out.logits = select(full)?.flatten_all()?.to_vec1()?;
        }
        if draws.iter().all(|d| d.temperature == 0.0) {
            if !picked.is_empty() {
                out.argmax = select(picked)?.argmax(1)?.to_vec1()?;
            }
        } else {
            out.argmax = self.sample(&select(picked)?, &draws)?;
        }
        Ok(out)
    }
}

impl Executor for CandleExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    fn describe(&self) -> String {
        format!("candle {:?} on {}", self.dtype, self.spec).to_lowercase()
    }

    fn kv_dtype(&self) -> &'static str {
        match self.dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
    }

    fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let m = &self.model;
        let layers: usize = m
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.qkv,
                    &l.out,
                    &l.ffn_norm,
                    &l.gate_up,
                    &l.down,
                ]
                .into_iter()
                .map(bytes)
                .sum::<usize>()
            })
            .sum();
        let head = match &m.lm_head {
            Some(head) if !m.tied => bytes(head),
            _ => 0,
        };
        bytes(&m.embed) + head + bytes(&m.norm) + layers
    }

    fn kv_block_bytes(&self, block_size: usize) -> usize {
        let c = &self.model.config;
        2 * c.layers * block_size * c.kv_width() * self.dtype.size_in_bytes()
    }

    fn available_memory(&self) -> usize {
        match self.device_memory() {
            Some(memory) => memory.free,
            None => super::int8::available_memory(),
        }
    }

    #[cfg(feature = "cuda")]
    fn device_memory(&self) -> Option<DeviceMemory> {
        if !self.device.is_cuda() {
            return None;
        }
        let facts = cuda::facts(&self.device).ok()?;
        Some(DeviceMemory {
            total: facts.total_memory,
            free: facts.free_memory,
        })
    }

    fn profile(&mut self, tokens: usize, sequences: usize, block_size: usize) -> Result<usize> {
        let Some(before_cache) = self.device_memory() else {
            return Ok(0);
        };
        let estimate = activation_estimate(&self.model.config, tokens, sequences, self.dtype);
        // A temporary cache for the profiling step: every sequence needs its own blocks.
        let c = &self.model.config;
        let (vocab, context) = (c.vocab_size as u32, c.context_length);
        let sequences = sequences.clamp(1, tokens.max(1));
        let first = tokens.saturating_sub(sequences - 1).clamp(1, context);
        let blocks_each = first.div_ceil(block_size);
        self.allocate_kv(blocks_each * sequences, block_size)?;
        let tables: Vec<Vec<u32>> = (0..sequences as u32)
            .map(|s| {
                (0..blocks_each as u32)
                    .map(|b| s * blocks_each as u32 + b)
                    .collect()
            })
            .collect();
        let ids: Vec<u32> = (0..first as u32).map(|i| i % vocab).collect();
        let batch: Vec<SeqInput<'_>> = tables
            .iter()
            .enumerate()
            .map(|(s, blocks)| SeqInput {
                tokens: if s == 0 { &ids } else { &ids[..1] },
                start: 0,
                blocks,
                output: RowOutput::Logits,
            })
            .collect();
        let before = self.device_memory().unwrap_or(before_cache);
        let stepped = self.execute(&batch).and_then(|_| {
            self.device.synchronize().map_err(backend_error)?;
            Ok(self.device_memory().unwrap_or(before))
        });
        self.cache.clear();
        self.drop_graphs();
        let after = stepped.map_err(|e| {
            EngineError::DoesNotFit(format!(
                "the largest step ({tokens} tokens over {sequences} sequences) failed on the \
                 device before the KV cache was sized: {e}"
            ))
        })?;
        let measured = before.free.saturating_sub(after.free);
        // Decode graphs keep their buffers and their own activations beside the eager steps'.
        let c = &self.model.config;
        let graphs = if self.cuda_graphs {
            let largest = graphs::MAX_GRAPH_BATCH;
            graphs::reserved_bytes(
                c.vocab_size,
                graphs::max_width(c.context_length, block_size),
                activation_estimate(c, largest, largest, self.dtype),
            )
        } else {
            0
        };
        tracing::info!(
            estimate_mib = estimate >> 20,
            measured_mib = measured >> 20,
            cuda_graphs_mib = graphs >> 20,
            "profiled the largest step"
        );
        Ok(measured.max(estimate) + graphs)
    }

    fn allocate_kv(&mut self, blocks: usize, block_size: usize) -> Result<()> {
        // Graphs hold the old cache's addresses.
        self.drop_graphs();
        let c = &self.model.config;
        let shape = (blocks * block_size, c.kv_width());
        let zeros = || Tensor::zeros(shape, self.dtype, &self.device).map_err(backend_error);
        self.cache = (0..c.layers)
            .map(|_| {
                Ok(LayerCache {
                    keys: zeros()?,
                    values: zeros()?,
                })
            })
            .collect::<Result<_>>()?;
        self.block_size = block_size;
        Ok(())
    }

    fn execute(&mut self, batch: &[SeqInput<'_>]) -> Result<StepOutput> {
        if self.cache.is_empty() {
            return Err(EngineError::Backend {
                backend: "candle",
                reason: "a step before the KV cache was allocated".into(),
            });
        }
        let output = self.step(batch).map_err(|e| {
            if self.device.is_cuda() {
                // A CUDA error may have poisoned the context: nothing runs on it again.
                EngineError::DeviceFault(e.to_string())
            } else {
                backend_error(e)
            }
        })?;
        // Sums aborted while the step ran leave its output meaningless.
        #[cfg(feature = "cuda")]
        if let Some(reason) = self.model.nccl.as_ref().and_then(|c| c.failure()) {
            return Err(EngineError::DeviceFault(reason));
        }
        Ok(output)
    }
}
