//! Model files → candle tensors of one type on one device: every weight read (GGUF blocks
//! dequantized), converted and moved; Q/K/V and gate/up concatenated into one matrix each. Or
//! random weights for a `dummy` shape, generated on the device.

use super::model::{Layer, Llama, rotary_tables};
use crate::engine::error::{EngineError, Result};
use crate::engine::model::loader::{LayerWeight, ModelFiles, Weight};
use crate::engine::parallel::Shard;
use crate::engine::parallel::collective::Collective;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

pub(super) fn backend_error(e: candle_core::Error) -> EngineError {
    EngineError::Backend {
        backend: "candle",
        reason: e.to_string(),
    }
}

/// The weights of a model's files — `shard`'s part of them — as tensors of `dtype` on `device`
/// (random for a dummy shape). A rank holds its heads' rows of Q, K and V and columns of the
/// output projection, its slice of the FFN's rows (gate, up) and columns (down); the embedding
/// and norms whole; the output head only on rank 0, which alone computes logits.
pub fn build(
    files: &mut ModelFiles,
    device: &Device,
    dtype: DType,
    shard: Shard,
    collective: Option<Arc<dyn Collective>>,
) -> Result<Llama> {
    let full = files.config.clone();
    if !full.heads.is_multiple_of(full.kv_heads) {
        return Err(EngineError::MissingConfig(format!(
            "a head count ({}) divisible by the KV head count ({})",
            full.heads, full.kv_heads
        )));
    }
    Shard::check(&full, shard.world)?;
    let c = shard.config(&full);
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q, kv, ffn) = (c.heads * hd, c.kv_heads * hd, c.intermediate_size);
    let r = shard.rank;
    let first_kv = shard.first_kv_head(&full);
    let dummy = files.is_dummy();
    // `len` rows or columns (`dim`) from `start` of a weight whose whole shape is `shape`.
    let mut read = |weight: Weight, shape: &[usize], dim: usize, start: usize, len: usize| {
        let mut part = shape.to_vec();
        part[dim] = len;
        match (dummy, part.as_slice()) {
            // A dummy model's norms are ones, its matrices random.
            (true, [len]) => Tensor::ones(*len, dtype, device).map_err(backend_error),
            (true, _) => random(&part, dtype, device),
            (false, _) => files.tensor_part(weight, shape, dim, start, len, dtype, device),
        }
    };
    let cat = |parts: &[Tensor]| Tensor::cat(parts, 0).map_err(backend_error);
    let embed = read(Weight::Embed, &[full.vocab_size, h], 0, 0, full.vocab_size)?;
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        if i > 0 && (i * 10 / c.layers) != ((i - 1) * 10 / c.layers) {
            tracing::info!(layer = i, layers = c.layers, "loading weights");
        }
        let mut w = |part, shape: &[usize], dim, start, len| {
            read(Weight::Layer(i, part), shape, dim, start, len)
        };
        let (full_q, full_kv, full_ffn) =
            (full.heads * hd, full.kv_heads * hd, full.intermediate_size);
        layers.push(Layer {
            attn_norm: w(LayerWeight::AttnNorm, &[h], 0, 0, h)?,
            qkv: cat(&[
                w(LayerWeight::Q, &[full_q, h], 0, r * q, q)?,
                w(LayerWeight::K, &[full_kv, h], 0, first_kv * hd, kv)?,
                w(LayerWeight::V, &[full_kv, h], 0, first_kv * hd, kv)?,
            ])?,
            out: w(LayerWeight::O, &[h, full_q], 1, r * q, q)?,
            ffn_norm: w(LayerWeight::FfnNorm, &[h], 0, 0, h)?,
            gate_up: cat(&[
                w(LayerWeight::Gate, &[full_ffn, h], 0, r * ffn, ffn)?,
                w(LayerWeight::Up, &[full_ffn, h], 0, r * ffn, ffn)?,
            ])?,
            down: w(LayerWeight::Down, &[h, full_ffn], 1, r * ffn, ffn)?,
        });
    }
    let norm = read(Weight::Norm, &[h], 0, 0, h)?;
    let tied = dummy || !files.has(Weight::LmHead);
    let lm_head = match (r, tied) {
        (0, true) => Some(embed.clone()),
        (0, false) => Some(files.tensor(Weight::LmHead, &[c.vocab_size, h], dtype, device)?),
        _ => None,
    };
    let (cos, sin) = rotary_tables(&c, dtype, device).map_err(backend_error)?;
    Ok(Llama {
        config: c,
        embed,
        layers,
        norm,
        lm_head,
        tied,
        cos,
        sin,
        paged: None,
        collective,
        #[cfg(feature = "cuda")]
        nccl: None,
    })
}

/// Random weights scaled so activations keep their size through a layer (`1/√cols`).
fn random(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    Tensor::randn(0f32, 1.0 / (cols as f32).sqrt(), shape, device)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(backend_error)
}
