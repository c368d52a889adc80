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

}
