//! The int8 backend's KV memory: keys and values of every layer, addressed through block tables,
//! in f32 or (`--kv-cache-dtype int8`) in int8 with one f32 scale per token and KV head — 68
//! bytes instead of 256 for a head of 64, a quarter of f32's and a little over half of f16's.
//!
//! Attention reads an f32 layer where it lies, and an int8 one dequantized a block of one head at
//! a time into f32 rows ([`Int8Layer::dequantize`]): each element is converted once for all the
//! query heads that share it, into a buffer small enough to stay in L1.

use crate::engine::backend::KvCacheType;
use crate::engine::scheduling::blocks::BlockId;

/// Keys and values of every layer, block by block: `[block][offset][kv_head][head_dim]`.
#[derive(Debug)]
pub struct KvStore {
    pub block_size: usize,
    /// Elements per cached token per layer (KV heads × head dim).
    pub width: usize,
    head_dim: usize,
    layers: Vec<LayerKv>,
}

/// One layer's keys and values.
#[derive(Debug)]
enum LayerKv {
    F32 {
        keys: Vec<f32>,
        values: Vec<f32>,
    },
    /// `x ≈ scale · q` for each head's `head_dim` elements of a token, `scale = max|x| / 127`.
    Int8 {
        keys: Vec<i8>,
        values: Vec<i8>,
        key_scales: Vec<f32>,
        value_scales: Vec<f32>,
    },
}

impl KvStore {
    pub fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        width: usize,
        head_dim: usize,
        dtype: KvCacheType,
    ) -> Self {
        let len = blocks * block_size * width;
        let layer = || match dtype {
            KvCacheType::Auto => LayerKv::F32 {
                keys: vec![0.0; len],
                values: vec![0.0; len],
            },
            KvCacheType::Int8 => LayerKv::Int8 {
                keys: vec![0; len],
                values: vec![0; len],
                key_scales: vec![0.0; len / head_dim],
                value_scales: vec![0.0; len / head_dim],
            },
        };
        Self {
            block_size,
            width,
            head_dim,
            layers: (0..layers).map(|_| layer()).collect(),
        }
    }

    /// Bytes one block takes across all layers, keys and values (and their scales).
    pub fn bytes_per_block(
        layers: usize,
        block_size: usize,
        width: usize,
        head_dim: usize,
        dtype: KvCacheType,
    ) -> usize {
        let per_token = match dtype {
            KvCacheType::Auto => width * size_of::<f32>(),
            KvCacheType::Int8 => width + width / head_dim * size_of::<f32>(),
        };
        2 * layers * block_size * per_token
    }

    /// Offset of `position` of a sequence with `table` in a layer's key or value array.
    #[inline]
    pub fn offset(&self, table: &[BlockId], position: usize) -> usize {
        let block = table[position / self.block_size] as usize;
        (block * self.block_size + position % self.block_size) * self.width
    }

    /// Stores one token's keys and values (`width` each) of `layer` at `at`.
    pub fn write(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32]) {
        let (width, hd) = (self.width, self.head_dim);
        match &mut self.layers[layer] {
            LayerKv::F32 { keys, values } => {
                keys[at..at + width].copy_from_slice(k);
                values[at..at + width].copy_from_slice(v);
            }
            LayerKv::Int8 {
                keys,
                values,
                key_scales,
                value_scales,
            } => {
                let heads = at / hd..(at + width) / hd;
                quantize_heads(k, &mut keys[at..at + width], &mut key_scales[heads.clone()]);
                quantize_heads(v, &mut values[at..at + width], &mut value_scales[heads]);
            }
        }
    }

    /// `layer`'s keys and values, in their own type.
    pub fn layer(&self, layer: usize) -> CachedLayer<'_> {
        match &self.layers[layer] {
            LayerKv::F32 { keys, values } => CachedLayer::F32 { keys, values },
            LayerKv::Int8 {
                keys,
                values,
                key_scales,
                value_scales,
            } => CachedLayer::Int8(Int8Layer {
                keys,
                values,
                key_scales,
                value_scales,
                head_dim: self.head_dim,
            }),
        }
    }
}

/// One layer's cached keys and values, at the element offsets of [`KvStore::offset`].
pub enum CachedLayer<'a> {
    F32 { keys: &'a [f32], values: &'a [f32] },
    Int8(Int8Layer<'a>),
}

pub struct Int8Layer<'a> {
    keys: &'a [i8],
    values: &'a [i8],
    key_scales: &'a [f32],
    value_scales: &'a [f32],
    head_dim: usize,
}

impl Int8Layer<'_> {
    /// Elements of one head, each with its own scale.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Dequantizes one head's keys (or values): `head_dim` elements from offset `at` of each row
    /// in `rows`, appended to `out` one row after another.
    pub fn dequantize(&self, rows: impl Iterator<Item = usize>, keys: bool, out: &mut Vec<f32>) {
        let hd = self.head_dim;
        let (elements, scales) = if keys {
            (self.keys, self.key_scales)
        } else {
            (self.values, self.value_scales)
        };
        for at in rows {
            let scale = scales[at / hd];
            out.extend(elements[at..at + hd].iter().map(|&q| scale * f32::from(q)));
        }
    }
}

/// Quantizes each `scales.len()`-th of `x` (one head) to int8 with its own scale.
fn quantize_heads(x: &[f32], out: &mut [i8], scales: &mut [f32]) {
    let hd = x.len() / scales.len();
    for ((x, out), scale) in x.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).zip(scales) {
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = max / 127.0;
        let inverse = if max > 0.0 { 127.0 / max } else { 0.0 };
        for (q, v) in out.iter_mut().zip(x) {
            // In range by construction; `as` saturates a NaN to 0.
            *q = (v * inverse).round() as i8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_block_table() {
        let store = KvStore::new(1, 4, 16, 8, 8, KvCacheType::Auto);
        assert_eq!(store.offset(&[2, 0], 0), 2 * 16 * 8);
        assert_eq!(store.offset(&[2, 0], 17), 8);
    }

    #[test]
    fn int8_blocks_take_a_quarter_of_f32_and_their_scales() {
        let f32_bytes = KvStore::bytes_per_block(30, 16, 192, 64, KvCacheType::Auto);
        let int8_bytes = KvStore::bytes_per_block(30, 16, 192, 64, KvCacheType::Int8);
        assert_eq!(f32_bytes, 2 * 30 * 16 * 192 * 4);
        assert_eq!(int8_bytes, 2 * 30 * 16 * (192 + 3 * 4));
        // Against f16 (2 bytes an element): 68 of 128 bytes per head.
        assert!((int8_bytes as f64 / (f32_bytes as f64 / 2.0) - 68.0 / 128.0).abs() < 1e-9);
    }

    #[test]
    fn int8_keys_and_values_read_back_within_half_a_step_of_their_heads_scale() {
        // Two heads of four, the second a hundred times larger: each keeps its own scale.
        let k = [0.5, -1.0, 0.25, 0.0, 50.0, -100.0, 25.0, 12.5];
        let v = [-0.3, 0.6, 0.9, -1.2, 30.0, -60.0, 90.0, 120.0];
        let mut store = KvStore::new(1, 2, 4, 8, 4, KvCacheType::Int8);
        let at = store.offset(&[1], 2);
        store.write(0, at, &k, &v);
        let CachedLayer::Int8(layer) = store.layer(0) else {
            panic!("an int8 store")
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        layer.dequantize([at, at + 4].into_iter(), true, &mut keys);
        layer.dequantize([at, at + 4].into_iter(), false, &mut values);
        for (exact, read) in [(k, &keys), (v, &values)] {
            for head in 0..2 {
                let part = 4 * head..4 * head + 4;
                let step = exact[part.clone()].iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (x, y) in exact[part.clone()].iter().zip(&read[part]) {
                    assert!((x - y).abs() <= 0.5 * step * 1.0001, "{x} read as {y}");
                }
            }
        }
        assert_ne!(keys, k, "the small head is not exact");
        // A head of zeros reads back as zeros (no division by a zero scale); an f32 store keeps
        // every bit.
        let zeros = [0.0; 8];
        store.write(0, 0, &zeros, &zeros);
        let CachedLayer::Int8(layer) = store.layer(0) else {
            panic!("an int8 store")
        };
        keys.clear();
        values.clear();
        layer.dequantize([0, 4].into_iter(), true, &mut keys);
        layer.dequantize([0, 4].into_iter(), false, &mut values);
        assert_eq!(
            (keys.as_slice(), values.as_slice()),
            (&zeros[..], &zeros[..])
        );
        let mut exact = KvStore::new(1, 2, 4, 8, 4, KvCacheType::Auto);
        exact.write(0, at, &k, &v);
        let CachedLayer::F32 { keys, values } = exact.layer(0) else {
            panic!("an f32 store")
        };
        assert_eq!((&keys[at..at + 8], &values[at..at + 8]), (&k[..], &v[..]));
    }
}
