//! `router` against `cpu::matmul::matmul` (the gate logits, f32 accumulation) and
//! `cpu::router::{route, group_by_expert}` applied to the device's own logits: the chosen experts
//! and the grouping exact, the weights close. Gate rows are duplicated on purpose so that scores tie
//! exactly (the lower expert must win); fewer tokens than experts, 1 token, top_k = experts. One
//! counter of finished blocks serves every launch: each must leave it at 0 for the next.

use mixtral::cpu::matmul::matmul;
use mixtral::cpu::router::{group_by_expert, route};
use mixtral::cuda::args::{RouterArgs, RouterScalars};
use mixtral::cuda::ops::{router, router_emulated};
use mixtral::dtype::WeightSlice;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::{
    self, assert_close, f32_bound, launch, random_values, to_bf16, to_f32, Guarded,
};

#[test]
fn router_picks_and_groups_the_host_experts() {
    let gpu = common::target("router_picks_and_groups_the_host_experts");
    let strategy =
        prop::sample::select(vec![1usize, 2, 3, 8, 16, 60, 256]).prop_flat_map(|experts| {
            (
                Just(experts),
                1..=experts.min(8),
                prop::sample::select(vec![1usize, 2, 5, 9, 33]),
                prop::sample::select(vec![8usize, 16, 136, 1024]),
                any::<u64>(),
                any::<bool>(),
            )
        });
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(24, 8)));
    let done = std::cell::RefCell::new(Guarded::with(gpu.stream(), &[0u32]));
    runner
        .run(
            &strategy,
            |(experts, top_k, tokens, hidden, seed, duplicate)| {
                let stream = gpu.stream();
                let mut done = done.borrow_mut();
                let x = to_bf16(&random_values(seed, tokens * hidden, 1.0));
                let mut gate = to_bf16(&random_values(seed ^ 1, experts * hidden, 0.5));
                let mut ties = Vec::new();
                if duplicate && experts >= 2 {
                    for (from, to) in [(0, experts - 1), (1 % experts, experts / 2)] {
                        if from != to {
                            let row: Vec<_> = gate[from * hidden..(from + 1) * hidden].to_vec();
                            gate[to * hidden..(to + 1) * hidden].copy_from_slice(&row);
                            ties.push((from, to));
                        }
                    }
                }

                let slots = tokens * top_k;
                let x_d = Guarded::with(stream, &x);
                let gate_d = Guarded::with(stream, &gate);
                let mut logits = Guarded::<f32>::poisoned(stream, tokens * experts);
                let mut ids = Guarded::<i32>::poisoned(stream, slots);
                let mut weights = Guarded::<f32>::poisoned(stream, slots);
                let mut counts = Guarded::<i32>::poisoned(stream, experts);
                let mut offsets = Guarded::<i32>::poisoned(stream, experts + 1);
                let mut sorted = Guarded::<i32>::poisoned(stream, slots);
                launch!(
                    gpu.on(),
                    router | router_emulated,
                    &RouterScalars {
                        tokens: tokens as u32,
                        hidden: hidden as u32,
                        experts: experts as u32,
                        top_k: top_k as u32,
                    },
                    RouterArgs {
                        x: x_d.dev(),
                        gate: gate_d.dev(),
                        logits: logits.dev_mut(),
                        topk_ids: ids.dev_mut(),
                        topk_weights: weights.dev_mut(),
                        expert_counts: counts.dev_mut(),
                        expert_offsets: offsets.dev_mut(),
                        sorted_slots: sorted.dev_mut(),
                        done: done.dev_mut(),
                    },
                )
                .expect("router");
                prop_assert_eq!(
                    done.read(stream, "done"),
                    vec![0],
                    "the counter left for the next launch"
                );
                let logits = logits.read_written(stream, "logits");
                let ids = ids.read_written(stream, "topk_ids");
                let weights = weights.read_written(stream, "topk_weights");
                let counts = counts.read_written(stream, "expert_counts");
                let offsets = offsets.read_written(stream, "expert_offsets");
                let sorted = sorted.read_written(stream, "sorted_slots");

                let mut reference = vec![0.0f32; tokens * experts];
                matmul(
                    &to_f32(&x),
                    WeightSlice::BF16(&gate),
                    experts,
                    hidden,
                    &mut reference,
                );
                // f32 logits summing `hidden` exact bf16 products: only the order differs.
                assert_close("router logits", &logits, &reference, f32_bound(hidden));
                for t in 0..tokens {
                    for &(a, b) in &ties {
                        prop_assert_eq!(
                            logits[t * experts + a].to_bits(),
                            logits[t * experts + b].to_bits(),
                            "duplicated gate rows {} and {} must give equal logits",
                            a,
                            b
                        );
                    }
                }

                let routing = route(&logits, experts, top_k);
                let expected_ids: Vec<i32> = routing.experts.iter().map(|&e| e as i32).collect();
                prop_assert_eq!(&ids, &expected_ids, "topk_ids");
                // Softmax and renormalisation in f32 of the same logits (accurate expf both sides):
                // a few f32 roundings over at most `experts` terms.
                assert_close(
                    "topk_weights",
                    &weights,
                    &routing.weights,
                    f32_bound(experts),
                );
                let groups = group_by_expert(&routing, experts);
                let as_i32 = |v: &[usize]| v.iter().map(|&n| n as i32).collect::<Vec<_>>();
                prop_assert_eq!(&counts, &as_i32(&groups.counts), "expert_counts");
                prop_assert_eq!(&offsets, &as_i32(&groups.offsets), "expert_offsets");
                prop_assert_eq!(&sorted, &as_i32(&groups.assignments), "sorted_slots");
                Ok(())
            },
        )
        .unwrap();
}
