//! The one kernel-selection table: from the op, the token count of the chunk, the weight format and
//! what the device offers, which kernels run. Nothing else in the crate branches on those; the
//! planners and the execution plan ask [`select`], and `mixtral-run --explain` prints [`table`].
//!
//! The thresholds come from arithmetic on the kernels' tiles, not from measurements:
//! - dense projections: a GEMV streams the weights once per tile of up to 8 tokens; at 17 tokens a
//!   third weight pass costs more than the tensor-core GEMM's idle rows of a 128-token tile;
//! - bf16 experts: below 32 tokens (top-2 over 8 experts: under 8 slots per expert) the GEMV's
//!   weight passes are at full bandwidth; from 32 on, 64-slot tensor-core tiles serve more slots per
//!   weight read;
//! - packed experts: reading the packed weights once per 8 slots costs less than expanding them to
//!   bf16 and reading that copy until about 40 slots per expert: up to 128 tokens;
//! - 8-bit experts (FP8, INT8) on CUTLASS's 8-bit grouped GEMM (nothing to expand): from 32
//!   tokens, as bf16;
//! - CUTLASS's Hopper expert kernels (grouped GEMM) run only where asked for, on compute capability
//!   9.0, after their self-check against the mma.sync kernels passed on the device; the dense
//!   projections past the GEMV's range then run on CUTLASS's Hopper GEMM too (its own self-check
//!   passed as well);
//! - where asked for ([`Device::mma_decode`]), the tensor-core decode kernels take the GEMVs'
//!   ranges (bf16 experts up to [`MOE_MMA_DECODE_MAX_TOKENS`] tokens, past the bf16 GEMV) for bf16
//!   weights and the packed ones they read ([`Format::PackedMma`], and the 8-bit [`Format::Q8`]):
//!   each weight is read (and decoded) once per pass of up to 32 tokens, the multiply-adds on the
//!   tensor cores; and decode attention computes its scores on the tensor cores where a variant is
//!   compiled for the shape ([`attention_decode_on_tensor_cores`]).

use std::fmt::Write as _;

/// Most tokens a dense projection runs as a GEMV (the kernels' own limit).
pub const LINEAR_GEMV_MAX_TOKENS: usize = super::params::LINEAR_GEMV_MAX_TOKENS as usize;
/// Fewest tokens the bf16 expert MLPs run on tensor cores.
pub const MOE_GROUPED_MIN_TOKENS: usize = 32;
/// Most tokens the packed expert MLPs run as GEMVs over the packed weights.
pub const QUANT_MOE_GEMV_MAX_TOKENS: usize = 128;
/// Most tokens the expert MLPs run on the tensor-core decode kernels, where asked for
/// ([`Device::mma_decode`]): about 32 slots per expert at top-2 of 8, one pass of 32 columns.
pub const MOE_MMA_DECODE_MAX_TOKENS: usize = 128;

/// What is being computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A dense projection `x @ w^T` (q/k/v, o, LM head).
    Projection,
    /// The routed expert MLPs of one layer.
    Experts,
}

/// How the weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// bf16.
    Bf16,
    /// Packed codes with their parameters (FP8, INT8 or 4-bit).
    Packed,
    /// Packed 8-bit codes (FP8 or INT8) with one scale per row, no column permutation, of the
    /// format the engine's CUTLASS 8-bit kernels serve (the tensor-core decode kernels read them
    /// too).
    Q8,
    /// Packed codes the tensor-core decode kernels read ([`mma_reads`](super::ops::mma_reads):
    /// FP8, INT8, or INT4 in groups of multiples of 128 columns; no column permutation).
    PackedMma,
}

impl Format {
    /// Every format, in the order `mixtral-run --explain` lists them.
    pub const ALL: [Format; 4] = [Format::Bf16, Format::Packed, Format::Q8, Format::PackedMma];
}

/// Which tensor-core kernels run the expert GEMMs of large chunks (decided once per engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupedKernel {
    /// `moe_grouped_gemm` (mma.sync; every supported GPU).
    #[default]
    Mma,
    /// `moe_cutlass_gemm` (CUTLASS's Hopper grouped GEMM), and `linear_cutlass` (its dense GEMM)
    /// for the projections of large chunks, once both self-checks passed on this device.
    Cutlass,
}

impl GroupedKernel {
    /// Every kind, in the order `mixtral-run --explain` lists them.
    pub const ALL: [GroupedKernel; 2] = [GroupedKernel::Mma, GroupedKernel::Cutlass];
}

/// What the device offers beyond sm_80, and which optional kernels the engine was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Device {
    /// The expert GEMMs of large chunks.
    pub grouped: GroupedKernel,
    /// Decode batches over bf16, [`Format::PackedMma`] and [`Format::Q8`] weights on the
    /// tensor-core decode kernels (`linear_mma_decode`, `moe_mma_*`, `qlinear_mma`, `qmoe_mma_*`)
    /// instead of the GEMVs.
    pub mma_decode: bool,
}

/// The kernels one op runs, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// `linear_gemv`: bf16 weights streamed once per tile of tokens.
    LinearGemv,
    /// `linear_mma`: the bf16 tensor-core GEMM.
    LinearMma,
    /// `linear_cutlass`: CUTLASS's Hopper GEMM (stream-K over the SMs).
    LinearCutlass,
    /// `linear_mma_decode`: a bf16 decode batch on the tensor cores, each weight row read once.
    LinearMmaDecode,
    /// `qlinear`: a GEMV over the packed weights, dequantized in registers.
    QLinear,
    /// `qlinear_mma`: packed weights decoded in registers, multiplied on the tensor cores.
    QLinearMma,
    /// `dequantize` into bf16 scratch, then `linear_mma`.
    DequantizeThenLinearMma,
    /// `dequantize` into bf16 scratch, then `linear_cutlass`.
    DequantizeThenLinearCutlass,
    /// `moe_up` + `moe_down`: GEMVs over the bf16 experts that have slots.
    MoeGemv,
    /// `moe_mma_up` + `moe_mma_down`: the bf16 experts that have slots on the tensor cores, each
    /// weight row read once per pass of up to 32 slots.
    MoeMma,
    /// `moe_grouped_up` + `moe_grouped_down`: the mma.sync grouped GEMM.
    MoeGrouped,
    /// `moe_cutlass`: gather, CUTLASS's grouped GEMM (w1 and w3), SwiGLU, grouped GEMM (w2),
    /// scatter.
    MoeCutlass,
    /// `qmoe_up` + `qmoe_down`: GEMVs over the packed experts.
    QMoeGemv,
    /// `qmoe_mma_up` + `qmoe_mma_down`: packed experts decoded in registers, multiplied on the
    /// tensor cores.
    QMoeMma,
    /// `dequantize` of the three expert stacks into bf16 scratch, then the grouped GEMM.
    DequantizeThenMoeGrouped,
    /// `dequantize` of the three expert stacks, then CUTLASS's grouped GEMM.
    DequantizeThenMoeCutlass,
    /// `moe_cutlass_q8`: gather and quantize, CUTLASS's 8-bit grouped GEMM (w1 and w3), SwiGLU and
    /// quantize, 8-bit grouped GEMM (w2), scatter.
    MoeCutlassQ8,
}

impl Choice {
    /// The kernels, as `mixtral-run --explain` names them.
    pub fn kernels(self) -> &'static str {
        match self {
            Choice::LinearGemv => "linear_gemv",
            Choice::LinearMma => "linear_mma",
            Choice::LinearCutlass => "linear_cutlass",
            Choice::LinearMmaDecode => "linear_mma_decode",
            Choice::QLinear => "qlinear",
            Choice::QLinearMma => "qlinear_mma",
            Choice::DequantizeThenLinearMma => "dequantize + linear_mma",
            Choice::DequantizeThenLinearCutlass => "dequantize + linear_cutlass",
            Choice::MoeGemv => "moe_up + moe_down",
            Choice::MoeMma => "moe_mma_up + moe_mma_down",
            Choice::MoeGrouped => "moe_grouped_up + moe_grouped_down",
            Choice::MoeCutlass => "moe_cutlass (gather, grouped GEMM x2, swiglu, scatter)",
            Choice::QMoeGemv => "qmoe_up + qmoe_down",
            Choice::QMoeMma => "qmoe_mma_up + qmoe_mma_down",
            Choice::DequantizeThenMoeGrouped => "dequantize x3 + moe_grouped_up + moe_grouped_down",
            Choice::DequantizeThenMoeCutlass => "dequantize x3 + moe_cutlass",
            Choice::MoeCutlassQ8 => {
                "moe_cutlass_q8 (quantize, 8-bit grouped GEMM x2, swiglu, scatter)"
            }
        }
    }
}

/// The kernels that run `op` over `tokens` tokens of weights in `format` on `device`.
pub fn select(op: Op, tokens: usize, format: Format, device: Device) -> Choice {
    use Format::{Bf16, Packed, PackedMma, Q8};
    match (op, format) {
        (Op::Projection, Bf16) if device.mma_decode && tokens <= LINEAR_GEMV_MAX_TOKENS => {
            Choice::LinearMmaDecode
        }
        (Op::Projection, Bf16) if tokens <= LINEAR_GEMV_MAX_TOKENS => Choice::LinearGemv,
        (Op::Projection, Bf16) if device.grouped == GroupedKernel::Cutlass => Choice::LinearCutlass,
        (Op::Projection, Bf16) => Choice::LinearMma,
        (Op::Projection, PackedMma | Q8)
            if device.mma_decode && tokens <= LINEAR_GEMV_MAX_TOKENS =>
        {
            Choice::QLinearMma
        }
        (Op::Projection, Packed | Q8 | PackedMma) if tokens <= LINEAR_GEMV_MAX_TOKENS => {
            Choice::QLinear
        }
        (Op::Projection, Packed | Q8 | PackedMma) if device.grouped == GroupedKernel::Cutlass => {
            Choice::DequantizeThenLinearCutlass
        }
        (Op::Projection, Packed | Q8 | PackedMma) => Choice::DequantizeThenLinearMma,
        (Op::Experts, Bf16) if device.mma_decode && tokens <= MOE_MMA_DECODE_MAX_TOKENS => {
            Choice::MoeMma
        }
        (Op::Experts, Bf16) if tokens < MOE_GROUPED_MIN_TOKENS => Choice::MoeGemv,
        (Op::Experts, Bf16) => match device.grouped {
            GroupedKernel::Mma => Choice::MoeGrouped,
            GroupedKernel::Cutlass => Choice::MoeCutlass,
        },
        // Only CUTLASS's 8-bit kernels read 8-bit codes as such; elsewhere they are any packed
        // format.
        (Op::Experts, Q8)
            if device.grouped == GroupedKernel::Cutlass && tokens >= MOE_GROUPED_MIN_TOKENS =>
        {
            Choice::MoeCutlassQ8
        }
        (Op::Experts, PackedMma | Q8)
            if device.mma_decode && tokens <= QUANT_MOE_GEMV_MAX_TOKENS =>
        {
            Choice::QMoeMma
        }
        (Op::Experts, Packed | Q8 | PackedMma) if tokens <= QUANT_MOE_GEMV_MAX_TOKENS => {
            Choice::QMoeGemv
        }
        (Op::Experts, Packed | Q8 | PackedMma) => match device.grouped {
            GroupedKernel::Mma => Choice::DequantizeThenMoeGrouped,
            GroupedKernel::Cutlass => Choice::DequantizeThenMoeCutlass,
        },
    }
}

/// Whether decode attention computes its scores on the tensor cores (`attention_decode_mma`, else
/// `attention_decode`): where asked for ([`Device::mma_decode`]) and compiled for the shape, a head
/// dimension of 64 or 128 and a GQA group of 4, 6 or 8 query heads per KV head.
pub fn attention_decode_on_tensor_cores(device: Device, head_dim: usize, group: usize) -> bool {
    device.mma_decode && matches!(head_dim, 64 | 128) && matches!(group, 4 | 6 | 8)
}

/// The token ranges over which `select(op, .., format, device)` stays the same, with its choice:
/// `("1-16", ..)`, ..., the last open (`"17+"`). Every threshold is far below
/// `4 * QUANT_MOE_GEMV_MAX_TOKENS`; past it the choice no longer changes.
fn ranges(op: Op, format: Format, device: Device) -> Vec<(String, Choice)> {
    let limit = 4 * QUANT_MOE_GEMV_MAX_TOKENS;
    let mut out = Vec::new();
    let mut start = 1;
    for tokens in 2..=limit + 1 {
        let current = select(op, start, format, device);
        if tokens == limit + 1 {
            out.push((format!("{start}+"), current));
        } else if select(op, tokens, format, device) != current {
            out.push((format!("{start}-{}", tokens - 1), current));
            start = tokens;
        }
    }
    out
}

/// The whole table as text: one line per op, format and device where the choice changes, with the
/// token ranges; `decode` says whether the engine was asked for the tensor-core decode kernels
/// (`mma`) or not (`gemv`), listed only where it changes something.
pub fn table() -> String {
    let mut out = String::from("op          format     grouped  decode  tokens       kernels\n");
    for op in [Op::Projection, Op::Experts] {
        for format in Format::ALL {
            for grouped in GroupedKernel::ALL {
                let device = |mma_decode| Device {
                    grouped,
                    mma_decode,
                };
                let gemv = ranges(op, format, device(false));
                let mma = ranges(op, format, device(true));
                let rows = [("gemv", &gemv), ("mma", &mma)];
                for (decode, ranges) in rows.into_iter().take(if mma == gemv { 1 } else { 2 }) {
                    for (range, choice) in ranges {
                        let _ = writeln!(
                            out,
                            "{:<11} {:<10} {:<8} {decode:<7} {range:<12} {}",
                            format!("{op:?}").to_lowercase(),
                            format!("{format:?}").to_lowercase(),
                            format!("{grouped:?}").to_lowercase(),
                            choice.kernels()
                        );
                    }
                }
            }
        }
    }
    out.push_str(
        "attention   decode: scores on the tensor cores (attention_decode_mma) with decode mma, \
         head_dim 64 or 128 and 4, 6 or 8 query heads per KV head; else attention_decode\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO: Device = Device {
        grouped: GroupedKernel::Mma,
        mma_decode: false,
    };
    const CUTLASS: Device = Device {
        grouped: GroupedKernel::Cutlass,
        mma_decode: false,
    };

    #[test]
    fn thresholds_sit_where_the_table_says() {
        use Choice::*;
        use Format::{Bf16, Packed};
        let p = |t, f| select(Op::Projection, t, f, NO);
        assert_eq!(p(16, Bf16), LinearGemv);
        assert_eq!(p(17, Bf16), LinearMma);
        assert_eq!(p(16, Packed), QLinear);
        assert_eq!(p(17, Packed), DequantizeThenLinearMma);
        // With CUTLASS's kernels, the projections past the GEMV's range run on its dense GEMM.
        let on = |t, f, d| select(Op::Projection, t, f, d);
        assert_eq!(on(16, Bf16, CUTLASS), LinearGemv);
        assert_eq!(on(17, Bf16, CUTLASS), LinearCutlass);
        assert_eq!(on(4096, Bf16, CUTLASS), LinearCutlass);
        assert_eq!(on(16, Packed, CUTLASS), QLinear);
        assert_eq!(on(17, Packed, CUTLASS), DequantizeThenLinearCutlass);
        let e = |t, f, d| select(Op::Experts, t, f, d);
        for (tokens, format, device, choice) in [
            (31, Bf16, NO, MoeGemv),
            (32, Bf16, NO, MoeGrouped),
            (128, Packed, NO, QMoeGemv),
            (129, Packed, NO, DequantizeThenMoeGrouped),
            (31, Bf16, CUTLASS, MoeGemv),
            (32, Bf16, CUTLASS, MoeCutlass),
            (128, Packed, CUTLASS, QMoeGemv),
            (129, Packed, CUTLASS, DequantizeThenMoeCutlass),
        ] {
            assert_eq!(
                e(tokens, format, device),
                choice,
                "{tokens} {format:?} {device:?}"
            );
        }
        assert_eq!(e(31, Format::Q8, CUTLASS), QMoeGemv);
        assert_eq!(e(32, Format::Q8, CUTLASS), Choice::MoeCutlassQ8);
        // 8-bit codes are any packed format where CUTLASS's 8-bit kernels do not run.
        for tokens in [1, 31, 32, 128, 129, 4096] {
            assert_eq!(e(tokens, Format::Q8, NO), e(tokens, Format::Packed, NO));
        }
        for tokens in [1, 16, 17, 4096] {
            assert_eq!(
                select(Op::Projection, tokens, Format::Q8, CUTLASS),
                select(Op::Projection, tokens, Format::Packed, CUTLASS)
            );
        }
    }

    #[test]
    fn tensor_core_decode_kernels_run_only_where_asked_for_over_the_gemv_ranges() {
        use Choice::{LinearMmaDecode, MoeMma};
        for grouped in GroupedKernel::ALL {
            let on = Device {
                grouped,
                mma_decode: true,
            };
            let off = Device {
                grouped,
                mma_decode: false,
            };
            for format in [Format::PackedMma, Format::Q8] {
                let p = |t, d| select(Op::Projection, t, format, d);
                assert_eq!(p(1, on), Choice::QLinearMma);
                assert_eq!(p(16, on), Choice::QLinearMma);
                // Past the decode range the request changes nothing.
                assert_eq!(p(17, on), p(17, off));
                let e = |t, d| select(Op::Experts, t, format, d);
                assert_eq!(e(1, on), Choice::QMoeMma);
                assert_eq!(e(31, on), Choice::QMoeMma);
                assert_eq!(e(129, on), e(129, off));
                // CUTLASS's 8-bit kernels keep the chunks they take.
                let cutlass_q8 = format == Format::Q8 && grouped == GroupedKernel::Cutlass;
                let at_128 = if cutlass_q8 {
                    Choice::MoeCutlassQ8
                } else {
                    Choice::QMoeMma
                };
                assert_eq!(e(128, on), at_128);
            }
            // bf16: the GEMV ranges, and the experts up to MOE_MMA_DECODE_MAX_TOKENS.
            assert_eq!(
                select(Op::Projection, 16, Format::Bf16, on),
                LinearMmaDecode
            );
            assert_eq!(select(Op::Experts, 128, Format::Bf16, on), MoeMma);
            for (op, past) in [
                (Op::Projection, 17),
                (Op::Experts, 129),
                (Op::Experts, 4096),
            ] {
                let bf16 = |d| select(op, past, Format::Bf16, d);
                assert_eq!(bf16(on), bf16(off));
            }
            // Without the request, and for packed formats the kernels do not read, the flag
            // changes nothing.
            for tokens in [1, 16, 17, 31, 32, 128, 129, 4096] {
                for op in [Op::Projection, Op::Experts] {
                    let packed = |d| select(op, tokens, Format::Packed, d);
                    assert_eq!(select(op, tokens, Format::PackedMma, off), packed(off));
                    assert_eq!(packed(on), packed(off));
                }
            }
        }
    }

    #[test]
    fn the_printed_table_lists_each_range_once() {
        let text = table();
        for line in [
            "projection  bf16       mma      gemv    1-16         linear_gemv",
            "projection  bf16       mma      gemv    17+          linear_mma",
            "projection  bf16       cutlass  gemv    17+          linear_cutlass",
            "projection  packed     cutlass  gemv    17+          dequantize + linear_cutlass",
            "projection  bf16       mma      mma     1-16         linear_mma_decode",
            "experts     packed     mma      gemv    129+         dequantize x3 + moe_grouped_up",
            "experts     bf16       cutlass  gemv    32+          moe_cutlass",
            "experts     bf16       mma      mma     1-128        moe_mma_up",
            "experts     bf16       mma      mma     129+         moe_grouped_up",
            "experts     q8         cutlass  gemv    32+          moe_cutlass_q8",
            "experts     q8         cutlass  mma     1-31         qmoe_mma_up",
            "projection  packedmma  mma      mma     1-16         qlinear_mma",
            "experts     packedmma  cutlass  mma     1-128        qmoe_mma_up",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        // The plain packed rows do not change with the request, so they are listed once.
        assert!(!text.contains("packed     mma      mma"));
        // 2 ops x 4 formats x 2 grouped kernels, two ranges each, plus the rows with the request
        // for bf16, q8 and packedmma (2 ops x 2 grouped kernels, two ranges each), plus the header
        // and the attention line.
        assert_eq!(text.lines().count(), 1 + 32 + 24 + 1);
        assert!(text.ends_with("else attention_decode\n"));
    }

    #[test]
    fn decode_attention_takes_the_tensor_cores_only_where_asked_for_and_compiled() {
        let device = |mma_decode| Device {
            grouped: GroupedKernel::Mma,
            mma_decode,
        };
        // Mixtral-8x7B: head_dim 128, 32 query heads over 8 KV heads.
        assert!(attention_decode_on_tensor_cores(device(true), 128, 4));
        assert!(!attention_decode_on_tensor_cores(device(false), 128, 4));
        for (head_dim, group) in [(64, 6), (64, 8), (128, 8)] {
            assert!(attention_decode_on_tensor_cores(
                device(true),
                head_dim,
                group
            ));
        }
        for (head_dim, group) in [(128, 1), (128, 2), (32, 4), (16, 8), (128, 3)] {
            assert!(!attention_decode_on_tensor_cores(
                device(true),
                head_dim,
                group
            ));
        }
    }
}
