//! Prefix affinity without tokenizing: a prompt's text is cut into fixed chunks, each chunk's
//! key a hash of its bytes chained to the keys before it (as the agents key their KV blocks), and
//! the router remembers which groups were last sent each key. The group that was sent the longest
//! run of a request's leading keys probably still holds those blocks in its prefix cache.

use std::collections::{HashMap, VecDeque};

/// Bytes of prompt text per chunk: about 16 tokens of English, one KV block.
pub const CHUNK_BYTES: usize = 64;
/// Chunks looked at per request (8 KiB of prompt): beyond it, affinity is already decided.
pub const MAX_CHUNKS: usize = 128;
/// Groups remembered per key.
const OWNERS_PER_KEY: usize = 4;

/// The chained keys of `text`'s whole chunks, seeded by `seed` (the model's name).
pub fn chunk_keys(seed: &str, text: &[u8]) -> Vec<u64> {
    let mut key = fnv1a(0xcbf2_9ce4_8422_2325, seed.as_bytes());
    text.chunks_exact(CHUNK_BYTES)
        .take(MAX_CHUNKS)
        .map(|chunk| {
            key = fnv1a(key, chunk);
            key
        })
        .collect()
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Which groups each key was sent to, most recent last; at most `capacity` keys, the least
/// recently sent forgotten first.
#[derive(Debug)]
pub struct PrefixIndex {
    owners: HashMap<u64, Vec<(String, u64)>>,
    /// (key, stamp) in the order keys were sent; an entry whose stamp is not its key's latest
    /// is stale and skipped when forgetting.
    order: VecDeque<(u64, u64)>,
    latest: HashMap<u64, u64>,
    stamp: u64,
    capacity: usize,
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            owners: HashMap::new(),
            order: VecDeque::new(),
            latest: HashMap::new(),
            stamp: 0,
            capacity: capacity.max(1),
        }
    }

    /// How many of `keys`, from the first, were sent to `group`.
    pub fn matched(&self, keys: &[u64], group: &str) -> usize {
        keys.iter()
            .take_while(|key| {
                self.owners
                    .get(key)
                    .is_some_and(|owners| owners.iter().any(|(g, _)| g == group))
            })
            .count()
    }

    /// `keys` were sent to `group`.
    pub fn record(&mut self, keys: &[u64], group: &str) {
        for &key in keys {
            self.stamp += 1;
            let stamp = self.stamp;
            let owners = self.owners.entry(key).or_default();
            owners.retain(|(g, _)| g != group);
            owners.push((group.to_owned(), stamp));
            if owners.len() > OWNERS_PER_KEY {
                owners.remove(0);
            }
            self.latest.insert(key, stamp);
            self.order.push_back((key, stamp));
        }
        while self.latest.len() > self.capacity {
            let Some((key, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.latest.get(&key) == Some(&stamp) {
                self.latest.remove(&key);
                self.owners.remove(&key);
            }
        }
        // Stale entries are dropped once they outnumber the live ones.
        if self.order.len() > 2 * self.capacity {
            let latest = &self.latest;
            self.order
                .retain(|(key, stamp)| latest.get(key) == Some(stamp));
        }
    }

    /// Forgets a group that left.
    pub fn forget(&mut self, group: &str) {
        self.owners.retain(|_, owners| {
            owners.retain(|(g, _)| g != group);
            !owners.is_empty()
        });
        let owners = &self.owners;
        self.latest.retain(|key, _| owners.contains_key(key));
    }

    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u8, bytes: usize) -> Vec<u8> {
        (0..bytes).map(|i| b'a' + (i as u8 ^ seed) % 26).collect()
    }

    #[test]
    fn keys_cover_whole_chunks_and_chain_on_what_came_before() {
        let long = text(1, 3 * CHUNK_BYTES + 10);
        let keys = chunk_keys("m", &long);
        assert_eq!(keys.len(), 3, "the partial last chunk has no key");
        let mut changed = long.clone();
        changed[0] = b'!';
        let other = chunk_keys("m", &changed);
        assert!(
            keys.iter().zip(&other).all(|(a, b)| a != b),
            "a different first chunk changes every key after it"
        );
        assert_ne!(chunk_keys("other model", &long), keys);
        assert_eq!(chunk_keys("m", &long[..3 * CHUNK_BYTES]), keys);
    }

    #[test]
    fn the_group_sent_the_longest_leading_run_matches_most() {
        let mut index = PrefixIndex::new(1000);
        let shared = chunk_keys("m", &text(2, 4 * CHUNK_BYTES));
        index.record(&shared[..2], "a");
        index.record(&shared, "b");
        assert_eq!(index.matched(&shared, "a"), 2);
        assert_eq!(index.matched(&shared, "b"), 4);
        assert_eq!(index.matched(&shared, "c"), 0);
        // A run counts from the first key: a later key alone does not.
        let mut tail_only = PrefixIndex::new(1000);
        tail_only.record(&shared[2..], "a");
        assert_eq!(tail_only.matched(&shared, "a"), 0);
    }

    #[test]
    fn the_least_recently_sent_keys_are_forgotten_first() {
        let mut index = PrefixIndex::new(4);
        let old = chunk_keys("m", &text(3, 2 * CHUNK_BYTES));
        let new = chunk_keys("m", &text(4, 3 * CHUNK_BYTES));
        index.record(&old, "a");
        index.record(&old[..1], "a"); // the first key is sent again: it is recent now
        index.record(&new, "b");
        assert_eq!(index.len(), 4);
        assert_eq!(index.matched(&old, "a"), 1, "the second old key went first");
        assert_eq!(index.matched(&new, "b"), 3);
        for _ in 0..100 {
            index.record(&new, "b");
        }
        assert!(index.order.len() <= 2 * 4 + new.len());
    }

    #[test]
    fn a_group_that_left_is_forgotten() {
        let mut index = PrefixIndex::new(100);
        let keys = chunk_keys("m", &text(5, 2 * CHUNK_BYTES));
        index.record(&keys, "a");
        index.record(&keys, "b");
        index.forget("a");
        assert_eq!(index.matched(&keys, "a"), 0);
        assert_eq!(index.matched(&keys, "b"), 2);
        index.forget("b");
        assert!(index.is_empty());
    }
}
