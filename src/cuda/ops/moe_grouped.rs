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
pub(super) fn max_tiles(slots: usize, experts: usize, bm: usize) -> usize {
    (slots + experts.min(slots) * (bm - 1)) / bm.max(1)
}

/// The rules of the tile-list kernels (`csrc/moe_tiles.cuh`: this file's and `moe_wgmma`'s) on top
/// of [`moe_rules`]: every block walks the expert offsets to find its tile (experts at most
/// ROUTER_MAX_EXPERTS keeps the walk short) and the down epilogue stores f32 pairs (a 16-byte
/// aligned `out` keeps every row start aligned). Returns the grid x: the worst-case count of tiles
/// of `bm` slots.
pub(super) fn tile_list(
    c: &Check,
    s: &MoeScalars,
    out_address: u64,
    bm: u32,
) -> Result<u32, CudaError> {
    let slots = moe_rules(c, s)?;
    if s.experts > ROUTER_MAX_EXPERTS {
        return Err(c.unsupported(
            "experts",
            s.experts as usize,
            format!("must be at most {ROUTER_MAX_EXPERTS} (each block walks the expert offsets)"),
        ));
    }
    aligned(c.op, "out", out_address)?;
    c.count("tiles", max_tiles(slots, s.experts as usize, bm as usize))
}

/// One pair of tile-list kernels: the up kernel writes `up_cols` columns of `act` per block, the
/// down kernel `down_cols` columns of `out`, over tiles of `bm` slots, `threads` per block.
pub(super) struct TilePair {
    pub up: (KernelFamily, &'static str),
    pub down: (KernelFamily, &'static str),
    pub bm: u32,
    pub up_cols: u32,
    pub down_cols: u32,
    pub threads: u32,
}

/// Plans a [`TilePair`]: the [`tile_list`] rules, the instantiations, then grid x = tiles and
/// y = column blocks of each pass.
pub(super) fn plan_tile_pair(
    c: &Check,
    pair: &TilePair,
    s: &MoeScalars,
    a: &MoeArgs<'_>,
) -> Planned<MoeParams, 2> {
    let params = a.params(c.op, s)?;
    let tiles = tile_list(c, s, a.out.address(), pair.bm)?;
    let up = c.variant(pair.up.0, pair.up.1, &[])?;
    let down = c.variant(pair.down.0, pair.down.1, &[])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let up_blocks = c.grid_yz("inter blocks", s.inter.div_ceil(pair.up_cols) as usize)?;
    let down_blocks = c.grid_yz("hidden blocks", s.hidden.div_ceil(pair.down_cols) as usize)?;
    let grid = |variant, blocks| Grid {
        variant,
        grid: (tiles, blocks, 1),
        block: pair.threads,
        shared_bytes: 0,
    };
    Ok(Some((
        params,
        [grid(up, up_blocks), grid(down, down_blocks)],
    )))
}

/// MOE_GROUPED_BN columns of w1 and w3 per up block, twice that (rows of w2) per down block.
const GROUPED: TilePair = TilePair {
    up: (KernelFamily::MoeGroupedUp, "moe_grouped_up"),
    down: (KernelFamily::MoeGroupedDown, "moe_grouped_down"),
    bm: MOE_GROUPED_BM,
    up_cols: MOE_GROUPED_BN,
    down_cols: 2 * MOE_GROUPED_BN,
    threads: MOE_GROUPED_THREADS,
};

fn plan(s: &MoeScalars, a: &MoeArgs<'_>) -> Planned<MoeParams, 2> {
    let c = Check::new("moe_grouped_gemm");
    plan_tile_pair(&c, &GROUPED, s, a)
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
pub(super) mod tests {
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::*;
    use crate::cuda::ops::fake::{misaligned, unsupported};
    use crate::cuda::ops::moe_gemv::tests::{
        args, mixtral, needs_exactly_the_contiguous_sizes, refuses_bad_shapes, smallest,
    };

    /// A tile-list planner.
    pub type Planner = fn(&MoeScalars, &MoeArgs<'_>) -> Planned<MoeParams, 2>;

    /// The tiles the kernel walks for these per-expert counts.
    fn real_tiles(counts: &[usize]) -> usize {
        counts
            .iter()
            .map(|c| c.div_ceil(MOE_GROUPED_BM as usize))
            .sum()
    }

    /// `planner`'s grids for Mixtral prefill: the tile list, 64 w1/w3 rows per up block, 128 w2
    /// rows per down block, 128 threads; `ups` / `downs` the symbols.
    pub fn mixtral_prefill_grids(planner: Planner, ups: &str, downs: &str) {
        for (tokens, tiles) in [(512, 23), (4096, 135)] {
            let s = mixtral(tokens);
            let (params, [up, down]) = planner(&s, &args(&s, "", "")).unwrap().unwrap();
            assert_eq!((up.symbol(), down.symbol()), (ups, downs));
            assert_eq!(up.grid, (tiles, 14336 / 64, 1));
            assert_eq!(down.grid, (tiles, 4096 / 128, 1));
            assert_eq!((up.block, down.block), (128, 128));
            assert_eq!((up.shared_bytes, down.shared_bytes), (0, 0));
            assert_eq!(params.tokens, tokens);
        }
    }

    /// The rules of [`tile_list`] on top of [`moe_rules`], as `planner` (named `op`) reports them.
    pub fn refuses_bad_tile_lists(op: &str, planner: Planner) {
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
    fn grid_covers(planner: Planner, s: &MoeScalars) -> Result<(), TestCaseError> {
        let (_, [up, down]) = planner(s, &args(s, "", "")).unwrap().unwrap();
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

    /// `planner` on random shapes the kernels take: the grid covers the columns and the worst tile
    /// count, and buffers of exactly the contiguous sizes pass while each one element short is
    /// refused by name.
    pub fn tile_list_properties(planner: Planner) {
        let mut runner = TestRunner::default();
        runner
            .run(&moe_shapes(600, 40), |s| grid_covers(planner, &s))
            .unwrap();
        runner
            .run(&moe_shapes(20, 8), |s| {
                needs_exactly_the_contiguous_sizes(planner, &s);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn moe_grouped_prefill_grids() {
        mixtral_prefill_grids(plan, "moe_grouped_up", "moe_grouped_down");
    }

    #[test]
    fn moe_grouped_refuses_bad_shapes() {
        refuses_bad_tile_lists("moe_grouped_gemm", plan);
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

    #[test]
    fn moe_grouped_tile_list_properties() {
        tile_list_properties(plan);
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
