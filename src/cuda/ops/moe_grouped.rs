//! `moe_grouped_up` / `moe_grouped_down` (csrc/moe_grouped.cu): the routed expert MLPs of a prefill
//! batch as two grouped tensor-core GEMMs (SwiGLU fused into the first), with exactly the buffers and
//! results of [`moe_gemv`]; [`moe_experts`] runs the one the selection table picks for bf16 experts.
//!
//! Grid: x = a flattened list of (expert, 64-slot) tiles sized for the worst case (the per-expert
//! counts are in device memory), y = output column blocks: MOE_GROUPED_BN columns (rows of w1 and
//! w3) per up block, twice that (rows of w2) per down block. See the header of
//! `csrc/moe_grouped.cu` for the tiling and its cost on Mixtral shapes.

use cudarc::driver::CudaStream;

#[cfg(feature = "testing")]
use super::moe_gemv::moe_gemv_emulated;
use super::moe_gemv::{moe_gemv, moe_rules};
use crate::cuda::args::{MoeArgs, MoeScalars};
use crate::cuda::checks::{aligned, Check};
use crate::cuda::error::CudaError;
use crate::cuda::launch::{planned_launcher, Grid, Planned};
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    KernelFamily, MoeParams, MOE_GROUPED_BM, MOE_GROUPED_BN, MOE_GROUPED_THREADS,
    ROUTER_MAX_EXPERTS,
};
use crate::cuda::select::{select, Choice, Device, Format, Op};

planned_launcher! {
    /// The routed expert MLPs of a prefill batch on tensor cores: `act = silu(w1 x) * (w3 x)`,
    /// `out = weight * (w2 act)` per slot, the same buffers and results as [`moe_gemv`] (`out` must be
    /// 16-byte aligned as well). Zero tokens launch nothing.
    moe_grouped_gemm(MoeScalars, MoeArgs) = plan; emulated moe_grouped_gemm_emulated
}

/// Upper bound on the tiles of `bm` slots in the flattened list: `sum_e ceil(count_e / bm)` over
/// counts summing to `slots`, at most `min(experts, slots)` of them non-zero, is at most
/// `floor((slots + min(experts, slots) * (bm - 1)) / bm)`.
fn max_tiles(slots: usize, experts: usize, bm: usize) -> usize {
    (slots + experts.min(slots) * (bm - 1)) / bm.max(1)
}

/// The planner: the rules of [`moe_rules`], then those of the tile list (`csrc/moe_tiles.cuh`):
/// every block walks the expert offsets to find its tile (experts at most ROUTER_MAX_EXPERTS keeps
/// the walk short) and the down epilogue stores f32 pairs (a 16-byte aligned `out` keeps every row
/// start aligned). Grid x = the worst-case count of tiles of MOE_GROUPED_BM slots, y = column
/// blocks: MOE_GROUPED_BN columns of w1 and w3 per up block, twice that (rows of w2) per down block.
fn plan(s: &MoeScalars, a: &MoeArgs<'_>) -> Planned<MoeParams, 2> {
    let c = Check::new("moe_grouped_gemm");
    let params = a.params(c.op, s)?;
    let slots = moe_rules(&c, s)?;
    if s.experts > ROUTER_MAX_EXPERTS {
        return Err(c.unsupported(
            "experts",
            s.experts as usize,
            format!("must be at most {ROUTER_MAX_EXPERTS} (each block walks the expert offsets)"),
        ));
    }
    aligned(c.op, "out", a.out.address())?;
    let tiles = c.count(
        "tiles",
        max_tiles(slots, s.experts as usize, MOE_GROUPED_BM as usize),
    )?;
    let up = c.variant(KernelFamily::MoeGroupedUp, "moe_grouped_up", &[])?;
    let down = c.variant(KernelFamily::MoeGroupedDown, "moe_grouped_down", &[])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let up_blocks = c.grid_yz("inter blocks", s.inter.div_ceil(MOE_GROUPED_BN) as usize)?;
    let down_blocks = c.grid_yz(
        "hidden blocks",
        s.hidden.div_ceil(2 * MOE_GROUPED_BN) as usize,
    )?;
    let grid = |variant, blocks| Grid {
        variant,
        grid: (tiles, blocks, 1),
        block: MOE_GROUPED_THREADS,
        shared_bytes: 0,
    };
    Ok(Some((
        params,
        [grid(up, up_blocks), grid(down, down_blocks)],
    )))
}

/// Runs [`moe_gemv`] or [`moe_grouped_gemm`] over bf16 experts, as the selection table picks for
/// the token count (on any device: the Hopper kernels are chosen by the engine); both write the
/// same `act` and `out`.
pub fn moe_experts(
    kernels: &Kernels,
    stream: &CudaStream,
    s: &MoeScalars,
    args: MoeArgs<'_>,
) -> Result<(), CudaError> {
    match select(
        Op::Experts,
        s.tokens as usize,
        Format::Bf16,
        Device::default(),
    ) {
        Choice::MoeGemv => moe_gemv(kernels, stream, s, args),
        _ => moe_grouped_gemm(kernels, stream, s, args),
    }
}

/// [`moe_experts`] on the kernel emulator (feature `testing`).
///
/// # Safety
/// Every view in the arguments is of host memory
/// ([`View::of_host`](crate::cuda::memory::View::of_host)).
#[cfg(feature = "testing")]
pub unsafe fn moe_experts_emulated(
    s: &MoeScalars,
    args: MoeArgs<'_>,
    schedule: crate::cuda::emulator::Schedule,
) -> Result<(), crate::cuda::emulator::EmulatorError> {
    match select(
        Op::Experts,
        s.tokens as usize,
        Format::Bf16,
        Device::default(),
    ) {
        // SAFETY: the caller's contract.
        Choice::MoeGemv => unsafe { moe_gemv_emulated(s, args, schedule) },
        _ => unsafe { moe_grouped_gemm_emulated(s, args, schedule) },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::*;
    use crate::cuda::ops::fake::{misaligned, unsupported};
    use crate::cuda::ops::moe_gemv::tests::{
        args, mixtral, needs_exactly_the_contiguous_sizes, refuses_bad_shapes, smallest,
    };

    /// The tiles the kernel walks for these per-expert counts.
    fn real_tiles(counts: &[usize]) -> usize {
        counts
            .iter()
            .map(|c| c.div_ceil(MOE_GROUPED_BM as usize))
            .sum()
    }

    /// The grids for Mixtral prefill: the tile list, 64 w1/w3 rows per up block, 128 w2 rows per
    /// down block, 128 threads.
    #[test]
    fn moe_grouped_prefill_grids() {
        for (tokens, tiles) in [(512, 23), (4096, 135)] {
            let s = mixtral(tokens);
            let (params, [up, down]) = plan(&s, &args(&s, "", "")).unwrap().unwrap();
            assert_eq!(
                (up.symbol(), down.symbol()),
                ("moe_grouped_up", "moe_grouped_down")
            );
            assert_eq!(up.grid, (tiles, 14336 / 64, 1));
            assert_eq!(down.grid, (tiles, 4096 / 128, 1));
            assert_eq!((up.block, down.block), (128, 128));
            assert_eq!((up.shared_bytes, down.shared_bytes), (0, 0));
            assert_eq!(params.tokens, tokens);
        }
    }

    /// The rules of the tile list on top of [`moe_rules`].
    #[test]
    fn moe_grouped_refuses_bad_shapes() {
        let (op, planner) = ("moe_grouped_gemm", plan);
        refuses_bad_shapes(op, planner);
        let many = MoeScalars {
            experts: ROUTER_MAX_EXPERTS + 1,
            ..smallest(64)
        };
        unsupported(planner(&many, &args(&many, "", "")), "experts");
        let s = mixtral(64);
        assert_eq!(misaligned(planner(&s, &args(&s, "", "out")), "out"), op);
    }

    /// MoE shapes the tiled planners take: 1 to `max_tokens - 1` tokens, hidden and inter multiples
    /// of 8 below `8 * max_dim8`, 1 to 11 experts, top_k 1 to 3 (at most the experts).
    fn moe_shapes(max_tokens: u32, max_dim8: u32) -> impl Strategy<Value = MoeScalars> {
        (1..max_tokens, 1..max_dim8, 1..max_dim8, 1u32..12, 1u32..4).prop_map(
            |(tokens, hidden8, inter8, experts, k)| MoeScalars {
                tokens,
                hidden: hidden8 * 8,
                inter: inter8 * 8,
                experts,
                top_k: k.min(experts),
            },
        )
    }

    /// For a shape the kernels take: the grid covers the columns and the worst tile count (all slots
    /// on one expert, and spread as evenly as the slots allow).
    fn grid_covers(s: &MoeScalars) -> Result<(), TestCaseError> {
        let (_, [up, down]) = plan(s, &args(s, "", "")).unwrap().unwrap();
        let (experts, slots) = (s.experts as usize, (s.tokens * s.top_k) as usize);
        let worst = slots.div_ceil(64);
        let mut even = vec![slots / experts; experts];
        for c in even.iter_mut().take(slots % experts) {
            *c += 1;
        }
        prop_assert!(up.grid.0 as usize >= worst.max(real_tiles(&even)));
        prop_assert_eq!(up.grid.0, down.grid.0);
        prop_assert!(up.grid.1 * 64 >= s.inter && (up.grid.1 - 1) * 64 < s.inter);
        prop_assert!(down.grid.1 * 128 >= s.hidden && (down.grid.1 - 1) * 128 < s.hidden);
        Ok(())
    }

    /// On random shapes the kernels take: the grid covers the columns and the worst tile count, and
    /// buffers of exactly the contiguous sizes pass while each one element short is refused by
    /// name.
    #[test]
    fn moe_grouped_tile_list_properties() {
        let mut runner = TestRunner::default();
        runner
            .run(&moe_shapes(600, 40), |s| grid_covers(&s))
            .unwrap();
        runner
            .run(&moe_shapes(20, 8), |s| {
                needs_exactly_the_contiguous_sizes(plan, &s);
                Ok(())
            })
            .unwrap();
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
    }
}
