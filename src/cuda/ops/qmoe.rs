//! `qmoe_up` / `qmoe_down` (csrc/qmoe.cu): the routed expert MLPs of a decode batch over packed
//! expert stacks (the layout of [`crate::quant::packed`]), the same buffers, grids, tiles and
//! results as `moe_gemv`: for every slot `s = t * top_k + j` routed to expert e, `qmoe_up` writes
//! `act[s] = silu(w1[e] x[t]) * (w3[e] x[t])` (`[tokens * top_k, inter]` bf16) and `qmoe_down`
//! `out[s] = weight[s] * (w2[e] act[s])` (`[tokens * top_k, hidden]` f32). w1 and w3 are
//! `[experts, inter, hidden]`, w2 `[experts, hidden, inter]`; the three stacks have one format, and
//! w1 and w3 one column permutation (or none); 4-bit table codes (LUT4) one table for the three
//! ([`QMoeArgs::table`], the same values: the format includes the table). Each expert's weights are streamed once per tile of
//! slots, the tile of `linear_gemv` for the token count (the most slots one expert can get).
//!
//! `qmoe_mma_up` / `qmoe_mma_down` (csrc/quant_mma.cuh) compute the same on the tensor cores for
//! the stacks [`mma_reads`](super::mma_reads) accepts (FP8, INT8, INT4 in groups of multiples of
//! 128 columns; no permutation): a block of QMMA_WARPS warps per 16 rows of an expert with slots,
//! its slots in passes of 8, 16 or 32.

use cudarc::driver::CudaStream;

use super::linear::gemv_tile;
use super::moe_gemv::active_experts;
use super::qlinear::mma_tiles;
use super::quant_layout::{table_view, PackedKernel};
use crate::cuda::args::{MoeScalars, QMoeArgs, QMoeScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{launch_planned, Grid, Planned};
use crate::cuda::memory::View;
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    KernelFamily, QMoeParams, MOE_DOWN_ROWS_PER_WARP, MOE_WARPS, QMMA_ROWS, QMMA_WARPS,
};
use crate::quant::PackedKind;

const OP: &str = "qmoe";

/// The permutation w1 and w3 share ([`QMoeArgs::w13_perm`]): the same buffer for both, or none.
pub fn shared_perm<'a>(
    w1: Option<View<'a, u32>>,
    w3: Option<View<'a, u32>>,
) -> Result<Option<View<'a, u32>>, CudaError> {
    match (w1, w3) {
        (None, None) => Ok(None),
        (Some(p1), Some(p3)) if p1.address() == p3.address() && p1.len() == p3.len() => {
            Ok(Some(p1))
        }
        _ => Err(Check::new(OP).unsupported(
            "w3_perm",
            0,
            "w1 and w3 must share one permutation buffer (the same view) or both have none",
        )),
    }
}

fn plan(
    kernel: PackedKernel,
    s: &MoeScalars,
    [k1, k3, k2]: [PackedKind; 3],
    a: &QMoeArgs<'_>,
) -> Planned<QMoeParams, 2> {
    let mma = kernel == PackedKernel::Mma;
    let c = Check::new(if mma { "qmoe_mma" } else { OP });
    for (what, kind) in [("w3 kind", k3), ("w2 kind", k2)] {
        if kind != k1 {
            return Err(c.unsupported(
                what,
                0,
                format!(
                    "{kind:?} differs from w1's {k1:?}: all three stacks must have the same format"
                ),
            ));
        }
    }
    table_view(&c, k1, a.table)?;
    c.at_least("experts", s.experts as usize, 1)?;
    c.at_least("top_k", s.top_k as usize, 1)?;
    let experts = active_experts(&c, s.experts, s.tokens, s.top_k)?;
    c.count("tokens", s.tokens as usize)?;
    c.product("tokens * top_k", &[s.tokens as usize, s.top_k as usize])?;
    let l13 = kernel.layout(&c, k1, s.hidden, "hidden", a.w13_perm.is_some())?;
    let l2 = kernel.layout(&c, k1, s.inter, "inter", a.w2_perm.is_some())?;
    let params = a.params(
        c.op,
        &QMoeScalars {
            tokens: s.tokens,
            hidden: s.hidden,
            inter: s.inter,
            experts: s.experts,
            top_k: s.top_k,
            group_size: l13.group_size,
            w13_row_bytes: l13.row_bytes,
            w13_row_params: l13.row_params,
            w2_row_bytes: l2.row_bytes,
            w2_row_params: l2.row_params,
        },
    )?;
    // Variants, blocks along x of the up and down grids, warps a block.
    let (up, down, warps) = if mma {
        // An expert has at most one slot per token.
        let tiles = mma_tiles(s.tokens);
        let (up, down) = (KernelFamily::QMoeMmaUp, KernelFamily::QMoeMmaDown);
        let up = c.variant(up, "(kind, most n-tiles)", &[l13.kind, tiles])?;
        let down = c.variant(down, "(kind, most n-tiles)", &[l2.kind, tiles])?;
        let rows = QMMA_ROWS;
        (
            (up, s.inter.div_ceil(rows)),
            (down, s.hidden.div_ceil(rows)),
            QMMA_WARPS,
        )
    } else {
        let tile = gemv_tile(s.tokens);
        let up = c.variant(KernelFamily::QMoeUp, "(kind, tile)", &[l13.kind, tile])?;
        let down = c.variant(KernelFamily::QMoeDown, "(kind, tile)", &[l2.kind, tile])?;
        let down_rows = MOE_WARPS * MOE_DOWN_ROWS_PER_WARP;
        (
            (up, s.inter.div_ceil(MOE_WARPS)),
            (down, s.hidden.div_ceil(down_rows)),
            MOE_WARPS,
        )
    };
    if s.tokens == 0 {
        return Ok(None);
    }
    let grid = |(variant, blocks)| Grid {
        variant,
        grid: (blocks, experts, 1),
        block: warps * 32,
        shared_bytes: 0,
    };
    Ok(Some((params, [grid(up), grid(down)])))
}

/// The routed expert MLPs of a decode batch over packed expert stacks of formats `kinds` (w1, w3,
/// w2: all the same) on `kernel` (the tensor-core kernels only for the stacks
/// [`mma_reads`](super::mma_reads) accepts; the same outputs up to the order of the f32 sums):
/// `act = silu(w1 x) * (w3 x)`, `out = weight * (w2 act)` per slot. Zero tokens launch nothing.
pub fn qmoe(
    kernels: &Kernels,
    stream: &CudaStream,
    s: &MoeScalars,
    (kinds, args): ([PackedKind; 3], QMoeArgs<'_>),
    kernel: PackedKernel,
) -> Result<(), CudaError> {
    launch_planned(kernels, stream, plan(kernel, s, kinds, &args)?)
}

/// [`qmoe`] on the kernel emulator (feature `testing`).
///
/// # Safety
/// Every view in the arguments is of host memory
/// ([`View::of_host`](crate::cuda::memory::View::of_host)).
#[cfg(feature = "testing")]
pub unsafe fn qmoe_emulated(
    s: &MoeScalars,
    (kinds, args): ([PackedKind; 3], QMoeArgs<'_>),
    kernel: PackedKernel,
    schedule: crate::cuda::emulator::Schedule,
) -> Result<(), crate::cuda::emulator::EmulatorError> {
    let planned = plan(kernel, s, kinds, &args)?;
    // SAFETY: planned just now over `args`, views of host memory (the caller's contract)
    // borrowed until this returns.
    unsafe { crate::cuda::emulator::run_planned(planned, schedule) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::error::KernelError;
    use crate::cuda::ops::fake::{
        any_kind, kind_label, table_for, too_small, unsupported, view, view_mut, BASE, KINDS,
    };
    use crate::packed::lut4::Lut4;

    const NAMES: [&str; 14] = [
        "x",
        "w1_codes",
        "w1_params",
        "w3_codes",
        "w3_params",
        "w13_perm",
        "w2_codes",
        "w2_params",
        "w2_perm",
        "topk_weights",
        "expert_offsets",
        "sorted_slots",
        "act",
        "out",
    ];

    fn scalars(tokens: u32, hidden: u32, inter: u32, experts: u32, top_k: u32) -> MoeScalars {
        MoeScalars {
            tokens,
            hidden,
            inter,
            experts,
            top_k,
        }
    }

    /// Buffer lengths in the order of [`NAMES`], exactly as needed.
    fn exact(s: &MoeScalars, kind: PackedKind) -> [usize; 14] {
        let [t, h, i, e, k] = [s.tokens, s.hidden, s.inter, s.experts, s.top_k].map(|v| v as usize);
        let (b13, p13) = (kind.row_code_bytes(h), kind.device_row_params(h));
        let (b2, p2) = (kind.row_code_bytes(i), kind.device_row_params(i));
        [
            t * h,
            e * i * b13,
            e * i * p13,
            e * i * b13,
            e * i * p13,
            e * h,
            e * h * b2,
            e * h * p2,
            e * i,
            t * k,
            e + 1,
            t * k,
            t * k * i,
            t * k * h,
        ]
    }

    fn args(kind: PackedKind, l: [usize; 14], perm: bool) -> QMoeArgs<'static> {
        QMoeArgs {
            table: table_for(kind),
            x: view(l[0]),
            w1_codes: view(l[1]),
            w1_params: view(l[2]),
            w3_codes: view(l[3]),
            w3_params: view(l[4]),
            w13_perm: perm.then(|| view(l[5])),
            w2_codes: view(l[6]),
            w2_params: view(l[7]),
            w2_perm: perm.then(|| view(l[8])),
            topk_weights: view(l[9]),
            expert_offsets: view(l[10]),
            sorted_slots: view(l[11]),
            act: view_mut(l[12]),
            out: view_mut(l[13]),
        }
    }

    fn plan_exact(s: &MoeScalars, kind: PackedKind) -> Planned<QMoeParams, 2> {
        plan(
            PackedKernel::Gemv,
            s,
            [kind; 3],
            &args(kind, exact(s, kind), true),
        )
    }

    #[test]
    fn grids_symbols_and_row_layouts_for_mixtral_shapes() {
        for kind in KINDS {
            for (tokens, tile) in [(1, 1), (2, 2), (3, 4), (8, 8), (40, 8)] {
                let s = scalars(tokens, 4096, 14336, 8, 2);
                let (p, [up, down]) = plan_exact(&s, kind).unwrap().unwrap();
                let k = kind_label(kind);
                assert_eq!(up.symbol(), format!("qmoe_up_{k}_t{tile}"));
                assert_eq!(down.symbol(), format!("qmoe_down_{k}_t{tile}"));
                // Grid rows: the experts a batch can reach, min(8, tokens * 2).
                let active = (tokens * 2).min(8);
                assert_eq!(up.grid, (14336 / 8, active, 1));
                assert_eq!(down.grid, (4096 / 16, active, 1));
                assert_eq!((up.block, down.block), (256, 256));
                assert_eq!(
                    [
                        p.w13_row_bytes,
                        p.w13_row_params,
                        p.w2_row_bytes,
                        p.w2_row_params
                    ]
                    .map(|v| v as usize),
                    [
                        kind.row_code_bytes(4096),
                        kind.device_row_params(4096),
                        kind.row_code_bytes(14336),
                        kind.device_row_params(14336)
                    ]
                );
            }
        }
        let s = scalars(1, 4096, 14336, 8, 2);
        let (p, _) = plan(
            PackedKernel::Gemv,
            &s,
            [PackedKind::Fp8; 3],
            &args(PackedKind::Fp8, exact(&s, PackedKind::Fp8), false),
        )
        .unwrap()
        .unwrap();
        assert_eq!((p.w13_perm, p.w2_perm, p.table), (0, 0, 0));
        let nf4 = KINDS[4];
        let (p, _) = plan_exact(&s, nf4).unwrap().unwrap();
        assert_ne!(p.table, 0, "table codes pass their table");
        assert_eq!(p.group_size, 64);
    }

    #[test]
    fn the_tensor_core_kernels_cover_each_experts_rows_and_slots() {
        let int4 = PackedKind::Int4 { group_size: 128 };
        for kind in [PackedKind::Fp8, PackedKind::Int8, int4] {
            for (tokens, columns) in [(1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (128, 32)] {
                let s = scalars(tokens, 4096, 14336, 8, 2);
                let a = args(kind, exact(&s, kind), false);
                let (p, [up, down]) = plan(PackedKernel::Mma, &s, [kind; 3], &a).unwrap().unwrap();
                let k = kind_label(kind);
                assert_eq!(up.symbol(), format!("qmoe_mma_up_{k}_n{columns}"));
                assert_eq!(down.symbol(), format!("qmoe_mma_down_{k}_n{columns}"));
                let active = (tokens * 2).min(8);
                assert_eq!(
                    up.grid,
                    (14336 / 16, active, 1),
                    "16 rows of w1 and w3 a block"
                );
                assert_eq!(down.grid, (4096 / 16, active, 1));
                assert_eq!((up.block, down.block), (QMMA_WARPS * 32, QMMA_WARPS * 32));
                assert_eq!(
                    (p.w13_row_bytes as usize, p.w2_row_params as usize),
                    (kind.row_code_bytes(4096), kind.device_row_params(14336))
                );
            }
        }
    }

    #[test]
    fn the_tensor_core_kernels_refuse_what_they_cannot_read() {
        let int4 = PackedKind::Int4 { group_size: 128 };
        let s = scalars(2, 256, 384, 4, 2);
        for kind in [PackedKind::Int8, int4] {
            let a = args(kind, exact(&s, kind), true);
            unsupported(plan(PackedKernel::Mma, &s, [kind; 3], &a), "perm");
        }
        let bad_inter = scalars(2, 256, 40, 4, 2);
        let a = args(int4, exact(&bad_inter, int4), false);
        unsupported(plan(PackedKernel::Mma, &bad_inter, [int4; 3], &a), "inter");
        for (kind, what) in [
            (PackedKind::Int4 { group_size: 64 }, "group_size"),
            (KINDS[4], "kind"),
        ] {
            let a = args(kind, exact(&s, kind), false);
            unsupported(plan(PackedKernel::Mma, &s, [kind; 3], &a), what);
        }
        let a = args(int4, exact(&s, int4), false);
        let other = PackedKind::Int4 { group_size: 256 };
        unsupported(
            plan(PackedKernel::Mma, &s, [int4, other, int4], &a),
            "w3 kind",
        );
    }

    #[test]
    fn w1_and_w3_must_share_their_permutation() {
        let p: View<'_, u32> = view(64);
        assert_eq!(
            shared_perm(Some(p), Some(p)).unwrap().unwrap().address(),
            BASE
        );
        assert!(shared_perm(None, None).unwrap().is_none());
        // SAFETY: the address is only compared, never dereferenced.
        let other: View<'_, u32> = unsafe { View::from_raw(BASE + 0x1000, 64) };
        for (p1, p3) in [(Some(p), Some(other)), (Some(p), None), (None, Some(p))] {
            unsupported(shared_perm(p1, p3), "w3_perm");
        }
        unsupported(shared_perm(Some(p), Some(view(63))), "w3_perm");
    }

    #[test]
    fn stacks_must_have_one_format() {
        let s = scalars(2, 96, 64, 4, 1);
        let kind = PackedKind::Int4 { group_size: 32 };
        let a = args(kind, exact(&s, kind), false);
        for other in [
            PackedKind::Int8,
            PackedKind::Int4 { group_size: 64 },
            KINDS[5],
        ] {
            unsupported(
                plan(PackedKernel::Gemv, &s, [kind, other, kind], &a),
                "w3 kind",
            );
            unsupported(
                plan(PackedKernel::Gemv, &s, [kind, kind, other], &a),
                "w2 kind",
            );
        }
        // NF4 and FP4 are different formats: one table cannot serve both.
        let (nf4, fp4) = (
            PackedKind::Lut4 {
                table: Lut4::Nf4,
                group_size: 32,
            },
            PackedKind::Lut4 {
                table: Lut4::Fp4,
                group_size: 32,
            },
        );
        let a = args(nf4, exact(&s, nf4), false);
        unsupported(plan(PackedKernel::Gemv, &s, [nf4, fp4, nf4], &a), "w3 kind");
        unsupported(plan(PackedKernel::Gemv, &s, [nf4, nf4, fp4], &a), "w2 kind");
    }

    #[test]
    fn a_table_exactly_for_table_codes() {
        let s = scalars(2, 96, 64, 4, 1);
        let nf4 = KINDS[4];
        let mut a = args(nf4, exact(&s, nf4), false);
        a.table = None;
        unsupported(plan(PackedKernel::Gemv, &s, [nf4; 3], &a), "table");
        a.table = Some(view(15));
        too_small(plan(PackedKernel::Gemv, &s, [nf4; 3], &a), "table");
        let int4 = PackedKind::Int4 { group_size: 32 };
        let mut a = args(int4, exact(&s, int4), false);
        a.table = Some(view(16));
        unsupported(plan(PackedKernel::Gemv, &s, [int4; 3], &a), "table");
    }

    #[test]
    fn refuses_bad_shapes() {
        let kind = PackedKind::Int4 { group_size: 32 };
        let a = args(kind, exact(&scalars(2, 96, 64, 4, 2), kind), false);
        for (bad, what) in [
            (scalars(2, 48, 64, 4, 2), "hidden"),
            (scalars(2, 96, 40, 4, 2), "inter"),
            (scalars(2, 96, 64, 0, 1), "experts"),
            (scalars(70_000, 96, 64, 70_000, 1), "experts"),
            (scalars(2, 96, 64, 4, 0), "top_k"),
        ] {
            unsupported(plan(PackedKernel::Gemv, &bad, [kind; 3], &a), what);
        }
        // Zero tokens: checked, nothing launched.
        let empty = scalars(0, 96, 64, 4, 2);
        assert!(plan_exact(&empty, kind).unwrap().is_none());
        let mut lens = exact(&empty, kind);
        lens[6] -= 1;
        too_small(
            plan(
                PackedKernel::Gemv,
                &empty,
                [kind; 3],
                &args(kind, lens, true),
            ),
            "w2_codes",
        );
    }

    proptest! {
        #[test]
        fn every_buffer_one_element_short_is_refused_by_name(
            kind in any_kind(Lut4::Fp4),
            tokens in 1u32..20,
            hidden32 in 1u32..8,
            inter32 in 1u32..8,
            experts in 1u32..9,
            k in 1u32..3,
        ) {
            let s = scalars(tokens, hidden32 * 32, inter32 * 32, experts, k.min(experts));
            let full = exact(&s, kind);
            prop_assert!(plan(PackedKernel::Gemv, &s, [kind; 3], &args(kind, full, true)).is_ok());
            for (i, name) in NAMES.into_iter().enumerate() {
                let mut lens = full;
                lens[i] -= 1;
                match plan(PackedKernel::Gemv, &s, [kind; 3], &args(kind, lens, true)) {
                    Err(CudaError::Kernel(KernelError::BufferTooSmall { buffer, .. })) => prop_assert_eq!(buffer, name),
                    other => prop_assert!(false, "{}: {:?}", name, other),
                }
            }
        }
    }
}
