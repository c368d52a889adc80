//! `attention_decode` (csrc/attention_decode.cu): split-KV flash-decoding of `tokens` query tokens
//! (each at its own position and block-table row) over the paged cache, GQA, optional sliding
//! window, f32 softmax, in one launch. q `[tokens, n_heads, head_dim]` (a column group of wider
//! rows) gives out `[tokens, n_heads, head_dim]` bf16, through the per-split scratch part_out
//! `[tokens, n_heads, max_splits, head_dim]` and part_lse `[tokens, n_heads, max_splits]` f32, where
//! `max_splits` = [`attention_splits`] of a sequence's capacity; the last split of each (token, KV
//! head) merges them, counted in split_done `[tokens, n_kv_heads]` u32 (zeroed once by its owner,
//! 0 again after every launch). Given the device's multiprocessor count, each token's keys are
//! spread over [`target_splits`] splits, sized on the device.

use super::paged_cache::{
    attention_splits, gqa_group, score_scale, window_scalar, PagedCacheShape,
};
use crate::cuda::args::{AttentionDecodeArgs, AttentionDecodeScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, Grid, Planned};
use crate::cuda::params::{
    AttentionDecodeParams, KernelFamily, ATTENTION_BLOCKS_PER_SM, ATTENTION_MAX_SPLIT_KEYS,
    ATTENTION_THREADS,
};

planned_launcher! {
    /// Split-KV decode attention over the paged cache, the splits merged into `out` by the last of
    /// each (token, KV head) in the same launch; zero tokens launch nothing.
    attention_decode(AttentionDecodeShape, AttentionDecodeArgs) = plan; emulated attention_decode_emulated
}

/// What the caller decides for [`attention_decode`]; the planner derives the split count and the
/// score scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDecodeShape {
    /// Query tokens (at most 65535).
    pub tokens: usize,
    /// Query heads (a multiple of `n_kv_heads`).
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension (a compiled value: 16, 32, 64 or 128).
    pub head_dim: usize,
    /// The cache and block tables.
    pub cache: PagedCacheShape,
    /// Sliding window W (keys per query, itself included); `None` = full causal attention.
    pub window: Option<usize>,
    /// Most keys per split (1..=ATTENTION_MAX_SPLIT_KEYS); with `multiprocessors` known, a
    /// token's keys are spread over more, shorter splits (see [`target_splits`]).
    pub split_keys: usize,
    /// The device's multiprocessors, or 0 (every split `split_keys` keys).
    pub multiprocessors: usize,
    /// The scores on the tensor cores (`attention_decode_mma`: head_dim 64 or 128, 4, 6 or 8
    /// query heads per KV head; [`crate::cuda::select::attention_decode_on_tensor_cores`]), else on
    /// CUDA cores.
    pub tensor_cores: bool,
}

/// The splits a token's keys are spread over: enough (token, KV head, split) blocks for
/// ATTENTION_BLOCKS_PER_SM per multiprocessor, at least 1 and at most `max_splits`; 0 (every split
/// `split_keys` keys) when `multiprocessors` is 0. The kernels size each token's splits from its
/// own key count (ATTENTION_MIN_SPLIT_KEYS to `split_keys` keys), so a short context stays in few
/// splits and a long one fills the device.
pub fn target_splits(
    multiprocessors: usize,
    tokens: usize,
    n_kv_heads: usize,
    max_splits: usize,
) -> usize {
    if multiprocessors == 0 {
        return 0;
    }
    let pairs = (tokens * n_kv_heads).max(1);
    (ATTENTION_BLOCKS_PER_SM as usize * multiprocessors)
        .div_ceil(pairs)
        .clamp(1, max_splits.max(1))
}

fn plan(
    s: &AttentionDecodeShape,
    a: &AttentionDecodeArgs<'_>,
) -> Planned<AttentionDecodeParams, 1> {
    let c = Check::new("attention_decode");
    let group = gqa_group(&c, s.n_heads, s.n_kv_heads)?;
    let head_dim = c.count("head_dim", s.head_dim)?;
    let family = if s.tensor_cores {
        KernelFamily::AttentionDecodeMma
    } else {
        KernelFamily::AttentionDecode
    };
    let decode = c.variant(family, "(head_dim, group)", &[head_dim, group])?;
    if s.split_keys == 0 || s.split_keys > ATTENTION_MAX_SPLIT_KEYS as usize {
        return Err(c.unsupported(
            "split_keys",
            s.split_keys,
            format!("must be in 1..={ATTENTION_MAX_SPLIT_KEYS}"),
        ));
    }
    // The splits cover every key a sequence can hold (the merge ignores splits past max_splits).
    let cache = s.cache.check(&c)?;
    let max_splits = attention_splits(s.cache.capacity(), s.split_keys);
    let scalars = AttentionDecodeScalars {
        tokens: c.grid_yz("tokens", s.tokens)?,
        n_heads: c.grid_yz("n_heads", s.n_heads)?,
        n_kv_heads: c.grid_yz("n_kv_heads", s.n_kv_heads)?,
        head_dim,
        cache,
        window: window_scalar(&c, s.window)?,
        split_keys: s.split_keys as u32,
        max_splits: c.count("max_splits", max_splits)?,
        target_splits: target_splits(s.multiprocessors, s.tokens, s.n_kv_heads, max_splits) as u32,
        scale: score_scale(head_dim),
    };
    let params = a.params(c.op, &scalars)?;
    if s.tokens == 0 {
        return Ok(None);
    }
    // Dynamic shared memory: the split's scores of every query head of the group.
    let shared = s.split_keys * group as usize * std::mem::size_of::<f32>();
    Ok(Some((
        params,
        [Grid {
            variant: decode,
            grid: (scalars.max_splits, scalars.n_kv_heads, scalars.tokens),
            block: ATTENTION_THREADS,
            shared_bytes: shared as u32,
        }],
    )))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::checks::DEFAULT_SHARED_BYTES;
    use crate::cuda::module::compiled_resources;
    use crate::cuda::ops::fake::{paged_cache, too_small, unsupported, view, view_mut};
    use crate::cuda::params::KERNEL_VARIANTS;

    fn shape() -> AttentionDecodeShape {
        AttentionDecodeShape {
            tokens: 2,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            cache: paged_cache(7, 5),
            window: None,
            split_keys: 32,
            multiprocessors: 0,
            tensor_cores: false,
        }
    }

    #[test]
    fn the_splits_fill_the_device_and_stay_within_the_scratch() {
        // H100 (132 SMs), 8 KV heads: one token spreads over 66 splits, 32 tokens over 3.
        assert_eq!(target_splits(132, 1, 8, 128), 66);
        assert_eq!(target_splits(132, 32, 8, 128), 3);
        assert_eq!(
            target_splits(132, 1, 8, 16),
            16,
            "at most the scratch's splits"
        );
        assert_eq!(target_splits(132, 4096, 8, 128), 1);
        assert_eq!(
            target_splits(0, 1, 8, 128),
            0,
            "unknown device: fixed splits"
        );
        let s = AttentionDecodeShape {
            multiprocessors: 132,
            ..shape()
        };
        let (p, _) = plan(&s, &args(&s)).unwrap().unwrap();
        // 80 keys of capacity in splits of 32: 3 splits, all used by two tokens of 8 KV heads.
        assert_eq!((p.max_splits, p.target_splits), (3, 3));
    }

    /// Buffers of exactly the length the kernels touch for `s`, q a column group of fused rows.
    fn args(s: &AttentionDecodeShape) -> AttentionDecodeArgs<'static> {
        let width = s.n_heads * s.head_dim;
        let kv = s.n_kv_heads * s.head_dim;
        let [q, _] = view_mut(s.tokens * (width + 2 * kv))
            .column_groups([width, 2 * kv])
            .unwrap();
        let cache = s.cache.num_blocks * s.cache.block_size * kv;
        let splits = attention_splits(s.cache.capacity(), s.split_keys);
        AttentionDecodeArgs {
            q: q.into(),
            k_cache: view(cache),
            v_cache: view(cache),
            block_tables: view(s.cache.num_seqs * s.cache.max_blocks_per_seq),
            token_seq: view(s.tokens),
            positions: view(s.tokens),
            out: view_mut(s.tokens * width),
            part_out: view_mut(s.tokens * s.n_heads * splits * s.head_dim),
            part_lse: view_mut(s.tokens * s.n_heads * splits),
            split_done: view_mut(s.tokens * s.n_kv_heads),
        }
    }

    #[test]
    fn picks_the_gqa_instantiation_and_derives_the_splits() {
        let s = shape();
        let (p, [decode]) = plan(&s, &args(&s)).unwrap().unwrap();
        assert_eq!(decode.symbol(), "attention_decode_d128_g4");
        // 5 blocks of 16 = 80 keys: 3 splits of 32.
        assert_eq!(p.max_splits, 3);
        assert_eq!(decode.grid, (3, 8, 2));
        assert_eq!(decode.shared_bytes, 4 * 32 * 4);
        assert_eq!(p.q_stride, 32 * 128 + 2 * 8 * 128);
        assert_eq!((p.split_keys, p.window), (32, 0));
        assert!((p.scale - 128f32.sqrt().recip()).abs() < 1e-9);
        let windowed = AttentionDecodeShape {
            window: Some(4096),
            ..s
        };
        let (p, _) = plan(&windowed, &args(&s)).unwrap().unwrap();
        assert_eq!(p.window, 4096);
        let empty = AttentionDecodeShape { tokens: 0, ..s };
        assert!(plan(&empty, &args(&empty)).unwrap().is_none());
        // The same launch with the scores on the tensor cores.
        let mma = AttentionDecodeShape {
            tensor_cores: true,
            ..s
        };
        let (p_mma, [on_mma]) = plan(&mma, &args(&s)).unwrap().unwrap();
        assert_eq!(on_mma.symbol(), "attention_decode_mma_d128_g4");
        assert_eq!((p_mma.max_splits, on_mma.grid), (3, decode.grid));
        assert_eq!(on_mma.shared_bytes, decode.shared_bytes);
    }

    #[test]
    fn refuses_shapes_the_kernels_cannot_take() {
        let s = shape();
        // The shape changed by `change`, planned over buffers sized for `s`.
        let refused = |change: &dyn Fn(&mut AttentionDecodeShape), what| {
            let mut bad = s;
            change(&mut bad);
            unsupported(plan(&bad, &args(&s)), what)
        };
        refused(&|x| x.head_dim = 96, "(head_dim, group)");
        refused(&|x| x.n_heads = 24, "(head_dim, group)");
        refused(&|x| x.n_heads = 30, "n_heads");
        refused(&|x| x.n_kv_heads = 0, "n_kv_heads");
        refused(&|x| x.window = Some(0), "window");
        for split_keys in [0, 513] {
            refused(&|x| x.split_keys = split_keys, "split_keys");
        }
        refused(&|x| x.tokens = 65_536, "tokens");
        refused(&|x| x.cache.block_size = 0, "block_size");
        // The tensor-core scores are compiled for head_dim 64 and 128, groups 4, 6 and 8 only.
        refused(
            &|x| {
                x.tensor_cores = true;
                x.n_kv_heads = 16;
            },
            "(head_dim, group)",
        );
        refused(
            &|x| {
                x.tensor_cores = true;
                x.head_dim = 32;
            },
            "(head_dim, group)",
        );
    }

    #[test]
    fn refuses_short_buffers_by_name() {
        let s = shape();
        let short_lse = AttentionDecodeArgs {
            part_lse: view_mut(2 * 32 * 3 - 1),
            ..args(&s)
        };
        too_small(plan(&s, &short_lse), "part_lse");
        let short_out = AttentionDecodeArgs {
            part_out: view_mut(2 * 32 * 3 * 128 - 1),
            ..args(&s)
        };
        too_small(plan(&s, &short_out), "part_out");
        let short_done = AttentionDecodeArgs {
            split_done: view_mut(2 * 8 - 1),
            ..args(&s)
        };
        too_small(plan(&s, &short_done), "split_done");
        // Splits sized for a shorter sequence do not cover this one.
        let longer = AttentionDecodeShape {
            cache: PagedCacheShape {
                max_blocks_per_seq: 7,
                ..s.cache
            },
            ..s
        };
        let sized_for_s = AttentionDecodeArgs {
            block_tables: view(3 * 7),
            ..args(&s)
        };
        too_small(plan(&longer, &sized_for_s), "part_out");
    }

    /// The most dynamic shared memory a launch asks for (the longest split's scores) plus the
    /// static shared memory each variant is compiled with (read from the fatbins where cuobjdump
    /// is at hand) fit the 48 KiB a kernel gets without opting in.
    #[test]
    fn dynamic_shared_memory_fits_for_every_compiled_variant() {
        let compiled = compiled_resources().unwrap_or_default();
        let families = [
            KernelFamily::AttentionDecode,
            KernelFamily::AttentionDecodeMma,
        ];
        for v in KERNEL_VARIANTS
            .iter()
            .filter(|v| families.contains(&v.family))
        {
            let (head_dim, group) = (v.consts[0] as usize, v.consts[1] as usize);
            let s = AttentionDecodeShape {
                n_heads: group * 2,
                n_kv_heads: 2,
                head_dim,
                split_keys: ATTENTION_MAX_SPLIT_KEYS as usize,
                tensor_cores: v.family == KernelFamily::AttentionDecodeMma,
                ..shape()
            };
            let (_, [decode]) = plan(&s, &args(&s)).unwrap().unwrap();
            assert_eq!(decode.symbol(), v.symbol);
            // The kernel's static shared memory, as compiled for each architecture, comes on top.
            for compiled in compiled.iter().filter(|r| r.symbol == v.symbol) {
                assert!(
                    decode.shared_bytes as usize + compiled.static_shared <= DEFAULT_SHARED_BYTES,
                    "{} on {}: {} + {} bytes",
                    v.symbol,
                    compiled.arch,
                    decode.shared_bytes,
                    compiled.static_shared
                );
            }
        }
    }

    proptest! {
        /// The derived splits are the fewest covering the longest sequence the block tables allow.
        #[test]
        fn splits_cover_the_longest_sequence(
            block_size in 1usize..40, max_blocks in 1usize..40, split_keys in 1usize..=512,
        ) {
            let cache = PagedCacheShape {
                num_blocks: 3, block_size, num_seqs: 2, max_blocks_per_seq: max_blocks,
            };
            let s = AttentionDecodeShape { cache, split_keys, ..shape() };
            let (p, [decode]) = plan(&s, &args(&s)).unwrap().unwrap();
            let (splits, keys) = (p.max_splits as usize, max_blocks * block_size);
            prop_assert!(splits * split_keys >= keys);
            prop_assert!(splits == 1 || (splits - 1) * split_keys < keys);
            prop_assert_eq!(decode.grid.0 as usize, splits);
        }
    }
}
