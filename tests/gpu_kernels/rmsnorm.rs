//! `rmsnorm` with each [`Addend`] against `cpu::norm::{rms_norm, add_rms_norm}`: odd widths, 1 row,
//! several addends per row; the bf16 output within one bf16 rounding of the reference (the norm is
//! computed in f32 and rounded once), the updated f32 residual within 1e-6 (the same f32 additions in
//! the same order: equal unless an addition is contracted; untouched without an addend).

use half::bf16;
use mixtral::cpu::norm::{add_rms_norm, rms_norm};
use mixtral::cuda::args::{RmsnormArgs, RmsnormScalars};
use mixtral::cuda::memory::AnyView;
use mixtral::cuda::ops::{rmsnorm, rmsnorm_emulated};
use mixtral::dtype::WeightSlice;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::{
    self, assert_close, bf16_bound, launch, random_values, round_bf16, to_bf16, to_f32, Guarded,
};

/// Which addend the case uses.
#[derive(Debug, Clone, Copy)]
enum Kind {
    None,
    Bf16,
    F32,
}

#[test]
fn rmsnorm_matches_the_cpu_reference_for_every_addend() {
    let target = common::target("rmsnorm_matches_the_cpu_reference_for_every_addend");
    let strategy = (
        1usize..9,
        prop::sample::select(vec![1usize, 3, 255, 257, 1000, 4096, 4099]),
        prop::sample::select(vec![Kind::None, Kind::Bf16, Kind::F32]),
        1usize..4,
        any::<u64>(),
        prop::sample::select(vec![1e-5f32, 1e-6, 0.1]),
    );
    let mut runner = TestRunner::new(Config::with_cases(target.cases(24, 8)));
    runner
        .run(&strategy, |(rows, hidden, kind, count, seed, eps)| {
            let stream = target.stream();
            let residual = random_values(seed, rows * hidden, 4.0);
            let weight: Vec<f32> = random_values(seed ^ 2, hidden, 0.5)
                .iter()
                .map(|v| 1.0 + v)
                .collect();
            let weight_bf16 = to_bf16(&weight);
            let count = if matches!(kind, Kind::None) { 0 } else { count };
            let mut addend = random_values(seed ^ 3, rows * count * hidden, 2.0);
            if matches!(kind, Kind::Bf16) {
                addend = round_bf16(&addend);
            }

            // Reference: the addends added one after the other, then the norm.
            let mut ref_residual = residual.clone();
            let mut reference = vec![0.0f32; rows * hidden];
            let w = WeightSlice::BF16(&weight_bf16);
            if count == 0 {
                rms_norm(&ref_residual, w, eps, &mut reference);
            } else {
                for a in 0..count {
                    let delta: Vec<f32> = (0..rows)
                        .flat_map(|r| {
                            let start = (r * count + a) * hidden;
                            addend[start..start + hidden].iter().copied()
                        })
                        .collect();
                    add_rms_norm(&mut ref_residual, &delta, w, eps, &mut reference);
                }
            }

            let mut residual_d = Guarded::with(stream, &residual);
            let weight_d = Guarded::with(stream, &weight_bf16);
            let add_bf16 = Guarded::with(stream, &to_bf16(&addend));
            let add_f32 = Guarded::with(stream, &addend);
            let mut out = Guarded::<bf16>::poisoned(stream, rows * hidden);
            let addend = match kind {
                Kind::None => None,
                Kind::Bf16 => Some(AnyView::Bf16(add_bf16.dev())),
                Kind::F32 => Some(AnyView::F32(add_f32.dev())),
            };
            launch!(
                target.on(),
                rmsnorm | rmsnorm_emulated,
                &RmsnormScalars {
                    rows: rows as u32,
                    hidden: hidden as u32,
                    addend_count: count as u32,
                    eps,
                },
                RmsnormArgs {
                    residual: residual_d.dev_mut(),
                    addend,
                    weight: weight_d.dev(),
                    out: out.dev_mut(),
                },
            )
            .expect("rmsnorm");
            let out = to_f32(&out.read_written(stream, "out"));
            let new_residual = residual_d.read(stream, "residual");
            // f32 sum of `hidden` squares, rsqrt and product, then one rounding at the bf16 store.
            assert_close("rmsnorm out", &out, &reference, bf16_bound(hidden, 1));
            if count == 0 {
                prop_assert_eq!(
                    &new_residual,
                    &residual,
                    "residual changed without an addend"
                );
            } else {
                assert_close("rmsnorm residual", &new_residual, &ref_residual, 1e-6);
            }
            Ok(())
        })
        .unwrap();
}
