//! The paged KV cache: a pool of fixed-size blocks allocated once at start-up, a block allocator
//! with a free list and reference counts (O(1) allocate and free), and per-sequence block tables
//! that give their blocks back when dropped.

use std::cell::RefCell;
use std::rc::Rc;

/// Index of a block in the pool.
pub type BlockId = u32;

#[derive(Debug)]
struct Pool {
    free: Vec<BlockId>,
    refs: Vec<u32>,
}

/// Hands out blocks. Cloning shares the pool (single-owner engine thread: `Rc`, not `Arc`).
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    pool: Rc<RefCell<Pool>>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(blocks: usize) -> Self {
        // Lowest ids first: pop from the end of a reversed list.
        let free = (0..blocks as BlockId).rev().collect();
        Self {
            pool: Rc::new(RefCell::new(Pool {
                free,
                refs: vec![0; blocks],
            })),
            total: blocks,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.pool.borrow().free.len()
    }

    pub fn used(&self) -> usize {
        self.total - self.free()
    }

    /// Fraction of blocks in use, 0.0–1.0.
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used() as f64 / self.total as f64
        }
    }

    fn allocate(&self) -> Option<BlockId> {
        let mut pool = self.pool.borrow_mut();
        let id = pool.free.pop()?;
        pool.refs[id as usize] = 1;
        Some(id)
    }

    fn release(&self, id: BlockId) {
        let mut pool = self.pool.borrow_mut();
        let refs = &mut pool.refs[id as usize];
        debug_assert!(*refs > 0, "block {id} released twice");
        *refs -= 1;
        if *refs == 0 {
            pool.free.push(id);
        }
    }

    /// Adds a reference to a block another table holds (prefix sharing).
    pub fn share(&self, id: BlockId) {
        self.pool.borrow_mut().refs[id as usize] += 1;
    }
}

/// The blocks of one sequence, in position order. Dropping it frees them.
#[derive(Debug)]
pub struct BlockTable {
    allocator: BlockAllocator,
    blocks: Vec<BlockId>,
    block_size: usize,
}

impl BlockTable {
    pub fn new(allocator: &BlockAllocator, block_size: usize) -> Self {
        Self {
            allocator: allocator.clone(),
            blocks: Vec::new(),
            block_size,
        }
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Tokens the table can hold now.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// Blocks needed beyond those held to hold `tokens` tokens.
    pub fn blocks_needed(&self, tokens: usize) -> usize {
        tokens
            .div_ceil(self.block_size)
            .saturating_sub(self.blocks.len())
    }

    /// Whether the free blocks would let the table hold `tokens` tokens.
    pub fn fits(&self, tokens: usize) -> bool {
        self.blocks_needed(tokens) <= self.allocator.free()
    }

    /// Grows the table to hold `tokens` tokens; on failure nothing is allocated.
    pub fn reserve(&mut self, tokens: usize) -> bool {
        let needed = self.blocks_needed(tokens);
        if needed > self.allocator.free() {
            return false;
        }
        for _ in 0..needed {
            let id = self.allocator.allocate().expect("free blocks were counted");
            self.blocks.push(id);
        }
        true
    }

    /// Frees every block (preemption); the table stays usable.
    pub fn clear(&mut self) {
        for id in self.blocks.drain(..) {
            self.allocator.release(id);
        }
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
    }
}

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
    fn tables_allocate_what_they_need_and_free_on_drop() {
        let allocator = BlockAllocator::new(4);
        let mut a = BlockTable::new(&allocator, 16);
        assert!(a.reserve(17));
        assert_eq!((a.blocks().len(), allocator.free()), (2, 2));
        assert!(a.reserve(32), "already holds 32");
        assert_eq!(allocator.free(), 2);
        let mut b = BlockTable::new(&allocator, 16);
        assert!(!b.reserve(48), "three blocks do not fit in two");
        assert_eq!(allocator.free(), 2, "a failed reserve takes nothing");
        assert!(b.reserve(32));
        assert_eq!(allocator.free(), 0);
        drop(a);
        assert_eq!(allocator.free(), 2);
        b.clear();
        assert_eq!(allocator.free(), 4);
        assert!(allocator.usage() == 0.0);
    }

    #[test]
    fn shared_blocks_are_freed_by_their_last_holder() {
        let allocator = BlockAllocator::new(1);
        let mut a = BlockTable::new(&allocator, 16);
        assert!(a.reserve(1));
        let id = a.blocks()[0];
        allocator.share(id);
        drop(a);
        assert_eq!(allocator.free(), 0, "still referenced");
        allocator.release(id);
        assert_eq!(allocator.free(), 1);
    }

    #[test]
    fn offsets_follow_the_block_table() {
        let store = KvStore::new(1, 4, 16, 8);
        assert_eq!(store.offset(&[2, 0], 0), 2 * 16 * 8);
        assert_eq!(store.offset(&[2, 0], 17), 8);
    }
}
