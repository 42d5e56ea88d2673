//! The Llama architecture (RoPE, grouped-query attention, RMSNorm, SwiGLU) and its forward pass
//! over a ragged batch: the tokens of every scheduled sequence — prefill chunks and single decode
//! tokens alike — in one pass, keys and values written to and read from the paged cache through
//! each sequence's block table, logits only for the sequences that sample.

use super::kernels::{
    Linear, Q8Matrix, Q8Panels, Rope, dot, matmul, matmul_q8, pool, rms_norm, silu_mul,
};
use super::kv::{CachedLayer, Int8Layer, KvStore};
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
    chunks: ChunkRows,
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
                kv.write(l, at, k, v);
            }
            self.attention(batch, &where_, kv, l, ws);
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

    /// Causal attention of every token over its own sequence's cached positions `0..=pos`, from
    /// `ws.qkv` into `ws.attn`. The
    /// query heads that share a key-value head are done together, walking the sequence's
    /// blocks, so each cached key and value is read once per token and group. An int8 cache is
    /// dequantized once per token and group, a block at a time, or once per step for all the
    /// tokens of a prefill chunk ([`ChunkRows`]).
    fn attention(
        &self,
        batch: &[SeqInput<'_>],
        where_: &[(usize, usize)],
        kv: &KvStore,
        layer: usize,
        ws: &mut Workspace,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let q_width = c.heads * hd;
        let qkv_width = q_width + 2 * c.kv_width();
        let group = c.heads / c.kv_heads;
        let Workspace {
            qkv,
            chunks,
            attn: out,
            ..
        } = ws;
        chunks.dequantize(batch, kv, layer, c.kv_heads);
        let (qkv, chunks) = (&*qkv, &*chunks);
        let cache = kv.layer(layer);
        let (block_size, width) = (kv.block_size, kv.width);
        out.resize(where_.len() * q_width, 0.0);
        // One task per token and key-value group: its query heads' slice of the output row.
        let groups = c.kv_heads;
        let work = |task: usize, out_group: &mut [f32]| {
            let (t, g) = (task / groups, task % groups);
            let (s, pos) = where_[t];
            let len = pos + 1;
            let q_row = &qkv[t * qkv_width..t * qkv_width + q_width];
            let queries = &q_row[g * group * hd..(g + 1) * group * hd];
            // Offsets of positions 0..=pos in a layer's cache, block by block.
            let starts = batch[s]
                .blocks
                .iter()
                .enumerate()
                .map(|(i, &block)| {
                    let first = i * block_size;
                    let count = block_size.min(len.saturating_sub(first));
                    (block as usize * block_size * width, first, count)
                })
                .take_while(|&(_, _, count)| count > 0);
            let kv_off = g * hd;
            match (&cache, chunks.starts.get(s).copied().flatten()) {
                (CachedLayer::F32 { keys, values }, _) => {
                    let mut rows = F32Rows {
                        keys,
                        values,
                        width,
                        offset: kv_off,
                    };
                    attend(queries, hd, len, &mut rows, starts, out_group);
                }
                (CachedLayer::Int8(_), Some(start)) => {
                    let mut rows = F32Rows {
                        keys: &chunks.keys[start..],
                        values: &chunks.values[start..],
                        width,
                        offset: kv_off,
                    };
                    attend(
                        queries,
                        hd,
                        len,
                        &mut rows,
                        std::iter::once((0, 0, len)),
                        out_group,
                    );
                }
                (CachedLayer::Int8(layer), None) => DEQUANTIZED.with_borrow_mut(|buffer| {
                    let mut rows = Int8Rows {
                        layer,
                        width,
                        offset: kv_off,
                        buffer,
                    };
                    attend(queries, hd, len, &mut rows, starts, out_group);
                }),
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

/// The most bytes [`ChunkRows`] holds; sequences past it are read a block at a time.
const CHUNK_ROWS_BYTES: usize = 64 << 20;

/// An int8 cache's keys and values for the sequences that run several tokens in a step (prefill
/// chunks), dequantized once for all of their tokens rather than once per token: each such
/// sequence's positions `0..start + tokens`, `[position][kv_head][head_dim]` from its start.
/// Both ways give the same bits, so a token's output does not depend on which way it was read.
#[derive(Debug, Default)]
struct ChunkRows {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Each sequence's first element, for those dequantized here.
    starts: Vec<Option<usize>>,
}

impl ChunkRows {
    /// Dequantizes `layer` of `kv` for the batch's prefill chunks, where it is int8 (`kv_heads`
    /// heads a row).
    fn dequantize(&mut self, batch: &[SeqInput<'_>], kv: &KvStore, layer: usize, kv_heads: usize) {
        self.keys.clear();
        self.values.clear();
        self.starts.clear();
        let CachedLayer::Int8(int8) = kv.layer(layer) else {
            return;
        };
        let (width, hd) = (kv.width, int8.head_dim());
        for seq in batch {
            let len = seq.start + seq.tokens.len();
            let fits = (self.keys.len() + len * width) * 2 * size_of::<f32>() <= CHUNK_ROWS_BYTES;
            if seq.tokens.len() < 2 || !fits {
                self.starts.push(None);
                continue;
            }
            self.starts.push(Some(self.keys.len()));
            let rows = (0..len).flat_map(|p| {
                let base = kv.offset(seq.blocks, p);
                (0..kv_heads).map(move |g| base + g * hd)
            });
            int8.dequantize(rows.clone(), true, &mut self.keys);
            int8.dequantize(rows, false, &mut self.values);
        }
    }
}

thread_local! {
    /// One block of one head's keys or values, dequantized from an int8 cache.
    static DEQUANTIZED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of f32 elements `width` apart; one head's from `offset` in each.
struct Rows<'a> {
    elements: &'a [f32],
    width: usize,
    offset: usize,
}

/// Where attention finds one head's cached keys and values, a block at a time.
trait HeadRows {
    /// The keys of the `count` positions of the block at `base`.
    fn keys(&mut self, base: usize, count: usize) -> Rows<'_>;
    /// Their values.
    fn values(&mut self, base: usize, count: usize) -> Rows<'_>;
}

/// An f32 cache, read where it lies.
struct F32Rows<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    width: usize,
    offset: usize,
}

impl HeadRows for F32Rows<'_> {
    fn keys(&mut self, base: usize, _: usize) -> Rows<'_> {
        Rows {
            elements: &self.keys[base..],
            width: self.width,
            offset: self.offset,
        }
    }

    fn values(&mut self, base: usize, _: usize) -> Rows<'_> {
        Rows {
            elements: &self.values[base..],
            width: self.width,
            offset: self.offset,
        }
    }
}

/// An int8 cache, a block of one head dequantized at a time into a buffer that stays in L1.
struct Int8Rows<'a, 'b> {
    layer: &'a Int8Layer<'a>,
    width: usize,
    offset: usize,
    buffer: &'b mut Vec<f32>,
}

impl Int8Rows<'_, '_> {
    fn rows(&mut self, base: usize, count: usize, keys: bool) -> Rows<'_> {
        let at = (0..count).map(|i| base + i * self.width + self.offset);
        self.buffer.clear();
        self.layer.dequantize(at, keys, self.buffer);
        Rows {
            elements: self.buffer,
            width: self.layer.head_dim(),
            offset: 0,
        }
    }
}

impl HeadRows for Int8Rows<'_, '_> {
    fn keys(&mut self, base: usize, count: usize) -> Rows<'_> {
        self.rows(base, count, true)
    }

    fn values(&mut self, base: usize, count: usize) -> Rows<'_> {
        self.rows(base, count, false)
    }
}

/// The attention of `queries` (the query heads of one key-value head, `hd` each) over `len`
/// positions of `rows`, into `out` (the same heads); `blocks` gives each block's base offset,
/// first position and positions held. Each element's weighted sum runs over the positions in
/// order whatever the blocks, so a sequence's output does not depend on where its blocks are.
fn attend(
    queries: &[f32],
    hd: usize,
    len: usize,
    rows: &mut impl HeadRows,
    blocks: impl Iterator<Item = (usize, usize, usize)> + Clone,
    out: &mut [f32],
) {
    let group = queries.len() / hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; group * len];
    for (base, first, count) in blocks.clone() {
        let keys = rows.keys(base, count);
        for i in 0..count {
            let at = i * keys.width + keys.offset;
            let k = &keys.elements[at..at + hd];
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
    out.fill(0.0);
    for (base, first, count) in blocks {
        let values = rows.values(base, count);
        for (h, out_head) in out.chunks_exact_mut(hd).enumerate() {
            let weights = &scores[h * len + first..h * len + first + count];
            // 64 elements at a time: eight independent sums hide the adds' latency.
            let mut parts = out_head.chunks_exact_mut(64);
            for (part, out) in (&mut parts).enumerate() {
                let out: &mut [f32; 64] = out.try_into().expect("64 elements");
                weighted_sum(out, weights, &values, 64 * part);
            }
            let rest = parts.into_remainder();
            let start = hd - rest.len();
            for (e, out) in rest.iter_mut().enumerate() {
                weighted_sum::<1>(std::array::from_mut(out), weights, &values, start + e);
            }
        }
    }
}

/// `acc += Σ weights[i] · values[i]` for `N` elements of each value row from `element` of its
/// head, in position order. `N` is fixed so that the sums stay in registers.
#[inline(always)]
fn weighted_sum<const N: usize>(
    acc: &mut [f32; N],
    weights: &[f32],
    values: &Rows<'_>,
    element: usize,
) {
    let mut sums = *acc;
    for (i, w) in weights.iter().enumerate() {
        let at = i * values.width + values.offset + element;
        let v: &[f32; N] = values.elements[at..at + N].try_into().expect("N elements");
        for (o, v) in sums.iter_mut().zip(v) {
            *o += w * v;
        }
    }
    *acc = sums;
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
