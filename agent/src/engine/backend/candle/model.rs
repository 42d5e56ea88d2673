//! The Llama architecture over candle tensors, on any candle device and in any float type: one
//! forward pass over a ragged batch (prefill chunks and decode tokens of many sequences), keys
//! and values written into a paged cache of device tensors through each token's slot, attention
//! read through each sequence's block table. Two ways to attend: fused kernels where the device
//! has them ([`PagedKernels`]: the CUDA build's rotary-and-cache-write and paged attention), else
//! by gathering each sequence's cached rows — single-token rows together, padded to the longest
//! context and masked, prefill chunks one sequence at a time with a causal mask — which is also
//! the kernels' reference. Softmax and norms accumulate in f32.

use crate::engine::model::{LlamaConfig, RopeStyle};
use crate::engine::parallel::collective::Collective;
use crate::engine::sampling::{Draw, draw_token};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// One transformer block, Q/K/V and gate/up fused into one matrix each (one GEMM each).
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Tensor,
    /// Rows: queries (heads × head_dim), then keys, then values.
    pub qkv: Tensor,
    pub out: Tensor,
    pub ffn_norm: Tensor,
    /// Rows: gate, then up.
    pub gate_up: Tensor,
    pub down: Tensor,
}

/// Device kernels that replace the gathered attention — the rotary embedding fused with the
/// KV-cache write, and attention read through the block tables — and fuse SwiGLU's two
/// element-wise ops.
pub trait PagedKernels: std::fmt::Debug + Send + Sync {
    /// Rotates the query and key heads of `qkv` (`[tokens, (heads + 2 kv) × dim]`) in place at
    /// `positions` (rotary tables `cos`/`sin` of every position) and writes keys and values into
    /// the caches at `slots` (`[tokens]`).
    #[allow(clippy::too_many_arguments)]
    fn rope_and_cache(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        positions: &Tensor,
        slots: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<()>;

    /// Every token's attention over its sequence's cached positions up to its own: `tables`
    /// `[sequences, max_blocks]`, `token_seq` and `token_pos` `[tokens]`. `[tokens, heads × dim]`.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        qkv: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        tables: &Tensor,
        token_seq: &Tensor,
        token_pos: &Tensor,
        block_size: usize,
    ) -> Result<Tensor>;

    /// One token per row of `logits` (`[rows, vocab]`, f32) as each row's draw says, picked on
    /// the device: what `sampling::draw_token` computes on the host.
    fn sample_rows(&self, logits: &Tensor, draws: &[Draw]) -> Result<Vec<u32>>;

    /// `SiLU(gate) × up` of each row of `gate_up` (`[tokens, 2 × ffn]`: gate, then up), in f32
    /// and rounded once. `[tokens, ffn]`.
    fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor>;
}

/// One token per row of `logits` as each row's draw says, on the host (rows copied over).
pub fn sample_rows_on_host(logits: &Tensor, draws: &[Draw]) -> Result<Vec<u32>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows
        .iter()
        .zip(draws)
        .map(|(row, draw)| draw_token(row, draw))
        .collect())
}

/// The weights, and the rotary tables, on one device in one type.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The embedding itself when the model ties them (`tied`); only on the rank that computes
    /// logits (rank 0 of a tensor-parallel group).
    pub lm_head: Option<Tensor>,
    pub tied: bool,
    /// `[context, head_dim / 2]`, in the model's type.
    pub cos: Tensor,
    pub sin: Tensor,
    /// The device's fused kernels, where it has them.
    pub paged: Option<Box<dyn PagedKernels>>,
    /// The other ranks of a tensor-parallel group: attention and MLP outputs are partial sums
    /// until all-reduced (`config` is then this rank's slice).
    pub collective: Option<Arc<dyn Collective>>,
    /// The group's NCCL communicator, where the ranks sum on the GPUs (then `collective` only
    /// carries the group's failures).
    #[cfg(feature = "cuda")]
    pub nccl: Option<Arc<super::cuda::nccl::Comm>>,
}

/// Keys and values of one layer: `[blocks × block_size, kv_heads × head_dim]` each.
#[derive(Debug)]
pub struct LayerCache {
    pub keys: Tensor,
    pub values: Tensor,
}

/// What a step runs, as device tensors built once and shared by every layer.
#[derive(Debug)]
pub struct Batch {
    /// Token ids, `[tokens]`.
    pub ids: Tensor,
    /// Each token's position, `[tokens]`.
    pub positions: Tensor,
    /// The tokens whose final hidden state gives logits, `[rows]`.
    pub last: Option<Tensor>,
    pub attention: AttentionInputs,
}

/// What attention reads, for the kernels or for the gathering path.
#[derive(Debug)]
pub enum AttentionInputs {
    Paged(PagedInputs),
    Gathered(GatheredInputs),
}

#[derive(Debug)]
pub struct PagedInputs {
    /// Each token's cache row, `[tokens]`.
    pub slots: Tensor,
    /// Each sequence's blocks, padded: `[sequences, max_blocks]`.
    pub tables: Tensor,
    /// Each token's sequence, `[tokens]`.
    pub token_seq: Tensor,
    pub block_size: usize,
}

#[derive(Debug)]
pub struct GatheredInputs {
    /// Each token's cache row, repeated across the cache width: `[tokens, width]`.
    pub slots: Tensor,
    /// Rows of one token each (decodes, mostly), attended together.
    pub decode: Option<DecodeRows>,
    /// Prefill chunks: first token index, token count, the chunk's first position, and its
    /// context's cache rows (`[start + count]`).
    pub prefill: Vec<PrefillChunk>,
    /// Token order of the attention outputs (decode rows first, then prefill chunks) back to the
    /// batch's order, when they differ.
    pub order: Option<Tensor>,
}

#[derive(Debug)]
pub struct DecodeRows {
    /// Their token indices in the batch, `[rows]`.
    pub tokens: Tensor,
    /// The cache rows of each one's context, padded to the longest: `[rows, longest]`.
    pub context: Tensor,
    /// 0 for context, −∞ for padding: `[rows, 1, 1, longest]` (f32).
    pub mask: Tensor,
}

#[derive(Debug)]
pub struct PrefillChunk {
    pub first: usize,
    pub count: usize,
    pub start: usize,
    pub context: Tensor,
}

impl Llama {
    /// Runs one step; the hidden states' logits for `batch.last` (f32), if any.
    pub fn forward(&self, batch: &Batch, cache: &[LayerCache]) -> Result<Option<Tensor>> {
        let c = &self.config;
        let mut x = self.embed.index_select(&batch.ids, 0)?;
        // The gathering path rotates with each token's own angles.
        let angles = match &batch.attention {
            AttentionInputs::Gathered(_) => Some((
                self.cos.index_select(&batch.positions, 0)?,
                self.sin.index_select(&batch.positions, 0)?,
            )),
            AttentionInputs::Paged(_) => None,
        };
        for (layer, kv) in self.layers.iter().zip(cache) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let qkv = h.matmul(&layer.qkv.t()?)?;
            let attn = match (&batch.attention, &self.paged, &angles) {
                (AttentionInputs::Paged(inputs), Some(kernels), _) => {
                    kernels.rope_and_cache(
                        &qkv,
                        &self.cos,
                        &self.sin,
                        &batch.positions,
                        &inputs.slots,
                        &kv.keys,
                        &kv.values,
                    )?;
                    kernels.paged_attention(
                        &qkv,
                        &kv.keys,
                        &kv.values,
                        &inputs.tables,
                        &inputs.token_seq,
                        &batch.positions,
                        inputs.block_size,
                    )?
                }
                (AttentionInputs::Gathered(inputs), _, Some((cos, sin))) => {
                    self.gathered_attention(kv, inputs, &qkv, cos, sin)?
                }
                _ => candle_core::bail!("paged attention inputs without paged kernels"),
            };
            x = (x + self.all_reduce(attn.matmul(&layer.out.t()?)?)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = h.matmul(&layer.gate_up.t()?)?;
            let act = match (&batch.attention, &self.paged) {
                (AttentionInputs::Paged(_), Some(kernels)) => kernels.silu_and_mul(&gate_up)?,
                _ => {
                    let ffn = c.intermediate_size;
                    (candle_nn::ops::silu(&gate_up.narrow(1, 0, ffn)?)?
                        * gate_up.narrow(1, ffn, ffn)?)?
                }
            };
            x = (x + self.all_reduce(act.matmul(&layer.down.t()?)?)?)?;
        }
        let (Some(last), Some(lm_head)) = (&batch.last, &self.lm_head) else {
            return Ok(None);
        };
        let h = candle_nn::ops::rms_norm(&x.index_select(last, 0)?, &self.norm, c.rms_eps)?;
        Ok(Some(h.matmul(&lm_head.t()?)?.to_dtype(DType::F32)?))
    }

    /// The sum of a partial result over the tensor-parallel group — on the GPUs through NCCL,
    /// or in f32 on the host — or the result itself without one.
    fn all_reduce(&self, partial: Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(comm) = &self.nccl {
            // A projection's fresh output: nothing else holds its storage.
            let partial = partial.contiguous()?;
            comm.all_reduce(&partial)?;
            return Ok(partial);
        }
        let Some(collective) = &self.collective else {
            return Ok(partial);
        };
        let (shape, dtype, device) = (
            partial.shape().clone(),
            partial.dtype(),
            partial.device().clone(),
        );
        let mut data: Vec<f32> = partial.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        collective
            .all_reduce(&mut data)
            .map_err(candle_core::Error::Msg)?;
        Tensor::from_vec(data, shape, &device)?.to_dtype(dtype)
    }

    /// Self-attention of one layer for every token by gathering: rotary embedding of `qkv`,
    /// the cache write, then attention over each sequence's cached context gathered from the
    /// cache. `[tokens, heads × head_dim]`.
    fn gathered_attention(
        &self,
        kv: &LayerCache,
        inputs: &GatheredInputs,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim, c.heads, c.kv_heads);
        let tokens = qkv.dim(0)?;
        let rotate = |x: Tensor, n: usize| -> Result<Tensor> {
            // Each token is its own batch row, so each gets its own position's angles.
            let x = x.contiguous()?.reshape((tokens, n, 1, hd))?;
            let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
            let x = match c.rope_style {
                RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            };
            x.reshape((tokens, n, hd))
        };
        let q = rotate(qkv.narrow(1, 0, heads * hd)?, heads)?;
        let k = rotate(qkv.narrow(1, heads * hd, kv_heads * hd)?, kv_heads)?;
        let v = qkv.narrow(1, (heads + kv_heads) * hd, kv_heads * hd)?;
        let width = kv_heads * hd;
        kv.keys
            .scatter_set(&inputs.slots, &k.reshape((tokens, width))?, 0)?;
        kv.values.scatter_set(&inputs.slots, &v.contiguous()?, 0)?;
        let mut parts = Vec::with_capacity(inputs.prefill.len() + 1);
        if let Some(decode) = &inputs.decode {
            let q = q.index_select(&decode.tokens, 0)?;
            parts.push(self.decode_attention(kv, decode, &q)?);
        }
        for chunk in &inputs.prefill {
            let q = q.narrow(0, chunk.first, chunk.count)?;
            parts.push(self.prefill_attention(kv, chunk, &q)?);
        }
        let out = Tensor::cat(&parts, 0)?;
        match &inputs.order {
            Some(order) => out.index_select(order, 0),
            None => Ok(out),
        }
    }

    /// `softmax(q·kᵀ / √d + mask) · v` over grouped heads: `q` is `[.., kv_heads, group × n, d]`,
    /// `k` and `v` `[.., kv_heads, context, d]`; scores and softmax in f32.
    fn scaled_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let scale = 1.0 / (self.config.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
        let scores = scores.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        weights.matmul(v)
    }

    /// Decode rows together: `q` is `[rows, heads, d]`; each row's context gathered from the
    /// cache, padded to the longest and masked. `[rows, heads × d]`.
    fn decode_attention(&self, kv: &LayerCache, rows: &DecodeRows, q: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (n, longest) = rows.context.dims2()?;
        let (kvh, group, hd) = (c.kv_heads, c.heads / c.kv_heads, c.head_dim);
        let flat = rows.context.flatten_all()?;
        let gather = |cache: &Tensor| -> Result<Tensor> {
            cache
                .index_select(&flat, 0)?
                .reshape((n, longest, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (k, v) = (gather(&kv.keys)?, gather(&kv.values)?);
        let q = q.reshape((n, kvh, group, hd))?;
        let out = self.scaled_attention(&q, &k, &v, &rows.mask)?;
        out.reshape((n, c.heads * hd))
    }

    /// One sequence's prefill chunk: `q` is `[count, heads, d]` at positions `start..`; it sees
    /// its context up to its own position. `[count, heads × d]`.
    fn prefill_attention(
        &self,
        kv: &LayerCache,
        chunk: &PrefillChunk,
        q: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (kvh, group, hd) = (c.kv_heads, c.heads / c.kv_heads, c.head_dim);
        let (n, context) = (chunk.count, chunk.start + chunk.count);
        let gather = |cache: &Tensor| -> Result<Tensor> {
            cache
                .index_select(&chunk.context, 0)?
                .reshape((context, kvh, hd))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k, v) = (gather(&kv.keys)?, gather(&kv.values)?);
        // [n, kv, group, d] → [kv, group × n, d]: a group's queries share their keys.
        let q = q
            .reshape((n, kvh, group, hd))?
            .permute((1, 2, 0, 3))?
            .reshape((kvh, group * n, hd))?;
        // Rows are (group, query): the query's mask, once per group.
        let mask = causal_mask(n, chunk.start, q.device())?.repeat((group, 1))?;
        let out = self.scaled_attention(&q, &k, &v, &mask)?;
        out.reshape((kvh, group, n, hd))?
            .permute((2, 0, 1, 3))?
            .reshape((n, c.heads * hd))
    }
}

/// `[n, start + n]`: 0 where query `i` (at position `start + i`) may look, −∞ after it.
fn causal_mask(n: usize, start: usize, device: &Device) -> Result<Tensor> {
    let context = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..context).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, context), device)
}

/// The rotary tables of a model: `cos` and `sin` of `position × inverse frequency`,
/// `[context, head_dim / 2]` each, in `dtype` on `device`.
pub fn rotary_tables(
    config: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let frequencies = config.inverse_frequencies();
    let half = frequencies.len();
    let positions = config.context_length;
    let angles: Vec<f32> = (0..positions)
        .flat_map(|p| frequencies.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (positions, half), device)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}
