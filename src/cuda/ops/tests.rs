//! GPU-free tests of the launch planners: every shape check, the buffer-length rules (exactly the
//! elements the kernel touches: one element less is refused, naming the buffer), and the chosen
//! instantiation and grid.

use proptest::prelude::*;

use super::*;

const BASE: u64 = 0x7f00_0000_0000;

fn buf(len: usize) -> Buf {
    Buf { address: BASE, len }
}

fn symbol(variant: usize) -> &'static str {
    KERNEL_VARIANTS[variant].symbol
}

fn too_small(result: Result<impl std::fmt::Debug, CudaError>, name: &str) {
    match result {
        Err(CudaError::BufferTooSmall { buffer, .. }) => assert_eq!(buffer, name),
        other => panic!("expected BufferTooSmall({name}), got {other:?}"),
    }
}

fn unsupported(result: Result<impl std::fmt::Debug, CudaError>, name: &str) {
    match result {
        Err(CudaError::Unsupported { what, .. }) => assert_eq!(what, name),
        other => panic!("expected Unsupported({name}), got {other:?}"),
    }
}

#[test]
fn every_family_has_a_compiled_variant() {
    for family in KernelFamily::ALL {
        let variants: Vec<_> = KERNEL_VARIANTS
            .iter()
            .filter(|v| v.family == family)
            .collect();
        assert!(!variants.is_empty(), "{family:?}");
        for v in variants {
            assert_eq!(v.consts.len(), family.axes().len(), "{}", v.symbol);
            assert!(v.symbol.starts_with(family.name()), "{}", v.symbol);
        }
    }
}

fn cache() -> PagedCacheShape {
    PagedCacheShape {
        num_blocks: 7,
        block_size: 16,
        num_seqs: 3,
        max_blocks_per_seq: 5,
    }
}

fn rope_shape() -> RopeKvShape {
    RopeKvShape {
        tokens: 4,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
        q_stride: 8 * 64,
        k_stride: 2 * 64,
        v_stride: 2 * 64,
        cache: cache(),
    }
}

fn rope_bufs(s: &RopeKvShape) -> RopeKvBufs {
    let cache = s.cache.num_blocks * s.cache.block_size * s.n_kv_heads * s.head_dim;
    RopeKvBufs {
        q: buf((s.tokens - 1) * s.q_stride + s.n_heads * s.head_dim),
        k: buf((s.tokens - 1) * s.k_stride + s.n_kv_heads * s.head_dim),
        v: buf((s.tokens - 1) * s.v_stride + s.n_kv_heads * s.head_dim),
        k_cache: buf(cache),
        v_cache: buf(cache),
        block_tables: buf(s.cache.num_seqs * s.cache.max_blocks_per_seq),
        token_seq: buf(s.tokens),
        positions: buf(s.tokens),
        inv_freq: buf(s.head_dim / 2),
    }
}

#[test]
fn rope_kv_accepts_strided_rows_and_refuses_short_buffers() {
    // q, k and v as column ranges of one fused [tokens, (8 + 2 + 2) * 64] projection output.
    let s = RopeKvShape {
        q_stride: 12 * 64,
        k_stride: 12 * 64,
        v_stride: 12 * 64,
        ..rope_shape()
    };
    let b = rope_bufs(&s);
    let plan = plan_rope_kv(&s, &b).unwrap().unwrap();
    assert_eq!(plan.grid, (4, 1, 1));
    assert_eq!(plan.shared_bytes, 32 * 8);
    assert_eq!(plan.params.q_stride, 768);
    too_small(
        plan_rope_kv(
            &s,
            &RopeKvBufs {
                q: buf(b.q.len - 1),
                ..rope_bufs(&s)
            },
        ),
        "q",
    );
    too_small(
        plan_rope_kv(
            &s,
            &RopeKvBufs {
                v_cache: buf(b.v_cache.len - 1),
                ..rope_bufs(&s)
            },
        ),
        "v_cache",
    );
    too_small(
        plan_rope_kv(
            &s,
            &RopeKvBufs {
                block_tables: buf(14),
                ..rope_bufs(&s)
            },
        ),
        "block_tables",
    );
    too_small(
        plan_rope_kv(
            &s,
            &RopeKvBufs {
                inv_freq: buf(31),
                ..rope_bufs(&s)
            },
        ),
        "inv_freq",
    );
    unsupported(
        plan_rope_kv(&RopeKvShape { head_dim: 63, ..s }, &b),
        "head_dim",
    );
    unsupported(
        plan_rope_kv(
            &RopeKvShape {
                q_stride: 511,
                ..rope_shape()
            },
            &rope_bufs(&rope_shape()),
        ),
        "q_stride",
    );
    let no_block = RopeKvShape {
        cache: PagedCacheShape {
            block_size: 0,
            ..cache()
        },
        ..s
    };
    unsupported(plan_rope_kv(&no_block, &b), "block_size");
}

fn attention_shape() -> AttentionDecodeShape {
    AttentionDecodeShape {
        tokens: 2,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        q_stride: 32 * 128,
        cache: cache(),
        window: None,
        split_keys: 32,
        max_splits: 3,
    }
}

fn attention_bufs(s: &AttentionDecodeShape) -> AttentionBufs {
    let cache = s.cache.num_blocks * s.cache.block_size * s.n_kv_heads * s.head_dim;
    AttentionBufs {
        q: buf((s.tokens - 1) * s.q_stride + s.n_heads * s.head_dim),
        k_cache: buf(cache),
        v_cache: buf(cache),
        block_tables: buf(s.cache.num_seqs * s.cache.max_blocks_per_seq),
        token_seq: buf(s.tokens),
        positions: buf(s.tokens),
        out: buf(s.tokens * s.n_heads * s.head_dim),
        part_out: buf(s.tokens * s.n_heads * s.max_splits * s.head_dim),
        part_lse: buf(s.tokens * s.n_heads * s.max_splits),
    }
}

#[test]
fn attention_picks_the_gqa_instantiation_and_checks_the_splits() {
    let s = attention_shape();
    let [decode, combine] = plan_attention(&s, &attention_bufs(&s)).unwrap().unwrap();
    assert_eq!(symbol(decode.variant), "attention_decode_d128_g4");
    assert_eq!(decode.grid, (3, 8, 2));
    assert_eq!(decode.shared_bytes, 4 * 32 * 4);
    assert_eq!(symbol(combine.variant), "attention_combine");
    assert_eq!(combine.grid, (32, 2, 1));
    assert!((decode.params.scale - 128f32.sqrt().recip()).abs() < 1e-9);
    assert_eq!(decode.params.window, 0);

    // 5 blocks of 16 = 80 keys; 2 splits of 32 do not cover them.
    unsupported(
        plan_attention(
            &AttentionDecodeShape { max_splits: 2, ..s },
            &attention_bufs(&s),
        ),
        "max_splits",
    );
    unsupported(
        plan_attention(
            &AttentionDecodeShape {
                head_dim: 96,
                q_stride: 32 * 96,
                ..s
            },
            &attention_bufs(&s),
        ),
        "(head_dim, group)",
    );
    unsupported(
        plan_attention(
            &AttentionDecodeShape {
                n_heads: 24,
                n_kv_heads: 8,
                ..s
            },
            &attention_bufs(&s),
        ),
        "(head_dim, group)",
    );
    unsupported(
        plan_attention(
            &AttentionDecodeShape { n_heads: 30, ..s },
            &attention_bufs(&s),
        ),
        "n_heads",
    );
    unsupported(
        plan_attention(
            &AttentionDecodeShape {
                window: Some(0),
                ..s
            },
            &attention_bufs(&s),
        ),
        "window",
    );
    unsupported(
        plan_attention(
            &AttentionDecodeShape {
                split_keys: 513,
                ..s
            },
            &attention_bufs(&s),
        ),
        "split_keys",
    );
    too_small(
        plan_attention(
            &s,
            &AttentionBufs {
                part_lse: buf(2 * 32 * 3 - 1),
                ..attention_bufs(&s)
            },
        ),
        "part_lse",
    );
    let windowed = AttentionDecodeShape {
        window: Some(4096),
        ..s
    };
    let [decode, _] = plan_attention(&windowed, &attention_bufs(&s))
        .unwrap()
        .unwrap();
    assert_eq!(decode.params.window, 4096);
}

#[test]
fn attention_dynamic_shared_memory_fits_for_every_compiled_variant() {
    for v in KERNEL_VARIANTS
        .iter()
        .filter(|v| v.family == KernelFamily::AttentionDecode)
    {
        let (head_dim, group) = (v.consts[0] as usize, v.consts[1] as usize);
        let s = AttentionDecodeShape {
            n_heads: group * 2,
            n_kv_heads: 2,
            head_dim,
            q_stride: group * 2 * head_dim,
            split_keys: ATTENTION_MAX_SPLIT_KEYS as usize,
            max_splits: 1,
            ..attention_shape()
        };
        let [decode, _] = plan_attention(&s, &attention_bufs(&s)).unwrap().unwrap();
        assert_eq!(
            decode.variant,
            KERNEL_VARIANTS.iter().position(|x| x == v).unwrap()
        );
        // The kernel's static shared memory (q and the cross-warp reduction) comes on top.
        let static_bytes =
            (group * head_dim + (ATTENTION_THREADS as usize / 32) * group * head_dim + 2 * group)
                * 4;
        assert!(
            decode.shared_bytes as usize + static_bytes <= DEFAULT_SHARED_BYTES,
            "{}",
            v.symbol
        );
    }
}

proptest! {
    /// The attention planner accepts exactly the split counts that cover the longest sequence.
    #[test]
    fn attention_splits_cover_the_longest_sequence(
        block_size in 1usize..40, max_blocks in 1usize..40, split_keys in 1usize..=512,
    ) {
        let cache = PagedCacheShape { num_blocks: 3, block_size, num_seqs: 2, max_blocks_per_seq: max_blocks };
        let needed = attention_splits(max_blocks * block_size, split_keys);
        prop_assert!(needed * split_keys >= max_blocks * block_size);
        let s = AttentionDecodeShape { cache, split_keys, max_splits: needed, ..attention_shape() };
        prop_assert!(plan_attention(&s, &attention_bufs(&s)).is_ok());
        if needed > 1 {
            let fewer = AttentionDecodeShape { max_splits: needed - 1, ..s };
            prop_assert!(plan_attention(&fewer, &attention_bufs(&fewer)).is_err());
        }
    }
}
