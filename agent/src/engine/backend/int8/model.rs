//! The Llama architecture (RoPE, grouped-query attention, RMSNorm, SwiGLU) and its forward pass
//! over a ragged batch: the tokens of every scheduled sequence — prefill chunks and single decode
//! tokens alike — in one pass, keys and values written to and read from the paged cache through
//! each sequence's block table, logits only for the sequences that sample.

use super::kernels::{
    Linear, Q8Matrix, Q8Panels, Rope, dot, matmul, matmul_q8, pool, rms_norm, silu_mul,
};
use super::kv::KvStore;
use crate::engine::backend::{RowOutput, SeqInput};
use crate::engine::model::LlamaConfig;
use std::sync::Arc;

/// One transformer block, with Q/K/V and gate/up fused into single matrices.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// Rows: heads × head_dim queries, then keys, then values.
    pub qkv: Linear,
    pub out: Linear,
    pub ffn_norm: Vec<f32>,
    /// Rows: gate, then up.
    pub gate_up: Linear,
    pub down: Linear,
}

/// A loaded model.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Arc<Q8Panels>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// The embedding itself when the model ties them.
    pub lm_head: Arc<Q8Panels>,
    pub rope: Rope,
}

/// Buffers reused from step to step.
#[derive(Debug, Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    hq: Q8Matrix,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    scratch: Vec<f32>,
}

impl Llama {
    pub fn weight_bytes(&self) -> usize {
        let layer = |l: &Layer| {
            l.qkv.bytes()
                + l.out.bytes()
                + l.gate_up.bytes()
                + l.down.bytes()
                + 4 * (l.attn_norm.len() + l.ffn_norm.len())
        };
        let head = if Arc::ptr_eq(&self.embed, &self.lm_head) {
            0
        } else {
            self.lm_head.bytes()
        };
        self.embed.bytes() + head + self.layers.iter().map(layer).sum::<usize>()
    }

    /// Runs one step; returns `vocab_size` logits for each sequence that wants an output (logits or
    /// its greedy token), in order.
    pub fn forward(
        &self,
        batch: &[SeqInput<'_>],
        kv: &mut KvStore,
        ws: &mut Workspace,
    ) -> Vec<f32> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_width = c.heads * hd;
        let kv_width = c.kv_width();
        let qkv_width = q_width + 2 * kv_width;
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();

        // Embeddings, and each token's (sequence, position).
        ws.x.resize(tokens * h, 0.0);
        let mut where_: Vec<(usize, usize)> = Vec::with_capacity(tokens);
        for (s, seq) in batch.iter().enumerate() {
            where_.extend((0..seq.tokens.len()).map(|i| (s, seq.start + i)));
        }
        for (row, &token) in
            ws.x.chunks_exact_mut(h)
                .zip(batch.iter().flat_map(|s| s.tokens))
        {
            self.embed.dequantize_row(token as usize, row);
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention.
            rms_norm(&ws.x, &layer.attn_norm, c.rms_eps, &mut ws.h);
            ws.hq.quantize_into(&ws.h, tokens, h);
            matmul(&ws.hq, &layer.qkv, &mut ws.qkv, &mut ws.scratch);
            for (row, &(s, pos)) in ws.qkv.chunks_exact_mut(qkv_width).zip(&where_) {
                let (q, rest) = row.split_at_mut(q_width);
                let (k, v) = rest.split_at_mut(kv_width);
                self.rope.apply(q, pos);
                self.rope.apply(k, pos);
                let at = kv.offset(batch[s].blocks, pos);
                kv.keys[l][at..at + kv_width].copy_from_slice(k);
                kv.values[l][at..at + kv_width].copy_from_slice(v);
            }
            self.attention(batch, &where_, kv, l, &ws.qkv, &mut ws.attn);
            ws.hq.quantize_into(&ws.attn, tokens, q_width);
            matmul(&ws.hq, &layer.out, &mut ws.proj, &mut ws.scratch);
            add_into(&mut ws.x, &ws.proj);

            // Feed-forward.
            rms_norm(&ws.x, &layer.ffn_norm, c.rms_eps, &mut ws.h);
            ws.hq.quantize_into(&ws.h, tokens, h);
            matmul(&ws.hq, &layer.gate_up, &mut ws.gate_up, &mut ws.scratch);
            silu_mul(&ws.gate_up, c.intermediate_size, &mut ws.act);
            ws.hq.quantize_into(&ws.act, tokens, c.intermediate_size);
            matmul(&ws.hq, &layer.down, &mut ws.proj, &mut ws.scratch);
            add_into(&mut ws.x, &ws.proj);
        }

        // Logits for the last token of each sequence that samples.
        let mut last = Vec::new();
        let mut end = 0;
        for seq in batch {
            end += seq.tokens.len();
            if seq.output != RowOutput::None {
                last.extend_from_slice(&ws.x[(end - 1) * h..end * h]);
            }
        }
        let rows = last.len() / h;
        if rows == 0 {
            return Vec::new();
        }
        rms_norm(&last, &self.norm, c.rms_eps, &mut ws.h);
        ws.hq.quantize_into(&ws.h, rows, h);
        let mut logits = Vec::new();
        matmul_q8(&ws.hq, &self.lm_head, &mut logits, &mut ws.scratch);
        logits
    }

    /// Causal attention of every token over its own sequence's cached positions `0..=pos`. The
    /// query heads that share a key-value head are done together, walking the sequence's
    /// blocks, so each cached key and value is read once per token and group.
    fn attention(
        &self,
        batch: &[SeqInput<'_>],
        where_: &[(usize, usize)],
        kv: &KvStore,
        layer: usize,
        qkv: &[f32],
        out: &mut Vec<f32>,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let q_width = c.heads * hd;
        let qkv_width = q_width + 2 * c.kv_width();
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys, values) = (&kv.keys[layer], &kv.values[layer]);
        let (block_size, width) = (kv.block_size, kv.width);
        out.resize(where_.len() * q_width, 0.0);
        // One task per token and key-value group: its query heads' slice of the output row.
        let groups = c.kv_heads;
        let work = |task: usize, out_group: &mut [f32]| {
            let (t, g) = (task / groups, task % groups);
            let (s, pos) = where_[t];
            let blocks = batch[s].blocks;
            let len = pos + 1;
            let q_row = &qkv[t * qkv_width..t * qkv_width + q_width];
            // Offsets of positions 0..=pos in a layer's cache, block by block.
            let starts = blocks.iter().enumerate().map(|(i, &block)| {
                let first = i * block_size;
                let count = block_size.min(len.saturating_sub(first));
                (block as usize * block_size * width, first, count)
            });
            let mut scores = vec![0f32; group * len];
            let kv_off = g * hd;
            let queries = &q_row[g * group * hd..(g + 1) * group * hd];
            for (base, first, count) in starts.clone() {
                for i in 0..count {
                    let at = base + i * width + kv_off;
                    let k = &keys[at..at + hd];
                    for (h, q) in queries.chunks_exact(hd).enumerate() {
                        scores[h * len + first + i] = dot(q, k) * scale;
                    }
                }
            }
            for head_scores in scores.chunks_exact_mut(len) {
                let max = head_scores.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let mut sum = 0.0;
                for score in head_scores.iter_mut() {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                for score in head_scores.iter_mut() {
                    *score /= sum;
                }
            }
            for (h, out_head) in out_group.chunks_exact_mut(hd).enumerate() {
                let weights = &scores[h * len..(h + 1) * len];
                // 64 elements at a time: eight independent sums hide the adds' latency.
                let mut parts = out_head.chunks_exact_mut(64);
                for (part, out) in (&mut parts).enumerate() {
                    let off = kv_off + 64 * part;
                    let out: &mut [f32; 64] = out.try_into().expect("64 elements");
                    *out = weighted_sum::<64>(weights, values, starts.clone(), width, off);
                }
                let rest = parts.into_remainder();
                let off = kv_off + hd - rest.len();
                for (e, out) in rest.iter_mut().enumerate() {
                    let [sum] = weighted_sum::<1>(weights, values, starts.clone(), width, off + e);
                    *out = sum;
                }
            }
        };
        let context: usize = where_.iter().map(|(_, p)| p + 1).sum();
        if context * c.heads > 256 {
            pool::for_each_chunk(out, group * hd, work);
        } else {
            out.chunks_exact_mut(group * hd)
                .enumerate()
                .for_each(|(task, out_group)| work(task, out_group));
        }
    }
}

/// `Σ weights[p] · values[p]` over a sequence's positions for `N` elements of each cached value
/// row from `offset`, in position order; `blocks` gives each block's base offset, first position
/// and positions held. `N` is fixed so that the sums stay in registers.
#[inline(always)]
fn weighted_sum<const N: usize>(
    weights: &[f32],
    values: &[f32],
    blocks: impl Iterator<Item = (usize, usize, usize)>,
    width: usize,
    offset: usize,
) -> [f32; N] {
    let mut acc = [0f32; N];
    for (base, first, count) in blocks {
        for i in 0..count {
            let at = base + i * width + offset;
            let v: &[f32; N] = values[at..at + N].try_into().expect("N elements");
            let w = weights[first + i];
            for (o, v) in acc.iter_mut().zip(v) {
                *o += w * v;
            }
        }
    }
    acc
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
