//! `moe_cutlass_gemm` (the prefill expert MLP on CUTLASS's Hopper grouped GEMM, `csrc/cutlass/`)
//! against the CPU expert MLP with the fixture of [`moe_gemv`](super::moe_gemv), `act` read in its
//! expert-sorted order, under the same bounds (f32 products and SwiGLU, one bf16 rounding of `act`,
//! its error propagated through w2), and `moe_cutlass_self_check`. Shapes: 1 to 300 tokens, an
//! expert with no slots (a group with M = 0), hidden and inter multiples of 8 that are not
//! multiples of the 128 x 128 x 64 tile, so every tail is crossed. The kernels exist only for
//! compute capability 9.0 in a build with CUTLASS: elsewhere the comparisons print that they do
//! not apply, and the gate tests check that the launcher refuses the device. The 8-bit (FP8, INT8)
//! kernels' comparisons are in [`quant`](super::quant), beside the other kernels over packed
//! stacks; their self-checks and gate are here.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use mixtral::cuda::args::{MoeArgs, MoeScalars};
use mixtral::cuda::memory::DeviceArena;
use mixtral::cuda::ops::{
    moe_cutlass_gemm, moe_cutlass_q8_self_check, moe_cutlass_self_check, ActOrder, HopperCheck,
    MoeCutlassQ8Scratch, MoeCutlassScratch, CUTLASS_BUILT, CUTLASS_COMPUTE_CAPABILITY,
    FP8_SELF_CHECK_BOUND, HOPPER_SELF_CHECK_BOUND, INT8_SELF_CHECK_BOUND,
};
use mixtral::cuda::CudaError;
use mixtral::quant::Q8;
use proptest::prelude::*;

use super::moe_gemv::{
    assert_skewed, cases, check_moe_with, check_one_held_expert, MoeCase, LONG_K, SINGLE_TOKEN,
    SKEWED,
};
use crate::common;

/// The device's stream when it runs the CUTLASS kernels; otherwise prints why `test` does not run
/// them (no GPU: the skip of `common::gpu`; another GPU or no CUTLASS in the build: not applicable,
/// and `moe_cutlass_self_check_and_device_gate` checks the refusal).
fn hopper_stream(test: &str) -> Option<Arc<CudaStream>> {
    hopper_gpu(test).map(|gpu| Arc::clone(gpu.cuda_stream()))
}

/// [`hopper_stream`]'s device with its kernels.
pub(crate) fn hopper_gpu(test: &str) -> Option<common::Target> {
    let gpu = common::gpu(test)?;
    let (major, minor) = gpu.device.compute_capability();
    if (major, minor) != CUTLASS_COMPUTE_CAPABILITY || !CUTLASS_BUILT {
        eprintln!(
            "not applicable {test}: {} has compute capability {major}.{minor} (CUTLASS built: \
             {CUTLASS_BUILT}); the CUTLASS kernels run only on 9.0",
            gpu.device.name()
        );
        return None;
    }
    Some(common::Target::Gpu(gpu))
}

/// Runs [`check_moe_with`] on `case` with a scratch made for its shape.
fn check_cutlass(name: &str, stream: &Arc<CudaStream>, case: &MoeCase) -> Vec<usize> {
    check_cutlass_replayed(name, stream, case, false)
}

/// [`check_cutlass`], the launch recorded into a graph and replayed twice where `replay`
/// ([`common::replayed_twice`]).
fn check_cutlass_replayed(
    name: &str,
    stream: &Arc<CudaStream>,
    case: &MoeCase,
    replay: bool,
) -> Vec<usize> {
    let max = MoeScalars {
        tokens: case.tokens as u32,
        hidden: case.hidden as u32,
        inter: case.inter as u32,
        experts: case.experts as u32,
        top_k: case.top_k as u32,
    };
    let mut arena = DeviceArena::new(Arc::clone(stream));
    let mut scratch = MoeCutlassScratch::new(&mut arena, stream, &max)
        .unwrap_or_else(|e| panic!("{name}: scratch for {case:?}: {e}"));
    let mut op = |on: common::On<'_>, s: &MoeScalars, args: MoeArgs<'_>| {
        let (_, on) = common::on_gpu(on);
        let launch = || moe_cutlass_gemm(on, s, args, &mut scratch);
        if replay {
            common::replayed_twice(stream, launch)
        } else {
            launch()
        }
    };
    check_moe_with(name, (&mut op, ActOrder::ExpertSorted), case)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn moe_cutlass_matches_the_cpu_experts(
        case in cases(prop_oneof![Just(1usize), 1usize..8, 8usize..300]),
    ) {
        let name = "moe_cutlass_matches_the_cpu_experts";
        if let Some(stream) = hopper_stream(name) {
            let counts = check_cutlass(name, &stream, &case);
            prop_assert_eq!(counts.iter().sum::<usize>(), case.tokens * case.top_k);
        }
    }
}

/// Three hot experts share 400 slots (M up to several 128-row tiles, the last partial), five get
/// none (groups with M = 0); hidden 200 and inter 136 leave K and N tails.
#[test]
fn moe_cutlass_with_skewed_routing() {
    let name = "moe_cutlass_with_skewed_routing";
    let Some(stream) = hopper_stream(name) else {
        return;
    };
    assert_skewed(&check_cutlass(name, &stream, &SKEWED));
}

/// A single token, top-1, four experts: one group with one row, three empty.
/// The skewed routing inside a captured graph, replayed twice: the groups' shapes and pointers are
/// written on the device by a recorded kernel, so the graph serves whatever routing the router left.
#[test]
fn moe_cutlass_replays_inside_a_captured_graph() {
    let name = "moe_cutlass_replays_inside_a_captured_graph";
    let Some(stream) = hopper_stream(name) else {
        return;
    };
    assert_skewed(&check_cutlass_replayed(name, &stream, &SKEWED, true));
}

#[test]
fn moe_cutlass_single_token() {
    let name = "moe_cutlass_single_token";
    let Some(stream) = hopper_stream(name) else {
        return;
    };
    let counts = check_cutlass(name, &stream, &SINGLE_TOKEN);
    assert_eq!(counts.iter().sum::<usize>(), 1);
}

/// K = 1024 and 768 (16 and 12 k-tiles of 64 through the pipeline stages), 300 tokens top-2.
#[test]
fn moe_cutlass_with_long_k() {
    let name = "moe_cutlass_with_long_k";
    let Some(stream) = hopper_stream(name) else {
        return;
    };
    check_cutlass(name, &stream, &LONG_K);
}

/// A rank holding one expert of a top-2 model (`moe_gemv`'s check): the groups are that expert's,
/// and the per-row kernels leave every row of the other experts alone (in `act` and `out`).
#[test]
fn moe_cutlass_on_a_rank_holding_one_expert_of_top_2() {
    let name = "moe_cutlass_on_a_rank_holding_one_expert_of_top_2";
    let Some(stream) = hopper_stream(name) else {
        return;
    };
    let (tokens, top_k) = (40, 2);
    let max = MoeScalars {
        tokens,
        hidden: 64,
        inter: 40,
        experts: 1,
        top_k,
    };
    let mut arena = DeviceArena::new(Arc::clone(&stream));
    let mut scratch = MoeCutlassScratch::new(&mut arena, &stream, &max)
        .unwrap_or_else(|e| panic!("{name}: scratch: {e}"));
    let mut op = |on: common::On<'_>, s: &MoeScalars, args: MoeArgs<'_>| {
        moe_cutlass_gemm(common::on_gpu(on).1, s, args, &mut scratch)
    };
    check_one_held_expert(name, (&mut op, ActOrder::ExpertSorted), tokens as usize);
}

/// On compute capability 9.0 (with CUTLASS built) the self-check passes within its bound; elsewhere
/// it answers `NotHopper` and making the scratch is refused before anything is launched.
#[test]
fn moe_cutlass_self_check_and_device_gate() {
    self_check_and_device_gate(
        "moe_cutlass_self_check_and_device_gate",
        |gpu| moe_cutlass_self_check(&gpu.kernels, gpu.stream()),
        HOPPER_SELF_CHECK_BOUND,
        |arena, stream, shape| MoeCutlassScratch::new(arena, stream, shape).map(drop),
    );
}

/// The same for the 8-bit kernels of each format: their self-check against the CPU reference with
/// 8-bit activations.
#[test]
fn moe_cutlass_q8_self_check_and_device_gate() {
    for (format, bound) in [
        (Q8::Fp8, FP8_SELF_CHECK_BOUND),
        (Q8::Int8, INT8_SELF_CHECK_BOUND),
    ] {
        self_check_and_device_gate(
            "moe_cutlass_q8_self_check_and_device_gate",
            |gpu| moe_cutlass_q8_self_check(gpu.stream(), format),
            bound,
            |arena, stream, shape| MoeCutlassQ8Scratch::new(arena, stream, shape, format).map(drop),
        );
    }
}

/// A self-check's verdict on this device: `Passed` within `bound` where the CUTLASS kernels run;
/// elsewhere `NotHopper`, and `scratch` refused for the device or the build.
pub(crate) fn self_check_and_device_gate(
    name: &str,
    check: impl FnOnce(&common::Gpu) -> Result<HopperCheck, CudaError>,
    bound: f64,
    scratch: impl FnOnce(&mut DeviceArena, &Arc<CudaStream>, &MoeScalars) -> Result<(), CudaError>,
) {
    let Some(gpu) = common::gpu(name) else {
        return;
    };
    let stream = gpu.stream();
    let verdict = check(&gpu).expect("self-check");
    if gpu.device.compute_capability() == CUTLASS_COMPUTE_CAPABILITY && CUTLASS_BUILT {
        match verdict {
            HopperCheck::Passed { rel_l2 } => assert!(rel_l2 <= bound),
            other => panic!(
                "{name}: expected Passed on {}, got {other:?}",
                gpu.device.name()
            ),
        }
        return;
    }
    assert_eq!(verdict, HopperCheck::NotHopper);
    let shape = MoeScalars {
        tokens: 4,
        hidden: 64,
        inter: 64,
        experts: 4,
        top_k: 2,
    };
    let mut arena = DeviceArena::new(Arc::clone(stream));
    match scratch(&mut arena, stream, &shape) {
        Err(CudaError::Kernel(mixtral::cuda::KernelError::Unsupported { what, .. })) => {
            assert!(what == "compute capability" || what == "build", "{what}");
        }
        other => panic!("{name}: expected the device to be refused, got {other:?}"),
    }
}
