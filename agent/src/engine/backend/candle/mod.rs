//! The candle backend: a Llama over candle tensors on any candle device — the CPU here, CUDA in a
//! build with the `cuda` feature — in f32, f16 or bf16 (`--dtype`). Keys and values live in a
//! paged cache of device tensors; attention gathers each sequence's blocks (a fused paged
//! attention kernel is the CUDA build's job). Only the rows that sample come back: logits where
//! they are needed, the greedy token id (argmax on the device) where that is all.

mod load;
mod model;

use super::{Executor, Precision, RowOutput, SeqInput, StepOutput};
use crate::engine::backend::DeviceSpec;
use crate::engine::error::{EngineError, Result};
use crate::engine::model::LlamaConfig;
use crate::engine::model::loader::ModelFiles;
use candle_core::{DType, Device, Tensor};
use load::backend_error;
use model::{Batch, DecodeRows, LayerCache, Llama, PrefillChunk};

/// The candle model, its KV cache and its device.
#[derive(Debug)]
pub struct CandleExecutor {
    model: Llama,
    device: Device,
    spec: DeviceSpec,
    dtype: DType,
    cache: Vec<LayerCache>,
    block_size: usize,
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
            Device::new_cuda(ordinal).map_err(backend_error)
        }
    }
}

impl CandleExecutor {
    pub fn load(files: &mut ModelFiles, spec: DeviceSpec, precision: Precision) -> Result<Self> {
        let device = device(spec)?;
        let dtype = dtype(precision);
        let model = load::build(files, &device, dtype)?;
        Ok(Self {
            model,
            device,
            spec,
            dtype,
            cache: Vec::new(),
            block_size: 0,
        })
    }

    /// The device tensors of one step.
    fn batch(&self, batch: &[SeqInput<'_>]) -> candle_core::Result<Batch> {
        let bs = self.block_size;
        let device = &self.device;
        let width = self.model.config.kv_width();
        let slot = |blocks: &[u32], position: usize| {
            blocks[position / bs] * bs as u32 + (position % bs) as u32
        };
        let u32s = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, n, device)
        };
        let (mut ids, mut positions, mut slots, mut last) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Single-token rows attend together; longer chunks one by one.
        let (mut singles, mut chunks) = (Vec::new(), Vec::new());
        for seq in batch {
            let first = ids.len();
            ids.extend_from_slice(seq.tokens);
            for i in 0..seq.tokens.len() {
                positions.push((seq.start + i) as u32);
                slots.push(slot(seq.blocks, seq.start + i));
            }
            if seq.output != RowOutput::None {
                last.push((ids.len() - 1) as u32);
            }
            if seq.tokens.len() == 1 {
                singles.push((first, seq));
            } else {
                chunks.push((first, seq));
            }
        }
        let tokens = ids.len();
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
                    context.push(slot(seq.blocks, if p < len { p } else { 0 }));
                    mask.push(if p < len { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            let rows = singles.len();
            Some(DecodeRows {
                tokens: u32s(singles.iter().map(|(t, _)| *t as u32).collect())?,
                context: Tensor::from_vec(context, (rows, longest), device)?,
                mask: Tensor::from_vec(mask, (rows, 1, 1, longest), device)?,
            })
        };
        let prefill = chunks
            .iter()
            .map(|(first, seq)| {
                let context = (0..seq.start + seq.tokens.len())
                    .map(|p| slot(seq.blocks, p))
                    .collect();
                Ok(PrefillChunk {
                    first: *first,
                    count: seq.tokens.len(),
                    start: seq.start,
                    context: u32s(context)?,
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
        Ok(Batch {
            ids: u32s(ids)?,
            positions: u32s(positions)?,
            slots: u32s(slots)?
                .unsqueeze(1)?
                .broadcast_as((tokens, width))?
                .contiguous()?,
            decode,
            prefill,
            order: if in_order { None } else { Some(u32s(at)?) },
            last: if last.is_empty() {
                None
            } else {
                Some(u32s(last)?)
            },
        })
    }

    fn step(&mut self, batch: &[SeqInput<'_>]) -> candle_core::Result<StepOutput> {
        let device_batch = self.batch(batch)?;
        let Some(logits) = self.model.forward(&device_batch, &self.cache)? else {
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
        let (full, greedy) = (rows_of(RowOutput::Logits), rows_of(RowOutput::Argmax));
        let select = |rows: Vec<u32>| -> candle_core::Result<Tensor> {
            if rows.len() == outputs.len() {
                return Ok(logits.clone());
            }
            let n = rows.len();
            logits.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)
        };
        let mut out = StepOutput::default();
        if !full.is_empty() {
            out.logits = select(full)?.flatten_all()?.to_vec1()?;
        }
        if !greedy.is_empty() {
            out.argmax = select(greedy)?.argmax(1)?.to_vec1()?;
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
        let head = if m.tied { 0 } else { bytes(&m.lm_head) };
        bytes(&m.embed) + head + bytes(&m.norm) + layers
    }

    fn kv_block_bytes(&self, block_size: usize) -> usize {
        let c = &self.model.config;
        2 * c.layers * block_size * c.kv_width() * self.dtype.size_in_bytes()
    }

    fn available_memory(&self) -> usize {
        match self.spec {
            DeviceSpec::Cpu => super::int8::available_memory(),
            // Sizing the cache from the card's free memory comes with the CUDA build; until
            // then `--kv-blocks` sizes it there.
            DeviceSpec::Cuda(_) => 0,
        }
    }

    fn allocate_kv(&mut self, blocks: usize, block_size: usize) -> Result<()> {
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
        self.step(batch).map_err(backend_error)
    }
}
