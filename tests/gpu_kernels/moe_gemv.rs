//! `moe_gemv` (decode-batch expert GEMV) against the CPU expert MLP, and the fixture both MoE kernel
//! tests share ([`MoeCase`], [`check_moe`]): random bf16 weights, a routing built on the CPU with
//! `route` / `group_by_expert` and uploaded as the router's buffers (so only the MoE kernels are under
//! test), `act` compared per slot with `silu(w1 x) * (w3 x)`, `out` per slot with
//! `weight * expert_mlp(x)`, and the per-token sum of `out` with `moe_block`.

use half::bf16;
use mixtral::cpu::matmul::matmul;
use mixtral::cpu::moe::{moe_block, Expert};
use mixtral::cpu::router::{group_by_expert, route};
use mixtral::cuda::args::{MoeArgs, MoeScalars};
use mixtral::cuda::ops::{moe_gemv, moe_gemv_emulated, moe_mma, moe_mma_emulated, ActOrder};
use mixtral::cuda::CudaError;
use mixtral::dtype::WeightSlice;
use proptest::prelude::*;

use crate::common::{self, launch, Guarded, On, Poison};
use crate::shared::moe::expert_slots;

/// One random MoE problem.
#[derive(Debug, Clone)]
pub struct MoeCase {
    /// Tokens.
    pub tokens: usize,
    /// Hidden size (a multiple of 8).
    pub hidden: usize,
    /// Intermediate size (a multiple of 8).
    pub inter: usize,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Experts the router is biased away from (bit e: expert e), so that they get no slots.
    pub cold: u32,
    /// Seed of every random value.
    pub seed: u64,
}

/// Three hot experts share 400 slots (at least one spans three 64-slot tiles, the last partial),
/// five get none; top-2; hidden 200 and inter 136 leave K tails and partial column blocks.
pub const SKEWED: MoeCase = MoeCase {
    tokens: 200,
    hidden: 200,
    inter: 136,
    experts: 8,
    top_k: 2,
    cold: 0b0111_1100,
    seed: 11,
};

/// A single token, top-1, four experts: one tile with one row.
pub const SINGLE_TOKEN: MoeCase = MoeCase {
    tokens: 1,
    hidden: 64,
    inter: 96,
    experts: 4,
    top_k: 1,
    cold: 0,
    seed: 3,
};

/// Hidden and inter many k stages long (1024 and 768), 300 tokens top-2 over 8 experts.
pub const LONG_K: MoeCase = MoeCase {
    tokens: 300,
    hidden: 1024,
    inter: 768,
    experts: 8,
    top_k: 2,
    cold: 0,
    seed: 5,
};

/// Checks that [`SKEWED`]'s routing is as it says: the cold experts got nothing, one expert more
/// than two 64-slot tiles.
pub fn assert_skewed(counts: &[usize]) {
    assert!(
        counts[2..7].iter().all(|&c| c == 0),
        "cold experts got slots: {counts:?}"
    );
    assert!(
        counts.iter().any(|&c| c > 128),
        "no expert spans three tiles: {counts:?}"
    );
}

/// Generated cases: `tokens` from the strategy, hidden / inter odd and even multiples of 8 (K tails
/// shorter than a GEMM tile), 1 to 8 experts, top-1 and top-2, some experts cold.
pub fn cases(tokens: impl Strategy<Value = usize>) -> impl Strategy<Value = MoeCase> {
    (
        tokens,
        1usize..=26,
        1usize..=21,
        prop_oneof![Just(4usize), Just(8usize), 1usize..=8],
        1usize..=2,
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(tokens, hidden8, inter8, experts, k, cold, seed)| MoeCase {
                tokens,
                hidden: hidden8 * 8,
                inter: inter8 * 8,
                experts,
                top_k: k.min(experts),
                // Never every expert cold.
                cold: cold & ((1u32 << experts) - 1) & !1,
                seed,
            },
        )
}

/// The op under test, issued as [`On`] says: [`moe_gemv_op`] or one with its signature.
pub type MoeOp = fn(On<'_>, &MoeScalars, MoeArgs<'_>) -> Result<(), CudaError>;

/// An op with [`MoeOp`]'s signature that may hold state (a scratch), and where it leaves `act`.
pub type MoeOpMut<'o> = dyn FnMut(On<'_>, &MoeScalars, MoeArgs<'_>) -> Result<(), CudaError> + 'o;

/// [`moe_gemv`] on the GPU or the emulator.
pub fn moe_gemv_op(on: On<'_>, s: &MoeScalars, a: MoeArgs<'_>) -> Result<(), CudaError> {
    launch!(on, moe_gemv | moe_gemv_emulated, s, a)
}

/// [`moe_mma`] on the GPU or the emulator.
pub fn moe_mma_op(on: On<'_>, s: &MoeScalars, a: MoeArgs<'_>) -> Result<(), CudaError> {
    launch!(on, moe_mma | moe_mma_emulated, s, a)
}

/// Runs `op` on `case` and compares `act` and `out` with the CPU reference; `name` labels failures.
/// Returns the slots each expert received (the routing is built even when there is no device).
pub fn check_moe(name: &str, mut op: MoeOp, case: &MoeCase) -> Vec<usize> {
    check_moe_with(name, (&mut op, ActOrder::Slots), case)
}

/// [`check_moe`] for an op that may hold state, with `act` read in its order.
pub fn check_moe_with(
    name: &str,
    (op, order): (&mut MoeOpMut<'_>, ActOrder),
    case: &MoeCase,
) -> Vec<usize> {
    let &MoeCase {
        tokens,
        hidden,
        inter,
        experts,
        top_k,
        cold,
        seed,
    } = case;
    let slots = tokens * top_k;

    // Inputs, rounded through bf16 (what the device sees). Column 0 of x is positive, so a strongly
    // negative router weight on it keeps a cold expert out of every token's top-k.
    let mut x = common::random_values(seed, tokens * hidden, 1.0);
    for row in x.chunks_exact_mut(hidden) {
        row[0] = 0.75 + 0.25 * row[0];
    }
    let x = common::round_bf16(&x);
    let x_bf16 = common::to_bf16(&x);
    let w_scale = 2.0 / (hidden as f32).sqrt();
    let w1 = common::to_bf16(&common::random_values(
        seed ^ 1,
        experts * inter * hidden,
        w_scale,
    ));
    let w3 = common::to_bf16(&common::random_values(
        seed ^ 2,
        experts * inter * hidden,
        w_scale,
    ));
    let w2 = common::to_bf16(&common::random_values(
        seed ^ 3,
        experts * hidden * inter,
        2.0 / (inter as f32).sqrt(),
    ));
    let mut router = common::random_values(seed ^ 4, experts * hidden, 0.5);
    for (e, row) in router.chunks_exact_mut(hidden).enumerate() {
        if cold & (1 << e) != 0 {
            row[0] = -64.0;
        }
    }
    let router = common::to_bf16(&router);

    // The routing, on the CPU.
    let mut logits = vec![0.0f32; tokens * experts];
    matmul(&x, WeightSlice::BF16(&router), experts, hidden, &mut logits);
    let routing = route(&logits, experts, top_k);
    let groups = group_by_expert(&routing, experts);
    let offsets: Vec<i32> = groups.offsets.iter().map(|&o| o as i32).collect();
    let sorted: Vec<i32> = groups.assignments.iter().map(|&a| a as i32).collect();

    // The device run.
    let gpu = common::target(name);
    let stream = gpu.stream();
    let d_x = Guarded::with(stream, &x_bf16);
    let d_w1 = Guarded::with(stream, &w1);
    let d_w3 = Guarded::with(stream, &w3);
    let d_w2 = Guarded::with(stream, &w2);
    let d_weights = Guarded::with(stream, &routing.weights);
    let d_offsets = Guarded::with(stream, &offsets);
    let d_sorted = Guarded::with(stream, &sorted);
    let mut d_act = Guarded::<bf16>::poisoned(stream, slots * inter);
    let mut d_out = Guarded::<f32>::poisoned(stream, slots * hidden);
    let shape = MoeScalars {
        tokens: tokens as u32,
        hidden: hidden as u32,
        inter: inter as u32,
        experts: experts as u32,
        top_k: top_k as u32,
    };
    op(
        gpu.on(),
        &shape,
        MoeArgs {
            x: d_x.dev(),
            w1: d_w1.dev(),
            w3: d_w3.dev(),
            w2: d_w2.dev(),
            topk_weights: d_weights.dev(),
            expert_offsets: d_offsets.dev(),
            sorted_slots: d_sorted.dev(),
            act: d_act.dev_mut(),
            out: d_out.dev_mut(),
        },
    )
    .unwrap_or_else(|e| panic!("{name} {case:?}: {e}"));
    stream.synchronize();
    let act = common::to_f32(&d_act.read_written(stream, "act"));
    let act = order.in_slot_order(act, &sorted, inter, f32::NAN);
    let out = d_out.read_written(stream, "out");
    // The inputs are untouched, guards included.
    assert_eq!(d_x.read(stream, "x"), x_bf16, "{name}: x changed");
    assert_eq!(d_w1.read(stream, "w1"), w1, "{name}: w1 changed");
    assert_eq!(d_w3.read(stream, "w3"), w3, "{name}: w3 changed");
    assert_eq!(d_w2.read(stream, "w2"), w2, "{name}: w2 changed");

    // The CPU reference, expert by expert over the same grouping.
    let matrix = inter * hidden;
    let experts_cpu: Vec<Expert<'_>> = (0..experts)
        .map(|e| Expert {
            w1: WeightSlice::BF16(&w1[e * matrix..(e + 1) * matrix]).into(),
            w2: WeightSlice::BF16(&w2[e * matrix..(e + 1) * matrix]).into(),
            w3: WeightSlice::BF16(&w3[e * matrix..(e + 1) * matrix]).into(),
        })
        .collect();
    let reference = expert_slots(&x, &experts_cpu, &routing, &groups, hidden, inter);
    // act: f32 sums of `hidden` exact products, silu and product in f32, one bf16 rounding.
    let act_bound = common::bf16_bound(hidden, 1);
    common::assert_close(
        &format!("{name} act {case:?}"),
        &act,
        &reference.act,
        act_bound,
    );
    // out (f32): the device rounds act to bf16 before the down projection, the reference does
    // not; that rounding's error propagates through w2 (derived from the data), plus f32 sums.
    let w2_f32 = common::to_f32(&w2);
    let propagated: f64 = (0..slots)
        .map(|s| {
            let e = routing.experts[s];
            common::propagation(
                &w2_f32[e * matrix..(e + 1) * matrix],
                &reference.act[s * inter..(s + 1) * inter],
                routing.weights[s],
            )
        })
        .sum();
    let out_bound = common::propagated_bound(propagated, &reference.out, hidden + inter);
    common::assert_close(
        &format!("{name} out {case:?}"),
        &out,
        &reference.out,
        out_bound,
    );

    // Summed over each token's slots, `out` is the MoE block.
    let mut block_ref = vec![0.0f32; tokens * hidden];
    moe_block(
        &x,
        Some(WeightSlice::BF16(&router)),
        &experts_cpu,
        top_k,
        hidden,
        inter,
        &mut block_ref,
    );
    let mut block = vec![0.0f32; tokens * hidden];
    for (s, row) in out.chunks_exact(hidden).enumerate() {
        let t = s / top_k;
        for (b, &v) in block[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
            *b += v;
        }
    }
    // The slots' independent act roundings add up in the block: the same propagated sum.
    let block_bound = common::propagated_bound(propagated, &block_ref, hidden + inter);
    common::assert_close(
        &format!("{name} block {case:?}"),
        &block,
        &block_ref,
        block_bound,
    );
    groups.counts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn moe_gemv_matches_the_cpu_experts(
        case in cases(prop_oneof![Just(1usize), 1usize..8, 8usize..40]),
    ) {
        let counts = check_moe("moe_gemv", moe_gemv_op, &case);
        prop_assert_eq!(counts.iter().sum::<usize>(), case.tokens * case.top_k);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// The expert MLP on tensor cores (`moe_mma`) over `check_moe`'s cases and bounds, up to 160
    /// tokens (passes of 8, 16 and 32 slots, several per expert).
    #[test]
    fn moe_mma_matches_the_cpu_experts(
        case in cases(prop_oneof![Just(1usize), 1usize..17, 17usize..160]),
    ) {
        let counts = check_moe("moe_mma", moe_mma_op, &case);
        prop_assert_eq!(counts.iter().sum::<usize>(), case.tokens * case.top_k);
    }
}

/// `moe_mma` on a rank holding one expert of a top-2 model (as `moe_gemv`'s test).
#[test]
fn moe_mma_on_a_rank_holding_one_expert_of_top_2() {
    let name = "moe_mma_on_a_rank_holding_one_expert_of_top_2";
    let mut op: MoeOp = moe_mma_op;
    check_one_held_expert(name, (&mut op, ActOrder::Slots), 40);
}

/// A fixed case with experts that receive no slot, fewer tokens than experts, top-2.
#[test]
fn moe_gemv_with_idle_experts() {
    let case = MoeCase {
        tokens: 3,
        hidden: 64,
        inter: 40,
        experts: 8,
        top_k: 2,
        cold: 0b1010_0000,
        seed: 7,
    };
    let counts = check_moe("moe_gemv_with_idle_experts", moe_gemv_op, &case);
    assert_eq!(
        (counts[5], counts[7]),
        (0, 0),
        "cold experts got slots: {counts:?}"
    );
}

/// A rank of an expert-parallel split holding one expert of a top-2 model (fewer experts than each
/// token uses): given that expert's weights and its range of the router's offsets
/// (`offsets[e..e + 2]`, absolute slot positions), `moe_gemv` writes exactly the slots routed to it,
/// within `check_moe`'s bounds, and never touches the others (they stay poisoned).
#[test]
fn moe_gemv_on_a_rank_holding_one_expert_of_top_2() {
    let name = "moe_gemv_on_a_rank_holding_one_expert_of_top_2";
    let mut op: MoeOp = moe_gemv_op;
    check_one_held_expert(name, (&mut op, ActOrder::Slots), 5);
}

/// [`moe_gemv_on_a_rank_holding_one_expert_of_top_2`] for `op` (which leaves `act` in `order`), over
/// `tokens` tokens of hidden 64, inter 40 (K and N tails), 8 experts, top-2.
pub fn check_one_held_expert(
    name: &str,
    (op, order): (&mut MoeOpMut<'_>, ActOrder),
    tokens: usize,
) {
    let (hidden, inter, experts, top_k, seed) = (64, 40, 8, 2, 11u64);
    let slots = tokens * top_k;
    let matrix = inter * hidden;
    let x = common::round_bf16(&common::random_values(seed, tokens * hidden, 1.0));
    let w_scale = 2.0 / (hidden as f32).sqrt();
    let w1 = common::to_bf16(&common::random_values(seed ^ 1, experts * matrix, w_scale));
    let w3 = common::to_bf16(&common::random_values(seed ^ 2, experts * matrix, w_scale));
    let w2_scale = 2.0 / (inter as f32).sqrt();
    let w2 = common::to_bf16(&common::random_values(seed ^ 3, experts * matrix, w2_scale));
    let router = common::to_bf16(&common::random_values(seed ^ 4, experts * hidden, 0.5));
    let mut logits = vec![0.0f32; tokens * experts];
    matmul(&x, WeightSlice::BF16(&router), experts, hidden, &mut logits);
    let routing = route(&logits, experts, top_k);
    let groups = group_by_expert(&routing, experts);
    // The expert with the most slots is the one held (it has at least one: 10 slots, 8 experts).
    let held = (0..experts).max_by_key(|&e| groups.counts[e]).unwrap();
    let offsets: Vec<i32> = groups.offsets[held..held + 2]
        .iter()
        .map(|&o| o as i32)
        .collect();
    let sorted: Vec<i32> = groups.assignments.iter().map(|&a| a as i32).collect();
    let gpu = common::target(name);
    let stream = gpu.stream();
    let one = |w: &[bf16]| Guarded::with(stream, &w[held * matrix..(held + 1) * matrix]);
    let (d_w1, d_w3, d_w2) = (one(&w1), one(&w3), one(&w2));
    let d_x = Guarded::with(stream, &common::to_bf16(&x));
    let d_weights = Guarded::with(stream, &routing.weights);
    let d_offsets = Guarded::with(stream, &offsets);
    let d_sorted = Guarded::with(stream, &sorted);
    let mut d_act = Guarded::<bf16>::poisoned(stream, slots * inter);
    let mut d_out = Guarded::<f32>::poisoned(stream, slots * hidden);
    let shape = MoeScalars {
        tokens: tokens as u32,
        hidden: hidden as u32,
        inter: inter as u32,
        experts: 1,
        top_k: top_k as u32,
    };
    let args = MoeArgs {
        x: d_x.dev(),
        w1: d_w1.dev(),
        w3: d_w3.dev(),
        w2: d_w2.dev(),
        topk_weights: d_weights.dev(),
        expert_offsets: d_offsets.dev(),
        sorted_slots: d_sorted.dev(),
        act: d_act.dev_mut(),
        out: d_out.dev_mut(),
    };
    op(gpu.on(), &shape, args).unwrap_or_else(|e| panic!("{name}: {e}"));
    stream.synchronize();
    let act = d_act.read(stream, "act");
    let out = d_out.read(stream, "out");
    // In slot order: a row the op left alone stays poisoned.
    let act = order.in_slot_order(act, &sorted, inter, bf16::POISON);

    let experts_cpu: Vec<Expert<'_>> = (0..experts)
        .map(|e| Expert {
            w1: WeightSlice::BF16(&w1[e * matrix..(e + 1) * matrix]).into(),
            w2: WeightSlice::BF16(&w2[e * matrix..(e + 1) * matrix]).into(),
            w3: WeightSlice::BF16(&w3[e * matrix..(e + 1) * matrix]).into(),
        })
        .collect();
    let reference = expert_slots(&x, &experts_cpu, &routing, &groups, hidden, inter);
    let mine: Vec<usize> = (0..slots).filter(|&s| routing.experts[s] == held).collect();
    let rows = |v: &[f32], width: usize| -> Vec<f32> {
        mine.iter()
            .flat_map(|&s| v[s * width..(s + 1) * width].iter().copied())
            .collect()
    };
    // The bounds of `check_moe`, over the held expert's slots.
    let act_f32 = common::to_f32(&act);
    let act_bound = common::bf16_bound(hidden, 1);
    common::assert_close(
        name,
        &rows(&act_f32, inter),
        &rows(&reference.act, inter),
        act_bound,
    );
    let w2_f32 = common::to_f32(&w2[held * matrix..(held + 1) * matrix]);
    let propagated: f64 = mine
        .iter()
        .map(|&s| {
            let a = &reference.act[s * inter..(s + 1) * inter];
            common::propagation(&w2_f32, a, routing.weights[s])
        })
        .sum();
    let want = rows(&reference.out, hidden);
    let out_bound = common::propagated_bound(propagated, &want, hidden + inter);
    common::assert_close(name, &rows(&out, hidden), &want, out_bound);
    // Every other slot is untouched, in `act` and in `out`.
    for s in (0..slots).filter(|s| !mine.contains(s)) {
        let untouched = out[s * hidden..(s + 1) * hidden]
            .iter()
            .all(|&v| f32::same_bits(v, f32::POISON))
            && act[s * inter..(s + 1) * inter]
                .iter()
                .all(|&v| bf16::same_bits(v, bf16::POISON));
        assert!(
            untouched,
            "{name}: slot {s} (expert {}) was written",
            routing.experts[s]
        );
    }
}
