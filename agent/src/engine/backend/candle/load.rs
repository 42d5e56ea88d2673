//! Model files → candle tensors of one type on one device: every weight read (GGUF blocks
//! dequantized), converted and moved; Q/K/V and gate/up concatenated into one matrix each. Or
//! random weights for a `dummy` shape, generated on the device.

use super::model::{Layer, Llama, rotary_tables};
use crate::engine::error::{EngineError, Result};
use crate::engine::model::loader::{LayerWeight, ModelFiles, Weight};
use candle_core::{DType, Device, Tensor};

pub(super) fn backend_error(e: candle_core::Error) -> EngineError {
    EngineError::Backend {
        backend: "candle",
        reason: e.to_string(),
    }
}

/// The weights of a model's files as tensors of `dtype` on `device` (random for a dummy shape).
pub fn build(files: &mut ModelFiles, device: &Device, dtype: DType) -> Result<Llama> {
    let c = files.config.clone();
    if !c.heads.is_multiple_of(c.kv_heads) {
        return Err(EngineError::MissingConfig(format!(
            "a head count ({}) divisible by the KV head count ({})",
            c.heads, c.kv_heads
        )));
    }
    let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_rows, kv_rows) = (c.heads * hd, c.kv_heads * hd);
    let dummy = files.is_dummy();
    let mut read = |weight: Weight, shape: &[usize]| -> Result<Tensor> {
        match (dummy, shape) {
            // A dummy model's norms are ones, its matrices random.
            (true, [len]) => Tensor::ones(*len, dtype, device).map_err(backend_error),
            (true, _) => random(shape, dtype, device),
            (false, _) => files.tensor(weight, shape, dtype, device),
        }
    };
    let cat = |parts: &[Tensor]| Tensor::cat(parts, 0).map_err(backend_error);
    let embed = read(Weight::Embed, &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        if i > 0 && (i * 10 / c.layers) != ((i - 1) * 10 / c.layers) {
            tracing::info!(layer = i, layers = c.layers, "loading weights");
        }
        let mut w = |part, shape: &[usize]| read(Weight::Layer(i, part), shape);
        layers.push(Layer {
            attn_norm: w(LayerWeight::AttnNorm, &[h])?,
            qkv: cat(&[
                w(LayerWeight::Q, &[q_rows, h])?,
                w(LayerWeight::K, &[kv_rows, h])?,
                w(LayerWeight::V, &[kv_rows, h])?,
            ])?,
            out: w(LayerWeight::O, &[h, q_rows])?,
            ffn_norm: w(LayerWeight::FfnNorm, &[h])?,
            gate_up: cat(&[
                w(LayerWeight::Gate, &[ffn, h])?,
                w(LayerWeight::Up, &[ffn, h])?,
            ])?,
            down: w(LayerWeight::Down, &[h, ffn])?,
        });
    }
    let norm = read(Weight::Norm, &[h])?;
    let tied = dummy || !files.has(Weight::LmHead);
    let lm_head = if tied {
        embed.clone()
    } else {
        files.tensor(Weight::LmHead, &[c.vocab_size, h], dtype, device)?
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
    })
}

/// Random weights scaled so activations keep their size through a layer (`1/√cols`).
fn random(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    Tensor::randn(0f32, 1.0 / (cols as f32).sqrt(), shape, device)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(backend_error)
}
