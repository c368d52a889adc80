//! `moe_wgmma_gemm` (Hopper warpgroup-MMA prefill expert GEMMs) against the CPU expert MLP with the
//! fixture of [`moe_gemv`](super::moe_gemv) (the same shapes as the `moe_grouped` test: several
//! 64-slot tiles per expert, idle experts, K tails and partial column blocks), and
//! `moe_wgmma_self_check`. The kernels exist only for compute capability 9.0: on another device the
//! comparisons print that they do not apply (`not applicable <test>: ...`), and the tests check
//! instead that the launcher refuses the device and that the self-check answers `NotHopper`.

use half::bf16;
use mixtral::cuda::args::{MoeArgs, MoeScalars};
use mixtral::cuda::memory::{View, ViewMut};
use mixtral::cuda::ops::{
    moe_wgmma_gemm, moe_wgmma_self_check, ActOrder, HopperCheck, WGMMA_COMPUTE_CAPABILITY,
    WGMMA_SELF_CHECK_BOUND,
};
use mixtral::cuda::{CudaError, KernelError};
use proptest::prelude::*;

use super::moe_gemv::{
    assert_skewed, cases, check_moe, check_one_held_expert, MoeOp, LONG_K, SINGLE_TOKEN, SKEWED,
};
use crate::common;

/// True when the device runs the wgmma kernels; otherwise prints why `test` does not run them
/// (no GPU: the skip of `common::gpu`; another GPU: not applicable there, and
/// `moe_wgmma_self_check_and_device_gate` checks that the launcher refuses it).
fn hopper(test: &str) -> bool {
    let Some(gpu) = common::gpu(test) else {
        return false;
    };
    let (major, minor) = gpu.device.compute_capability();
    if (major, minor) != WGMMA_COMPUTE_CAPABILITY {
        eprintln!(
            "not applicable {test}: {} has compute capability {major}.{minor}; the wgmma kernels \
             run only on 9.0",
            gpu.device.name()
        );
        return false;
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn moe_wgmma_matches_the_cpu_experts(
        case in cases(prop_oneof![Just(1usize), 1usize..8, 8usize..300]),
    ) {
        if hopper("moe_wgmma_matches_the_cpu_experts") {
            let counts = check_moe("moe_wgmma_gemm", wgmma_op, &case);
            prop_assert_eq!(counts.iter().sum::<usize>(), case.tokens * case.top_k);
        }
    }
}

/// Three hot experts share 400 slots: at least one spans three 64-slot tiles (the last partial);
/// five get nothing; top-2; hidden 200 and inter 136 leave K tails and partial column blocks.
#[test]
fn moe_wgmma_with_skewed_routing() {
    let name = "moe_wgmma_with_skewed_routing";
    if !hopper(name) {
        return;
    }
    assert_skewed(&check_moe(name, wgmma_op, &SKEWED));
}

/// A single token, top-1, four experts: one tile with one row.
#[test]
fn moe_wgmma_single_token() {
    let name = "moe_wgmma_single_token";
    if !hopper(name) {
        return;
    }
    let counts = check_moe(name, wgmma_op, &SINGLE_TOKEN);
    assert_eq!(counts.iter().sum::<usize>(), 1);
}

/// Hidden and inter several blocks wide (K = 1024 and 768: 32 and 24 k tiles through the three
/// stages), 300 tokens top-2 over 8 experts.
#[test]
fn moe_wgmma_with_long_k() {
    let name = "moe_wgmma_with_long_k";
    if !hopper(name) {
        return;
    }
    check_moe(name, wgmma_op, &LONG_K);
}

/// On compute capability 9.0 the self-check passes (within its bound); elsewhere it answers
/// `NotHopper` and the launcher refuses the device before launching anything.
#[test]
fn moe_wgmma_self_check_and_device_gate() {
    let name = "moe_wgmma_self_check_and_device_gate";
    let Some(gpu) = common::gpu(name) else {
        return;
    };
    let stream = gpu.stream();
    let check = moe_wgmma_self_check(&gpu.kernels, stream).expect("self-check");
    if gpu.device.compute_capability() == WGMMA_COMPUTE_CAPABILITY {
        match check {
            HopperCheck::Passed { rel_l2 } => assert!(rel_l2 <= WGMMA_SELF_CHECK_BOUND),
            other => panic!(
                "{name}: expected Passed on {}, got {other:?}",
                gpu.device.name()
            ),
        }
        return;
    }
    assert_eq!(check, HopperCheck::NotHopper);
    // Valid buffers of a small problem: only the device is refused.
    let shape = MoeScalars {
        tokens: 4,
        hidden: 64,
        inter: 64,
        experts: 2,
        top_k: 1,
    };
    let x = stream.alloc_zeros::<bf16>(4 * 64).expect("alloc");
    let w = stream.alloc_zeros::<bf16>(2 * 64 * 64).expect("alloc");
    let weights = stream.alloc_zeros::<f32>(4).expect("alloc");
    let offsets = stream.clone_htod(&[0i32, 4, 4]).expect("upload");
    let sorted = stream.clone_htod(&[0i32, 1, 2, 3]).expect("upload");
    let mut act = stream.alloc_zeros::<bf16>(4 * 64).expect("alloc");
    let mut out = stream.alloc_zeros::<f32>(4 * 64).expect("alloc");
    let result = moe_wgmma_gemm(
        &gpu.kernels,
        stream,
        &shape,
        MoeArgs {
            x: View::of(&x),
            w1: View::of(&w),
            w3: View::of(&w),
            w2: View::of(&w),
            topk_weights: View::of(&weights),
            expert_offsets: View::of(&offsets),
            sorted_slots: View::of(&sorted),
            act: ViewMut::of(&mut act),
            out: ViewMut::of(&mut out),
        },
    );
    match result {
        Err(CudaError::Kernel(KernelError::Unsupported { op, what, .. })) => {
            assert_eq!((op, what), ("moe_wgmma_gemm", "compute capability"));
        }
        other => panic!("{name}: expected the device to be refused, got {other:?}"),
    }
}

/// A rank holding one expert of a top-2 model (`moe_gemv`'s check), on the wgmma kernels.
#[test]
fn moe_wgmma_on_a_rank_holding_one_expert_of_top_2() {
    let name = "moe_wgmma_on_a_rank_holding_one_expert_of_top_2";
    if hopper(name) {
        let mut op: MoeOp = wgmma_op;
        check_one_held_expert(name, (&mut op, ActOrder::Slots), 40);
    }
}

/// [`moe_wgmma_gemm`] as a [`MoeOp`]: on the GPU only (the tests above run it where the device
/// does).
fn wgmma_op(
    on: common::On<'_>,
    s: &mixtral::cuda::args::MoeScalars,
    a: mixtral::cuda::args::MoeArgs<'_>,
) -> Result<(), mixtral::cuda::CudaError> {
    let (kernels, stream) = common::on_gpu(on);
    moe_wgmma_gemm(kernels, stream, s, a)
}
