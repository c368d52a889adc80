//! The dense projection (`mixtral::cuda::ops::linear`) against the CPU reference
//! `mixtral::cpu::matmul::matmul` on the same bf16 inputs: random shapes through both kernels (the
//! GEMV up to `LINEAR_GEMV_MAX_TOKENS` tokens, the tensor-core GEMM above), both output types, odd
//! output widths and in_features that are odd multiples of 8; the two kernels on the same rows at
//! the crossover; zero tokens touching nothing; the decode kernel on tensor cores
//! (`linear_mma_decode`) for up to 16 tokens.

use half::bf16;
use mixtral::cpu::matmul::matmul;
use mixtral::cuda::args::{LinearArgs, LinearScalars};
use mixtral::cuda::ops::{linear, linear_emulated, linear_mma_decode, linear_mma_decode_emulated};
use mixtral::cuda::params::LINEAR_GEMV_MAX_TOKENS;
use mixtral::cuda::CudaError;
use mixtral::dtype::WeightSlice;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::common::{self, launch, Guarded, On, Target};

/// The bound of one output: exact bf16 products summed in f32 over `in_features` terms
/// ([`common::f32_bound`]: only the order and, on the tensor-core path, the accumulator's rounding
/// differ), plus one bf16 rounding at the store for a bf16 output ([`common::bf16_bound`]).
fn bound(in_features: usize, out_f32: bool) -> f64 {
    if out_f32 {
        common::f32_bound(in_features)
    } else {
        common::bf16_bound(in_features, 1)
    }
}

/// One problem: the bf16 inputs the device gets and the CPU reference output on them.
struct Problem {
    shape: LinearScalars,
    x: Vec<bf16>,
    w: Vec<bf16>,
    reference: Vec<f32>,
}

fn problem(seed: u64, tokens: usize, in_features: usize, out_features: usize) -> Problem {
    let x = common::to_bf16(&common::random_values(seed, tokens * in_features, 1.0));
    let w = common::to_bf16(&common::random_values(
        seed ^ 0x5151_7e57,
        out_features * in_features,
        0.5,
    ));
    let mut reference = vec![0.0f32; tokens * out_features];
    matmul(
        &common::to_f32(&x),
        WeightSlice::BF16(&w),
        out_features,
        in_features,
        &mut reference,
    );
    Problem {
        shape: LinearScalars {
            tokens: tokens as u32,
            in_features: in_features as u32,
            out_features: out_features as u32,
        },
        x,
        w,
        reference,
    }
}

/// A launcher of the dense projection: `linear`, `linear_mma_decode`, or `linear_cutlass` with its
/// scratch.
pub(crate) trait LinearOp:
    FnMut(On<'_>, &LinearScalars, LinearArgs<'_>) -> Result<(), CudaError>
{
}
impl<F: FnMut(On<'_>, &LinearScalars, LinearArgs<'_>) -> Result<(), CudaError>> LinearOp for F {}

/// [`linear`] on the GPU or the emulator.
fn linear_op(on: On<'_>, s: &LinearScalars, a: LinearArgs<'_>) -> Result<(), CudaError> {
    launch!(on, linear | linear_emulated, s, a)
}

/// [`linear_mma_decode`] on the GPU or the emulator.
fn linear_mma_decode_op(on: On<'_>, s: &LinearScalars, a: LinearArgs<'_>) -> Result<(), CudaError> {
    launch!(on, linear_mma_decode | linear_mma_decode_emulated, s, a)
}

/// Runs `linear` on `p` into a poisoned, guarded output and reads it back as f32 (every element
/// must be written, nothing outside touched).
fn run(gpu: &Target, p: &Problem, out_f32: bool) -> Vec<f32> {
    run_op(&mut linear_op, gpu, p, out_f32)
}

/// [`run`] with `op`.
fn run_op(op: &mut impl LinearOp, gpu: &Target, p: &Problem, out_f32: bool) -> Vec<f32> {
    let stream = gpu.stream();
    let x = Guarded::with(stream, &p.x);
    let w = Guarded::with(stream, &p.w);
    let len = p.shape.tokens as usize * p.shape.out_features as usize;
    if out_f32 {
        let mut out = Guarded::<f32>::poisoned(stream, len);
        op(
            gpu.on(),
            &p.shape,
            LinearArgs {
                x: x.dev(),
                w: w.dev(),
                out: out.dev_mut().into(),
            },
        )
        .expect("linear (f32 out)");
        out.read_written(stream, "out")
    } else {
        let mut out = Guarded::<bf16>::poisoned(stream, len);
        op(
            gpu.on(),
            &p.shape,
            LinearArgs {
                x: x.dev(),
                w: w.dev(),
                out: out.dev_mut().into(),
            },
        )
        .expect("linear (bf16 out)");
        common::to_f32(&out.read_written(stream, "out"))
    }
}

/// Token counts on both sides of every GEMV tile and of the crossover, and several GEMM row tiles.
const TOKENS: &[usize] = &[1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 128, 130, 257];

/// in_features: small multiples of 8 (odd ones included: 24, 72, ...), and sizes with whole GEMV
/// steps (1024 columns) plus a tail and GEMM K tiles (32) plus a tail.
fn in_features() -> impl Strategy<Value = usize> {
    prop_oneof![
        (1usize..=64).prop_map(|m| m * 8),
        prop::sample::select(vec![1024usize, 1096, 2056, 3080]),
    ]
}

#[test]
fn linear_matches_the_cpu_reference() {
    let name = "linear_matches_the_cpu_reference";
    let gpu = common::target(name);
    let shapes = (prop::sample::select(TOKENS), 1usize..=300);
    check_random_shapes(&gpu, &mut linear_op, shapes);
}

/// The decode kernel on tensor cores (`linear_mma_decode`, up to 16 tokens) against the same
/// reference and bounds: exact bf16 products, only the order of the f32 sums differs.
#[test]
fn linear_mma_decode_matches_the_cpu_reference() {
    let name = "linear_mma_decode_matches_the_cpu_reference";
    let gpu = common::target(name);
    let shapes = (1usize..=LINEAR_GEMV_MAX_TOKENS as usize, 1usize..=300);
    check_random_shapes(&gpu, &mut linear_mma_decode_op, shapes);
}

/// `op` on random problems (tokens and out_features from `shapes`, [`in_features`], both output
/// types) against the CPU reference within [`bound`].
pub(crate) fn check_random_shapes(
    gpu: &Target,
    op: &mut impl LinearOp,
    shapes: (impl Strategy<Value = usize>, impl Strategy<Value = usize>),
) {
    let (tokens, out_features) = shapes;
    let strategy = (
        tokens,
        in_features(),
        out_features,
        any::<bool>(),
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(24, 8)));
    let op = std::cell::RefCell::new(op);
    runner
        .run(
            &strategy,
            |(tokens, in_features, out_features, out_f32, seed)| {
                let p = problem(seed, tokens, in_features, out_features);
                let out = run_op(*op.borrow_mut(), gpu, &p, out_f32);
                let err = common::rel_l2(&out, &p.reference);
                let bound = bound(in_features, out_f32);
                if err > bound {
                    return Err(TestCaseError::fail(format!(
                        "tokens {tokens}, in {in_features}, out {out_features}, f32 out {out_f32}: \
                         relative L2 error {err:e} > {bound:e}"
                    )));
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn gemv_and_tensor_core_paths_agree_at_the_crossover() {
    let gpu = common::target("gemv_and_tensor_core_paths_agree_at_the_crossover");
    let gemv_tokens = LINEAR_GEMV_MAX_TOKENS as usize;
    let (in_features, out_features) = (1096, 299);
    // The same first rows: the GEMM problem is the GEMV problem plus one token.
    let mma = problem(11, gemv_tokens + 1, in_features, out_features);
    let gemv = Problem {
        shape: LinearScalars {
            tokens: gemv_tokens as u32,
            ..mma.shape
        },
        x: mma.x[..gemv_tokens * in_features].to_vec(),
        w: mma.w.clone(),
        reference: mma.reference[..gemv_tokens * out_features].to_vec(),
    };
    for out_f32 in [true, false] {
        let by_gemv = run(&gpu, &gemv, out_f32);
        let by_mma = run(&gpu, &mma, out_f32);
        let to_cpu = bound(in_features, out_f32);
        common::assert_close("gemv vs cpu", &by_gemv, &gemv.reference, to_cpu);
        common::assert_close("mma vs cpu", &by_mma, &mma.reference, to_cpu);
        // Both accumulate exact bf16 products in f32; only the order differs. A bf16 output is
        // rounded once on each side: at most one rounding away from the same f32 value each.
        let bound = if out_f32 {
            common::f32_bound(in_features)
        } else {
            common::bf16_bound(in_features, 2)
        };
        common::assert_close(
            "gemv vs mma on the same rows",
            &by_gemv,
            &by_mma[..gemv_tokens * out_features],
            bound,
        );
    }
}

#[test]
fn mixtral_hidden_size_through_both_paths() {
    let gpu = common::target("mixtral_hidden_size_through_both_paths");
    check_hidden_size(&gpu, &mut linear_op, &[1, 8, 130]);
}

/// `op` with Mixtral's hidden size as K and 520 outputs at each of `tokens`, both output types,
/// against the CPU reference within [`bound`].
pub(crate) fn check_hidden_size(gpu: &Target, op: &mut impl LinearOp, tokens: &[usize]) {
    for (seed, &tokens) in (1..).zip(tokens) {
        let p = problem(seed, tokens, 4096, 520);
        for out_f32 in [true, false] {
            let out = run_op(op, gpu, &p, out_f32);
            common::assert_close(
                &format!("tokens {tokens}, f32 out {out_f32}"),
                &out,
                &p.reference,
                bound(4096, out_f32),
            );
        }
    }
}

#[test]
fn zero_tokens_touch_nothing() {
    let gpu = common::target("zero_tokens_touch_nothing");
    check_zero_tokens(&gpu, &mut linear_op);
}

/// `op` over zero tokens (64 in, 16 out features) succeeds and writes nothing.
pub(crate) fn check_zero_tokens(gpu: &Target, op: &mut impl LinearOp) {
    let stream = gpu.stream();
    let p = problem(5, 0, 64, 16);
    let x = Guarded::with(stream, &p.x);
    let w = Guarded::with(stream, &p.w);
    let mut out = Guarded::<f32>::poisoned(stream, 0);
    let args = LinearArgs {
        x: x.dev(),
        w: w.dev(),
        out: out.dev_mut().into(),
    };
    op(gpu.on(), &p.shape, args).expect("zero tokens");
    assert!(out.read(stream, "out").is_empty());
}
