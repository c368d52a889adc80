//! `rope_kv` (csrc/rope_kv.cu): RoPE (rotate_half, angles `position * inv_freq[i]`) on q
//! `[tokens, n_heads, head_dim]` in place and on k `[tokens, n_kv_heads, head_dim]` on its way into
//! the paged cache, v copied beside it; token t lands in its sequence's slot for `positions[t]` (see
//! [`PagedCacheShape`](super::PagedCacheShape)). q, k and v are column groups of wider rows (the
//! fused QKV activation).

use super::paged_cache::PagedCacheShape;
use crate::cuda::args::{RopeKvArgs, RopeKvScalars};
use crate::cuda::checks::{Check, DEFAULT_SHARED_BYTES};
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{KernelFamily, RopeKvParams, ROPE_KV_THREADS};

planned_launcher! {
    /// RoPE on q (in place) and k, and k/v written to the paged cache at each token's position; zero
    /// tokens launch nothing.
    rope_kv(RopeKvScalars, RopeKvArgs) = plan; emulated rope_kv_emulated
}

fn plan(s: &RopeKvScalars, a: &RopeKvArgs<'_>) -> Planned<RopeKvParams, 1> {
    let c = Check::new("rope_kv");
    let head_dim = s.head_dim as usize;
    if head_dim < 2 || !head_dim.is_multiple_of(2) {
        return Err(c.unsupported("head_dim", head_dim, "must be even and at least 2"));
    }
    // Dynamic shared memory: one (cos, sin) pair per rotated dimension pair.
    let shared = head_dim / 2 * std::mem::size_of::<[f32; 2]>();
    if shared > DEFAULT_SHARED_BYTES {
        return Err(c.unsupported(
            "head_dim",
            head_dim,
            "its cos/sin table must fit 48 KiB of shared memory",
        ));
    }
    c.count("tokens", s.tokens as usize)?;
    c.at_least("n_kv_heads", s.n_kv_heads as usize, 1)?;
    c.product("n_heads * head_dim", &[s.n_heads as usize, head_dim])?;
    c.product("n_kv_heads * head_dim", &[s.n_kv_heads as usize, head_dim])?;
    PagedCacheShape::from(s.cache).check(&c)?;
    let params = a.params(c.op, s)?;
    let variant = c.variant(KernelFamily::RopeKv, "rope_kv", &[])?;
    Ok(unless_empty(
        s.tokens,
        params,
        [Grid {
            variant,
            grid: (s.tokens, 1, 1),
            block: ROPE_KV_THREADS,
            shared_bytes: shared as u32,
        }],
    ))
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::cuda::args::PagedCacheScalars;
    use crate::cuda::memory::RowsMut;
    use crate::cuda::ops::fake::{too_small, unsupported, view, view_mut};

    fn scalars() -> RopeKvScalars {
        RopeKvScalars {
            tokens: 4,
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            cache: PagedCacheScalars {
                block_size: 16,
                max_blocks_per_seq: 5,
                num_blocks: 7,
                num_seqs: 3,
            },
        }
    }

    /// q, k and v as the column groups of one fused `[rows, (8 + 2 + 2) * 64]` activation.
    fn fused(rows: usize) -> [RowsMut<'static, bf16>; 3] {
        view_mut(rows * 12 * 64)
            .column_groups([8 * 64, 2 * 64, 2 * 64])
            .unwrap()
    }

    fn args(
        [q, k, v]: [RowsMut<'static, bf16>; 3],
        cache: usize,
        tables: usize,
        inv_freq: usize,
    ) -> RopeKvArgs<'static> {
        RopeKvArgs {
            q,
            k: k.into(),
            v: v.into(),
            k_cache: view_mut(cache),
            v_cache: view_mut(cache),
            block_tables: view(tables),
            token_seq: view(4),
            positions: view(4),
            inv_freq: view(inv_freq),
        }
    }

    const CACHE: usize = 7 * 16 * 2 * 64;

    #[test]
    fn takes_the_strides_of_the_fused_rows_and_one_block_per_token() {
        let s = scalars();
        let (params, [grid]) = plan(&s, &args(fused(4), CACHE, 15, 32)).unwrap().unwrap();
        assert_eq!(grid.symbol(), "rope_kv");
        assert_eq!((grid.grid, grid.block), ((4, 1, 1), ROPE_KV_THREADS));
        // head_dim / 2 (cos, sin) pairs of f32.
        assert_eq!(grid.shared_bytes, 32 * 8);
        assert_eq!(
            (params.q_stride, params.k_stride, params.v_stride),
            (768, 768, 768)
        );
        let empty = RopeKvScalars { tokens: 0, ..s };
        assert!(plan(&empty, &args(fused(4), CACHE, 15, 32))
            .unwrap()
            .is_none());
    }

    #[test]
    fn refuses_short_buffers_by_name() {
        let s = scalars();
        too_small(plan(&s, &args(fused(3), CACHE, 15, 32)), "q");
        too_small(plan(&s, &args(fused(4), CACHE - 1, 15, 32)), "k_cache");
        too_small(plan(&s, &args(fused(4), CACHE, 14, 32)), "block_tables");
        too_small(plan(&s, &args(fused(4), CACHE, 15, 31)), "inv_freq");
    }

    #[test]
    fn refuses_shapes_the_kernel_cannot_take() {
        let s = scalars();
        let ok = || args(fused(4), CACHE, 15, 32);
        for head_dim in [0, 1, 63] {
            unsupported(plan(&RopeKvScalars { head_dim, ..s }, &ok()), "head_dim");
        }
        // 6145 (cos, sin) pairs are 8 bytes more than 48 KiB.
        unsupported(
            plan(
                &RopeKvScalars {
                    head_dim: 12_290,
                    ..s
                },
                &ok(),
            ),
            "head_dim",
        );
        unsupported(
            plan(&RopeKvScalars { n_kv_heads: 0, ..s }, &ok()),
            "n_kv_heads",
        );
        let mut empty_blocks = s;
        empty_blocks.cache.block_size = 0;
        unsupported(plan(&empty_blocks, &ok()), "block_size");
        // Nine query heads do not fit q's 8 * 64 wide column group.
        unsupported(plan(&RopeKvScalars { n_heads: 9, ..s }, &ok()), "q");
    }
}
