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

fn router_bufs(s: &RouterShape) -> RouterBufs {
    RouterBufs {
        x: buf(s.tokens * s.hidden),
        gate: buf(s.experts * s.hidden),
        logits: buf(s.tokens * s.experts),
        topk_ids: buf(s.tokens * s.top_k),
        topk_weights: buf(s.tokens * s.top_k),
        expert_counts: buf(s.experts),
        expert_offsets: buf(s.experts + 1),
        sorted_slots: buf(s.tokens * s.top_k),
    }
}

#[test]
fn router_limits_and_launches() {
    let s = RouterShape {
        tokens: 3,
        hidden: 64,
        experts: 8,
        top_k: 2,
    };
    let [topk, group] = plan_router(&s, &router_bufs(&s)).unwrap().unwrap();
    assert_eq!(
        (symbol(topk.variant), topk.grid),
        ("router_topk", (3, 1, 1))
    );
    assert_eq!(
        (symbol(group.variant), group.grid),
        ("router_group", (1, 1, 1))
    );
    unsupported(
        plan_router(&RouterShape { hidden: 60, ..s }, &router_bufs(&s)),
        "hidden",
    );
    unsupported(
        plan_router(
            &RouterShape {
                top_k: 9,
                experts: 16,
                ..s
            },
            &router_bufs(&s),
        ),
        "top_k",
    );
    unsupported(
        plan_router(
            &RouterShape {
                top_k: 3,
                experts: 2,
                ..s
            },
            &router_bufs(&s),
        ),
        "top_k",
    );
    unsupported(
        plan_router(&RouterShape { experts: 257, ..s }, &router_bufs(&s)),
        "experts",
    );
    too_small(
        plan_router(
            &s,
            &RouterBufs {
                expert_offsets: buf(8),
                ..router_bufs(&s)
            },
        ),
        "expert_offsets",
    );
    let misaligned = RouterBufs {
        x: Buf {
            address: BASE + 8,
            len: 192,
        },
        ..router_bufs(&s)
    };
    assert!(matches!(
        plan_router(&s, &misaligned),
        Err(CudaError::Misaligned { buffer: "x", .. })
    ));
}

fn moe_bufs(s: &MoeShape) -> MoeBufs {
    let slots = s.tokens * s.top_k;
    MoeBufs {
        x: buf(s.tokens * s.hidden),
        w1: buf(s.experts * s.inter * s.hidden),
        w3: buf(s.experts * s.inter * s.hidden),
        w2: buf(s.experts * s.hidden * s.inter),
        topk_weights: buf(slots),
        expert_offsets: buf(s.experts + 1),
        sorted_slots: buf(slots),
        act: buf(slots * s.inter),
        out: buf(slots * s.hidden),
    }
}

#[test]
fn moe_grids_for_mixtral_shapes() {
    let s = MoeShape {
        tokens: 1,
        hidden: 4096,
        inter: 14336,
        experts: 8,
        top_k: 2,
    };
    let [up, down] = plan_moe(&s, &moe_bufs(&s)).unwrap().unwrap();
    assert_eq!(
        (symbol(up.variant), up.grid, up.block),
        ("moe_up_t1", (14336 / 8, 8, 1), 256)
    );
    assert_eq!(
        (symbol(down.variant), down.grid),
        ("moe_down_t1", (4096 / 16, 8, 1))
    );
    let batch = MoeShape { tokens: 13, ..s };
    let [up, _] = plan_moe(&batch, &moe_bufs(&batch)).unwrap().unwrap();
    assert_eq!(symbol(up.variant), "moe_up_t8");
    unsupported(
        plan_moe(&MoeShape { inter: 40 + 4, ..s }, &moe_bufs(&s)),
        "inter",
    );
    too_small(
        plan_moe(
            &s,
            &MoeBufs {
                w2: buf(8 * 4096 * 14336 - 1),
                ..moe_bufs(&s)
            },
        ),
        "w2",
    );
    let misaligned = MoeBufs {
        act: Buf {
            address: BASE + 2,
            len: 2 * 14336,
        },
        ..moe_bufs(&s)
    };
    assert!(matches!(
        plan_moe(&s, &misaligned),
        Err(CudaError::Misaligned { buffer: "act", .. })
    ));
}

#[test]
fn moe_tile_covers_the_batch_up_to_the_largest_tile() {
    for tokens in 1..64 {
        let tile = moe_tile(tokens) as usize;
        assert!(tile >= tokens.min(8), "tokens {tokens} tile {tile}");
        assert!(tile < 2 * tokens, "tokens {tokens} tile {tile}: wasteful");
    }
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
    /// For any MoE shape the kernels take, buffers of exactly the contiguous sizes pass and each one
    /// made one element shorter is refused by name.
    #[test]
    fn moe_needs_exactly_the_contiguous_sizes(
        tokens in 1usize..40, hidden8 in 1usize..64, inter8 in 1usize..64, experts in 1usize..12, k in 1usize..4,
    ) {
        let top_k = k.min(experts);
        let s = MoeShape { tokens, hidden: hidden8 * 8, inter: inter8 * 8, experts, top_k };
        prop_assert!(plan_moe(&s, &moe_bufs(&s)).is_ok());
        let full = moe_bufs(&s);
        let cases: [(&str, MoeBufs); 9] = [
            ("x", MoeBufs { x: buf(full.x.len - 1), ..moe_bufs(&s) }),
            ("w1", MoeBufs { w1: buf(full.w1.len - 1), ..moe_bufs(&s) }),
            ("w3", MoeBufs { w3: buf(full.w3.len - 1), ..moe_bufs(&s) }),
            ("w2", MoeBufs { w2: buf(full.w2.len - 1), ..moe_bufs(&s) }),
            ("topk_weights", MoeBufs { topk_weights: buf(full.topk_weights.len - 1), ..moe_bufs(&s) }),
            ("expert_offsets", MoeBufs { expert_offsets: buf(full.expert_offsets.len - 1), ..moe_bufs(&s) }),
            ("sorted_slots", MoeBufs { sorted_slots: buf(full.sorted_slots.len - 1), ..moe_bufs(&s) }),
            ("act", MoeBufs { act: buf(full.act.len - 1), ..moe_bufs(&s) }),
            ("out", MoeBufs { out: buf(full.out.len - 1), ..moe_bufs(&s) }),
        ];
        for (name, bufs) in cases {
            match plan_moe(&s, &bufs) {
                Err(CudaError::BufferTooSmall { buffer, .. }) => prop_assert_eq!(buffer, name),
                other => prop_assert!(false, "{}: {:?}", name, other),
            }
        }
    }

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
