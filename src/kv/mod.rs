//! Paged KV-cache bookkeeping shared by every backend: a pool of `num_blocks` blocks of
//! `block_size` token slots, a block table per sequence, and (when enabled) a prefix cache. The
//! storage of the blocks themselves (e.g. `[block_size, kv_heads, head_dim]` per block and layer)
//! belongs to the backend; this module only decides which block and row each token of each sequence
//! uses, and which blocks the backend must copy.
//!
//! Invariant: a sequence holding `len` tokens has a table of exactly `ceil(len / block_size)`
//! entries, and token `p` lives in row `p % block_size` of block `table[p / block_size]`. Blocks are
//! reference-counted: a block is in the tables of `refs` sequences; at `refs == 0` it is free.
//!
//! Every change a step makes goes through [`PagedKv::apply`] (or [`PagedKv::apply_step`]), which
//! validates the whole batch first and then applies it; a refused step changes nothing. Block ids are
//! handed out lowest-first and freed ids are reused before new ones, so a backend that allocates
//! block storage lazily only ever touches the ids below the pool's high-water mark.
//!
//! Sharing (off unless enabled, so a backend that cannot copy blocks never sees it):
//! - prefix caching ([`PagedKv::with_prefix_caching`]): every full block is named by a hash chain
//!   of its tokens; [`PagedKv::reuse_prefix`] starts a sequence on the cached blocks of the longest
//!   matching prefix; blocks no sequence uses stay cached, in least-recently-used order, and count
//!   as free: the pool takes them (oldest first) only when no never-cached block is left;
//! - [`PagedKv::fork`]: a new sequence sharing every block of another;
//! - copy-on-write: a step that would write a block shared with another sequence gets a fresh block
//!   instead, and [`AppliedStep::copies`] tells the backend to copy the rows already there.
//!
//! Sliding window ([`PagedKv::with_sliding_window`]): before a step, the blocks of a sequence that
//! hold only positions no query of the step (or later) can see are released; their table entries
//! become [`RELEASED`], and a later step may not rewind to where it would need them.

mod invariants;
mod prefix;

pub use prefix::block_hash;

use crate::engine::{EngineError, LogitsFor, SeqId, SeqStep};
use prefix::PrefixCache;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The block-table entry of a block released because it fell out of the sliding window.
pub const RELEASED: usize = usize::MAX;

/// Fixed limits of a [`PagedKv`] pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Token slots per block (at least 1).
    pub block_size: usize,
    /// Blocks in the pool (at least 1).
    pub num_blocks: usize,
    /// Most tokens one sequence may hold (at least 1).
    pub max_context: usize,
    /// Most sequences alive at once (at least 1).
    pub max_sequences: usize,
    /// Vocabulary size: every token id of a step must be below it (at least 1).
    pub vocab_size: usize,
}

/// Where one token's K/V lives: row `offset` of block `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Block id, below [`KvLimits::num_blocks`].
    pub block: usize,
    /// Row inside the block, below [`KvLimits::block_size`].
    pub offset: usize,
}

impl Slot {
    /// The slot of position `pos` in a sequence with block table `table`; `None` when the table
    /// has no block for it.
    pub fn lookup(table: &[usize], block_size: usize, pos: usize) -> Option<Slot> {
        let block = *table.get(pos.checked_div(block_size)?)?;
        Some(Slot {
            block,
            offset: pos % block_size,
        })
    }
}

/// One entry of an applied step, in batch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepEntry {
    /// The sequence.
    pub seq: SeqId,
    /// Absolute position of the entry's first new token.
    pub start_pos: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Index of the entry's first token in the step's flattened token list (entries concatenated
    /// in batch order).
    pub token_offset: usize,
    /// Which positions produce logits.
    pub logits: LogitsFor,
}

impl StepEntry {
    /// Range of the entry's tokens in the flattened token list.
    pub fn tokens(&self) -> std::ops::Range<usize> {
        self.token_offset..self.token_offset + self.len
    }

    /// Indices (into the entry's own tokens) of the positions that produce logits.
    pub fn logit_rows(&self) -> std::ops::Range<usize> {
        match self.logits {
            LogitsFor::None => 0..0,
            LogitsFor::Last => self.len.saturating_sub(1)..self.len,
            LogitsFor::All => 0..self.len,
        }
    }
}

/// The validated shape of an applied step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// One per batch entry, in batch order.
    pub entries: Vec<StepEntry>,
    /// Tokens of all entries together.
    pub total_tokens: usize,
}

/// A block the backend must copy before a step writes it: every row of block `src` into block `dst`
/// (copy-on-write of a shared block; `dst` is a fresh block of the same sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// The shared block read.
    pub src: usize,
    /// The sequence's new block, written.
    pub dst: usize,
}

/// An applied step: its validated shape and the block copies the backend runs before computing it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedStep {
    /// The step's shape.
    pub plan: StepPlan,
    /// Copies to run, in order, before any of the step's K/V is written.
    pub copies: Vec<BlockCopy>,
}

#[derive(Debug, Clone, Default)]
struct Sequence {
    len: usize,
    /// Block table; leading entries may be [`RELEASED`].
    blocks: Vec<usize>,
    /// The tokens at positions `0..len`.
    tokens: Vec<u32>,
    /// Names of the full blocks (hash chain), when prefix caching is on: `names[i]` names block
    /// `i`; never longer than `len / block_size`.
    names: Vec<u64>,
    /// Leading table entries released by the sliding window.
    released: usize,
}

/// Reference count and name of one block id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BlockInfo {
    refs: usize,
    name: Option<u64>,
}

/// What a step does to a block that it writes and that the sequence already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrite {
    /// The block is the sequence's own but named: forget the name (its content changes).
    Unname,
    /// The block is shared: write a fresh block instead, copying the old rows when `copy`.
    Replace { copy: bool },
}

/// The changes a validated step makes to one sequence, decided by [`PagedKv::plan`] and carried out
/// by [`PagedKv::apply`].
#[derive(Debug, Clone)]
struct Change {
    seq: SeqId,
    start_pos: usize,
    end: usize,
    /// Table length kept before growing.
    keep: usize,
    /// Leading table entries released after the step (sliding window).
    released: usize,
    rewrites: Vec<(usize, Rewrite)>,
}

/// A block pool and the block tables of the live sequences.
#[derive(Debug, Clone)]
pub struct PagedKv {
    limits: KvLimits,
    /// Freed never-named block ids, reused before fresh ones (last freed first).
    recycled: Vec<usize>,
    /// Ids `fresh..num_blocks` have never been handed out.
    fresh: usize,
    /// Per block id below `fresh`.
    info: Vec<BlockInfo>,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: u64,
    caching: bool,
    cache: PrefixCache,
    window: Option<usize>,
}

impl PagedKv {
    /// An empty pool, with prefix caching and the sliding window off. Refuses a zero limit with
    /// [`EngineError::InvalidOptions`].
    pub fn new(limits: KvLimits) -> Result<Self, EngineError> {
        let fields = [
            ("block_size", limits.block_size),
            ("num_blocks", limits.num_blocks),
            ("max_context", limits.max_context),
            ("max_sequences", limits.max_sequences),
            ("vocab_size", limits.vocab_size),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(EngineError::InvalidOptions(format!(
                "KV pool {name} must be at least 1"
            )));
        }
        Ok(PagedKv {
            limits,
            recycled: Vec::new(),
            fresh: 0,
            info: Vec::new(),
            seqs: BTreeMap::new(),
            next_id: 0,
            caching: false,
            cache: PrefixCache::default(),
            window: None,
        })
    }

    /// Turns prefix caching on or off (set it before the first sequence). A backend enabling it
    /// must run the copies of [`PagedKv::apply`].
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        self.caching = on;
        self
    }

    /// Releases blocks that fall out of a sliding window of `window` tokens (`None`: never), as
    /// the attention of the model sees them (the query at `p` sees keys `p + 1 - window ..= p`).
    pub fn with_sliding_window(mut self, window: Option<usize>) -> Self {
        self.window = window.map(|w| w.max(1));
        self
    }

    /// The pool's limits.
    pub fn limits(&self) -> &KvLimits {
        &self.limits
    }

    /// True when prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.caching
    }

    /// Blocks currently free: never used, freed, or cached but used by no sequence.
    pub fn free_blocks(&self) -> usize {
        self.recycled.len() + (self.limits.num_blocks - self.fresh) + self.cache.parked()
    }

    /// Blocks named in the prefix cache (used by sequences or not).
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Cached blocks that no sequence uses (free, but kept until the pool needs them).
    pub fn unused_cached_blocks(&self) -> usize {
        self.cache.parked()
    }

    /// Total blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.limits.num_blocks
    }

    /// One more than the highest block id ever handed out (storage a backend needs at most).
    pub fn high_water_mark(&self) -> usize {
        self.fresh
    }

    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Sequences whose tables hold block `block`.
    pub fn block_refs(&self, block: usize) -> usize {
        self.info.get(block).map_or(0, |i| i.refs)
    }

    /// Starts an empty sequence; refuses with [`EngineError::TooManySequences`] at the limit.
    pub fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.insert_sequence(Sequence::default())
    }

    fn insert_sequence(&mut self, s: Sequence) -> Result<SeqId, EngineError> {
        if self.seqs.len() >= self.limits.max_sequences {
            return Err(EngineError::TooManySequences {
                limit: self.limits.max_sequences,
            });
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, s);
        Ok(id)
    }

    /// A new sequence holding the same tokens as `seq`, sharing all of its blocks (a later write to
    /// a shared block is copied on write). Refuses an unknown `seq` and the sequence limit.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        let s = self.get(seq)?.clone();
        let blocks: Vec<usize> = s
            .blocks
            .iter()
            .copied()
            .filter(|&b| b != RELEASED)
            .collect();
        let id = self.insert_sequence(s)?;
        for b in blocks {
            if let Some(i) = self.info.get_mut(b) {
                i.refs += 1;
            }
        }
        Ok(id)
    }

    /// Starts the empty sequence `seq` on the cached blocks of the longest prefix of `tokens` made
    /// of full blocks, leaving at least the last token of `tokens` to compute (a step must produce
    /// its logits). Returns the tokens now cached for `seq` (a multiple of the block size; 0 when
    /// prefix caching is off or nothing matches). Refuses an unknown sequence and one that is not
    /// empty ([`EngineError::SequenceNotEmpty`]).
    pub fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        let len = self.get(seq)?.len;
        if len != 0 {
            return Err(EngineError::SequenceNotEmpty { seq, len });
        }
        if !self.caching {
            return Ok(0);
        }
        let bs = self.limits.block_size;
        let most = (tokens.len().saturating_sub(1) / bs).min(self.limits.max_context / bs);
        let (mut blocks, mut names) = (Vec::new(), Vec::new());
        let mut parent = None;
        for chunk in tokens.chunks_exact(bs).take(most) {
            let name = block_hash(parent, chunk);
            let Some(block) = self.cache.lookup(name, parent, chunk) else {
                break;
            };
            blocks.push(block);
            names.push(name);
            parent = Some(name);
        }
        for &b in &blocks {
            if let Some(i) = self.info.get_mut(b) {
                if i.refs == 0 {
                    self.cache.unpark(b);
                }
                i.refs += 1;
            }
        }
        let cached = blocks.len() * bs;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        s.blocks = blocks;
        s.names = names;
        s.len = cached;
        s.tokens = tokens[..cached].to_vec();
        Ok(cached)
    }

    /// Ends a sequence; each of its blocks no other sequence holds is free again (a cached one
    /// stays cached, as the most recently used).
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        self.release_all(&s.blocks);
        Ok(())
    }

    /// Tokens cached for `seq`.
    pub fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.get(seq).map(|s| s.len)
    }

    /// The block table of `seq`: block id of positions `i * block_size ..` at index `i`
    /// ([`RELEASED`] for a block the sliding window released).
    pub fn block_table(&self, seq: SeqId) -> Result<&[usize], EngineError> {
        self.get(seq).map(|s| s.blocks.as_slice())
    }

    /// The slot of position `pos` of `seq`; `None` when the sequence is unknown, holds no more
    /// than `pos` tokens, or released the block.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Option<Slot> {
        let s = self.seqs.get(&seq)?;
        if pos >= s.len {
            return None;
        }
        Slot::lookup(&s.blocks, self.limits.block_size, pos).filter(|s| s.block != RELEASED)
    }

    fn get(&self, seq: SeqId) -> Result<&Sequence, EngineError> {
        self.seqs.get(&seq).ok_or(EngineError::UnknownSequence(seq))
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.limits.block_size)
    }

    /// Drops one reference to each block of `blocks` (skipping [`RELEASED`]); a block left with none
    /// is parked in the cache when named, else recycled (so that the lowest id of the run is
    /// handed out first).
    fn release_all(&mut self, blocks: &[usize]) {
        for &b in blocks.iter().rev() {
            let Some(info) = self.info.get_mut(b) else {
                continue; // RELEASED, or never handed out (unreachable)
            };
            info.refs = info.refs.saturating_sub(1);
            if info.refs > 0 {
                continue;
            }
            if info.name.is_some() {
                self.cache.park(b);
            } else {
                self.recycled.push(b);
            }
        }
    }

    /// A free block with one reference: a recycled one, else a never-used one, else the least
    /// recently used cached one (its name forgotten).
    fn take_block(&mut self) -> Option<usize> {
        let block = if let Some(b) = self.recycled.pop() {
            b
        } else if self.fresh < self.limits.num_blocks {
            self.fresh += 1;
            self.info.push(BlockInfo::default());
            self.fresh - 1
        } else {
            let b = self.cache.pop_oldest()?;
            if let Some(name) = self.info.get_mut(b).and_then(|i| i.name.take()) {
                self.cache.remove(name);
            }
            b
        };
        if let Some(i) = self.info.get_mut(block) {
            i.refs = 1;
        }
        Some(block)
    }

    /// Checks a whole step batch without changing anything: every entry non-empty, token ids below
    /// the vocabulary, no sequence twice, every sequence known, `start_pos` at most its cached
    /// length and not before what the sliding window released, `start_pos + tokens` within the
    /// context, and enough free blocks for all entries together (counting the blocks that rewinding
    /// entries and the window give back, and the fresh blocks of copy-on-write). Errors are reported
    /// for the first failing entry in batch order, in that order of checks; the block check comes
    /// last and names the first entry at which the blocks needed so far exceed the free ones.
    pub fn check_step(&self, batch: &[SeqStep<'_>]) -> Result<StepPlan, EngineError> {
        self.plan(batch).map(|(plan, _)| plan)
    }

    fn plan(&self, batch: &[SeqStep<'_>]) -> Result<(StepPlan, Vec<Change>), EngineError> {
        let bs = self.limits.block_size;
        let mut seen = HashSet::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        let mut changes = Vec::with_capacity(batch.len());
        let mut offset = 0usize;
        for step in batch {
            if step.tokens.is_empty() {
                return Err(EngineError::EmptyStep(step.seq));
            }
            if let Some(&token) = step
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.limits.vocab_size)
            {
                return Err(EngineError::TokenOutOfRange {
                    token,
                    vocab: self.limits.vocab_size,
                });
            }
            if !seen.insert(step.seq) {
                return Err(EngineError::DuplicateSequence(step.seq));
            }
            let s = self.get(step.seq)?;
            if step.start_pos > s.len {
                return Err(EngineError::BadStartPosition {
                    seq: step.seq,
                    cached: s.len,
                    start_pos: step.start_pos,
                });
            }
            let first_needed = match self.window {
                Some(w) => (step.start_pos + 1).saturating_sub(w),
                None => 0,
            };
            if first_needed < s.released * bs {
                return Err(EngineError::WindowReleased {
                    seq: step.seq,
                    start_pos: step.start_pos,
                    first_kept: s.released * bs,
                });
            }
            let end = step.start_pos.checked_add(step.tokens.len());
            let end = match end {
                Some(end) if end <= self.limits.max_context => end,
                _ => {
                    return Err(EngineError::ContextOverflow {
                        seq: step.seq,
                        needed: end.unwrap_or(usize::MAX),
                        max_context: self.limits.max_context,
                    })
                }
            };
            changes.push(Change {
                seq: step.seq,
                start_pos: step.start_pos,
                end,
                keep: s.blocks.len().min(self.blocks_for(end)),
                released: (first_needed / bs).max(s.released),
                rewrites: Vec::new(),
            });
            entries.push(StepEntry {
                seq: step.seq,
                start_pos: step.start_pos,
                len: step.tokens.len(),
                token_offset: offset,
                logits: step.logits,
            });
            offset += step.tokens.len();
        }
        // Releases first (as `apply` does), counting the blocks left with no reference.
        let mut refs: HashMap<usize, usize> = HashMap::new();
        let mut freed = 0;
        for c in &changes {
            let s = self.get(c.seq)?;
            let dropped = s.blocks[c.keep..].iter();
            let windowed = s.blocks[s.released..c.released.min(c.keep)].iter();
            for &b in dropped.chain(windowed).filter(|&&b| b != RELEASED) {
                let r = refs.entry(b).or_insert(self.block_refs(b));
                *r = r.saturating_sub(1);
                if *r == 0 {
                    freed += 1;
                }
            }
        }
        let free = self.free_blocks() + freed;
        let mut needed = 0;
        for c in &mut changes {
            let s = self.get(c.seq)?;
            for idx in c.start_pos / bs..c.keep {
                let b = s.blocks[idx];
                let r = refs.entry(b).or_insert(self.block_refs(b));
                if *r > 1 {
                    *r -= 1;
                    needed += 1;
                    let copy = idx == c.start_pos / bs && c.start_pos % bs != 0;
                    c.rewrites.push((idx, Rewrite::Replace { copy }));
                } else if self.info.get(b).is_some_and(|i| i.name.is_some()) {
                    c.rewrites.push((idx, Rewrite::Unname));
                }
            }
            needed += self.blocks_for(c.end) - c.keep;
            if needed > free {
                return Err(EngineError::KvCacheFull {
                    seq: c.seq,
                    needed,
                    free,
                });
            }
        }
        let plan = StepPlan {
            entries,
            total_tokens: offset,
        };
        Ok((plan, changes))
    }

    /// Validates `batch` (see [`PagedKv::check_step`]) and then applies it: each sequence is cut
    /// to `start_pos` tokens (blocks past the new end lose a reference), loses the blocks the
    /// sliding window no longer sees, gets a fresh block for each shared block it would write
    /// (copy-on-write, listed in [`AppliedStep::copies`]) and grows by its new tokens (blocks taken
    /// from the pool); full blocks get their names in the prefix cache. On error nothing changed.
    pub fn apply(&mut self, batch: &[SeqStep<'_>]) -> Result<AppliedStep, EngineError> {
        let (plan, changes) = self.plan(batch)?;
        let bs = self.limits.block_size;
        // Release first so that the blocks of rewinding entries are available to growing ones.
        for c in &changes {
            let Some(s) = self.seqs.get_mut(&c.seq) else {
                continue; // unreachable: checked above
            };
            let mut dropped = s.blocks.split_off(c.keep);
            let upto = c.released.min(c.keep);
            for b in s.blocks.get_mut(s.released..upto).unwrap_or_default() {
                dropped.push(std::mem::replace(b, RELEASED));
            }
            s.released = s.released.max(upto);
            self.release_all(&dropped);
        }
        let mut copies = Vec::new();
        for (c, step) in changes.iter().zip(batch) {
            let Some(mut s) = self.seqs.remove(&c.seq) else {
                continue; // unreachable: checked above
            };
            for &(idx, rewrite) in &c.rewrites {
                let old = s.blocks[idx];
                match rewrite {
                    Rewrite::Unname => {
                        if let Some(name) = self.info.get_mut(old).and_then(|i| i.name.take()) {
                            self.cache.remove(name);
                        }
                    }
                    Rewrite::Replace { copy } => {
                        let Some(new) = self.take_block() else {
                            break; // unreachable: enough blocks were checked above
                        };
                        if let Some(i) = self.info.get_mut(old) {
                            i.refs = i.refs.saturating_sub(1);
                        }
                        if copy {
                            copies.push(BlockCopy { src: old, dst: new });
                        }
                        s.blocks[idx] = new;
                    }
                }
            }
            while s.blocks.len() < self.blocks_for(c.end) {
                match self.take_block() {
                    Some(b) => s.blocks.push(b),
                    None => break, // unreachable: enough blocks were checked above
                }
            }
            s.tokens.truncate(c.start_pos);
            s.tokens.extend_from_slice(step.tokens);
            s.len = c.end;
            s.names.truncate(c.start_pos / bs);
            if self.caching {
                self.name_full_blocks(&mut s);
            }
            self.seqs.insert(c.seq, s);
        }
        Ok(AppliedStep { plan, copies })
    }

    /// Names the full blocks of `s` past its named ones; a block whose name another block already
    /// has (or that was released) stays unnamed.
    fn name_full_blocks(&mut self, s: &mut Sequence) {
        let bs = self.limits.block_size;
        for i in s.names.len()..s.len / bs {
            let parent = s.names.last().copied();
            let tokens = &s.tokens[i * bs..(i + 1) * bs];
            let name = block_hash(parent, tokens);
            s.names.push(name);
            let b = s.blocks[i];
            let Some(info) = self.info.get_mut(b) else {
                continue; // RELEASED
            };
            if info.name.is_none() && !self.cache.contains(name) {
                info.name = Some(name);
                self.cache.insert(name, b, parent, tokens);
            }
        }
    }

    /// [`PagedKv::apply`] for a backend that cannot copy blocks: refuses (changing nothing) a step
    /// that would need a copy, which only happens after [`PagedKv::fork`] or
    /// [`PagedKv::reuse_prefix`].
    pub fn apply_step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepPlan, EngineError> {
        let (_, changes) = self.plan(batch)?;
        let copies = changes
            .iter()
            .flat_map(|c| &c.rewrites)
            .any(|(_, r)| matches!(r, Rewrite::Replace { copy: true }));
        if copies {
            return Err(EngineError::Unsupported(
                "a step writing a shared KV block (copy-on-write) on this backend",
            ));
        }
        self.apply(batch).map(|a| a.plan)
    }
}
