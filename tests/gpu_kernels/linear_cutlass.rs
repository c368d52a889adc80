//! `linear_cutlass` (the dense prefill projection on CUTLASS's Hopper GEMM, `csrc/cutlass/`)
//! against the CPU reference with the fixture and bounds of [`linear`](super::linear) (exact bf16
//! products summed in f32; one bf16 rounding for a bf16 output), and `linear_cutlass_self_check`.
//! Shapes: 1 to 300 tokens (one tile column of 128 tokens and past it), in_features and
//! out_features multiples of 8 that are not multiples of the 64-wide k stage nor of the 128-row
//! tile, both output types; Mixtral's hidden size with few output tiles, so that stream-K splits
//! the K loops between blocks, launched and replayed from a captured graph; zero tokens touching
//! nothing. The kernels exist only for compute
//! capability 9.0 in a build with CUTLASS: elsewhere the comparisons print that they do not apply,
//! and the gate test checks that making the scratch is refused.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use mixtral::cuda::args::{LinearArgs, LinearScalars};
use mixtral::cuda::memory::DeviceArena;
use mixtral::cuda::ops::{
    linear_cutlass, linear_cutlass_self_check, LinearCutlassScratch, LINEAR_CUTLASS_BF16_BOUND,
};
use proptest::prelude::*;

use super::linear::{check_hidden_size, check_random_shapes, check_zero_tokens, LinearOp};
use super::moe_cutlass::{hopper_gpu, self_check_and_device_gate};
use crate::common;

/// A launcher of `linear_cutlass` with a scratch made for each problem (kept until the launcher is
/// dropped).
fn with_own_scratch(stream: &Arc<CudaStream>) -> impl LinearOp {
    let stream = Arc::clone(stream);
    let mut kept = Vec::new();
    move |on: common::On<'_>, s: &LinearScalars, args: LinearArgs<'_>| {
        let (_, on) = common::on_gpu(on);
        let mut arena = DeviceArena::new(Arc::clone(&stream));
        let features = [(s.in_features, s.out_features)];
        let mut scratch = LinearCutlassScratch::new(&mut arena, &stream, &features, s.tokens)?;
        let result = linear_cutlass(on, s, args, &mut scratch);
        kept.push((arena, scratch));
        result
    }
}

/// A launcher of `linear_cutlass` with one scratch made for up to `max_tokens` tokens of every
/// problem of `features`.
fn with_scratch(
    stream: &Arc<CudaStream>,
    features: &[(u32, u32)],
    max_tokens: u32,
) -> impl LinearOp {
    let mut arena = DeviceArena::new(Arc::clone(stream));
    let mut scratch = LinearCutlassScratch::new(&mut arena, stream, features, max_tokens)
        .unwrap_or_else(|e| panic!("scratch for {features:?} x {max_tokens}: {e}"));
    move |on: common::On<'_>, s: &LinearScalars, args: LinearArgs<'_>| {
        let _arena = &arena;
        linear_cutlass(common::on_gpu(on).1, s, args, &mut scratch)
    }
}

#[test]
fn linear_cutlass_matches_the_cpu_reference() {
    let Some(gpu) = hopper_gpu("linear_cutlass_matches_the_cpu_reference") else {
        return;
    };
    let mut op = with_own_scratch(gpu.cuda_stream());
    let tokens = prop::sample::select(vec![1usize, 2, 16, 17, 40, 127, 128, 129, 257, 300]);
    let out_features = (1usize..=38).prop_map(|m| m * 8);
    check_random_shapes(&gpu, &mut op, (tokens, out_features));
}

/// Mixtral's hidden size as K with 520 outputs: 5 output tiles per 128 tokens on 132 SMs, so
/// stream-K splits the 64 k-stages of each tile between blocks and reduces them in its workspace.
#[test]
fn linear_cutlass_splits_long_k_over_the_sms() {
    let Some(gpu) = hopper_gpu("linear_cutlass_splits_long_k_over_the_sms") else {
        return;
    };
    let mut op = with_scratch(gpu.cuda_stream(), &[(4096, 520)], 130);
    check_hidden_size(&gpu, &mut op, &[17, 64, 130]);
}

/// `op` recorded into a CUDA graph and the graph replayed twice instead of a launch, as a captured
/// prefill chunk runs: the host-side arguments and the workspace's initialisation must be part of
/// what is recorded, and nothing may depend on state left by the first replay.
fn replayed(stream: &Arc<CudaStream>, mut op: impl LinearOp) -> impl LinearOp {
    let stream = Arc::clone(stream);
    move |on: common::On<'_>, s: &LinearScalars, args: LinearArgs<'_>| {
        common::replayed_twice(&stream, || op(on, s, args))
    }
}

/// The stream-K problem of [`linear_cutlass_splits_long_k_over_the_sms`] inside a captured graph.
#[test]
fn linear_cutlass_replays_inside_a_captured_graph() {
    let Some(gpu) = hopper_gpu("linear_cutlass_replays_inside_a_captured_graph") else {
        return;
    };
    let mut op = replayed(
        gpu.cuda_stream(),
        with_scratch(gpu.cuda_stream(), &[(4096, 520)], 130),
    );
    check_hidden_size(&gpu, &mut op, &[40, 130]);
}

#[test]
fn linear_cutlass_with_zero_tokens_touches_nothing() {
    let Some(gpu) = hopper_gpu("linear_cutlass_with_zero_tokens_touches_nothing") else {
        return;
    };
    check_zero_tokens(&gpu, &mut with_scratch(gpu.cuda_stream(), &[(64, 16)], 4));
}

/// Where the CUTLASS kernels run, the self-check passes within the larger (bf16) bound; elsewhere
/// it answers `NotHopper` and making the scratch is refused before anything is launched.
#[test]
fn linear_cutlass_self_check_and_device_gate() {
    self_check_and_device_gate(
        "linear_cutlass_self_check_and_device_gate",
        |gpu| linear_cutlass_self_check(&gpu.kernels, gpu.stream()),
        LINEAR_CUTLASS_BF16_BOUND,
        |arena, stream, _| LinearCutlassScratch::new(arena, stream, &[(64, 64)], 4).map(drop),
    );
}
