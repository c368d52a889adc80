//! The paged KV cache as `rope_kv`, `attention_decode` and `attention_prefill` see it: per layer
//! `k_cache` / `v_cache` `[num_blocks, block_size, n_kv_heads, head_dim]` bf16, indexed through block
//! tables `[num_seqs, max_blocks_per_seq]` i32 (position p of row r lives in slot
//! `(tables[r, p / block_size], p % block_size)`), and the shape rules the attention planners share.

use crate::cuda::args::PagedCacheScalars;
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;

/// Shape of a layer's paged KV cache and the block tables indexing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedCacheShape {
    /// Blocks in the cache (`k_cache` / `v_cache` hold `num_blocks * block_size` token rows).
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Rows of the block tables.
    pub num_seqs: usize,
    /// Columns of the block tables: the most blocks one sequence can hold.
    pub max_blocks_per_seq: usize,
}

impl PagedCacheShape {
    /// Keys one sequence can hold: `max_blocks_per_seq * block_size` (saturating).
    pub fn capacity(&self) -> usize {
        self.max_blocks_per_seq.saturating_mul(self.block_size)
    }

    /// Checks what every kernel reading the cache relies on (a block holds at least one token; the
    /// counts and a sequence's [`capacity`](Self::capacity) are 32-bit indices, as positions are
    /// `i32`) and returns the kernels' scalars.
    pub(super) fn check(&self, c: &Check) -> Result<PagedCacheScalars, CudaError> {
        c.at_least("block_size", self.block_size, 1)?;
        let scalars = PagedCacheScalars {
            num_blocks: c.count("num_blocks", self.num_blocks)?,
            num_seqs: c.count("num_seqs", self.num_seqs)?,
            max_blocks_per_seq: c.count("max_blocks_per_seq", self.max_blocks_per_seq)?,
            block_size: c.count("block_size", self.block_size)?,
        };
        c.product(
            "max_blocks_per_seq * block_size",
            &[self.max_blocks_per_seq, self.block_size],
        )?;
        Ok(scalars)
    }
}

/// Each count saturated at `u32::MAX`, which the planners refuse (counts must be below 2^31).
impl From<PagedCacheShape> for PagedCacheScalars {
    fn from(s: PagedCacheShape) -> Self {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        PagedCacheScalars {
            block_size: count(s.block_size),
            max_blocks_per_seq: count(s.max_blocks_per_seq),
            num_blocks: count(s.num_blocks),
            num_seqs: count(s.num_seqs),
        }
    }
}

impl From<PagedCacheScalars> for PagedCacheShape {
    fn from(s: PagedCacheScalars) -> Self {
        PagedCacheShape {
            num_blocks: s.num_blocks as usize,
            block_size: s.block_size as usize,
            num_seqs: s.num_seqs as usize,
            max_blocks_per_seq: s.max_blocks_per_seq as usize,
        }
    }
}

/// The fewest splits of `split_keys` keys covering a sequence of `max_keys` keys (at least 1).
pub fn attention_splits(max_keys: usize, split_keys: usize) -> usize {
    max_keys.div_ceil(split_keys.max(1)).max(1)
}

/// Query heads per KV head (GQA): `n_heads` must be a positive multiple of `n_kv_heads`.
pub(super) fn gqa_group(c: &Check, n_heads: usize, n_kv_heads: usize) -> Result<u32, CudaError> {
    c.at_least("n_kv_heads", n_kv_heads, 1)?;
    if n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(c.unsupported(
            "n_heads",
            n_heads,
            format!("must be a positive multiple of n_kv_heads = {n_kv_heads}"),
        ));
    }
    c.count("n_heads / n_kv_heads", n_heads / n_kv_heads)
}

/// The kernels' window scalar: `None` (full causal) is 0, a window must hold at least one key.
pub(super) fn window_scalar(c: &Check, window: Option<usize>) -> Result<u32, CudaError> {
    match window {
        None => Ok(0),
        Some(w) => {
            c.at_least("window", w, 1)?;
            c.count("window", w)
        }
    }
}

/// The score scale both attention kernels take: `1 / sqrt(head_dim)`.
pub(super) fn score_scale(head_dim: u32) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}
