//! `moe_grouped_gemm` (prefill expert GEMMs on tensor cores) and the `moe_experts` dispatch against
//! the CPU expert MLP, with the fixture of [`moe_gemv`](super::moe_gemv): the same routing uploaded
//! by hand, `act` and `out` compared per slot, every element written and nothing outside touched.
//! Token counts reach a few hundred so that one expert spans several 64-slot tiles, and hidden /
//! inter reach 208 / 168 so that the column blocks and the K tails (not multiples of 32) are crossed.

use mixtral::cuda::args::{MoeArgs, MoeScalars};
use mixtral::cuda::ops::{
    moe_experts, moe_experts_emulated, moe_grouped_gemm, moe_grouped_gemm_emulated, ActOrder,
    MOE_GROUPED_MIN_TOKENS,
};
use mixtral::cuda::CudaError;
use proptest::prelude::*;

use super::moe_gemv::{
    assert_skewed, cases, check_moe, check_one_held_expert, MoeCase, MoeOp, SINGLE_TOKEN, SKEWED,
};
use crate::common::{launch, On};

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn moe_grouped_matches_the_cpu_experts(
        case in cases(prop_oneof![Just(1usize), 1usize..8, 8usize..300]),
    ) {
        let counts = check_moe("moe_grouped_gemm", moe_grouped_op, &case);
        prop_assert_eq!(counts.iter().sum::<usize>(), case.tokens * case.top_k);
    }
}

/// Three hot experts share 400 slots: at least one spans three 64-slot tiles (the last partial);
/// five get nothing; top-2.
#[test]
fn moe_grouped_with_skewed_routing() {
    assert_skewed(&check_moe(
        "moe_grouped_with_skewed_routing",
        moe_grouped_op,
        &SKEWED,
    ));
}

/// A single token, top-1, four experts: one tile with one row.
#[test]
fn moe_grouped_single_token() {
    let counts = check_moe("moe_grouped_single_token", moe_grouped_op, &SINGLE_TOKEN);
    assert_eq!(counts.iter().sum::<usize>(), 1);
}

/// `moe_experts` gives the reference on both sides of its threshold.
#[test]
fn moe_experts_on_both_sides_of_the_threshold() {
    for (i, tokens) in [MOE_GROUPED_MIN_TOKENS - 1, MOE_GROUPED_MIN_TOKENS]
        .into_iter()
        .enumerate()
    {
        let case = MoeCase {
            tokens,
            hidden: 64,
            inter: 128,
            experts: 8,
            top_k: 2,
            cold: 0,
            seed: 20 + i as u64,
        };
        check_moe("moe_experts", moe_experts_op, &case);
    }
}

/// A rank holding one expert of a top-2 model: 40 tokens, so the grouped kernels' tile list is
/// walked with the rank's range of the router's offsets (the check of `moe_gemv`'s test).
#[test]
fn moe_grouped_on_a_rank_holding_one_expert_of_top_2() {
    let mut op: MoeOp = moe_grouped_op;
    let name = "moe_grouped_on_a_rank_holding_one_expert_of_top_2";
    check_one_held_expert(name, (&mut op, ActOrder::Slots), 40);
}

/// [`moe_grouped_gemm`] on the GPU or the emulator.
fn moe_grouped_op(on: On<'_>, s: &MoeScalars, a: MoeArgs<'_>) -> Result<(), CudaError> {
    launch!(on, moe_grouped_gemm | moe_grouped_gemm_emulated, s, a)
}

/// [`moe_experts`] on the GPU or the emulator.
fn moe_experts_op(on: On<'_>, s: &MoeScalars, a: MoeArgs<'_>) -> Result<(), CudaError> {
    launch!(on, moe_experts | moe_experts_emulated, s, a)
}
