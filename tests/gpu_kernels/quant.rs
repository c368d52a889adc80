//! The kernels over packed quantized weights (`mixtral::cuda::ops::{qlinear, qmoe, dequantize}`) against the CPU reference on the dequantized matrices
//! (`PackedMatrix::dequantize`, the values the CPU engine runs on): every format (FP8, INT8, 4-bit
//! in groups of 32, 64 and 128 columns, the last group of a row shorter when 128 does not divide the
//! columns, and 4-bit table codes: NF4 in bitsandbytes' blocks of 64 and in groups of 128, FP4 in
//! groups of 32), with and without a random permutation of the input columns; `qlinear` for 1..=16
//! tokens and both output types, `qmoe` with the router's grouping built on the CPU (idle
//! experts included), `dequantize` bit-exact against the host values rounded to bf16; the 4-bit
//! tensor-core decode kernels (`PackedKernel::Mma`) on the formats they read.

use half::bf16;
use mixtral::cpu::matmul::matmul;
use mixtral::cpu::moe::Expert;
use mixtral::cpu::router::{group_by_expert, route};
use mixtral::cuda::args::{LinearScalars, MoeScalars, QMoeArgs};
use mixtral::cuda::engine::matrix::table_values;
use mixtral::cuda::memory::DeviceArena;
use mixtral::cuda::ops::{
    dequantize, dequantize_emulated, moe_cutlass_q8_gemm, qlinear, qlinear_emulated, qmoe,
    qmoe_emulated, shared_perm, DequantShape, MoeCutlassQ8Scratch, PackedKernel, PackedView,
    CUTLASS_BUILT, CUTLASS_COMPUTE_CAPABILITY,
};
use mixtral::dtype::WeightSlice;
use mixtral::packed::lut4::{self, Lut4};
use mixtral::quant::{fp8, int4, int8, PackedKind, PackedMatrix, Q8};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::common::{self, launch, Guarded, Poison, Stream, Target};
use crate::shared::moe::{expert_slots_with, Activations};

/// The bound of a qlinear output over `cols` columns against the CPU on the dequantized matrix:
/// the decoding is exact and the scale multiplies partial sums instead of each element (8-bit,
/// INT4), or each weight is the dequantized value itself (LUT4: `table[q] * scale` rounded once in
/// f32, as `PackedMatrix::dequantize`, then fused into the FMA with x where the CPU rounds the
/// product: at most one more rounding per term), so only f32 roundings over the `cols` terms
/// differ ([`common::f32_bound`]), plus one bf16 rounding at the store for a bf16 output
/// ([`common::bf16_bound`]).
fn qlinear_bound(cols: usize, out_f32: bool) -> f64 {
    if out_f32 {
        common::f32_bound(cols)
    } else {
        common::bf16_bound(cols, 1)
    }
}

/// Every format the kernels read.
const KINDS: [PackedKind; 8] = [
    PackedKind::Fp8,
    PackedKind::Int8,
    PackedKind::Int4 { group_size: 32 },
    PackedKind::Int4 { group_size: 64 },
    PackedKind::Int4 { group_size: 128 },
    PackedKind::Lut4 {
        table: Lut4::Nf4,
        group_size: 64,
    },
    PackedKind::Lut4 {
        table: Lut4::Nf4,
        group_size: 128,
    },
    PackedKind::Lut4 {
        table: Lut4::Fp4,
        group_size: 32,
    },
];

/// A column count every format accepts: a multiple of 32.
fn columns() -> impl Strategy<Value = usize> {
    prop_oneof![
        (1usize..=12).prop_map(|c| c * 32),
        prop::sample::select(vec![1056usize, 2080, 4096]),
    ]
}

/// A deterministic random permutation of `0..n` (Fisher-Yates on splitmix64).
fn permutation(seed: u64, n: usize) -> Vec<u32> {
    let mut state = seed ^ 0x0123_4567_89ab_cdef;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        p.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    p
}

/// `w` (`[rows, cols]`) quantized to `kind` the way the loaders do, with `perm` as its act-order
/// permutation.
fn pack(
    kind: PackedKind,
    w: &[f32],
    rows: usize,
    cols: usize,
    perm: Option<Vec<u32>>,
) -> PackedMatrix {
    let mut m = match kind {
        PackedKind::Fp8 => {
            let (codes, scales) = fp8::quantize_per_channel(w, rows, cols);
            PackedMatrix::fp8(codes, &scales, rows, cols).expect("fp8 packing")
        }
        PackedKind::Int8 => {
            let (codes, scales) = int8::quantize_per_channel(w, rows, cols);
            PackedMatrix::int8(&codes, &scales, rows, cols).expect("int8 packing")
        }
        PackedKind::Int4 { group_size } => {
            PackedMatrix::from_rtn(&int4::quantize_rtn(w, rows, cols, group_size))
                .expect("4-bit packing")
        }
        PackedKind::Lut4 { table, group_size } => {
            lut4::quantize(table, w, (rows, cols), group_size).expect("4-bit table packing")
        }
    };
    m.perm = perm;
    m.gpu_layout_ok().expect("a layout the kernels read");
    m
}

/// A random `[rows, cols]` matrix packed as `kind`, permuted when `permuted`.
fn random_matrix(
    kind: PackedKind,
    seed: u64,
    rows: usize,
    cols: usize,
    permuted: bool,
) -> PackedMatrix {
    let w = common::random_values(seed, rows * cols, 2.0 / (cols as f32).sqrt());
    pack(
        kind,
        &w,
        rows,
        cols,
        permuted.then(|| permutation(seed ^ 0x9e37, cols)),
    )
}

/// A stack of packed matrices on the device (the matrices one after the other), with the table of
/// its kind (LUT4) as the engine uploads it.
struct DeviceStack {
    kind: PackedKind,
    codes: Guarded<u8>,
    params: Guarded<f32>,
    perm: Option<Guarded<u32>>,
    table: Option<Guarded<f32>>,
}

impl DeviceStack {
    fn upload(stream: Stream<'_>, matrices: &[&PackedMatrix]) -> Self {
        let codes: Vec<u8> = matrices
            .iter()
            .flat_map(|m| m.codes.iter().copied())
            .collect();
        let params: Vec<f32> = matrices
            .iter()
            .flat_map(|m| m.device_params().expect("an f16 scale per 4-bit group"))
            .collect();
        let perm: Option<Vec<u32>> = matrices
            .iter()
            .map(|m| m.perm.clone())
            .collect::<Option<Vec<_>>>()
            .map(|p| p.concat());
        DeviceStack {
            kind: matrices[0].kind,
            codes: Guarded::with(stream, &codes),
            params: Guarded::with(stream, &params),
            perm: perm.map(|p| Guarded::with(stream, &p)),
            table: table_values(matrices[0].kind).map(|t| Guarded::with(stream, &t)),
        }
    }

    fn weights(&self) -> PackedView<'_> {
        PackedView {
            kind: self.kind,
            codes: self.codes.dev(),
            params: self.params.dev(),
            perm: self.perm.as_ref().map(Guarded::dev),
            table: self.table.as_ref().map(Guarded::dev),
        }
    }

    /// The same stack with another stack's permutation buffer (w3 sharing w1's).
    fn weights_with_perm<'a>(&'a self, perm: Option<&'a Guarded<u32>>) -> PackedView<'a> {
        PackedView {
            perm: perm.map(Guarded::dev),
            ..self.weights()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// qlinear

/// Runs qlinear on `kernel`, `m` and bf16 `x` into a poisoned, guarded output; returns it as f32.
fn run_qlinear_with(
    kernel: PackedKernel,
    gpu: &Target,
    m: &PackedMatrix,
    x: &[bf16],
    tokens: usize,
    out_f32: bool,
) -> Vec<f32> {
    let stream = gpu.stream();
    let shape = LinearScalars {
        tokens: tokens as u32,
        in_features: m.cols as u32,
        out_features: m.rows as u32,
    };
    let d_x = Guarded::with(stream, x);
    let w = DeviceStack::upload(stream, &[m]);
    let len = tokens * m.rows;
    if out_f32 {
        let mut out = Guarded::<f32>::poisoned(stream, len);
        launch!(
            gpu.on(),
            qlinear | qlinear_emulated,
            &shape,
            (d_x.dev(), w.weights()),
            out.dev_mut().into(),
            kernel,
        )
        .expect("qlinear (f32 out)");
        out.read_written(stream, "out")
    } else {
        let mut out = Guarded::<bf16>::poisoned(stream, len);
        launch!(
            gpu.on(),
            qlinear | qlinear_emulated,
            &shape,
            (d_x.dev(), w.weights()),
            out.dev_mut().into(),
            kernel,
        )
        .expect("qlinear (bf16 out)");
        common::to_f32(&out.read_written(stream, "out"))
    }
}

#[test]
fn qlinear_matches_the_cpu_reference_on_the_dequantized_matrix() {
    let gpu = common::target("qlinear_matches_the_cpu_reference_on_the_dequantized_matrix");
    let strategy = (
        0..KINDS.len(),
        1usize..=16,
        columns(),
        1usize..=300,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(40));
    runner
        .run(
            &strategy,
            |(k, tokens, cols, rows, permuted, out_f32, seed)| {
                let kind = KINDS[k];
                let m = random_matrix(kind, seed, rows, cols, permuted);
                let x = common::to_bf16(&common::random_values(seed ^ 0x51, tokens * cols, 1.0));
                let mut reference = vec![0.0f32; tokens * rows];
                matmul(
                    &common::to_f32(&x),
                    WeightSlice::F32(&m.dequantize()),
                    rows,
                    cols,
                    &mut reference,
                );
                let out = run_qlinear_with(PackedKernel::Gemv, &gpu, &m, &x, tokens, out_f32);
                let err = common::rel_l2(&out, &reference);
                let bound = qlinear_bound(cols, out_f32);
                if err > bound {
                    return Err(TestCaseError::fail(format!(
                        "{kind:?}, tokens {tokens}, [{rows}, {cols}], perm {permuted}, f32 out \
                         {out_f32}: relative L2 error {err:e} > {bound:e}"
                    )));
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn qlinear_every_format_at_a_mixtral_projection_shape() {
    let gpu = common::target("qlinear_every_format_at_a_mixtral_projection_shape");
    for (i, kind) in KINDS.into_iter().enumerate() {
        for (tokens, permuted) in [(1, false), (8, true), (13, false)] {
            let seed = 100 + i as u64;
            let m = random_matrix(kind, seed, 264, 4096, permuted);
            let x = common::to_bf16(&common::random_values(seed, tokens * 4096, 1.0));
            let mut reference = vec![0.0f32; tokens * 264];
            matmul(
                &common::to_f32(&x),
                WeightSlice::F32(&m.dequantize()),
                264,
                4096,
                &mut reference,
            );
            let out = run_qlinear_with(PackedKernel::Gemv, &gpu, &m, &x, tokens, true);
            common::assert_close(
                &format!("{kind:?}, tokens {tokens}, perm {permuted}"),
                &out,
                &reference,
                qlinear_bound(4096, true),
            );
        }
    }
}

/// The formats the tensor-core decode kernels read: FP8, INT8, and INT4 in groups of 128 and 256
/// columns.
const MMA_KINDS: [PackedKind; 4] = [
    PackedKind::Fp8,
    PackedKind::Int8,
    PackedKind::Int4 { group_size: 128 },
    PackedKind::Int4 { group_size: 256 },
];

#[test]
fn qlinear_mma_matches_the_cpu_reference_on_the_dequantized_matrix() {
    let name = "qlinear_mma_matches_the_cpu_reference_on_the_dequantized_matrix";
    let gpu = common::target(name);
    let strategy = (
        0..MMA_KINDS.len(),
        1usize..=16,
        // Whole steps (multiples of 128 columns) and rows ending in a partial step.
        prop_oneof![
            (1usize..=12).prop_map(|c| c * 128),
            (1usize..=40).prop_map(|c| c * 32),
            Just(4096usize)
        ],
        1usize..=300,
        any::<bool>(),
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(40));
    runner
        .run(&strategy, |(k, tokens, cols, rows, out_f32, seed)| {
            let kind = MMA_KINDS[k];
            let m = random_matrix(kind, seed, rows, cols, false);
            let x = common::to_bf16(&common::random_values(seed ^ 0x51, tokens * cols, 1.0));
            let mut reference = vec![0.0f32; tokens * rows];
            let w = m.dequantize();
            matmul(
                &common::to_f32(&x),
                WeightSlice::F32(&w),
                rows,
                cols,
                &mut reference,
            );
            let out = run_qlinear_with(PackedKernel::Mma, &gpu, &m, &x, tokens, out_f32);
            let err = common::rel_l2(&out, &reference);
            // The bound of qlinear: the decoding is exact (every code's value, or q - zero, is a
            // bf16), the products are exact in the tensor cores, the scale multiplies partial sums.
            let bound = qlinear_bound(cols, out_f32);
            if err > bound {
                return Err(TestCaseError::fail(format!(
                    "{kind:?}, tokens {tokens}, [{rows}, {cols}], f32 out {out_f32}: relative L2 \
                     error {err:e} > {bound:e}"
                )));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn qlinear_mma_at_mixtral_projection_shapes() {
    let gpu = common::target("qlinear_mma_at_mixtral_projection_shapes");
    for (i, (tokens, rows)) in [(1, 6144), (8, 4096), (9, 264), (16, 520)]
        .into_iter()
        .enumerate()
    {
        let kind = MMA_KINDS[i % 2];
        let seed = 300 + i as u64;
        let m = random_matrix(kind, seed, rows, 4096, false);
        let x = common::to_bf16(&common::random_values(seed, tokens * 4096, 1.0));
        let mut reference = vec![0.0f32; tokens * rows];
        matmul(
            &common::to_f32(&x),
            WeightSlice::F32(&m.dequantize()),
            rows,
            4096,
            &mut reference,
        );
        let out = run_qlinear_with(PackedKernel::Mma, &gpu, &m, &x, tokens, true);
        common::assert_close(
            &format!("{kind:?}, tokens {tokens}, rows {rows}"),
            &out,
            &reference,
            qlinear_bound(4096, true),
        );
    }
}

#[test]
fn qlinear_zero_tokens_touch_nothing() {
    let gpu = common::target("qlinear_zero_tokens_touch_nothing");
    let m = random_matrix(PackedKind::Int4 { group_size: 32 }, 9, 10, 64, true);
    assert!(run_qlinear_with(PackedKernel::Gemv, &gpu, &m, &[], 0, true).is_empty());
}

// ---------------------------------------------------------------------------------------------
// dequantize

#[test]
fn dequantize_is_bit_exact_against_the_host_values() {
    let gpu = common::target("dequantize_is_bit_exact_against_the_host_values");
    let strategy = (
        0..KINDS.len(),
        1usize..=3,
        1usize..=40,
        columns(),
        any::<bool>(),
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(32));
    runner
        .run(&strategy, |(k, count, rows, cols, permuted, seed)| {
            let kind = KINDS[k];
            let matrices: Vec<PackedMatrix> = (0..count as u64)
                .map(|i| random_matrix(kind, seed.wrapping_add(i), rows, cols, permuted))
                .collect();
            let expected: Vec<bf16> = matrices
                .iter()
                .flat_map(|m| m.dequantize())
                .map(bf16::from_f32)
                .collect();
            let stream = gpu.stream();
            let refs: Vec<&PackedMatrix> = matrices.iter().collect();
            let w = DeviceStack::upload(stream, &refs);
            let mut out = Guarded::<bf16>::poisoned(stream, expected.len());
            launch!(
                gpu.on(),
                dequantize | dequantize_emulated,
                &DequantShape {
                    count: count as u32,
                    rows: rows as u32,
                    cols: cols as u32,
                },
                w.weights(),
                out.dev_mut(),
            )
            .expect("dequantize");
            let got = out.read_written(stream, "out");
            if let Some(i) = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(TestCaseError::fail(format!(
                    "{kind:?}, {count} x [{rows}, {cols}], perm {permuted}: element {i} is {} \
                     (bits {:#06x}), expected {} (bits {:#06x})",
                    got[i],
                    got[i].to_bits(),
                    expected[i],
                    expected[i].to_bits()
                )));
            }
            Ok(())
        })
        .unwrap();
}

/// Every finite E4M3 code, through both FP8 decodings of csrc/quant.cuh (by bits before sm_89, by
/// the pair conversion instruction after): `dequantize` must give the host values bit for bit.
/// On a GPU the device's own decoding runs; on the emulator, both.
#[test]
fn dequantize_fp8_decodes_every_code_on_both_architectures() {
    use mixtral::cuda::emulator::{Arch, Schedule};
    let gpu = common::target("dequantize_fp8_decodes_every_code_on_both_architectures");
    // Row 0 holds codes 0..128, row 1 codes 128..256 (the negative ones); the two NaN codes
    // (0x7f, 0xff) become their finite neighbours. Scales that keep every product exact in f32.
    let codes: Vec<u8> = (0..=255u8)
        .map(|c| if c & 0x7f == 0x7f { c - 1 } else { c })
        .collect();
    let m = PackedMatrix {
        kind: PackedKind::Fp8,
        rows: 2,
        cols: 128,
        codes,
        params: vec![1.0, 0.75],
        perm: None,
    };
    let expected: Vec<bf16> = m.dequantize().into_iter().map(bf16::from_f32).collect();
    let ons = match gpu.on() {
        common::On::Emulator(s) => vec![
            common::On::Emulator(Schedule {
                arch: Arch::Sm80,
                ..s
            }),
            common::On::Emulator(Schedule {
                arch: Arch::Sm90,
                ..s
            }),
        ],
        on => vec![on],
    };
    let stream = gpu.stream();
    let w = DeviceStack::upload(stream, &[&m]);
    for on in ons {
        let mut out = Guarded::<bf16>::poisoned(stream, expected.len());
        launch!(
            on,
            dequantize | dequantize_emulated,
            &DequantShape {
                count: 1,
                rows: 2,
                cols: 128,
            },
            w.weights(),
            out.dev_mut(),
        )
        .expect("dequantize");
        let got = out.read_written(stream, "out");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "code {:#04x} (row {}): {g} where the host has {e}",
                m.codes[i],
                i / 128
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// qmoe_gemv

/// One random quantized MoE problem.
#[derive(Debug, Clone)]
struct QMoeCase {
    kind: PackedKind,
    tokens: usize,
    hidden: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
    /// Experts the router is biased away from (bit e: expert e).
    cold: u32,
    permuted: bool,
    seed: u64,
    /// Run as a rank of an expert-parallel split holding only the expert with the most slots: its
    /// stacks alone, its range of the router's offsets; every other slot must stay untouched.
    held: bool,
}

fn qmoe_cases() -> impl Strategy<Value = QMoeCase> {
    let tokens = prop_oneof![Just(1usize), 1usize..8, 8usize..24];
    cases_of(&KINDS, tokens, (32, 8, 6), any::<bool>())
}

/// Cases of `kinds` (one picked per case): `tokens` tokens, hidden and inter `unit` times 1 to
/// `max_hidden` / `max_inter`, 1 to 8 experts, top-1 or top-2, some experts cold, `permuted`.
fn cases_of(
    kinds: &'static [PackedKind],
    tokens: impl Strategy<Value = usize>,
    (unit, max_hidden, max_inter): (usize, usize, usize),
    permuted: impl Strategy<Value = bool>,
) -> impl Strategy<Value = QMoeCase> {
    (
        0..kinds.len(),
        tokens,
        1..=max_hidden,
        1..=max_inter,
        1usize..=8,
        1usize..=2,
        any::<u32>(),
        permuted,
        any::<u64>(),
    )
        .prop_map(
            move |(k, tokens, hidden, inter, experts, top_k, cold, permuted, seed)| QMoeCase {
                kind: kinds[k],
                tokens,
                hidden: hidden * unit,
                inter: inter * unit,
                experts,
                top_k: top_k.min(experts),
                cold: cold & ((1u32 << experts) - 1) & !1,
                permuted,
                seed,
                held: false,
            },
        )
}

/// The expert kernels over packed stacks under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QMoeKernel {
    /// `qmoe_gemv` (every format; `act` and `out` compared).
    Gemv,
    /// `moe_cutlass_q8_gemm` (FP8 or INT8 without permutation, compute capability 9.0 in a build
    /// with CUTLASS; `out` compared with the 8-bit-activation reference, `act` is not written).
    CutlassQ8,
    /// `qmoe_mma` (FP8, INT8, INT4 in groups of multiples of 128 columns; no permutation; the
    /// bounds of `qmoe_gemv`: exact decoding, only the order of the f32 sums differs).
    Mma,
}

/// Runs qmoe_gemv on `case` and compares `act` and `out` per slot with the CPU expert MLP on the
/// dequantized experts.
fn check_qmoe(name: &str, case: &QMoeCase) {
    check_qmoe_with(name, QMoeKernel::Gemv, case);
}

/// Runs `kernel` on `case` and compares its outputs per slot with the CPU expert MLP on the
/// dequantized experts (with the activations `kernel` multiplies with).
fn check_qmoe_with(name: &str, kernel: QMoeKernel, case: &QMoeCase) {
    // The CUTLASS kernels run on a GPU only; the others on the emulator too.
    let gpu = match kernel {
        QMoeKernel::CutlassQ8 => match common::gpu(name) {
            Some(gpu) => Target::Gpu(gpu),
            None => return,
        },
        _ => common::target(name),
    };
    let &QMoeCase {
        kind,
        tokens,
        hidden,
        inter,
        experts,
        top_k,
        cold,
        permuted,
        seed,
        held,
    } = case;
    let slots = tokens * top_k;

    // Inputs; column 0 of x is positive so that a strongly negative router weight keeps an expert cold.
    let mut x = common::random_values(seed, tokens * hidden, 1.0);
    for row in x.chunks_exact_mut(hidden) {
        row[0] = 0.75 + 0.25 * row[0];
    }
    let x = common::round_bf16(&x);
    let x_bf16 = common::to_bf16(&x);
    let mut router = common::random_values(seed ^ 4, experts * hidden, 0.5);
    for (e, row) in router.chunks_exact_mut(hidden).enumerate() {
        if cold & (1 << e) != 0 {
            row[0] = -64.0;
        }
    }
    let mut logits = vec![0.0f32; tokens * experts];
    matmul(&x, WeightSlice::F32(&router), experts, hidden, &mut logits);
    let routing = route(&logits, experts, top_k);
    let groups = group_by_expert(&routing, experts);
    let mut offsets: Vec<i32> = groups.offsets.iter().map(|&o| o as i32).collect();
    let sorted: Vec<i32> = groups.assignments.iter().map(|&a| a as i32).collect();
    // A held expert: the one with the most slots (at least one), its two offsets.
    let held = held.then(|| (0..experts).max_by_key(|&e| groups.counts[e]).unwrap());
    if let Some(e) = held {
        offsets = offsets[e..e + 2].to_vec();
    }
    // The slots compared: all, or the held expert's (the others must stay poisoned).
    let mine: Vec<usize> = (0..slots)
        .filter(|&s| held.is_none_or(|e| routing.experts[s] == e))
        .collect();

    // The experts: w1 and w3 of an expert share one permutation, w2 has its own.
    let mut w1 = Vec::new();
    let mut w3 = Vec::new();
    let mut w2 = Vec::new();
    for e in 0..experts as u64 {
        let s = seed.wrapping_mul(31).wrapping_add(e * 7);
        let perm13 = permuted.then(|| permutation(s ^ 13, hidden));
        let perm2 = permuted.then(|| permutation(s ^ 2, inter));
        let scale13 = 2.0 / (hidden as f32).sqrt();
        let scale2 = 2.0 / (inter as f32).sqrt();
        w1.push(pack(
            kind,
            &common::random_values(s ^ 1, inter * hidden, scale13),
            inter,
            hidden,
            perm13.clone(),
        ));
        w3.push(pack(
            kind,
            &common::random_values(s ^ 3, inter * hidden, scale13),
            inter,
            hidden,
            perm13,
        ));
        w2.push(pack(
            kind,
            &common::random_values(s ^ 5, hidden * inter, scale2),
            hidden,
            inter,
            perm2,
        ));
    }

    // The device run.
    let stream = gpu.stream();
    let d_x = Guarded::with(stream, &x_bf16);
    let d_w1 = DeviceStack::upload(stream, &held_stack(&w1, held));
    let d_w3 = DeviceStack::upload(stream, &held_stack(&w3, held));
    let d_w2 = DeviceStack::upload(stream, &held_stack(&w2, held));
    let d_weights = Guarded::with(stream, &routing.weights);
    let d_offsets = Guarded::with(stream, &offsets);
    let d_sorted = Guarded::with(stream, &sorted);
    let mut d_act = Guarded::<bf16>::poisoned(stream, slots * inter);
    let mut d_out = Guarded::<f32>::poisoned(stream, slots * hidden);
    let shape = MoeScalars {
        tokens: tokens as u32,
        hidden: hidden as u32,
        inter: inter as u32,
        experts: if held.is_some() { 1 } else { experts as u32 },
        top_k: top_k as u32,
    };
    let (w1s, w3s, w2s) = (
        d_w1.weights(),
        d_w3.weights_with_perm(d_w1.perm.as_ref()),
        d_w2.weights(),
    );
    let args = QMoeArgs {
        x: d_x.dev(),
        w1_codes: w1s.codes,
        w1_params: w1s.params,
        w3_codes: w3s.codes,
        w3_params: w3s.params,
        w13_perm: shared_perm(w1s.perm, w3s.perm).expect("w1 and w3 share one permutation"),
        w2_codes: w2s.codes,
        w2_params: w2s.params,
        w2_perm: w2s.perm,
        table: w1s.table,
        topk_weights: d_weights.dev(),
        expert_offsets: d_offsets.dev(),
        sorted_slots: d_sorted.dev(),
        act: d_act.dev_mut(),
        out: d_out.dev_mut(),
    };
    let kinds = [w1s.kind, w3s.kind, w2s.kind];
    let run = match kernel {
        QMoeKernel::Gemv => launch!(
            gpu.on(),
            qmoe | qmoe_emulated,
            &shape,
            (kinds, args),
            PackedKernel::Gemv,
        ),
        QMoeKernel::Mma => launch!(
            gpu.on(),
            qmoe | qmoe_emulated,
            &shape,
            (kinds, args),
            PackedKernel::Mma,
        ),
        QMoeKernel::CutlassQ8 => {
            let Target::Gpu(gpu) = &gpu else {
                unreachable!("{name}: the CUTLASS cases open the GPU only");
            };
            let stream = gpu.stream();
            let format = Q8::of(kind).expect("an 8-bit case");
            let mut arena = DeviceArena::new(std::sync::Arc::clone(stream));
            let mut scratch = match MoeCutlassQ8Scratch::new(&mut arena, stream, &shape, format) {
                Ok(scratch) => scratch,
                Err(e) => {
                    // Only another GPU or a build without CUTLASS may refuse: the gate test
                    // (`moe_cutlass_q8_self_check_and_device_gate`) checks which.
                    eprintln!("not applicable {name} on {}: {e}", gpu.device.name());
                    assert!(
                        gpu.device.compute_capability() != CUTLASS_COMPUTE_CAPABILITY
                            || !CUTLASS_BUILT,
                        "{name}: {e}"
                    );
                    return;
                }
            };
            moe_cutlass_q8_gemm(stream, &shape, kinds, args, &mut scratch)
        }
    };
    run.unwrap_or_else(|e| panic!("{name} {case:?}: {e}"));
    stream.synchronize();
    let untouched = |what: &str| format!("{name} {what} {case:?}");
    let out = compared_rows(
        &d_out.read(stream, "out"),
        (&mine, slots),
        hidden,
        &untouched("out"),
    );

    // The CPU reference, expert by expert over the same grouping, on the dequantized matrices.
    let dequantized: Vec<[Vec<f32>; 3]> = (0..experts)
        .map(|e| [w1[e].dequantize(), w3[e].dequantize(), w2[e].dequantize()])
        .collect();
    let experts_cpu: Vec<Expert<'_>> = dequantized
        .iter()
        .map(|[m1, m3, m2]| Expert {
            w1: WeightSlice::F32(m1).into(),
            w2: WeightSlice::F32(m2).into(),
            w3: WeightSlice::F32(m3).into(),
        })
        .collect();
    let activations = match (kernel, Q8::of(kind)) {
        (QMoeKernel::CutlassQ8, Some(format)) => Activations::Q8(format),
        _ => Activations::Exact,
    };
    let (experts_cpu, dims) = (&experts_cpu, (hidden, inter));
    let reference = expert_slots_with(activations, &x, experts_cpu, &routing, &groups, dims);
    // What the device's roundings of act contribute through w2, per slot, with the RMS of each
    // element's rounding (`rms(a, row maximum)`) in place of the value.
    let propagated_with = |rms: &dyn Fn(f32, f32) -> f64| -> f64 {
        mine.iter()
            .map(|&s| {
                let row = &reference.act[s * inter..(s + 1) * inter];
                let amax = row.iter().fold(0.0f32, |m, a| m.max(a.abs()));
                let scaled: Vec<f32> = row.iter().map(|&a| rms(a, amax) as f32).collect();
                common::propagation(
                    &dequantized[routing.experts[s]][2],
                    &scaled,
                    routing.weights[s],
                )
            })
            .sum()
    };
    let out_bound = match (kernel, activations) {
        // The rounding chain of moe_gemv (tests/gpu_kernels/moe_gemv.rs) on the dequantized
        // weights: act rounded once to bf16; out derived from that rounding propagated through w2.
        (QMoeKernel::Gemv | QMoeKernel::Mma, _) | (_, Activations::Exact) => {
            let propagated = propagated_with(&|a, _| a as f64);
            let act = d_act.read(stream, "act");
            let act = common::to_f32(&compared_rows(
                &act,
                (&mine, slots),
                inter,
                &untouched("act"),
            ));
            let reference_act = rows_of(&reference.act, &mine, inter);
            common::assert_close(
                &format!("{name} act {case:?}"),
                &act,
                &reference_act,
                common::bf16_bound(hidden, 1),
            );
            common::propagated_bound(
                propagated,
                &rows_of(&reference.out, &mine, hidden),
                hidden + inter,
            )
        }
        // The same codes of x on both sides; activation codes one step apart where the
        // accumulation moves them across a rounding boundary (`common::q8_bound`).
        (QMoeKernel::CutlassQ8, Activations::Q8(format)) => {
            let d = common::q8_activation_spread(format, hidden);
            let flips =
                propagated_with(&|a, amax| common::q8_flip_variance(format, d, a, amax).sqrt());
            common::q8_bound(
                format,
                flips,
                &rows_of(&reference.out, &mine, hidden),
                d,
                inter,
            )
        }
    };
    common::assert_close(
        &format!("{name} out {case:?}"),
        &out,
        &rows_of(&reference.out, &mine, hidden),
        out_bound,
    );
}

/// The matrices of a stack on the device: all, or the held expert's alone.
fn held_stack(ws: &[PackedMatrix], held: Option<usize>) -> Vec<&PackedMatrix> {
    match held {
        Some(e) => vec![&ws[e]],
        None => ws.iter().collect(),
    }
}

/// The rows `mine` of `v` (`[slots, width]`), in that order, after checking that every other row
/// still holds the poison (`what` names the buffer in the failure).
fn compared_rows<T: Poison>(
    v: &[T],
    (mine, slots): (&[usize], usize),
    width: usize,
    what: &str,
) -> Vec<T> {
    for s in (0..slots).filter(|s| !mine.contains(s)) {
        let row = &v[s * width..(s + 1) * width];
        assert!(
            row.iter().all(|&x| T::same_bits(x, T::POISON)),
            "{what}: slot {s} of another expert was written"
        );
    }
    rows_of(v, mine, width)
}

/// The rows `slots` of `v` (`[*, width]`), in that order.
fn rows_of<T: Copy>(v: &[T], slots: &[usize], width: usize) -> Vec<T> {
    slots
        .iter()
        .flat_map(|&s| v[s * width..(s + 1) * width].iter().copied())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn qmoe_gemv_matches_the_cpu_experts_on_the_dequantized_weights(case in qmoe_cases()) {
        check_qmoe("qmoe_gemv", &case);
    }
}

/// Every format with idle experts, fewer tokens than experts, top-2, permuted columns.
#[test]
fn qmoe_gemv_every_format_with_idle_experts() {
    for (i, kind) in KINDS.into_iter().enumerate() {
        let case = QMoeCase {
            kind,
            tokens: 3,
            hidden: 256,
            inter: 160,
            experts: 8,
            top_k: 2,
            cold: 0b1010_0000,
            permuted: i % 2 == 0,
            seed: 7 + i as u64,
            held: false,
        };
        check_qmoe("qmoe_gemv_every_format_with_idle_experts", &case);
    }
}

// ---------------------------------------------------------------------------------------------
// qmoe_mma

/// Cases for the tensor-core expert kernels: FP8, INT8, INT4 in groups of 128 or 256 columns,
/// hidden and inter multiples of 96 (up to 768 and 576: whole and partial steps of 64 and 128
/// columns), 1 to 80 tokens (passes of 8, 16 and 32 slots, several per expert), no permutation.
fn mma_cases() -> impl Strategy<Value = QMoeCase> {
    let tokens = prop_oneof![Just(1usize), 1usize..17, 17usize..80];
    cases_of(&MMA_KINDS, tokens, (96, 8, 6), Just(false))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn qmoe_mma_matches_the_cpu_experts_on_the_dequantized_weights(case in mma_cases()) {
        check_qmoe_with("qmoe_mma", QMoeKernel::Mma, &case);
    }
}

/// Mixtral's depth (hidden 4096: 32 or 64 steps over the four warps) with idle experts, each format
/// at a decode batch of 1 and one of 40 tokens (an expert with more than 32 slots takes two passes).
#[test]
fn qmoe_mma_at_mixtral_depth_with_idle_experts() {
    for (i, (kind, tokens)) in MMA_KINDS
        .into_iter()
        .flat_map(|k| [(k, 1), (k, 40)])
        .enumerate()
    {
        let case = QMoeCase {
            kind,
            tokens,
            hidden: 4096,
            inter: 512,
            experts: 8,
            top_k: 2,
            cold: 0b0101_0000,
            permuted: false,
            seed: 41 + i as u64,
            held: false,
        };
        check_qmoe_with(
            "qmoe_mma_at_mixtral_depth_with_idle_experts",
            QMoeKernel::Mma,
            &case,
        );
    }
}

/// A rank of an expert-parallel split holding one expert of a top-2 model (fewer experts held than
/// each token uses), for every kernel over packed stacks: the held expert's slots within the
/// bounds of the full run, every other slot of `act` and `out` untouched.
#[test]
fn packed_experts_on_a_rank_holding_one_expert_of_top_2() {
    let int4 = |group_size| PackedKind::Int4 { group_size };
    for (i, (kernel, kind)) in [
        (QMoeKernel::Gemv, int4(32)),
        (QMoeKernel::Gemv, PackedKind::Fp8),
        (QMoeKernel::Mma, PackedKind::Int8),
        (QMoeKernel::Mma, int4(128)),
        (QMoeKernel::CutlassQ8, PackedKind::Fp8),
        (QMoeKernel::CutlassQ8, PackedKind::Int8),
    ]
    .into_iter()
    .enumerate()
    {
        let case = QMoeCase {
            kind,
            tokens: 40,
            hidden: 256,
            inter: 128,
            experts: 8,
            top_k: 2,
            cold: 0,
            permuted: false,
            seed: 23 + i as u64,
            held: true,
        };
        check_qmoe_with(
            "packed_experts_on_a_rank_holding_one_expert_of_top_2",
            kernel,
            &case,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// moe_cutlass_q8_gemm

/// FP8 and INT8 cases for CUTLASS's 8-bit expert kernels: hidden and inter multiples of 16 (whole
/// 16-byte rows of codes), 1 to 300 tokens (groups of M = 0 up to several 128-row tiles), no
/// permutation.
fn q8_cases() -> impl Strategy<Value = QMoeCase> {
    let tokens = prop_oneof![Just(1usize), 1usize..8, 8usize..300];
    cases_of(
        &[PackedKind::Fp8, PackedKind::Int8],
        tokens,
        (16, 20, 16),
        Just(false),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn moe_cutlass_q8_matches_the_cpu_experts_with_8_bit_activations(case in q8_cases()) {
        check_qmoe_with("moe_cutlass_q8", QMoeKernel::CutlassQ8, &case);
    }
}

/// Mixtral-like depth for each 8-bit format: K = 1024 and 768 (8 and 6 k-tiles of 128), 300
/// tokens top-2 over 8 experts with two cold ones, so several 128-row tiles per expert and groups
/// with M = 0.
#[test]
fn moe_cutlass_q8_with_long_k_and_idle_experts() {
    for (i, kind) in [PackedKind::Fp8, PackedKind::Int8].into_iter().enumerate() {
        let case = QMoeCase {
            kind,
            tokens: 300,
            hidden: 1024,
            inter: 768,
            experts: 8,
            top_k: 2,
            cold: 0b0110_0000,
            permuted: false,
            seed: 17 + i as u64,
            held: false,
        };
        let name = "moe_cutlass_q8_with_long_k_and_idle_experts";
        check_qmoe_with(name, QMoeKernel::CutlassQ8, &case);
    }
}
