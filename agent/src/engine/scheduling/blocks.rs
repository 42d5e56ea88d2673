//! The paged KV cache's bookkeeping, apart from the memory the backend keeps: a pool of
//! fixed-size blocks counted once at start-up, a block allocator with a free list and reference
//! counts (O(1) allocate and free), per-sequence block tables that give their blocks back when
//! dropped, and the prefix cache.
//!
//! Prefix caching: a full block is known by the hash of (its parent block's hash, its tokens), so
//! a hash names a whole prefix. A table enters its full blocks into the cache as they are
//! computed; a new sequence takes the longest run of cached blocks that its tokens begin with
//! (sharing them by reference count) and computes only the rest. A cached block that no table
//! holds stays cached, in least-recently-released order, until a new block is needed and no
//! block is free: then the oldest is evicted. Cached-but-unheld blocks count as free.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::rc::Rc;

/// Index of a block in the pool.
pub type BlockId = u32;

/// A full block's content hash: its tokens and, through its parent's hash, every token before.
pub type BlockHash = u64;

const NONE: BlockId = BlockId::MAX;

/// Blocks in release order, oldest first, as an intrusive doubly linked list over block ids:
/// insert at the back, remove anywhere and pop the front, each O(1).
#[derive(Debug)]
struct Lru {
    prev: Vec<BlockId>,
    next: Vec<BlockId>,
    linked: Vec<bool>,
    head: BlockId,
    tail: BlockId,
    len: usize,
}

impl Lru {
    fn new(blocks: usize) -> Self {
        Self {
            prev: vec![NONE; blocks],
            next: vec![NONE; blocks],
            linked: vec![false; blocks],
            head: NONE,
            tail: NONE,
            len: 0,
        }
    }

    fn push_back(&mut self, id: BlockId) {
        debug_assert!(!self.linked[id as usize]);
        self.prev[id as usize] = self.tail;
        self.next[id as usize] = NONE;
        match self.tail {
            NONE => self.head = id,
            tail => self.next[tail as usize] = id,
        }
        self.tail = id;
        self.linked[id as usize] = true;
        self.len += 1;
    }

    fn remove(&mut self, id: BlockId) {
        if !self.linked[id as usize] {
            return;
        }
        let (prev, next) = (self.prev[id as usize], self.next[id as usize]);
        match prev {
            NONE => self.head = next,
            p => self.next[p as usize] = next,
        }
        match next {
            NONE => self.tail = prev,
            n => self.prev[n as usize] = prev,
        }
        self.linked[id as usize] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<BlockId> {
        let id = self.head;
        (id != NONE).then(|| {
            self.remove(id);
            id
        })
    }
}

/// What the prefix cache knows of a cached block.
#[derive(Debug)]
struct Cached {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct Pool {
    /// Blocks with no content worth keeping, lowest ids last.
    free: Vec<BlockId>,
    refs: Vec<u32>,
    /// Whether full blocks are entered into the prefix cache.
    prefix_caching: bool,
    hasher: RandomState,
    /// Cached content, by block.
    cached: Vec<Option<Cached>>,
    /// Cached blocks by content hash.
    index: HashMap<BlockHash, BlockId>,
    /// Cached blocks that no table holds, oldest release first: evicted from the front.
    evictable: Lru,
}

impl Pool {
    /// Forgets a block's cached content.
    fn uncache(&mut self, id: BlockId) {
        if let Some(c) = self.cached[id as usize].take() {
            self.index.remove(&c.hash);
        }
    }
}

/// The hash of the parent of a sequence's first block.
const ROOT: BlockHash = 0x9e37_79b9_7f4a_7c15;

/// Hands out blocks. Cloning shares the pool (single-owner engine thread: `Rc`, not `Arc`).
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    pool: Rc<RefCell<Pool>>,
    total: usize,
}

impl BlockAllocator {
    /// A pool of `blocks` blocks without a prefix cache.
    pub fn new(blocks: usize) -> Self {
        Self::with_prefix_caching(blocks, false)
    }

    /// A pool of `blocks` blocks; with `prefix_caching`, full blocks are shared between
    /// sequences whose tokens begin alike.
    pub fn with_prefix_caching(blocks: usize, prefix_caching: bool) -> Self {
        // Lowest ids first: pop from the end of a reversed list.
        let free = (0..blocks as BlockId).rev().collect();
        Self {
            pool: Rc::new(RefCell::new(Pool {
                free,
                refs: vec![0; blocks],
                prefix_caching,
                hasher: RandomState::new(),
                cached: (0..blocks).map(|_| None).collect(),
                index: HashMap::new(),
                evictable: Lru::new(blocks),
            })),
            total: blocks,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks a table may take now: those never used or given back, and cached blocks no table
    /// holds (evicted when taken).
    pub fn free(&self) -> usize {
        let pool = self.pool.borrow();
        pool.free.len() + pool.evictable.len
    }

    /// Blocks held by at least one table.
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

    /// Blocks whose content is in the prefix cache, held or not.
    pub fn cached(&self) -> usize {
        self.pool.borrow().index.len()
    }

    pub fn prefix_caching(&self) -> bool {
        self.pool.borrow().prefix_caching
    }

    /// A block for a table: a free one, or else the least recently released cached one, whose
    /// content is forgotten.
    fn allocate(&self) -> Option<BlockId> {
        let mut pool = self.pool.borrow_mut();
        let id = match pool.free.pop() {
            Some(id) => id,
            None => {
                let id = pool.evictable.pop_front()?;
                pool.uncache(id);
                id
            }
        };
        pool.refs[id as usize] = 1;
        Some(id)
    }

    fn release(&self, id: BlockId) {
        let mut pool = self.pool.borrow_mut();
        let refs = &mut pool.refs[id as usize];
        debug_assert!(*refs > 0, "block {id} released twice");
        *refs -= 1;
        if *refs == 0 {
            if pool.cached[id as usize].is_some() {
                pool.evictable.push_back(id);
            } else {
                pool.free.push(id);
            }
        }
    }

    fn hash(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let mut hasher = self.pool.borrow().hasher.build_hasher();
        parent.hash(&mut hasher);
        tokens.hash(&mut hasher);
        hasher.finish()
    }

    /// The cached block with this content, now held once more by the caller.
    fn take_cached(&self, hash: BlockHash, parent: BlockHash, tokens: &[u32]) -> Option<BlockId> {
        let mut pool = self.pool.borrow_mut();
        let id = *pool.index.get(&hash)?;
        // The hash is keyed per process; checking the content too rules collisions out.
        let content = pool.cached[id as usize].as_ref()?;
        if content.parent != parent || *content.tokens != *tokens {
            return None;
        }
        pool.evictable.remove(id);
        pool.refs[id as usize] += 1;
        Some(id)
    }

    /// Enters a full, computed block into the cache, unless that content is already cached (in
    /// another block, which then stays the one found).
    fn enter(&self, id: BlockId, hash: BlockHash, parent: BlockHash, tokens: &[u32]) {
        let mut pool = self.pool.borrow_mut();
        if !pool.prefix_caching
            || pool.cached[id as usize].is_some()
            || pool.index.contains_key(&hash)
        {
            return;
        }
        pool.index.insert(hash, id);
        pool.cached[id as usize] = Some(Cached {
            hash,
            parent,
            tokens: tokens.into(),
        });
    }
}

/// The blocks of one sequence, in position order. Dropping it frees them.
#[derive(Debug)]
pub struct BlockTable {
    allocator: BlockAllocator,
    blocks: Vec<BlockId>,
    block_size: usize,
    /// Content hashes of the leading full blocks already looked up in or entered into the prefix
    /// cache, in order.
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn new(allocator: &BlockAllocator, block_size: usize) -> Self {
        Self {
            allocator: allocator.clone(),
            blocks: Vec::new(),
            block_size,
            hashes: Vec::new(),
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

    /// Frees every block (preemption); the table stays usable. The last blocks go first, so
    /// that a prefix's tail is evicted before its head.
    pub fn clear(&mut self) {
        while let Some(id) = self.blocks.pop() {
            self.allocator.release(id);
        }
        self.hashes.clear();
    }

    /// Takes, into an empty table, the longest run of cached blocks that `tokens` begins with,
    /// leaving at least the last token to compute (its logits are needed). Returns the tokens
    /// the table now holds computed: whole blocks, 0 when nothing matched.
    pub fn reuse_cached_prefix(&mut self, tokens: &[u32]) -> usize {
        debug_assert!(
            self.blocks.is_empty(),
            "only an empty table reuses a prefix"
        );
        if !self.allocator.prefix_caching() {
            return 0;
        }
        let full = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = ROOT;
        for block in tokens.chunks_exact(self.block_size).take(full) {
            let hash = self.allocator.hash(parent, block);
            let Some(id) = self.allocator.take_cached(hash, parent, block) else {
                break;
            };
            self.blocks.push(id);
            self.hashes.push(hash);
            parent = hash;
        }
        self.blocks.len() * self.block_size
    }

    /// The content hash of the block that the sequence's next computed token falls in: the
    /// block it is filling, when every block before it is cached and it lies whole before the
    /// last token (so that a sequence with the same tokens could reuse it, see
    /// [`Self::reuse_cached_prefix`]). Two sequences with the same frontier would compute the
    /// same reusable block.
    pub fn frontier(&self, tokens: &[u32], computed: usize) -> Option<BlockHash> {
        if !self.allocator.prefix_caching() {
            return None;
        }
        let index = computed / self.block_size;
        let reusable = &tokens[..tokens.len().saturating_sub(1)];
        let block = reusable.get(index * self.block_size..(index + 1) * self.block_size)?;
        if self.hashes.len() != index {
            return None;
        }
        let parent = self.hashes.last().copied().unwrap_or(ROOT);
        Some(self.allocator.hash(parent, block))
    }

    /// Enters the full blocks among the first `computed` of `tokens` (whose keys and values are
    /// written) into the prefix cache.
    pub fn cache_computed(&mut self, tokens: &[u32], computed: usize) {
        if !self.allocator.prefix_caching() {
            return;
        }
        let full = (computed / self.block_size).min(self.blocks.len());
        for i in self.hashes.len()..full {
            let block = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let parent = self.hashes.last().copied().unwrap_or(ROOT);
            let hash = self.allocator.hash(parent, block);
            self.allocator.enter(self.blocks[i], hash, parent, block);
            self.hashes.push(hash);
        }
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
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

    /// A table holding `tokens`, computed, as the engine leaves one after a step.
    fn computed(allocator: &BlockAllocator, tokens: &[u32]) -> BlockTable {
        let mut table = BlockTable::new(allocator, 4);
        assert!(table.reserve(tokens.len()));
        table.cache_computed(tokens, tokens.len());
        table
    }

    #[test]
    fn a_cached_prefix_is_shared_and_freed_by_its_last_holder() {
        let allocator = BlockAllocator::with_prefix_caching(8, true);
        let prompt: Vec<u32> = (0..10).collect();
        let a = computed(&allocator, &prompt);
        // Two full blocks (8 tokens) are cached; the third holds 2 tokens and is not.
        assert_eq!((allocator.cached(), allocator.used()), (2, 3));
        let mut b = BlockTable::new(&allocator, 4);
        assert_eq!(b.reuse_cached_prefix(&prompt), 8);
        assert_eq!(b.blocks(), &a.blocks()[..2], "the same blocks, shared");
        assert_eq!(allocator.used(), 3, "sharing takes no new block");
        drop(a);
        assert_eq!(allocator.used(), 2, "still held by b");
        drop(b);
        assert_eq!(allocator.used(), 0);
        assert_eq!(
            (allocator.free(), allocator.cached()),
            (8, 2),
            "unheld cached blocks count as free and stay cached"
        );
        let mut c = BlockTable::new(&allocator, 4);
        assert_eq!(
            c.reuse_cached_prefix(&prompt),
            8,
            "found again after release"
        );
    }

    #[test]
    fn at_least_the_last_token_is_left_to_compute_and_a_different_token_ends_the_match() {
        let allocator = BlockAllocator::with_prefix_caching(8, true);
        let prompt: Vec<u32> = (0..8).collect();
        let _a = computed(&allocator, &prompt);
        let mut same = BlockTable::new(&allocator, 4);
        assert_eq!(
            same.reuse_cached_prefix(&prompt),
            4,
            "the second block holds the last token"
        );
        let mut other = BlockTable::new(&allocator, 4);
        let changed: Vec<u32> = (0..9).map(|t| if t == 5 { 99 } else { t }).collect();
        assert_eq!(other.reuse_cached_prefix(&changed), 4);
        let mut shifted = BlockTable::new(&allocator, 4);
        let later: Vec<u32> = (1..10).collect();
        assert_eq!(
            shifted.reuse_cached_prefix(&later),
            0,
            "a block is known by all tokens before it"
        );
    }

    #[test]
    fn the_least_recently_released_cached_blocks_are_evicted_tail_first() {
        let allocator = BlockAllocator::with_prefix_caching(4, true);
        let first: Vec<u32> = (0..8).collect();
        let second: Vec<u32> = (100..108).collect();
        drop(computed(&allocator, &first));
        drop(computed(&allocator, &second));
        assert_eq!((allocator.cached(), allocator.free()), (4, 4));
        // One new block evicts the oldest release: the first prefix's tail.
        let mut fresh = BlockTable::new(&allocator, 4);
        assert!(fresh.reserve(4));
        assert_eq!(allocator.cached(), 3);
        let probe = |tokens: &[u32]| {
            let mut table = BlockTable::new(&allocator, 4);
            let mut longer = tokens.to_vec();
            longer.push(7);
            table.reuse_cached_prefix(&longer)
        };
        assert_eq!(probe(&first), 4, "its head is still cached");
        assert_eq!(probe(&second), 8);
        // Taking every block evicts the rest.
        assert!(fresh.reserve(16));
        assert_eq!((allocator.cached(), allocator.free()), (0, 0));
        assert_eq!(probe(&second), 0);
    }

    #[test]
    fn without_prefix_caching_nothing_is_cached() {
        let allocator = BlockAllocator::new(4);
        let prompt: Vec<u32> = (0..9).collect();
        drop(computed(&allocator, &prompt));
        assert_eq!(allocator.cached(), 0);
        assert_eq!(
            BlockTable::new(&allocator, 4).reuse_cached_prefix(&prompt),
            0
        );
    }
}
