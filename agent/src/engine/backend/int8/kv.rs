//! The int8 backend's KV memory: f32 keys and values of every layer, addressed through block
//! tables.

use crate::engine::scheduling::blocks::BlockId;

/// Keys and values of every layer, block by block: `[block][offset][kv_head][head_dim]`.
#[derive(Debug)]
pub struct KvStore {
    pub block_size: usize,
    /// Floats per cached token per layer (KV heads × head dim).
    pub width: usize,
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
}

impl KvStore {
    pub fn new(layers: usize, blocks: usize, block_size: usize, width: usize) -> Self {
        let len = blocks * block_size * width;
        Self {
            block_size,
            width,
            keys: (0..layers).map(|_| vec![0.0; len]).collect(),
            values: (0..layers).map(|_| vec![0.0; len]).collect(),
        }
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(layers: usize, block_size: usize, width: usize) -> usize {
        2 * layers * block_size * width * size_of::<f32>()
    }

    /// Offset of `position` of a sequence with `table` in a layer's key or value array.
    #[inline]
    pub fn offset(&self, table: &[BlockId], position: usize) -> usize {
        let block = table[position / self.block_size] as usize;
        (block * self.block_size + position % self.block_size) * self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_block_table() {
        let store = KvStore::new(1, 4, 16, 8);
        assert_eq!(store.offset(&[2, 0], 0), 2 * 16 * 8);
        assert_eq!(store.offset(&[2, 0], 17), 8);
    }
}
