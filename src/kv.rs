//! Paged KV-cache bookkeeping shared by every backend: a pool of `num_blocks` blocks of
//! `block_size` token slots and a block table per sequence. The storage of the blocks themselves
//! (e.g. `[block_size, kv_heads, head_dim]` per block and layer) belongs to the backend; this module
//! only decides which block and row each token of each sequence uses.
//!
//! Invariant: a sequence holding `len` tokens owns exactly `ceil(len / block_size)` blocks, and
//! token `p` lives in row `p % block_size` of block `table[p / block_size]`.
//!
//! Every change a step makes goes through [`PagedKv::apply_step`], which validates the whole batch
//! first and then applies it; a refused step changes nothing. Block ids are handed out lowest-first
//! and freed ids are reused before new ones, so a backend that allocates block storage lazily only
//! ever touches the ids below the pool's high-water mark.

use crate::engine::{EngineError, LogitsFor, SeqId, SeqStep};
use std::collections::{BTreeMap, HashSet};

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

#[derive(Debug, Clone)]
struct Sequence {
    len: usize,
    blocks: Vec<usize>,
}

/// A block pool and the block tables of the live sequences.
#[derive(Debug, Clone)]
pub struct PagedKv {
    limits: KvLimits,
    /// Freed block ids, reused before fresh ones (last freed first).
    recycled: Vec<usize>,
    /// Ids `fresh..num_blocks` have never been handed out.
    fresh: usize,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: u64,
}

impl PagedKv {
    /// An empty pool. Refuses a zero limit with [`EngineError::InvalidOptions`].
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
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// The pool's limits.
    pub fn limits(&self) -> &KvLimits {
        &self.limits
    }

    /// Blocks currently free.
    pub fn free_blocks(&self) -> usize {
        self.recycled.len() + (self.limits.num_blocks - self.fresh)
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

    /// Starts an empty sequence; refuses with [`EngineError::TooManySequences`] at the limit.
    pub fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        if self.seqs.len() >= self.limits.max_sequences {
            return Err(EngineError::TooManySequences {
                limit: self.limits.max_sequences,
            });
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                len: 0,
                blocks: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Ends a sequence and returns its blocks to the pool.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        self.release(s.blocks);
        Ok(())
    }

    /// Tokens cached for `seq`.
    pub fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.get(seq).map(|s| s.len)
    }

    /// The block table of `seq`: block id of positions `i * block_size ..` at index `i`.
    pub fn block_table(&self, seq: SeqId) -> Result<&[usize], EngineError> {
        self.get(seq).map(|s| s.blocks.as_slice())
    }

    /// The slot of position `pos` of `seq`; `None` when the sequence is unknown or holds no more
    /// than `pos` tokens.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Option<Slot> {
        let s = self.seqs.get(&seq)?;
        if pos >= s.len {
            return None;
        }
        Slot::lookup(&s.blocks, self.limits.block_size, pos)
    }

    fn get(&self, seq: SeqId) -> Result<&Sequence, EngineError> {
        self.seqs.get(&seq).ok_or(EngineError::UnknownSequence(seq))
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.limits.block_size)
    }

    fn release(&mut self, blocks: Vec<usize>) {
        // Pushed in reverse so the lowest id of the freed run is handed out first.
        self.recycled.extend(blocks.into_iter().rev());
    }

    fn take_block(&mut self) -> Option<usize> {
        if let Some(b) = self.recycled.pop() {
            return Some(b);
        }
        if self.fresh < self.limits.num_blocks {
            self.fresh += 1;
            return Some(self.fresh - 1);
        }
        None
    }

    /// Checks a whole step batch without changing anything: every entry non-empty, token ids below
    /// the vocabulary, no sequence twice, every sequence known, `start_pos` at most its cached
    /// length, `start_pos + tokens` within the context, and enough free blocks for all entries
    /// together (counting the blocks that rewinding entries give back). Errors are reported for the
    /// first failing entry in batch order, in that order of checks; the block check comes last.
    pub fn check_step(&self, batch: &[SeqStep<'_>]) -> Result<StepPlan, EngineError> {
        let mut seen = HashSet::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        let (mut offset, mut needed, mut freed) = (0usize, 0usize, 0usize);
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
            let want = self.blocks_for(end);
            needed += want.saturating_sub(s.blocks.len());
            freed += s.blocks.len().saturating_sub(want);
            entries.push(StepEntry {
                seq: step.seq,
                start_pos: step.start_pos,
                len: step.tokens.len(),
                token_offset: offset,
                logits: step.logits,
            });
            offset += step.tokens.len();
        }
        let free = self.free_blocks() + freed;
        if needed > free {
            return Err(EngineError::KvCacheFull { needed, free });
        }
        Ok(StepPlan {
            entries,
            total_tokens: offset,
        })
    }

    /// Validates `batch` (see [`PagedKv::check_step`]) and then applies it: each sequence is cut
    /// to `start_pos` tokens (blocks past the new end return to the pool) and grown by its new
    /// tokens (blocks taken from the pool). On error nothing changed.
    pub fn apply_step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepPlan, EngineError> {
        let plan = self.check_step(batch)?;
        // Release first so that the blocks of rewinding entries are available to growing ones.
        for e in &plan.entries {
            let want = self.blocks_for(e.start_pos + e.len);
            if let Some(s) = self.seqs.get_mut(&e.seq) {
                if s.blocks.len() > want {
                    let extra = s.blocks.split_off(want);
                    self.release(extra);
                }
            }
        }
        for e in &plan.entries {
            let want = self.blocks_for(e.start_pos + e.len);
            let Some(mut s) = self.seqs.remove(&e.seq) else {
                continue; // unreachable: checked above
            };
            while s.blocks.len() < want {
                match self.take_block() {
                    Some(b) => s.blocks.push(b),
                    None => break, // unreachable: enough blocks were checked above
                }
            }
            s.len = e.start_pos + e.len;
            self.seqs.insert(e.seq, s);
        }
        Ok(plan)
    }
}
