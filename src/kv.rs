//! Paged KV-cache bookkeeping shared by every backend: a pool of `total_blocks` blocks of
//! `block_size` token slots, and a block table per sequence (position `p` of a sequence lives in slot
//! `p % block_size` of block `table[p / block_size]`). The storage of the blocks belongs to the
//! backend; this file only decides which block holds what.
//!
//! [`PagedKv::prepare_step`] validates a whole batch before changing anything, so a refused step
//! leaves every sequence exactly as it was.

use crate::engine::{EngineError, SeqId, SeqStep};
use std::collections::{BTreeMap, HashSet};

/// The blocks and length of one sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceBlocks {
    /// Block ids, in position order.
    pub blocks: Vec<u32>,
    /// Tokens cached.
    pub len: usize,
}

/// Block pool plus per-sequence block tables.
#[derive(Debug, Clone)]
pub struct PagedKv {
    block_size: usize,
    total_blocks: usize,
    /// Free block ids; the next block handed out is the last element.
    free: Vec<u32>,
    sequences: BTreeMap<SeqId, SequenceBlocks>,
    next_id: u64,
    max_sequences: usize,
    max_context: usize,
}

impl PagedKv {
    /// A pool of `total_blocks` blocks of `block_size` tokens, at most `max_sequences` sequences of
    /// at most `max_context` tokens. Sizes are clamped to at least 1.
    pub fn new(
        block_size: usize,
        total_blocks: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> Self {
        let total_blocks = total_blocks.clamp(1, u32::MAX as usize);
        PagedKv {
            block_size: block_size.max(1),
            total_blocks,
            free: (0..total_blocks as u32).rev().collect(),
            sequences: BTreeMap::new(),
            next_id: 0,
            max_sequences: max_sequences.max(1),
            max_context: max_context.max(1),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Longest sequence allowed.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Sequences alive.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    /// Starts an empty sequence.
    pub fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        if self.sequences.len() >= self.max_sequences {
            return Err(EngineError::TooManySequences {
                limit: self.max_sequences,
            });
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, SequenceBlocks::default());
        Ok(id)
    }

    /// Ends a sequence, returning its blocks to the pool.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let blocks = self
            .sequences
            .remove(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        self.free.extend(blocks.blocks.iter().rev());
        Ok(())
    }

    /// The blocks and length of `seq`.
    pub fn sequence(&self, seq: SeqId) -> Result<&SequenceBlocks, EngineError> {
        self.sequences
            .get(&seq)
            .ok_or(EngineError::UnknownSequence(seq))
    }

    /// Tokens cached for `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize, EngineError> {
        Ok(self.sequence(seq)?.len)
    }

    /// (block id, slot in block) of position `pos` of a sequence with block table `blocks`.
    pub fn slot(&self, blocks: &[u32], pos: usize) -> (u32, usize) {
        (blocks[pos / self.block_size], pos % self.block_size)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Validates every entry of `batch` (token ids below `vocab`, entries non-empty and of distinct,
    /// known sequences, `start_pos` within the cached length, the context limit, enough free blocks
    /// for all entries together) and only then applies it: each sequence is truncated to its
    /// `start_pos` and grown to hold its new tokens. On error nothing has changed.
    pub fn prepare_step(&mut self, batch: &[SeqStep<'_>], vocab: usize) -> Result<(), EngineError> {
        let mut seen = HashSet::with_capacity(batch.len());
        let (mut grow, mut shrink) = (0usize, 0usize);
        for entry in batch {
            if entry.tokens.is_empty() {
                return Err(EngineError::EmptyStep(entry.seq));
            }
            if !seen.insert(entry.seq) {
                return Err(EngineError::DuplicateSequence(entry.seq));
            }
            let current = self.sequence(entry.seq)?;
            if let Some(&token) = entry.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange { token, vocab });
            }
            if entry.start_pos > current.len {
                return Err(EngineError::BadStartPosition {
                    seq: entry.seq,
                    cached: current.len,
                    start_pos: entry.start_pos,
                });
            }
            let end = entry.start_pos.saturating_add(entry.tokens.len());
            if end > self.max_context {
                return Err(EngineError::ContextOverflow {
                    seq: entry.seq,
                    needed: end,
                    max_context: self.max_context,
                });
            }
            let (have, want) = (current.blocks.len(), self.blocks_for(end));
            if want > have {
                grow += want - have;
            } else {
                shrink += have - want;
            }
        }
        if grow > self.free.len() + shrink {
            return Err(EngineError::KvCacheFull {
                needed: grow,
                free: self.free.len() + shrink,
            });
        }
        // Shrink first so that freed blocks can serve the growth of other entries.
        for entry in batch {
            let end = entry.start_pos + entry.tokens.len();
            let want = self.blocks_for(end);
            let seq = self.sequences.get_mut(&entry.seq).expect("validated above");
            while seq.blocks.len() > want {
                self.free.push(seq.blocks.pop().expect("non-empty"));
            }
        }
        for entry in batch {
            let end = entry.start_pos + entry.tokens.len();
            let want = end.div_ceil(self.block_size);
            let seq = self.sequences.get_mut(&entry.seq).expect("validated above");
            while seq.blocks.len() < want {
                seq.blocks.push(self.free.pop().expect("counted above"));
            }
            seq.len = end;
        }
        Ok(())
    }
}
