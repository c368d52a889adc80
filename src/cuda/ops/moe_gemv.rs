//! `moe_up` / `moe_down` (csrc/moe_gemv.cu): the routed expert MLPs of a decode batch, GEMV style.
//! For every slot `s = t * top_k + j` routed to expert `e` (the router's `expert_offsets` /
//! `sorted_slots`): `act[s] = silu(w1[e] x[t]) * (w3[e] x[t])` (`[tokens * top_k, inter]` bf16) and
//! `out[s] = weight[s] * (w2[e] act[s])` (`[tokens * top_k, hidden]` f32). w1 / w3 are
//! `[experts, inter, hidden]`, w2 `[experts, hidden, inter]` bf16.
//!
//! Also the shape rules every expert kernel over [`MoeParams`] states ([`moe_rules`]): the tensor-core
//! kernels of [`moe_grouped`](super::moe_grouped) check them too.

use super::linear::gemv_tile;
use super::qlinear::mma_tiles;
use crate::cuda::args::{MoeArgs, MoeScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{planned_launcher, Grid, Planned};
use crate::cuda::params::{
    KernelFamily, MoeParams, MOE_DOWN_ROWS_PER_WARP, MOE_WARPS, QMMA_ROWS, QMMA_WARPS,
};

planned_launcher! {
    /// The routed expert MLPs of a decode batch: `act = silu(w1 x) * (w3 x)`, `out = weight * (w2 act)`
    /// per slot; zero tokens launch nothing.
    moe_gemv(MoeScalars, MoeArgs) = plan; emulated moe_gemv_emulated
}

planned_launcher! {
    /// [`moe_gemv`] on the tensor cores (csrc/quant_mma.cuh, the bf16 weights as stored): a block
    /// per 16 rows of an expert with slots, its slots in passes of 8, 16 or 32, every weight row
    /// read once per pass; the same outputs up to the order of the f32 sums.
    moe_mma(MoeScalars, MoeArgs) = plan_mma; emulated moe_mma_emulated
}

/// The rules of every expert kernel beyond the buffer extents: hidden and inter multiples of 8
/// (16-byte loads), top_k at least 1, counts and `tokens * hidden` below 2^31; returns the slot
/// count `tokens * top_k` (below 2^31: the kernels hold slots in 32-bit integers). `experts` are the
/// experts held, which may be fewer than `top_k`: a rank of an expert-parallel split holding one
/// expert of a top-2 model runs the slots routed to it and leaves the others' alone.
pub(super) fn moe_rules(c: &Check, s: &MoeScalars) -> Result<usize, CudaError> {
    c.multiple_of_8("hidden", s.hidden as usize)?;
    c.multiple_of_8("inter", s.inter as usize)?;
    c.at_least("experts", s.experts as usize, 1)?;
    c.at_least("top_k", s.top_k as usize, 1)?;
    for (what, value) in [
        ("tokens", s.tokens),
        ("hidden", s.hidden),
        ("inter", s.inter),
        ("experts", s.experts),
    ] {
        c.count(what, value as usize)?;
    }
    c.product("tokens * hidden", &[s.tokens as usize, s.hidden as usize])?;
    c.product("tokens * top_k", &[s.tokens as usize, s.top_k as usize])
}

/// Grid rows of the decode expert kernels: the most experts a batch can route slots to,
/// `min(experts, tokens * top_k)` (row `y` serves the `y`-th expert with slots, csrc/slot_tiles.cuh).
pub(super) fn active_experts(
    c: &Check,
    experts: u32,
    tokens: u32,
    top_k: u32,
) -> Result<u32, CudaError> {
    let slots = tokens as usize * top_k as usize;
    c.grid_yz("experts", (experts as usize).min(slots))
}

fn plan(s: &MoeScalars, a: &MoeArgs<'_>) -> Planned<MoeParams, 2> {
    let c = Check::new("moe_gemv");
    let params = a.params(c.op, s)?;
    moe_rules(&c, s)?;
    let experts = active_experts(&c, s.experts, s.tokens, s.top_k)?;
    let tile = gemv_tile(s.tokens);
    let up = c.variant(KernelFamily::MoeUp, "tile", &[tile])?;
    let down = c.variant(KernelFamily::MoeDown, "tile", &[tile])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let block = MOE_WARPS * 32;
    let grid = |variant, columns: u32, per_block: u32| Grid {
        variant,
        grid: (columns.div_ceil(per_block), experts, 1),
        block,
        shared_bytes: 0,
    };
    Ok(Some((
        params,
        [
            grid(up, s.inter, MOE_WARPS),
            grid(down, s.hidden, MOE_WARPS * MOE_DOWN_ROWS_PER_WARP),
        ],
    )))
}

fn plan_mma(s: &MoeScalars, a: &MoeArgs<'_>) -> Planned<MoeParams, 2> {
    let c = Check::new("moe_mma");
    let params = a.params(c.op, s)?;
    moe_rules(&c, s)?;
    let experts = active_experts(&c, s.experts, s.tokens, s.top_k)?;
    // An expert has at most one slot per token.
    let tiles = [mma_tiles(s.tokens)];
    let up = c.variant(KernelFamily::MoeMmaUp, "most n-tiles", &tiles)?;
    let down = c.variant(KernelFamily::MoeMmaDown, "most n-tiles", &tiles)?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let grid = |variant, rows: u32| Grid {
        variant,
        grid: (rows.div_ceil(QMMA_ROWS), experts, 1),
        block: QMMA_WARPS * 32,
        shared_bytes: 0,
    };
    Ok(Some((params, [grid(up, s.inter), grid(down, s.hidden)])))
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::error::KernelError;
    use crate::cuda::memory::{View, ViewMut};
    use crate::cuda::ops::fake::{misaligned, too_small, unsupported, BASE};

    /// The buffers of [`MoeArgs`] in declaration order.
    pub const BUFFERS: [&str; 9] = [
        "x",
        "w1",
        "w3",
        "w2",
        "topk_weights",
        "expert_offsets",
        "sorted_slots",
        "act",
        "out",
    ];

    /// Buffers of exactly the sizes `s` needs, except `short` one element short and `shifted` 8
    /// bytes off a 16-byte boundary (by name; "" for none).
    pub fn args(s: &MoeScalars, short: &str, shifted: &str) -> MoeArgs<'static> {
        let [t, h, i, e, k] = [s.tokens, s.hidden, s.inter, s.experts, s.top_k].map(|v| v as usize);
        let len = |name: &str, n: usize| n - usize::from(name == short);
        let at = |name: &str| BASE + if name == shifted { 8 } else { 0 };
        fn r<T>(address: u64, len: usize) -> View<'static, T> {
            // SAFETY: planner tests only read the address and length; nothing is launched on it.
            unsafe { View::from_raw(address, len) }
        }
        fn w<T>(address: u64, len: usize) -> ViewMut<'static, T> {
            // SAFETY: as `r`.
            unsafe { ViewMut::from_raw(address, len) }
        }
        MoeArgs {
            x: r(at("x"), len("x", t * h)),
            w1: r(at("w1"), len("w1", e * i * h)),
            w3: r(at("w3"), len("w3", e * i * h)),
            w2: r(at("w2"), len("w2", e * h * i)),
            topk_weights: r(at("topk_weights"), len("topk_weights", t * k)),
            expert_offsets: r(at("expert_offsets"), len("expert_offsets", e + 1)),
            sorted_slots: r(at("sorted_slots"), len("sorted_slots", t * k)),
            act: w(at("act"), len("act", t * k * i)),
            out: w(at("out"), len("out", t * k * h)),
        }
    }

    /// Mixtral 8x7B's expert shapes.
    pub fn mixtral(tokens: u32) -> MoeScalars {
        MoeScalars {
            tokens,
            hidden: 4096,
            inter: 14336,
            experts: 8,
            top_k: 2,
        }
    }

    /// The smallest expert shapes the kernels take: hidden and inter 8, one expert, top-1.
    pub fn smallest(tokens: u32) -> MoeScalars {
        MoeScalars {
            tokens,
            hidden: 8,
            inter: 8,
            experts: 1,
            top_k: 1,
        }
    }

    type Planner<P> = fn(&MoeScalars, &MoeArgs<'_>) -> Result<Option<P>, CudaError>;

    /// The shape rules of [`moe_rules`] and the alignment of x, the weights and act, as `planner`
    /// (named `op` in its errors) reports them.
    pub fn refuses_bad_shapes<P: std::fmt::Debug>(op: &str, planner: Planner<P>) {
        let s = mixtral(64);
        let bad = |s: MoeScalars, what: &str| {
            let result = planner(&s, &args(&s, "", ""));
            if let Err(CudaError::Kernel(KernelError::Unsupported { op: got, .. })) = &result {
                assert_eq!(*got, op);
            }
            unsupported(result, what);
        };
        bad(MoeScalars { hidden: 4100, ..s }, "hidden");
        bad(MoeScalars { inter: 0, ..s }, "inter");
        bad(MoeScalars { inter: 44, ..s }, "inter");
        bad(MoeScalars { experts: 0, ..s }, "experts");
        bad(MoeScalars { top_k: 0, ..s }, "top_k");
        // A rank holding one expert of a top-2 model is planned.
        let one_held = MoeScalars { experts: 1, ..s };
        assert!(planner(&one_held, &args(&one_held, "", "")).is_ok());
        bad(smallest(1 << 31), "tokens");
        bad(smallest(1 << 28), "tokens * hidden");
        for name in ["x", "w1", "w3", "w2", "act"] {
            assert_eq!(misaligned(planner(&s, &args(&s, "", name)), name), op);
        }
        // Zero tokens launch nothing, after the checks.
        let empty = MoeScalars { tokens: 0, ..s };
        assert!(planner(&empty, &args(&empty, "", "")).unwrap().is_none());
        too_small(
            planner(&empty, &args(&empty, "expert_offsets", "")),
            "expert_offsets",
        );
    }

    /// For shapes the kernels take, exact buffers pass and each one element short is refused by name.
    pub fn needs_exactly_the_contiguous_sizes<P: std::fmt::Debug>(
        planner: Planner<P>,
        s: &MoeScalars,
    ) {
        assert!(planner(s, &args(s, "", "")).unwrap().is_some());
        for name in BUFFERS {
            too_small(planner(s, &args(s, name, "")), name);
        }
    }

    #[test]
    fn moe_grids_for_mixtral_shapes() {
        let s = mixtral(1);
        let (params, [up, down]) = plan(&s, &args(&s, "", "")).unwrap().unwrap();
        // One token reaches top_k = 2 of the 8 experts: two grid rows.
        assert_eq!(
            (up.symbol(), up.grid, up.block),
            ("moe_up_t1", (14336 / 8, 2, 1), 256)
        );
        assert_eq!(
            (down.symbol(), down.grid, down.block),
            ("moe_down_t1", (4096 / 16, 2, 1), 256)
        );
        assert_eq!((params.tokens, params.inter, params.top_k), (1, 14336, 2));
        let batch = mixtral(13);
        let (_, [up, down]) = plan(&batch, &args(&batch, "", "")).unwrap().unwrap();
        assert_eq!((up.symbol(), down.symbol()), ("moe_up_t8", "moe_down_t8"));
        assert_eq!((up.grid.1, down.grid.1), (8, 8));
        // out is written with scalar stores: any 4-byte alignment is accepted.
        assert!(plan(&s, &args(&s, "", "out")).is_ok());
        // More grid rows than a grid has: as many experts as slots, both above 65 535.
        let many = MoeScalars {
            experts: 65_536,
            top_k: 2,
            ..smallest(32_768)
        };
        unsupported(plan(&many, &args(&many, "", "")), "experts");
    }

    #[test]
    fn moe_gemv_refuses_bad_shapes() {
        refuses_bad_shapes("moe_gemv", plan);
    }

    #[test]
    fn moe_mma_grids_for_mixtral_shapes() {
        for (tokens, columns, experts) in
            [(1, 8, 2), (8, 8, 8), (9, 16, 8), (16, 16, 8), (40, 32, 8)]
        {
            let s = mixtral(tokens);
            let (params, [up, down]) = plan_mma(&s, &args(&s, "", "")).unwrap().unwrap();
            assert_eq!(up.symbol(), format!("moe_mma_up_n{columns}"));
            assert_eq!(down.symbol(), format!("moe_mma_down_n{columns}"));
            // 16 rows a block, a grid row per expert a batch can reach.
            assert_eq!(
                (up.grid, up.block),
                ((14336 / 16, experts, 1), QMMA_WARPS * 32)
            );
            assert_eq!(
                (down.grid, down.block),
                ((4096 / 16, experts, 1), QMMA_WARPS * 32)
            );
            assert_eq!(params.tokens, tokens);
        }
        refuses_bad_shapes("moe_mma", plan_mma);
    }

    #[test]
    fn the_gemv_tile_covers_the_batch_up_to_the_largest_tile() {
        for tokens in 1..64 {
            let tile = gemv_tile(tokens as u32) as usize;
            assert!(tile >= tokens.min(8), "tokens {tokens} tile {tile}");
            assert!(tile < 2 * tokens, "tokens {tokens} tile {tile}: wasteful");
        }
    }

    proptest! {
        /// For any MoE shape the kernels take, buffers of exactly the contiguous sizes pass and each
        /// one made one element shorter is refused by name.
        #[test]
        fn moe_needs_exactly_the_contiguous_sizes(
            tokens in 1u32..40, hidden8 in 1u32..64, inter8 in 1u32..64, experts in 1u32..12, k in 1u32..4,
        ) {
            let s = MoeScalars { tokens, hidden: hidden8 * 8, inter: inter8 * 8, experts, top_k: k.min(experts) };
            needs_exactly_the_contiguous_sizes(plan, &s);
            needs_exactly_the_contiguous_sizes(plan_mma, &s);
        }
    }
}
