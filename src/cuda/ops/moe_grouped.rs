//! The routed expert MLPs for prefill: [`moe_grouped_gemm`] runs `csrc/moe_grouped.cu` (two grouped
//! tensor-core GEMMs, SwiGLU fused into the first), with exactly the buffers and results of
//! [`moe_gemv`]; [`moe_experts`] picks between the two by the token count.
//!
//! Grid: x = a flattened list of (expert, 64-slot) tiles sized for the worst case (the per-expert
//! counts are in device memory), y = output column blocks. See the header of `csrc/moe_grouped.cu`
//! for the tiling and its cost on Mixtral shapes.

use cudarc::driver::CudaStream;

use super::{
    launch_moe, moe_gemv, moe_params, Check, CudaError, KernelFamily, Kernels, Launch, MoeBuffers,
    MoeBufs, MoeParams, MoeShape, ROUTER_MAX_EXPERTS,
};
use crate::cuda::params::{MOE_GROUPED_BM, MOE_GROUPED_BN, MOE_GROUPED_THREADS};

/// Token count from which [`moe_experts`] uses [`moe_grouped_gemm`] instead of [`moe_gemv`].
///
/// Below it every expert gets few slots and the decode GEMV reads each weight row once per 8 slots
/// at full bandwidth; from it on, a 64-slot tensor-core tile serves more slots per weight read
/// (32 tokens with top-2 over 8 experts is 8 slots per expert on average, one GEMV pass). Chosen
/// from that arithmetic, not measured.
pub const MOE_GROUPED_MIN_TOKENS: usize = 32;

/// Output columns of one `moe_grouped_down` block (two weight tiles of [`MOE_GROUPED_BN`] rows).
const DOWN_COLUMNS: usize = 2 * MOE_GROUPED_BN as usize;

/// Whether [`moe_experts`] runs the grouped GEMM for `tokens` tokens.
fn use_grouped(tokens: usize) -> bool {
    tokens >= MOE_GROUPED_MIN_TOKENS
}

/// Upper bound on the tiles of `bm` slots in the flattened list: `sum_e ceil(count_e / bm)` over
/// counts summing to `slots`, at most `min(experts, slots)` of them non-zero, is at most
/// `floor((slots + min(experts, slots) * (bm - 1)) / bm)`.
pub(super) fn max_tiles(slots: usize, experts: usize, bm: usize) -> usize {
    (slots + experts.min(slots) * (bm - 1)) / bm.max(1)
}

/// A pair of expert-GEMM kernels over the flattened tile list (`csrc/moe_tiles.cuh`): what differs
/// between the mma.sync kernels and the Hopper ones.
pub(super) struct TiledExperts {
    /// The op name in errors.
    pub(super) op: &'static str,
    /// The up kernel (w1, w3, SwiGLU) and its name.
    pub(super) up: (KernelFamily, &'static str),
    /// The down kernel (w2, routing weight) and its name.
    pub(super) down: (KernelFamily, &'static str),
    /// Slots per tile.
    pub(super) bm: usize,
    /// Output columns (rows of w1 / w3) per up block.
    pub(super) up_columns: usize,
    /// Output columns (rows of w2) per down block.
    pub(super) down_columns: usize,
    /// Threads per block.
    pub(super) threads: u32,
}

/// The mma.sync kernels of `csrc/moe_grouped.cu`.
const GROUPED: TiledExperts = TiledExperts {
    op: "moe_grouped_gemm",
    up: (KernelFamily::MoeGroupedUp, "moe_grouped_up"),
    down: (KernelFamily::MoeGroupedDown, "moe_grouped_down"),
    bm: MOE_GROUPED_BM as usize,
    up_columns: MOE_GROUPED_BN as usize,
    down_columns: DOWN_COLUMNS,
    threads: MOE_GROUPED_THREADS,
};

/// The two launches of the kernel pair `k` for the shapes and buffers (none for zero tokens, after
/// the checks): grid x the worst-case tile list, y the output column blocks.
pub(super) fn plan_tiled(
    k: &TiledExperts,
    s: &MoeShape,
    b: &MoeBufs,
) -> Result<Option<[Launch<MoeParams>; 2]>, CudaError> {
    let c = Check { op: k.op };
    // Every block walks the experts' offsets to find its tile: keep that walk short.
    if s.experts > ROUTER_MAX_EXPERTS as usize {
        return Err(c.unsupported(
            "experts",
            s.experts,
            format!("must be at most {ROUTER_MAX_EXPERTS} (each block walks the expert offsets)"),
        ));
    }
    let (params, slots) = moe_params(&c, s, b)?;
    // The down epilogue stores f32 pairs with 8-byte stores; 16 bytes keeps every row start aligned.
    c.aligned16("out", b.out)?;
    let up = c.variant(k.up.0, k.up.1, &[])?;
    let down = c.variant(k.down.0, k.down.1, &[])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let tiles = c.count("tiles", max_tiles(slots, s.experts, k.bm))?;
    let up_columns = c.grid_yz("inter blocks", s.inter.div_ceil(k.up_columns))?;
    let down_columns = c.grid_yz("hidden blocks", s.hidden.div_ceil(k.down_columns))?;
    Ok(Some([
        Launch {
            variant: up,
            grid: (tiles, up_columns, 1),
            block: k.threads,
            shared_bytes: 0,
            params,
        },
        Launch {
            variant: down,
            grid: (tiles, down_columns, 1),
            block: k.threads,
            shared_bytes: 0,
            params,
        },
    ]))
}

fn plan_moe_grouped(
    s: &MoeShape,
    b: &MoeBufs,
) -> Result<Option<[Launch<MoeParams>; 2]>, CudaError> {
    plan_tiled(&GROUPED, s, b)
}

/// The routed expert MLPs of a prefill batch on tensor cores: `act = silu(w1 x) * (w3 x)`,
/// `out = weight * (w2 act)` per slot, the same buffers and results as [`moe_gemv`] (`out` must be
/// 16-byte aligned as well). Zero tokens launch nothing.
pub fn moe_grouped_gemm(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeShape,
    b: MoeBuffers<'_>,
) -> Result<(), CudaError> {
    launch_moe(kernels, stream, shape, b, plan_moe_grouped)
}

/// Picks [`moe_gemv`] below [`MOE_GROUPED_MIN_TOKENS`] tokens and [`moe_grouped_gemm`] from it on;
/// both write the same `act` and `out`.
pub fn moe_experts(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeShape,
    b: MoeBuffers<'_>,
) -> Result<(), CudaError> {
    if use_grouped(shape.tokens) {
        moe_grouped_gemm(kernels, stream, shape, b)
    } else {
        moe_gemv(kernels, stream, shape, b)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::super::moe_wgmma::WGMMA;
    use super::super::{Buf, KERNEL_VARIANTS};
    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;

    /// Both expert-GEMM pairs that share [`plan_tiled`].
    const PAIRS: [&TiledExperts; 2] = [&GROUPED, &WGMMA];

    pub(in crate::cuda::ops) fn buf(len: usize) -> Buf {
        Buf { address: BASE, len }
    }

    /// Buffers of exactly the sizes `s` needs.
    pub(in crate::cuda::ops) fn bufs(s: &MoeShape) -> MoeBufs {
        let slots = s.tokens * s.top_k;
        let weights = s.experts * s.inter * s.hidden;
        MoeBufs {
            x: buf(s.tokens * s.hidden),
            w1: buf(weights),
            w3: buf(weights),
            w2: buf(weights),
            topk_weights: buf(slots),
            expert_offsets: buf(s.experts + 1),
            sorted_slots: buf(slots),
            act: buf(slots * s.inter),
            out: buf(slots * s.hidden),
        }
    }

    fn mixtral(tokens: usize) -> MoeShape {
        MoeShape {
            tokens,
            hidden: 4096,
            inter: 14336,
            experts: 8,
            top_k: 2,
        }
    }

    fn symbol(variant: usize) -> &'static str {
        KERNEL_VARIANTS[variant].symbol
    }

    fn unsupported(result: Result<impl std::fmt::Debug, CudaError>, expected_op: &str, name: &str) {
        match result {
            Err(CudaError::Unsupported { op, what, .. }) => {
                assert_eq!(op, expected_op);
                assert_eq!(what, name);
            }
            other => panic!("expected Unsupported({name}), got {other:?}"),
        }
    }

    /// The tiles the kernel walks for these per-expert counts.
    fn real_tiles(counts: &[usize]) -> usize {
        counts
            .iter()
            .map(|c| c.div_ceil(MOE_GROUPED_BM as usize))
            .sum()
    }

    #[test]
    fn mixtral_prefill_grids() {
        // Both pairs: the same tile list, 64 w1/w3 rows per up block, 128 w2 rows per down block.
        for k in PAIRS {
            for (tokens, tiles) in [(512, 23), (4096, 135)] {
                let s = mixtral(tokens);
                let [up, down] = plan_tiled(k, &s, &bufs(&s)).unwrap().unwrap();
                assert_eq!(symbol(up.variant), k.up.1);
                assert_eq!(symbol(down.variant), k.down.1);
                assert_eq!(up.grid, (tiles, 14336 / 64, 1));
                assert_eq!(down.grid, (tiles, 4096 / 128, 1));
                assert_eq!((up.block, down.block), (128, 128));
                assert_eq!((up.shared_bytes, down.shared_bytes), (0, 0));
                assert_eq!(up.params.tokens as usize, tokens);
                assert_eq!(up.params, down.params);
            }
        }
        assert_eq!(
            KERNEL_VARIANTS[plan_tiled(&WGMMA, &mixtral(512), &bufs(&mixtral(512)))
                .unwrap()
                .unwrap()[0]
                .variant]
                .module,
            "moe_wgmma"
        );
    }

    #[test]
    fn tile_bound_is_reached_by_the_worst_counts() {
        // 8 experts sharing 1024 slots as 7 x 65 + 569: every expert wastes 63 rows but one.
        let counts = [65, 65, 65, 65, 65, 65, 65, 569];
        assert_eq!(counts.iter().sum::<usize>(), 1024);
        assert_eq!(real_tiles(&counts), 2 * 7 + 9);
        assert_eq!(max_tiles(1024, 8, 64), 23);
        // Fewer slots than experts: each slot its own tile.
        assert_eq!(max_tiles(3, 8, 64), 3);
        assert_eq!(max_tiles(1, 1, 64), 1);
        assert_eq!(max_tiles(0, 8, 64), 0);
    }

    proptest! {
        #[test]
        fn tile_bound_covers_every_routing(
            counts in proptest::collection::vec(0usize..300, 1..40),
        ) {
            let slots: usize = counts.iter().sum();
            prop_assert!(real_tiles(&counts) <= max_tiles(slots, counts.len(), 64));
        }

        #[test]
        fn grid_covers_the_columns_and_the_worst_tile_count(
            tokens in 1usize..600,
            hidden8 in 1usize..40,
            inter8 in 1usize..40,
            experts in 1usize..12,
            k in 1usize..4,
        ) {
            let top_k = k.min(experts);
            let s = MoeShape { tokens, hidden: hidden8 * 8, inter: inter8 * 8, experts, top_k };
            for pair in PAIRS {
                let [up, down] = plan_tiled(pair, &s, &bufs(&s)).unwrap().unwrap();
                let slots = tokens * top_k;
                // All slots on one expert, and spread as evenly as the slots allow.
                let worst = slots.div_ceil(64);
                let mut even = vec![slots / experts; experts];
                for c in even.iter_mut().take(slots % experts) {
                    *c += 1;
                }
                prop_assert!(up.grid.0 as usize >= worst.max(real_tiles(&even)));
                prop_assert_eq!(up.grid.0, down.grid.0);
                prop_assert!(up.grid.1 as usize * 64 >= s.inter && (up.grid.1 as usize - 1) * 64 < s.inter);
                prop_assert!(down.grid.1 as usize * 128 >= s.hidden && (down.grid.1 as usize - 1) * 128 < s.hidden);
            }
        }

        #[test]
        fn needs_exactly_the_contiguous_sizes(
            tokens in 1usize..20,
            hidden8 in 1usize..8,
            inter8 in 1usize..8,
            experts in 1usize..9,
            k in 1usize..3,
        ) {
            let top_k = k.min(experts);
            let s = MoeShape { tokens, hidden: hidden8 * 8, inter: inter8 * 8, experts, top_k };
            for pair in PAIRS {
                prop_assert!(plan_tiled(pair, &s, &bufs(&s)).is_ok());
                let full = bufs(&s);
                let cases: [(&str, MoeBufs); 9] = [
                    ("x", MoeBufs { x: buf(full.x.len - 1), ..bufs(&s) }),
                    ("w1", MoeBufs { w1: buf(full.w1.len - 1), ..bufs(&s) }),
                    ("w3", MoeBufs { w3: buf(full.w3.len - 1), ..bufs(&s) }),
                    ("w2", MoeBufs { w2: buf(full.w2.len - 1), ..bufs(&s) }),
                    ("topk_weights", MoeBufs { topk_weights: buf(full.topk_weights.len - 1), ..bufs(&s) }),
                    ("expert_offsets", MoeBufs { expert_offsets: buf(full.expert_offsets.len - 1), ..bufs(&s) }),
                    ("sorted_slots", MoeBufs { sorted_slots: buf(full.sorted_slots.len - 1), ..bufs(&s) }),
                    ("act", MoeBufs { act: buf(full.act.len - 1), ..bufs(&s) }),
                    ("out", MoeBufs { out: buf(full.out.len - 1), ..bufs(&s) }),
                ];
                for (name, b) in cases {
                    match plan_tiled(pair, &s, &b) {
                        Err(CudaError::BufferTooSmall { op, buffer, .. }) => {
                            prop_assert_eq!(op, pair.op);
                            prop_assert_eq!(buffer, name);
                        }
                        other => prop_assert!(false, "{name}: expected BufferTooSmall, got {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_bad_shapes_with_typed_errors() {
        for k in PAIRS {
            refuses_bad_shapes(k);
        }
    }

    fn refuses_bad_shapes(k: &TiledExperts) {
        let s = mixtral(64);
        unsupported(
            plan_tiled(k, &MoeShape { hidden: 4100, ..s }, &bufs(&s)),
            k.op,
            "hidden",
        );
        unsupported(
            plan_tiled(k, &MoeShape { inter: 0, ..s }, &bufs(&s)),
            k.op,
            "inter",
        );
        unsupported(
            plan_tiled(k, &MoeShape { experts: 0, ..s }, &bufs(&s)),
            k.op,
            "experts",
        );
        let many = MoeShape {
            experts: ROUTER_MAX_EXPERTS as usize + 1,
            hidden: 8,
            inter: 8,
            ..s
        };
        unsupported(plan_tiled(k, &many, &bufs(&many)), k.op, "experts");
        unsupported(
            plan_tiled(k, &MoeShape { top_k: 0, ..s }, &bufs(&s)),
            k.op,
            "top_k",
        );
        unsupported(
            plan_tiled(k, &MoeShape { top_k: 9, ..s }, &bufs(&s)),
            k.op,
            "top_k",
        );
        let huge = MoeShape {
            tokens: 1 << 30,
            ..s
        };
        unsupported(plan_tiled(k, &huge, &bufs(&s)), k.op, "tokens * top_k");
        for name in ["x", "w1", "w3", "w2", "act", "out"] {
            let mut b = bufs(&s);
            let field = match name {
                "x" => &mut b.x,
                "w1" => &mut b.w1,
                "w3" => &mut b.w3,
                "w2" => &mut b.w2,
                "act" => &mut b.act,
                _ => &mut b.out,
            };
            field.address += 8;
            match plan_tiled(k, &s, &b) {
                Err(CudaError::Misaligned { op, buffer, .. }) => {
                    assert_eq!(op, k.op);
                    assert_eq!(buffer, name);
                }
                other => panic!("{name}: expected Misaligned, got {other:?}"),
            }
        }
    }

    #[test]
    fn zero_tokens_launch_nothing_but_are_checked() {
        for k in PAIRS {
            zero_tokens(k);
        }
    }

    fn zero_tokens(k: &TiledExperts) {
        let s = MoeShape {
            tokens: 0,
            ..mixtral(0)
        };
        assert!(plan_tiled(k, &s, &bufs(&s)).unwrap().is_none());
        let short = MoeBufs {
            expert_offsets: buf(8),
            ..bufs(&s)
        };
        assert!(matches!(
            plan_tiled(k, &s, &short),
            Err(CudaError::BufferTooSmall {
                buffer: "expert_offsets",
                ..
            })
        ));
    }

    #[test]
    fn dispatch_threshold() {
        assert!(!use_grouped(0));
        assert!(!use_grouped(1));
        assert!(!use_grouped(MOE_GROUPED_MIN_TOKENS - 1));
        assert!(use_grouped(MOE_GROUPED_MIN_TOKENS));
        assert!(use_grouped(4096));
        // Both ops accept the shapes either side of the threshold with the same buffers.
        for tokens in [MOE_GROUPED_MIN_TOKENS - 1, MOE_GROUPED_MIN_TOKENS] {
            let s = MoeShape {
                tokens,
                hidden: 64,
                inter: 40,
                experts: 4,
                top_k: 2,
            };
            assert!(plan_moe_grouped(&s, &bufs(&s)).unwrap().is_some());
            assert!(super::super::plan_moe(&s, &bufs(&s)).unwrap().is_some());
        }
    }
}
