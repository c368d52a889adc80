//! The prefill flash-attention op: one sequence's run of consecutive query tokens attends causally
//! (optionally within a sliding window) to its paged KV cache, with grouped-query heads, on bf16
//! tensor cores (`csrc/attention_prefill.cu`). One launch per sequence; not meant for graph capture
//! (the engine calls it once per prefill entry of a step), though it neither allocates nor syncs.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{launch, read, write, Buf, Check, Launch, PagedCacheShape, DEFAULT_SHARED_BYTES};
use crate::cuda::error::CudaError;
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    AttentionPrefillParams, KernelFamily, ATTENTION_PREFILL_KEYS, ATTENTION_PREFILL_PAD,
    ATTENTION_PREFILL_QUERIES, ATTENTION_PREFILL_THREADS,
};

/// Shapes of [`attention_prefill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPrefillShape {
    /// Query tokens of the sequence in this step (consecutive positions).
    pub tokens: usize,
    /// Absolute position of the first query token (keys `0 .. start_pos` are already cached).
    pub start_pos: usize,
    /// The sequence's row of the block tables.
    pub seq_row: usize,
    /// Query heads (a multiple of `n_kv_heads`, at most 65535).
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension (a compiled value: 16, 32, 64 or 128).
    pub head_dim: usize,
    /// Elements between consecutive tokens of `q` (>= n_heads * head_dim).
    pub q_stride: usize,
    /// The cache and block tables.
    pub cache: PagedCacheShape,
    /// Sliding window W (keys per query, itself included); `None` = full causal attention.
    pub window: Option<usize>,
}

/// Buffers of [`attention_prefill`].
pub struct AttentionPrefillBuffers<'a> {
    /// `[tokens, n_heads, head_dim]` rotated queries (row stride `q_stride`; any alignment).
    pub q: &'a dyn DevicePtr<bf16>,
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` key cache (16-byte aligned), holding the
    /// keys of positions `0 .. start_pos + tokens`.
    pub k_cache: &'a dyn DevicePtr<bf16>,
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` value cache (16-byte aligned).
    pub v_cache: &'a dyn DevicePtr<bf16>,
    /// `[num_seqs, max_blocks_per_seq]` block tables.
    pub block_tables: &'a dyn DevicePtr<i32>,
    /// `[tokens, n_heads, head_dim]` output, contiguous.
    pub out: &'a mut dyn DevicePtrMut<bf16>,
}

/// The buffers as the planner sees them.
#[derive(Debug, Clone, Copy)]
pub(super) struct PrefillBufs {
    pub(super) q: Buf,
    pub(super) k_cache: Buf,
    pub(super) v_cache: Buf,
    pub(super) block_tables: Buf,
    pub(super) out: Buf,
}

/// Static shared memory of the kernel for `head_dim` (as declared in `csrc/attention_prefill.cu`):
/// the K tile `[KEYS, head_dim + PAD]` and transposed V tile `[head_dim, KEYS + PAD]` in bf16, and
/// one 64-bit cache slot per key.
pub(super) fn prefill_shared_bytes(head_dim: usize) -> usize {
    let keys = ATTENTION_PREFILL_KEYS as usize;
    let pad = ATTENTION_PREFILL_PAD as usize;
    keys * (head_dim + pad) * 2 + head_dim * (keys + pad) * 2 + keys * 8
}

pub(super) fn plan_attention_prefill(
    s: &AttentionPrefillShape,
    b: &PrefillBufs,
) -> Result<Option<Launch<AttentionPrefillParams>>, CudaError> {
    let c = Check {
        op: "attention_prefill",
    };
    c.at_least("n_kv_heads", s.n_kv_heads, 1)?;
    if s.n_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(c.unsupported(
            "n_heads",
            s.n_heads,
            format!(
                "must be a positive multiple of n_kv_heads = {}",
                s.n_kv_heads
            ),
        ));
    }
    let head_dim = c.count("head_dim", s.head_dim)?;
    let variant = c.variant(KernelFamily::AttentionPrefill, "head_dim", &[head_dim])?;
    let shared = prefill_shared_bytes(s.head_dim);
    if shared > DEFAULT_SHARED_BYTES {
        return Err(c.unsupported(
            "head_dim",
            s.head_dim,
            format!("needs {shared} bytes of shared memory, above {DEFAULT_SHARED_BYTES}"),
        ));
    }
    let window = match s.window {
        None => 0,
        Some(w) => {
            c.at_least("window", w, 1)?;
            c.count("window", w)?
        }
    };
    let n_heads = c.grid_yz("n_heads", s.n_heads)?;
    let n_kv_heads = c.count("n_kv_heads", s.n_kv_heads)?;
    s.cache.check(
        &c,
        s.n_kv_heads,
        s.head_dim,
        b.k_cache,
        b.v_cache,
        b.block_tables,
    )?;
    if s.seq_row >= s.cache.num_seqs {
        return Err(c.unsupported(
            "seq_row",
            s.seq_row,
            format!("must be below num_seqs = {}", s.cache.num_seqs),
        ));
    }
    // Every query position (and so every key position) must have a block-table column.
    let capacity = s.cache.max_blocks_per_seq * s.cache.block_size; // checked below 2^31 above
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
    c.aligned16("k_cache", b.k_cache)?;
    c.aligned16("v_cache", b.v_cache)?;
    c.len(
        "q",
        b.q,
        c.strided("q_stride", s.tokens, s.q_stride, s.n_heads * s.head_dim)?,
    )?;
    c.len(
        "out",
        b.out,
        c.product(
            "tokens * n_heads * head_dim",
            &[s.tokens, s.n_heads, s.head_dim],
        )?,
    )?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let tiles = s.tokens.div_ceil(ATTENTION_PREFILL_QUERIES as usize);
    Ok(Some(Launch {
        variant,
        grid: (c.count("query tiles", tiles)?, n_heads, 1),
        block: ATTENTION_PREFILL_THREADS,
        shared_bytes: 0,
        params: AttentionPrefillParams {
            q: b.q.address,
            k_cache: b.k_cache.address,
            v_cache: b.v_cache.address,
            block_tables: b.block_tables.address,
            out: b.out.address,
            tokens: c.count("tokens", s.tokens)?,
            start_pos: c.count("start_pos", s.start_pos)?,
            seq_row: c.count("seq_row", s.seq_row)?,
            n_heads,
            n_kv_heads,
            head_dim,
            q_stride: c.count("q_stride", s.q_stride)?,
            block_size: c.count("block_size", s.cache.block_size)?,
            max_blocks_per_seq: c.count("max_blocks_per_seq", s.cache.max_blocks_per_seq)?,
            num_blocks: c.count("num_blocks", s.cache.num_blocks)?,
            num_seqs: c.count("num_seqs", s.cache.num_seqs)?,
            window,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        },
    }))
}

/// Causal flash attention of one sequence's `tokens` queries at positions
/// `start_pos .. start_pos + tokens` over its paged cache (block-table row `seq_row`), GQA, optional
/// sliding window, f32 softmax; writes `out: [tokens, n_heads, head_dim]`. The cache must already
/// hold this step's keys and values. Nothing is allocated and nothing synchronises; zero tokens
/// launch nothing.
pub fn attention_prefill(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &AttentionPrefillShape,
    b: AttentionPrefillBuffers<'_>,
) -> Result<(), CudaError> {
    let (q, _q) = read(b.q, stream);
    let (k_cache, _k_cache) = read(b.k_cache, stream);
    let (v_cache, _v_cache) = read(b.v_cache, stream);
    let (block_tables, _block_tables) = read(b.block_tables, stream);
    let (out, _out) = write(b.out, stream);
    let bufs = PrefillBufs {
        q,
        k_cache,
        v_cache,
        block_tables,
        out,
    };
    match plan_attention_prefill(shape, &bufs)? {
        Some(plan) => launch(kernels, stream, &plan),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! GPU-free tests of the planner: instantiation per head_dim, grid, exact buffer lengths and the
    //! typed errors.

    use proptest::prelude::*;

    use super::*;
    use crate::cuda::params::KERNEL_VARIANTS;

    const BASE: u64 = 0x7f00_0000_0000;

    fn buf(len: usize) -> Buf {
        Buf { address: BASE, len }
    }

    fn shape() -> AttentionPrefillShape {
        AttentionPrefillShape {
            tokens: 100,
            start_pos: 30,
            seq_row: 2,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            q_stride: (32 + 2 * 8) * 128,
            cache: PagedCacheShape {
                num_blocks: 40,
                block_size: 16,
                num_seqs: 3,
                max_blocks_per_seq: 9,
            },
            window: None,
        }
    }

    /// Buffers of exactly the length the kernel touches for `s`.
    fn bufs(s: &AttentionPrefillShape) -> PrefillBufs {
        let cache = s.cache.num_blocks * s.cache.block_size * s.n_kv_heads * s.head_dim;
        let q = if s.tokens == 0 {
            0
        } else {
            (s.tokens - 1) * s.q_stride + s.n_heads * s.head_dim
        };
        PrefillBufs {
            q: buf(q),
            k_cache: buf(cache),
            v_cache: buf(cache),
            block_tables: buf(s.cache.num_seqs * s.cache.max_blocks_per_seq),
            out: buf(s.tokens * s.n_heads * s.head_dim),
        }
    }

    fn too_small(s: &AttentionPrefillShape, b: PrefillBufs, name: &str) {
        match plan_attention_prefill(s, &b) {
            Err(CudaError::BufferTooSmall { buffer, .. }) => assert_eq!(buffer, name),
            other => panic!("expected BufferTooSmall({name}), got {other:?}"),
        }
    }

    fn unsupported(s: &AttentionPrefillShape, name: &str) {
        match plan_attention_prefill(s, &bufs(s)) {
            Err(CudaError::Unsupported { what, .. }) => assert_eq!(what, name),
            other => panic!("expected Unsupported({name}), got {other:?}"),
        }
    }

    fn shorter(b: Buf) -> Buf {
        Buf {
            len: b.len - 1,
            ..b
        }
    }

    #[test]
    fn picks_the_head_dim_instantiation_and_one_block_per_query_tile_and_head() {
        for head_dim in [16, 32, 64, 128] {
            let s = AttentionPrefillShape {
                head_dim,
                q_stride: 48 * head_dim,
                ..shape()
            };
            let plan = plan_attention_prefill(&s, &bufs(&s)).unwrap().unwrap();
            assert_eq!(
                KERNEL_VARIANTS[plan.variant].symbol,
                format!("attention_prefill_d{head_dim}")
            );
            // 100 tokens in tiles of 64 queries, one column per query head.
            assert_eq!(plan.grid, (2, 32, 1));
            assert_eq!(plan.block, ATTENTION_PREFILL_THREADS);
            assert_eq!(plan.shared_bytes, 0);
            let p = plan.params;
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
        let one = AttentionPrefillShape {
            tokens: 1,
            ..shape()
        };
        let plan = plan_attention_prefill(&one, &bufs(&one)).unwrap().unwrap();
        assert_eq!(plan.grid, (1, 32, 1));
        let exact = AttentionPrefillShape {
            tokens: 64,
            start_pos: 0,
            ..shape()
        };
        let plan = plan_attention_prefill(&exact, &bufs(&exact))
            .unwrap()
            .unwrap();
        assert_eq!(plan.grid, (1, 32, 1));
    }

    #[test]
    fn window_is_passed_and_zero_is_refused() {
        let s = AttentionPrefillShape {
            window: Some(7),
            ..shape()
        };
        let plan = plan_attention_prefill(&s, &bufs(&s)).unwrap().unwrap();
        assert_eq!(plan.params.window, 7);
        unsupported(
            &AttentionPrefillShape {
                window: Some(0),
                ..shape()
            },
            "window",
        );
    }

    #[test]
    fn refuses_shapes_the_kernels_cannot_take() {
        for head_dim in [8, 48, 96, 256] {
            unsupported(
                &AttentionPrefillShape {
                    head_dim,
                    q_stride: 32 * head_dim,
                    ..shape()
                },
                "head_dim",
            );
        }
        unsupported(
            &AttentionPrefillShape {
                n_heads: 12,
                ..shape()
            },
            "n_heads",
        );
        unsupported(
            &AttentionPrefillShape {
                n_kv_heads: 0,
                ..shape()
            },
            "n_kv_heads",
        );
        unsupported(
            &AttentionPrefillShape {
                seq_row: 3,
                ..shape()
            },
            "seq_row",
        );
        // 9 blocks of 16 = 144 positions: 44 + 100 fits, 45 + 100 does not.
        assert!(plan_attention_prefill(
            &AttentionPrefillShape {
                start_pos: 44,
                ..shape()
            },
            &bufs(&shape())
        )
        .is_ok());
        unsupported(
            &AttentionPrefillShape {
                start_pos: 45,
                ..shape()
            },
            "start_pos + tokens",
        );
        unsupported(
            &AttentionPrefillShape {
                start_pos: usize::MAX,
                ..shape()
            },
            "start_pos + tokens",
        );
        unsupported(
            &AttentionPrefillShape {
                q_stride: 32 * 128 - 1,
                ..shape()
            },
            "q_stride",
        );
        unsupported(
            &AttentionPrefillShape {
                cache: PagedCacheShape {
                    block_size: 0,
                    ..shape().cache
                },
                ..shape()
            },
            "block_size",
        );
        unsupported(
            &AttentionPrefillShape {
                n_heads: 65_536,
                n_kv_heads: 8,
                q_stride: 65_536 * 128,
                ..shape()
            },
            "n_heads",
        );
    }

    #[test]
    fn every_buffer_must_cover_what_the_kernel_touches() {
        let s = shape();
        let b = bufs(&s);
        assert!(plan_attention_prefill(&s, &b).is_ok());
        too_small(
            &s,
            PrefillBufs {
                q: shorter(b.q),
                ..b
            },
            "q",
        );
        too_small(
            &s,
            PrefillBufs {
                k_cache: shorter(b.k_cache),
                ..b
            },
            "k_cache",
        );
        too_small(
            &s,
            PrefillBufs {
                v_cache: shorter(b.v_cache),
                ..b
            },
            "v_cache",
        );
        too_small(
            &s,
            PrefillBufs {
                block_tables: shorter(b.block_tables),
                ..b
            },
            "block_tables",
        );
        too_small(
            &s,
            PrefillBufs {
                out: shorter(b.out),
                ..b
            },
            "out",
        );
    }

    #[test]
    fn the_caches_must_be_16_byte_aligned_and_q_need_not_be() {
        let s = shape();
        let b = bufs(&s);
        let odd = |x: Buf| Buf {
            address: x.address + 2,
            ..x
        };
        for (name, bad) in [
            (
                "k_cache",
                PrefillBufs {
                    k_cache: odd(b.k_cache),
                    ..b
                },
            ),
            (
                "v_cache",
                PrefillBufs {
                    v_cache: odd(b.v_cache),
                    ..b
                },
            ),
        ] {
            match plan_attention_prefill(&s, &bad) {
                Err(CudaError::Misaligned { buffer, .. }) => assert_eq!(buffer, name),
                other => panic!("expected Misaligned({name}), got {other:?}"),
            }
        }
        let shifted = PrefillBufs {
            q: odd(b.q),
            out: odd(b.out),
            ..b
        };
        assert!(plan_attention_prefill(&s, &shifted).is_ok());
    }

    #[test]
    fn zero_tokens_launch_nothing_but_are_still_checked() {
        let s = AttentionPrefillShape {
            tokens: 0,
            ..shape()
        };
        assert!(plan_attention_prefill(&s, &bufs(&s)).unwrap().is_none());
        unsupported(&AttentionPrefillShape { seq_row: 9, ..s }, "seq_row");
    }

    #[test]
    fn shared_memory_fits_without_opting_in_for_every_compiled_variant() {
        let mut seen = 0;
        for v in KERNEL_VARIANTS
            .iter()
            .filter(|v| v.family == KernelFamily::AttentionPrefill)
        {
            let head_dim = v.consts[0] as usize;
            assert!(
                prefill_shared_bytes(head_dim) <= DEFAULT_SHARED_BYTES,
                "{}",
                v.symbol
            );
            seen += 1;
        }
        assert_eq!(seen, 4);
        // The largest compiled value, as ptxas reports it for attention_prefill_d128.
        assert_eq!(prefill_shared_bytes(128), 36_352);
    }

    proptest! {
        /// The grid covers every token exactly: tiles * QUERIES >= tokens > (tiles - 1) * QUERIES,
        /// and the capacity bound is exact.
        #[test]
        fn grid_covers_the_tokens_and_capacity_is_exact(
            tokens in 1usize..1000,
            start_pos in 0usize..500,
            block_size in 1usize..=16,
        ) {
            let queries = ATTENTION_PREFILL_QUERIES as usize;
            let needed = (start_pos + tokens).div_ceil(block_size);
            let cache = PagedCacheShape {
                num_blocks: needed,
                block_size,
                num_seqs: 1,
                max_blocks_per_seq: needed,
            };
            let s = AttentionPrefillShape {
                tokens,
                start_pos,
                seq_row: 0,
                cache,
                ..shape()
            };
            let plan = plan_attention_prefill(&s, &bufs(&s)).unwrap().unwrap();
            let tiles = plan.grid.0 as usize;
            prop_assert!(tiles * queries >= tokens && (tiles - 1) * queries < tokens);
            let short = AttentionPrefillShape {
                cache: PagedCacheShape { max_blocks_per_seq: needed - 1, ..cache },
                ..s
            };
            let refused = matches!(
                plan_attention_prefill(&short, &bufs(&short)),
                Err(CudaError::Unsupported { what: "start_pos + tokens", .. })
            );
            prop_assert!(refused);
        }
    }
}
