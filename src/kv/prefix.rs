//! The prefix cache of a [`super::PagedKv`] pool: full blocks named by a hash chain of their tokens
//! (block `i` of a sequence is named by `hash(name of block i - 1, its block_size tokens)`), an index
//! from name to block id, and the cached blocks no sequence uses, in least-recently-used order.
//!
//! A name is a 64-bit hash, so the index also keeps each cached block's parent name and tokens and a
//! lookup compares them: a hash collision is a miss, never a wrong block.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The name of a full block: a hash of its parent's name (`None` for a sequence's first block) and
/// its tokens.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What the index holds about one cached block.
#[derive(Debug, Clone)]
struct Entry {
    block: usize,
    parent: Option<u64>,
    tokens: Vec<u32>,
}

/// Index of named blocks and the LRU order of the unused ones.
#[derive(Debug, Clone, Default)]
pub(super) struct PrefixCache {
    by_name: HashMap<u64, Entry>,
    /// Unused cached blocks by the tick they were last released at (oldest first).
    lru: BTreeMap<u64, usize>,
    /// The tick of each block in `lru`.
    lru_tick: HashMap<usize, u64>,
    tick: u64,
}

impl PrefixCache {
    /// The block named `name` holding exactly `tokens` after `parent`, if cached.
    pub(super) fn lookup(&self, name: u64, parent: Option<u64>, tokens: &[u32]) -> Option<usize> {
        self.by_name
            .get(&name)
            .filter(|e| e.parent == parent && e.tokens == tokens)
            .map(|e| e.block)
    }

    /// True when some block is named `name`.
    pub(super) fn contains(&self, name: u64) -> bool {
        self.by_name.contains_key(&name)
    }

    /// Names `block` (which must not be named yet, nor `name` taken).
    pub(super) fn insert(&mut self, name: u64, block: usize, parent: Option<u64>, tokens: &[u32]) {
        self.by_name.insert(
            name,
            Entry {
                block,
                parent,
                tokens: tokens.to_vec(),
            },
        );
    }

    /// Forgets the name `name` (its block's content is about to change or be reused).
    pub(super) fn remove(&mut self, name: u64) {
        self.by_name.remove(&name);
    }

    /// Named blocks.
    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Puts an unused named block at the most-recently-used end.
    pub(super) fn park(&mut self, block: usize) {
        self.tick += 1;
        self.lru.insert(self.tick, block);
        self.lru_tick.insert(block, self.tick);
    }

    /// Takes `block` out of the unused list (a sequence uses it again); false when it was not there.
    pub(super) fn unpark(&mut self, block: usize) -> bool {
        match self.lru_tick.remove(&block) {
            Some(tick) => self.lru.remove(&tick).is_some(),
            None => false,
        }
    }

    /// The least recently used unused block, taken out of the list (its name stays until the
    /// caller removes it).
    pub(super) fn pop_oldest(&mut self) -> Option<usize> {
        let (_, block) = self.lru.pop_first()?;
        self.lru_tick.remove(&block);
        Some(block)
    }

    /// Unused named blocks.
    pub(super) fn parked(&self) -> usize {
        self.lru.len()
    }

    /// True when `block` is in the unused list.
    pub(super) fn is_parked(&self, block: usize) -> bool {
        self.lru_tick.contains_key(&block)
    }

    /// Every (name, block) of the index.
    pub(super) fn names(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.by_name.iter().map(|(&n, e)| (n, e.block))
    }
}
