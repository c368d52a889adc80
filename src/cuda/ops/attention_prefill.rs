//! `attention_prefill` (csrc/attention_prefill.cu): causal flash attention of one sequence's
//! `tokens` consecutive queries (positions `start_pos ..`, block-table row `seq_row`) over its paged
//! cache, GQA, optional sliding window, on bf16 tensor cores with an f32 softmax. q
//! `[tokens, n_heads, head_dim]` (a column group of wider rows, any alignment) gives out
//! `[tokens, n_heads, head_dim]` bf16, contiguous. The cache must already hold this step's keys and
//! values. One launch per sequence (the engine's prefill pieces).

use super::paged_cache::{gqa_group, score_scale, window_scalar, PagedCacheShape};
use crate::cuda::args::{AttentionPrefillArgs, AttentionPrefillScalars};
use crate::cuda::checks::{Check, DEFAULT_SHARED_BYTES};
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{
    AttentionPrefillParams, KernelFamily, ATTENTION_PREFILL_KEYS, ATTENTION_PREFILL_PAD,
    ATTENTION_PREFILL_ROWS, ATTENTION_PREFILL_THREADS,
};

planned_launcher! {
    /// Causal flash attention of one sequence's queries over its paged cache into `out`; zero tokens
    /// launch nothing.
    attention_prefill(AttentionPrefillShape, AttentionPrefillArgs) = plan; emulated attention_prefill_emulated
}

/// What the caller decides for [`attention_prefill`]; the planner derives the score scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPrefillShape {
    /// Query tokens of the sequence in this step (consecutive positions).
    pub tokens: usize,
    /// Absolute position of the first query token (keys `0 .. start_pos` are already cached).
    pub start_pos: usize,
    /// The sequence's row of the block tables.
    pub seq_row: usize,
    /// Query heads (a multiple of `n_kv_heads`).
    pub n_heads: usize,
    /// Key/value heads (at most 65535).
    pub n_kv_heads: usize,
    /// Head dimension (a compiled value: 16, 32, 64 or 128).
    pub head_dim: usize,
    /// The cache and block tables.
    pub cache: PagedCacheShape,
    /// Sliding window W (keys per query, itself included); `None` = full causal attention.
    pub window: Option<usize>,
}

/// Static shared memory of the kernel for `head_dim` (as declared in `csrc/attention_prefill.cu`):
/// two stages of a K and a V tile `[KEYS, head_dim + PAD]` in bf16, and one 32-bit mask of absent
/// keys per stage.
fn shared_bytes(head_dim: usize) -> usize {
    let keys = ATTENTION_PREFILL_KEYS as usize;
    let pad = ATTENTION_PREFILL_PAD as usize;
    2 * (2 * keys * (head_dim + pad) * 2 + 4)
}

fn plan(
    s: &AttentionPrefillShape,
    a: &AttentionPrefillArgs<'_>,
) -> Planned<AttentionPrefillParams, 1> {
    let c = Check::new("attention_prefill");
    gqa_group(&c, s.n_heads, s.n_kv_heads)?;
    let head_dim = c.count("head_dim", s.head_dim)?;
    let variant = c.variant(KernelFamily::AttentionPrefill, "head_dim", &[head_dim])?;
    let shared = shared_bytes(s.head_dim);
    if shared > DEFAULT_SHARED_BYTES {
        return Err(c.unsupported(
            "head_dim",
            s.head_dim,
            format!("needs {shared} bytes of shared memory, above {DEFAULT_SHARED_BYTES}"),
        ));
    }
    let cache = s.cache.check(&c)?;
    let capacity = s.cache.capacity();
    if s.seq_row >= s.cache.num_seqs {
        return Err(c.unsupported(
            "seq_row",
            s.seq_row,
            format!("must be below num_seqs = {}", s.cache.num_seqs),
        ));
    }
    // Every query position (and so every key position) must have a block-table column.
    let end = s
        .start_pos
        .checked_add(s.tokens)
        .ok_or_else(|| c.unsupported("start_pos + tokens", usize::MAX, "overflows"))?;
    if end > capacity {
        return Err(c.unsupported(
            "start_pos + tokens",
            end,
            format!(
                "must be at most max_blocks_per_seq * block_size = {capacity} (the sequence's block-table row)"
            ),
        ));
    }
    let scalars = AttentionPrefillScalars {
        tokens: s.tokens as u32,
        start_pos: s.start_pos as u32,
        seq_row: s.seq_row as u32,
        n_heads: c.count("n_heads", s.n_heads)?,
        n_kv_heads: c.grid_yz("n_kv_heads", s.n_kv_heads)?,
        head_dim,
        cache,
        window: window_scalar(&c, s.window)?,
        scale: score_scale(head_dim),
    };
    let params = a.params(c.op, &scalars)?;
    // A block takes ROWS of a KV head's (token, query head of its group) rows.
    let rows = s.tokens * (s.n_heads / s.n_kv_heads);
    c.count("tokens * n_heads / n_kv_heads", rows)?;
    let tiles = rows.div_ceil(ATTENTION_PREFILL_ROWS as usize) as u32;
    let grid = Grid {
        variant,
        grid: (tiles, scalars.n_kv_heads, 1),
        block: ATTENTION_PREFILL_THREADS,
        shared_bytes: 0,
    };
    Ok(unless_empty(tiles, params, [grid]))
}

#[cfg(test)]
mod tests {
    //! GPU-free tests of the planner: instantiation per head_dim, grid, the shape rules and the
    //! typed errors.

    use proptest::prelude::*;

    use super::*;
    use crate::cuda::error::{CudaError, KernelError};
    use crate::cuda::ops::fake::{misaligned, paged_cache, too_small, unsupported, view, view_mut};
    use crate::cuda::params::KERNEL_VARIANTS;

    fn shape() -> AttentionPrefillShape {
        AttentionPrefillShape {
            tokens: 100,
            start_pos: 30,
            seq_row: 2,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            cache: paged_cache(40, 9),
            window: None,
        }
    }

    /// [`shape`] with `change` made.
    fn with(change: impl FnOnce(&mut AttentionPrefillShape)) -> AttentionPrefillShape {
        let mut s = shape();
        change(&mut s);
        s
    }

    /// Buffers of exactly the length the kernel touches for `s`, q a column group of fused rows
    /// starting `offset` elements into its allocation.
    fn args_at(s: &AttentionPrefillShape, offset: usize) -> AttentionPrefillArgs<'static> {
        let width = s.n_heads * s.head_dim;
        let kv = s.n_kv_heads * s.head_dim;
        let rows = s.tokens * (width + 2 * kv);
        let [q, _] = view_mut(offset + rows)
            .sub(offset, rows)
            .unwrap()
            .column_groups([width, 2 * kv])
            .unwrap();
        let cache = s.cache.num_blocks * s.cache.block_size * kv;
        AttentionPrefillArgs {
            q: q.into(),
            k_cache: view(cache),
            v_cache: view(cache),
            block_tables: view(s.cache.num_seqs * s.cache.max_blocks_per_seq),
            out: view_mut(s.tokens * width),
        }
    }

    fn args(s: &AttentionPrefillShape) -> AttentionPrefillArgs<'static> {
        args_at(s, 0)
    }

    #[test]
    fn picks_the_head_dim_instantiation_and_one_block_per_row_tile_and_kv_head() {
        for head_dim in [16, 32, 64, 128] {
            let s = with(|x| x.head_dim = head_dim);
            let (p, [grid]) = plan(&s, &args(&s)).unwrap().unwrap();
            assert_eq!(grid.symbol(), format!("attention_prefill_d{head_dim}"));
            // 100 tokens x 4 query heads per KV head in tiles of 128 rows, one column per KV head.
            assert_eq!(grid.grid, (4, 8, 1));
            assert_eq!(
                (grid.block, grid.shared_bytes),
                (ATTENTION_PREFILL_THREADS, 0)
            );
            assert_eq!(
                (p.tokens, p.start_pos, p.seq_row, p.n_heads, p.n_kv_heads),
                (100, 30, 2, 32, 8)
            );
            assert_eq!(
                (p.head_dim, p.q_stride, p.window),
                (head_dim as u32, 48 * head_dim as u32, 0)
            );
            assert_eq!(
                (p.block_size, p.max_blocks_per_seq, p.num_blocks, p.num_seqs),
                (16, 9, 40, 3)
            );
            assert_eq!(p.scale, 1.0 / (head_dim as f32).sqrt());
        }
        for (tokens, n_kv_heads, tiles) in [
            (1, 8, 1),
            (32, 8, 1),
            (33, 8, 2),
            (128, 32, 1),
            (129, 32, 2),
        ] {
            let s = AttentionPrefillShape {
                tokens,
                start_pos: 0,
                n_kv_heads,
                ..shape()
            };
            let (_, [grid]) = plan(&s, &args(&s)).unwrap().unwrap();
            assert_eq!(grid.grid, (tiles, n_kv_heads as u32, 1));
        }
    }

    #[test]
    fn window_is_passed_and_zero_is_refused() {
        let s = with(|x| x.window = Some(7));
        let (p, _) = plan(&s, &args(&s)).unwrap().unwrap();
        assert_eq!(p.window, 7);
        let zero = with(|x| x.window = Some(0));
        unsupported(plan(&zero, &args(&zero)), "window");
    }

    #[test]
    fn refuses_shapes_the_kernels_cannot_take() {
        let refused = |s: AttentionPrefillShape, what: &str| unsupported(plan(&s, &args(&s)), what);
        for head_dim in [8, 48, 96, 256] {
            refused(with(|x| x.head_dim = head_dim), "head_dim");
        }
        refused(with(|x| x.n_heads = 12), "n_heads");
        refused(with(|x| x.n_kv_heads = 0), "n_kv_heads");
        refused(with(|x| x.seq_row = 3), "seq_row");
        // 9 blocks of 16 = 144 positions: 44 + 100 fits, 45 + 100 does not.
        let last = with(|x| x.start_pos = 44);
        assert!(plan(&last, &args(&last)).is_ok());
        refused(with(|x| x.start_pos = 45), "start_pos + tokens");
        let huge = with(|x| x.start_pos = usize::MAX);
        unsupported(plan(&huge, &args(&shape())), "start_pos + tokens");
        let no_block = PagedCacheShape {
            block_size: 0,
            ..shape().cache
        };
        refused(with(|x| x.cache = no_block), "block_size");
        refused(
            AttentionPrefillShape {
                n_heads: 65_536,
                n_kv_heads: 65_536,
                ..shape()
            },
            "n_kv_heads",
        );
        // q's column group must be as wide as the heads the kernel reads.
        let narrow = with(|x| x.n_heads = 24);
        unsupported(plan(&shape(), &args(&narrow)), "q");
    }

    #[test]
    fn refuses_short_buffers_by_name() {
        let s = shape();
        let short_rows = AttentionPrefillShape { tokens: 99, ..s };
        too_small(plan(&s, &args(&short_rows)), "q");
        let short_out = AttentionPrefillArgs {
            out: view_mut(100 * 32 * 128 - 1),
            ..args(&s)
        };
        too_small(plan(&s, &short_out), "out");
    }

    #[test]
    fn the_caches_must_be_16_byte_aligned_and_q_and_out_need_not_be() {
        let s = shape();
        let cache = 40 * 16 * 8 * 128;
        let odd = || view(cache + 1).sub(1, cache).unwrap();
        for (name, bad) in [
            (
                "k_cache",
                AttentionPrefillArgs {
                    k_cache: odd(),
                    ..args(&s)
                },
            ),
            (
                "v_cache",
                AttentionPrefillArgs {
                    v_cache: odd(),
                    ..args(&s)
                },
            ),
        ] {
            misaligned(plan(&s, &bad), name);
        }
        let shifted = AttentionPrefillArgs {
            out: view_mut(100 * 32 * 128 + 1).sub(1, 100 * 32 * 128).unwrap(),
            ..args_at(&s, 1)
        };
        assert!(plan(&s, &shifted).is_ok());
    }

    #[test]
    fn zero_tokens_launch_nothing_but_are_still_checked() {
        let s = with(|x| x.tokens = 0);
        assert!(plan(&s, &args(&s)).unwrap().is_none());
        unsupported(
            plan(&AttentionPrefillShape { seq_row: 9, ..s }, &args(&s)),
            "seq_row",
        );
    }

    #[test]
    fn shared_memory_fits_without_opting_in_for_every_compiled_variant() {
        let mut seen = 0;
        for v in KERNEL_VARIANTS
            .iter()
            .filter(|v| v.family == KernelFamily::AttentionPrefill)
        {
            assert!(
                shared_bytes(v.consts[0] as usize) <= DEFAULT_SHARED_BYTES,
                "{}",
                v.symbol
            );
            seen += 1;
        }
        assert_eq!(seen, 4);
        // The largest compiled value, as ptxas reports it for attention_prefill_d128 on sm_80 (sm_90a
        // adds 1 KiB it reserves itself).
        assert_eq!(shared_bytes(128), 34_824);
    }

    proptest! {
        /// The grid covers every query row exactly: tiles * ROWS >= rows > (tiles - 1) * ROWS for
        /// the rows = tokens * (query heads per KV head), and the capacity bound is exact.
        #[test]
        fn grid_covers_the_tokens_and_capacity_is_exact(
            tokens in 1usize..1000,
            start_pos in 0usize..500,
            block_size in 1usize..=16,
            group in 1usize..=8,
        ) {
            let per_block = ATTENTION_PREFILL_ROWS as usize;
            let needed = (start_pos + tokens).div_ceil(block_size);
            let cache = PagedCacheShape {
                num_blocks: needed,
                block_size,
                num_seqs: 1,
                max_blocks_per_seq: needed,
            };
            let n_heads = 8 * group;
            let s = AttentionPrefillShape { tokens, start_pos, seq_row: 0, cache, n_heads, ..shape() };
            let (_, [grid]) = plan(&s, &args(&s)).unwrap().unwrap();
            let (tiles, rows) = (grid.grid.0 as usize, tokens * group);
            prop_assert!(tiles * per_block >= rows && (tiles - 1) * per_block < rows);
            prop_assert_eq!(grid.grid.1, 8);
            let short = AttentionPrefillShape {
                cache: PagedCacheShape { max_blocks_per_seq: needed - 1, ..cache },
                ..s
            };
            let refused = matches!(
                plan(&short, &args(&short)),
                Err(CudaError::Kernel(KernelError::Unsupported { what: "start_pos + tokens", .. }))
            );
            prop_assert!(refused);
        }
    }
}
