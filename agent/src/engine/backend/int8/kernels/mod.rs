//! CPU kernels of the forward pass: int8 block quantization (`quant`), the int8 matrix products
//! every linear layer uses (`product`), RMSNorm, rotary embeddings, SiLU, the attention dot.
//! Safe Rust written so that LLVM vectorises it (the workspace builds for x86-64-v3) except the
//! products' explicit AVX2 and AVX-512 kernels; the hot loops are fixed-size so they unroll.
//!
//! Numerics do not depend on the batch: each output element is one row of weights dotted with
//! one row of activations in a fixed order, whatever else is in the batch. That is what makes
//! continuous batching give the same greedy tokens as running a request alone.

use crate::engine::model::RopeStyle;

pub mod pool;
mod product;
mod quant;

pub use product::{matmul, matmul_q8};
pub use quant::{BLOCK, Linear, PANEL, Q8Matrix, Q8Panels, Q41Matrix};

/// Eight lanes summed as GGML's hsum_float_8 does: halves, then pairs, then the last two.
#[inline(always)]
fn reduce_lanes(lanes: [f32; 8]) -> f32 {
    let quad = [
        lanes[4] + lanes[0],
        lanes[5] + lanes[1],
        lanes[6] + lanes[2],
        lanes[7] + lanes[3],
    ];
    let pair = [quad[0] + quad[2], quad[1] + quad[3]];
    pair[0] + pair[1]
}

/// RMSNorm of each row of `x` (`rows × weight.len()`) into `out`, rows in the forward pool.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let h = weight.len();
    out.resize(x.len(), 0.0);
    by_rows(out, h, x, h, |o, x| {
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
            *o = x / rms * w;
        }
    });
}

/// `row(out_row, in_row)` for each row of `out` (`out_width` wide) and of `input`
/// (`in_width` wide); in the forward pool when there are several rows.
fn by_rows(
    out: &mut [f32],
    out_width: usize,
    input: &[f32],
    in_width: usize,
    row: impl Fn(&mut [f32], &[f32]) + Sync,
) {
    let rows_of = |out: &mut [f32], input: &[f32]| {
        for (o, x) in out
            .chunks_exact_mut(out_width)
            .zip(input.chunks_exact(in_width))
        {
            row(o, x);
        }
    };
    let rows = out.len() / out_width.max(1);
    if rows < 2 {
        return rows_of(out, input);
    }
    let per_task = rows.div_ceil(pool::threads() * 2);
    pool::for_each_chunk(out, per_task * out_width, |task, out| {
        rows_of(out, &input[task * per_task * in_width..]);
    });
}

/// Precomputed cos and sin for every position and frequency.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// The tables of a model: its pairing, `head_dim / 2` inverse frequencies
    /// ([`crate::engine::model::LlamaConfig::inverse_frequencies`]) and its context.
    pub fn new(style: RopeStyle, inverse_frequencies: &[f32], max_positions: usize) -> Self {
        let half = inverse_frequencies.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &freq in inverse_frequencies {
                let angle = p as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            style,
            half,
            cos,
            sin,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of one token's vector (`heads × head_dim`) to `position`.
    pub fn apply(&self, x: &mut [f32], position: usize) {
        let half = self.half;
        let cos = &self.cos[position * half..(position + 1) * half];
        let sin = &self.sin[position * half..(position + 1) * half];
        for head in x.chunks_exact_mut(2 * half) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos[i] - b * sin[i];
                        pair[1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::HalfSplit => {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }
}

/// `Σ a·b` in eight lanes (element `i` in lane `i mod 8`), fused-multiply-added, reduced
/// pairwise: one fixed order that vectorises (attention scores).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a8.remainder(), b8.remainder());
    for (a, b) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] = a[l].mul_add(b[l], lanes[l]);
        }
    }
    for (l, (a, b)) in a_rest.iter().zip(b_rest).enumerate() {
        lanes[l] = a.mul_add(*b, lanes[l]);
    }
    reduce_lanes(lanes)
}

/// `gate_up` holds rows of `[gate | up]` (each `ffn` wide); writes `silu(gate) * up` rows.
pub fn silu_mul(gate_up: &[f32], ffn: usize, out: &mut Vec<f32>) {
    out.resize(gate_up.len() / 2, 0.0);
    by_rows(out, ffn, gate_up, 2 * ffn, |o, row| {
        let (gate, up) = row.split_at(ffn);
        for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_rotate_the_pairs_they_name() {
        let rope = Rope::new(RopeStyle::Interleaved, &[1.0, 0.01], 8);
        let mut x = vec![1.0, 0.0, 1.0, 0.0];
        rope.apply(&mut x, 0);
        assert_eq!(x, vec![1.0, 0.0, 1.0, 0.0], "position 0 is the identity");
        rope.apply(&mut x, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let split = Rope::new(RopeStyle::HalfSplit, &[1.0, 0.01], 8);
        let mut y = vec![1.0, 1.0, 0.0, 0.0];
        split.apply(&mut y, 1);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let mut out = Vec::new();
        rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 1.0], 1e-6, &mut out);
        let rms = (12.5f32 + 1e-6).sqrt();
        assert_eq!(out[..2], [3.0 / rms, 4.0 / rms]);
        assert_eq!(out[2..], [0.0, 0.0]);
    }
}
