//! Model files → the int8 layout: every matrix in int8 blocks (the file's own Q4_1 or Q8_0 blocks
//! where all parts of a fused matrix share them, anything else requantized to Q8_0), Q/K/V and
//! gate/up fused, f32 norms; or random int8 weights for a `dummy` shape.

use super::kernels::{BLOCK, Linear, Q8Matrix, Q8Panels, Q41Matrix, Rope};
use super::model::{Layer, Llama};
use crate::engine::error::{EngineError, Result};
use crate::engine::model::LlamaConfig;
use crate::engine::model::loader::{LayerWeight, ModelFiles, Weight};
use candle_core::quantized::GgmlDType;
use std::sync::Arc;

fn matrix(files: &mut ModelFiles, weight: Weight, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let (data, shape) = files.read(weight)?;
    if shape != [rows, cols] {
        return Err(EngineError::ShapeMismatch {
            tensor: files.name(weight),
            expected: vec![rows, cols],
            found: shape,
        });
    }
    Ok(data)
}

/// The matrices `parts` (weight, rows) stacked by rows into one weight matrix of `cols` columns,
/// kept in their file's Q4_1 or Q8_0 blocks when they all share one, else requantized to Q8_0.
fn linear(files: &mut ModelFiles, parts: &[(Weight, usize)], cols: usize) -> Result<Linear> {
    let rows: usize = parts.iter().map(|(_, r)| r).sum();
    let mut raws = Vec::with_capacity(parts.len());
    for &(weight, r) in parts {
        match files.read_raw(weight)? {
            Some(raw) if raw.shape == [r, cols] => raws.push(raw),
            Some(raw) => {
                return Err(EngineError::ShapeMismatch {
                    tensor: files.name(weight),
                    expected: vec![r, cols],
                    found: raw.shape,
                });
            }
            None => break,
        }
    }
    if raws.len() == parts.len() {
        let bytes: Vec<u8> = raws.iter().flat_map(|r| r.bytes.iter().copied()).collect();
        if raws.iter().all(|r| r.dtype == GgmlDType::Q4_1) {
            if let Some(m) = Q41Matrix::from_ggml(&bytes, rows, cols) {
                return Ok(Linear::Q41(m));
            }
        } else if raws.iter().all(|r| r.dtype == GgmlDType::Q8_0)
            && let Some(m) = Q8Matrix::from_ggml(&bytes, rows, cols)
        {
            return Ok(Linear::Q8(Q8Panels::from_matrix(&m)));
        }
    }
    let mut data = Vec::with_capacity(rows * cols);
    if raws.len() == parts.len() {
        // Already read: dequantize what is in hand.
        for raw in &raws {
            data.extend(raw.dequantize()?);
        }
    } else {
        for &(weight, r) in parts {
            data.extend(matrix(files, weight, r, cols)?);
        }
    }
    Ok(Linear::Q8(Q8Panels::from_matrix(&Q8Matrix::quantize(
        &data, rows, cols,
    ))))
}

/// A Q8_0 matrix: the file's own blocks when it has Q8_0, else requantized.
fn q8_matrix(files: &mut ModelFiles, weight: Weight, rows: usize, cols: usize) -> Result<Q8Panels> {
    match linear(files, &[(weight, rows)], cols)? {
        Linear::Q8(m) => Ok(m),
        Linear::Q41(_) => Ok(Q8Panels::from_matrix(&Q8Matrix::quantize(
            &matrix(files, weight, rows, cols)?,
            rows,
            cols,
        ))),
    }
}

fn vector(files: &mut ModelFiles, weight: Weight, len: usize) -> Result<Vec<f32>> {
    let (data, shape) = files.read(weight)?;
    if shape != [len] {
        return Err(EngineError::ShapeMismatch {
            tensor: files.name(weight),
            expected: vec![len],
            found: shape,
        });
    }
    Ok(data)
}

fn check_blocks(c: &LlamaConfig) -> Result<()> {
    for (what, n) in [
        ("hidden size", c.hidden_size),
        ("intermediate size", c.intermediate_size),
        ("heads × head dim", c.heads * c.head_dim),
    ] {
        if n % BLOCK != 0 {
            return Err(EngineError::UnsupportedTensor {
                tensor: what.into(),
                reason: format!("{n} is not a multiple of {BLOCK}"),
            });
        }
    }
    if !c.heads.is_multiple_of(c.kv_heads) {
        return Err(EngineError::MissingConfig(format!(
            "a head count ({}) divisible by the KV head count ({})",
            c.heads, c.kv_heads
        )));
    }
    Ok(())
}

fn rope(c: &LlamaConfig) -> Rope {
    Rope::new(c.rope_style, &c.inverse_frequencies(), c.context_length)
}

/// The int8 layout of a model's files (random weights for a dummy shape).
pub fn build(files: &mut ModelFiles) -> Result<Llama> {
    let config = files.config.clone();
    check_blocks(&config)?;
    if files.is_dummy() {
        return Ok(dummy(config));
    }
    let c = &config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let embed = Arc::new(q8_matrix(files, Weight::Embed, c.vocab_size, h)?);
    let lm_head = if files.has(Weight::LmHead) {
        Arc::new(q8_matrix(files, Weight::LmHead, c.vocab_size, h)?)
    } else {
        embed.clone()
    };
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        // Progress in tenths, so a large model shows it is moving and a small one stays quiet.
        if i > 0 && (i * 10 / c.layers) != ((i - 1) * 10 / c.layers) {
            tracing::info!(layer = i, layers = c.layers, "loading weights");
        }
        let w = |part| Weight::Layer(i, part);
        layers.push(Layer {
            attn_norm: vector(files, w(LayerWeight::AttnNorm), h)?,
            qkv: linear(
                files,
                &[
                    (w(LayerWeight::Q), c.heads * hd),
                    (w(LayerWeight::K), c.kv_heads * hd),
                    (w(LayerWeight::V), c.kv_heads * hd),
                ],
                h,
            )?,
            out: linear(files, &[(w(LayerWeight::O), h)], c.heads * hd)?,
            ffn_norm: vector(files, w(LayerWeight::FfnNorm), h)?,
            gate_up: linear(
                files,
                &[
                    (w(LayerWeight::Gate), c.intermediate_size),
                    (w(LayerWeight::Up), c.intermediate_size),
                ],
                h,
            )?,
            down: linear(files, &[(w(LayerWeight::Down), h)], c.intermediate_size)?,
        });
    }
    let norm = vector(files, Weight::Norm, h)?;
    let rope = rope(c);
    Ok(Llama {
        config,
        embed,
        layers,
        norm,
        lm_head,
        rope,
    })
}

/// Random int8 weights with small scales, generated straight into the engine's layout.
fn dummy(config: LlamaConfig) -> Llama {
    let c = &config;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |rows: usize, cols: usize| {
        let mut quants = vec![0i8; rows * cols];
        for q in quants.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *q = (seed >> 56) as i8;
        }
        let scale = 0.5 / (127.0 * (cols as f32).sqrt());
        Q8Panels::from_matrix(&Q8Matrix {
            rows,
            cols,
            quants,
            scales: vec![scale; rows * cols / BLOCK],
            sums: Vec::new(),
        })
    };
    let hd = c.head_dim;
    let embed = Arc::new(random(c.vocab_size, c.hidden_size));
    let layers = (0..c.layers)
        .map(|_| Layer {
            attn_norm: vec![1.0; c.hidden_size],
            qkv: Linear::Q8(random((c.heads + 2 * c.kv_heads) * hd, c.hidden_size)),
            out: Linear::Q8(random(c.hidden_size, c.heads * hd)),
            ffn_norm: vec![1.0; c.hidden_size],
            gate_up: Linear::Q8(random(2 * c.intermediate_size, c.hidden_size)),
            down: Linear::Q8(random(c.hidden_size, c.intermediate_size)),
        })
        .collect();
    let rope = rope(c);
    Llama {
        norm: vec![1.0; c.hidden_size],
        lm_head: embed.clone(),
        embed,
        layers,
        rope,
        config,
    }
}
