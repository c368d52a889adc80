//! What the Hopper-only (sm_90a) expert and dense kernels on CUTLASS share: the one compute
//! capability they run on, and the self-check an engine runs once before using them. The check
//! runs a fixed seeded grouped MoE problem ([`SelfCheckProblem`]: 100 tokens top-2 over 8 experts)
//! through the checked op and through [`moe_grouped_gemm`] (mma.sync, every GPU) and compares
//! their `act` and `out` by relative L2 difference.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;

use super::moe_grouped::moe_grouped_gemm;
use crate::cpu::router::{group_by_expert, route};
use crate::cuda::args::{MoeArgs, MoeScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::memory::{copy_to_host, DeviceArena, DeviceBuffer};
use crate::cuda::module::Kernels;
use crate::sampling::Rng;

/// The one compute capability the Hopper kernels run on (sm_90a SASS: H100, H200).
pub const HOPPER_COMPUTE_CAPABILITY: (i32, i32) = (9, 0);

/// Largest relative L2 difference between a checked bf16 op and [`moe_grouped_gemm`] (on `act` and
/// on `out`, each) that the self-check accepts: the bound the GPU tests put on every bf16
/// path. The two differ only in the order of f32 accumulation, so a correct kernel is far below it.
pub const HOPPER_SELF_CHECK_BOUND: f64 = 1e-2;

/// The compute capability of the device `stream` issues on.
pub(super) fn compute_capability(stream: &CudaStream) -> Result<(i32, i32), CudaError> {
    stream
        .context()
        .compute_capability()
        .map_err(CudaError::driver("reading the compute capability"))
}

/// Refuses a compute capability other than 9.0 ([`HOPPER_COMPUTE_CAPABILITY`], the one the sm_90a
/// CUTLASS kernels are built for).
pub(super) fn hopper_only(c: &Check, capability: (i32, i32)) -> Result<(), CudaError> {
    if capability != HOPPER_COMPUTE_CAPABILITY {
        let (major, minor) = capability;
        let value = usize::try_from(major * 10 + minor).unwrap_or(0);
        return Err(c.unsupported(
            "compute capability",
            value,
            format!(
                "the CUTLASS kernels run only on compute capability 9.0 (sm_90a), not {major}.{minor}"
            ),
        ));
    }
    Ok(())
}

/// What the self-check of a Hopper kernel ([`moe_cutlass_self_check`](super::moe_cutlass_self_check),
/// [`linear_cutlass_self_check`](super::linear_cutlass_self_check)) found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HopperCheck {
    /// The device's compute capability is not 9.0 (or the build lacks the kernel): nothing was
    /// run, use [`moe_grouped_gemm`].
    NotHopper,
    /// The checked kernel agreed with [`moe_grouped_gemm`]: the larger of the relative L2
    /// differences of `act` and `out` is `rel_l2` <= [`HOPPER_SELF_CHECK_BOUND`].
    Passed {
        /// The larger of the two relative L2 differences.
        rel_l2: f64,
    },
    /// The checked kernel disagreed with [`moe_grouped_gemm`] (or left an element unwritten, or
    /// wrote a non-finite value: `rel_l2` is then infinite): do not use it.
    Failed {
        /// The larger of the two relative L2 differences.
        rel_l2: f64,
    },
}

impl HopperCheck {
    /// True only for [`HopperCheck::Passed`].
    pub fn passed(&self) -> bool {
        matches!(self, HopperCheck::Passed { .. })
    }

    /// The verdict of two checks that must both pass: the first that did not pass, else
    /// [`HopperCheck::Passed`] with the larger difference.
    pub fn and(self, other: HopperCheck) -> HopperCheck {
        match (self, other) {
            (HopperCheck::Passed { rel_l2: a }, HopperCheck::Passed { rel_l2: b }) => {
                HopperCheck::Passed { rel_l2: a.max(b) }
            }
            (HopperCheck::Passed { .. }, failed) => failed,
            (failed, _) => failed,
        }
    }
}

/// Seed of the self-check problem (fixed: the check is the same on every run).
pub(super) const SELF_CHECK_SEED: u64 = 0x5eed_0090;

/// Hidden and inter of the bf16 self-check problem.
const SELF_CHECK_DIMS: (u32, u32) = (264, 376);

/// The random grouped MoE problem the self-checks run, on the host.
#[derive(Debug, Clone)]
pub(super) struct SelfCheckProblem {
    pub shape: MoeScalars,
    pub x: Vec<bf16>,
    pub w1: Vec<bf16>,
    pub w3: Vec<bf16>,
    pub w2: Vec<bf16>,
    pub topk_weights: Vec<f32>,
    pub expert_offsets: Vec<i32>,
    pub sorted_slots: Vec<i32>,
}

/// `len` uniform values in `[-scale, scale)` as bf16.
pub(super) fn random_bf16(rng: &mut Rng, len: usize, scale: f64) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f64((rng.next_f64() * 2.0 - 1.0) * scale))
        .collect()
}

/// 100 tokens top-2 over 8 experts, hidden and inter from `(hidden, inter)`: [`SELF_CHECK_DIMS`]
/// (264 and 376) are multiples of 8 but not of the 32-wide k stage nor of the 64 / 128 output
/// columns of a block, so K tails and partial column blocks are crossed in the checked kernel and
/// in [`moe_grouped_gemm`]. The router logits are random plus a per-expert bias: expert 0 never
/// wins (an idle expert), expert 7 is in almost every token's top-2 (several 64-slot tiles, the
/// last one partial), the others share the rest unevenly. The grouping is the CPU router's.
pub(super) fn self_check_problem(seed: u64, (hidden, inter): (u32, u32)) -> SelfCheckProblem {
    let shape = MoeScalars {
        tokens: 100,
        hidden,
        inter,
        experts: 8,
        top_k: 2,
    };
    let [tokens, hidden, inter, experts, top_k] = [
        shape.tokens,
        shape.hidden,
        shape.inter,
        shape.experts,
        shape.top_k,
    ]
    .map(|v| v as usize);
    let mut rng = Rng::new(seed);
    let x = random_bf16(&mut rng, tokens * hidden, 1.0);
    let matrix = experts * inter * hidden;
    let w1 = random_bf16(&mut rng, matrix, 2.0 / (hidden as f64).sqrt());
    let w3 = random_bf16(&mut rng, matrix, 2.0 / (hidden as f64).sqrt());
    let w2 = random_bf16(&mut rng, matrix, 2.0 / (inter as f64).sqrt());
    let bias = [-30.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 6.0];
    let logits: Vec<f32> = (0..tokens * experts)
        .map(|i| (rng.next_f64() * 2.0 - 1.0 + bias[i % experts]) as f32)
        .collect();
    let routing = route(&logits, experts, top_k);
    let groups = group_by_expert(&routing, experts);
    SelfCheckProblem {
        shape,
        x,
        w1,
        w3,
        w2,
        topk_weights: routing.weights,
        // Below 2^31: 200 slots.
        expert_offsets: groups.offsets.iter().map(|&o| o as i32).collect(),
        sorted_slots: groups.assignments.iter().map(|&a| a as i32).collect(),
    }
}

/// `||out - reference|| / ||reference||`, infinite when anything is not finite (an unwritten NaN
/// included) or the reference is zero.
pub(super) fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        diff += (f64::from(o) - f64::from(r)).powi(2);
        norm += f64::from(r).powi(2);
    }
    if norm == 0.0 {
        return f64::INFINITY;
    }
    diff.sqrt() / norm.sqrt()
}

/// The verdict on the differences against `bound`.
pub(super) fn verdict(differences: &[f64], bound: f64) -> HopperCheck {
    // NaN compares false: a NaN difference becomes infinite, hence Failed.
    let worst = differences.iter().fold(0.0f64, |worst, &d| {
        if d.is_nan() {
            f64::INFINITY
        } else {
            worst.max(d)
        }
    });
    if worst <= bound {
        HopperCheck::Passed { rel_l2: worst }
    } else {
        HopperCheck::Failed { rel_l2: worst }
    }
}

/// An expert-MLP op with [`moe_grouped_gemm`]'s signature (a closure may hold the op's scratch).
pub(super) type MoeOp<'o> =
    dyn FnMut(&Kernels, &CudaStream, &MoeScalars, MoeArgs<'_>) -> Result<(), CudaError> + 'o;

/// Where an expert-MLP op leaves `act` (`[slots, inter]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActOrder {
    /// Row s is slot s (`moe_grouped_gemm`).
    Slots,
    /// Row r is slot `sorted_slots[r]` (`moe_cutlass_gemm`).
    ExpertSorted,
}

impl ActOrder {
    /// `act` (rows of `inter` values in this order) with row s holding slot s; a slot no row
    /// names is `missing`.
    pub fn in_slot_order<T: Copy>(
        self,
        act: Vec<T>,
        sorted_slots: &[i32],
        inter: usize,
        missing: T,
    ) -> Vec<T> {
        if self == ActOrder::Slots {
            return act;
        }
        let mut by_slot = vec![missing; act.len()];
        for (row, &slot) in act.chunks_exact(inter).zip(sorted_slots) {
            let slot = slot as usize;
            by_slot[slot * inter..(slot + 1) * inter].copy_from_slice(row);
        }
        by_slot
    }
}

/// The expert outputs of one op on the self-check problem: (`act` in slot order, `out`) read back,
/// both pre-filled with NaN so that an element the op leaves unwritten shows.
fn run_op(
    kernels: &Kernels,
    stream: &CudaStream,
    arena: &mut DeviceArena,
    problem: &SelfCheckProblem,
    inputs: &SelfCheckInputs,
    (op, order): (&mut MoeOp<'_>, ActOrder),
) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
    let s = &problem.shape;
    let slots = (s.tokens * s.top_k) as usize;
    let what = "the self-check outputs";
    let mut act = arena.upload(&vec![bf16::NAN; slots * s.inter as usize], what)?;
    let mut out = arena.upload(&vec![f32::NAN; slots * s.hidden as usize], what)?;
    op(
        kernels,
        stream,
        s,
        MoeArgs {
            x: inputs.x.view(),
            w1: inputs.w1.view(),
            w3: inputs.w3.view(),
            w2: inputs.w2.view(),
            topk_weights: inputs.topk_weights.view(),
            expert_offsets: inputs.expert_offsets.view(),
            sorted_slots: inputs.sorted_slots.view(),
            act: act.view_mut(),
            out: out.view_mut(),
        },
    )?;
    let act = copy_to_host(stream, act.view())?;
    let out = copy_to_host(stream, out.view())?;
    let act = act.iter().map(|v| v.to_f32()).collect();
    let act = order.in_slot_order(act, &problem.sorted_slots, s.inter as usize, f32::NAN);
    Ok((act, out))
}

/// The self-check problem's inputs on the device.
struct SelfCheckInputs {
    x: DeviceBuffer<bf16>,
    w1: DeviceBuffer<bf16>,
    w3: DeviceBuffer<bf16>,
    w2: DeviceBuffer<bf16>,
    topk_weights: DeviceBuffer<f32>,
    expert_offsets: DeviceBuffer<i32>,
    sorted_slots: DeviceBuffer<i32>,
}

impl SelfCheckInputs {
    fn upload(arena: &mut DeviceArena, p: &SelfCheckProblem) -> Result<Self, CudaError> {
        let what = "the self-check inputs";
        Ok(SelfCheckInputs {
            x: arena.upload(&p.x, what)?,
            w1: arena.upload(&p.w1, what)?,
            w3: arena.upload(&p.w3, what)?,
            w2: arena.upload(&p.w2, what)?,
            topk_weights: arena.upload(&p.topk_weights, what)?,
            expert_offsets: arena.upload(&p.expert_offsets, what)?,
            sorted_slots: arena.upload(&p.sorted_slots, what)?,
        })
    }
}

/// Runs [`moe_grouped_gemm`] and `op` on the self-check problem (in an arena freed on return) and
/// compares `act` and `out` by relative L2 difference against [`HOPPER_SELF_CHECK_BOUND`].
pub(super) fn compare_with_grouped(
    kernels: &Kernels,
    stream: &Arc<CudaStream>,
    op: (&mut MoeOp<'_>, ActOrder),
) -> Result<HopperCheck, CudaError> {
    let problem = self_check_problem(SELF_CHECK_SEED, SELF_CHECK_DIMS);
    let mut arena = DeviceArena::new(Arc::clone(stream));
    let inputs = SelfCheckInputs::upload(&mut arena, &problem)?;
    let reference = (&mut moe_grouped_gemm as &mut MoeOp<'_>, ActOrder::Slots);
    let (act_ref, out_ref) = run_op(kernels, stream, &mut arena, &problem, &inputs, reference)?;
    let (act, out) = run_op(kernels, stream, &mut arena, &problem, &inputs, op)?;
    let differences = [rel_l2(&act, &act_ref), rel_l2(&out, &out_ref)];
    Ok(verdict(&differences, HOPPER_SELF_CHECK_BOUND))
}

/// The shape of the self-check problem (what a checked op's scratch must hold).
pub(super) fn self_check_shape() -> MoeScalars {
    self_check_problem(SELF_CHECK_SEED, SELF_CHECK_DIMS).shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::error::KernelError;

    /// The op name the capability tests refuse for.
    const OP: &str = "moe_cutlass_gemm";

    fn unsupported(result: Result<impl std::fmt::Debug, CudaError>, name: &str) {
        match result {
            Err(CudaError::Kernel(KernelError::Unsupported { op, what, .. })) => {
                assert_eq!(op, OP);
                assert_eq!(what, name);
            }
            other => panic!("expected Unsupported({name}), got {other:?}"),
        }
    }

    #[test]
    fn only_compute_capability_9_0_is_accepted() {
        let c = Check::new(OP);
        assert!(hopper_only(&c, (9, 0)).is_ok());
        for capability in [(8, 0), (8, 6), (8, 9), (9, 1), (10, 0), (12, 0)] {
            unsupported(hopper_only(&c, capability), "compute capability");
        }
    }

    #[test]
    fn self_check_problem_has_uneven_counts_an_idle_expert_and_tails() {
        let p = self_check_problem(SELF_CHECK_SEED, SELF_CHECK_DIMS);
        let [tokens, hidden, inter, experts] = [
            p.shape.tokens,
            p.shape.hidden,
            p.shape.inter,
            p.shape.experts,
        ]
        .map(|v| v as usize);
        assert_ne!(hidden % 32, 0);
        assert_ne!(inter % 32, 0);
        // Tails in every dimension a block tiles: k stages of 32, output blocks of 64 and 128.
        assert_ne!(inter % 64, 0);
        assert_ne!(hidden % 128, 0);
        let slots = tokens * p.shape.top_k as usize;
        assert_eq!(p.x.len(), tokens * hidden);
        assert_eq!(p.w1.len(), experts * inter * hidden);
        assert_eq!(p.topk_weights.len(), slots);
        // The grouping is a permutation of the slots, consistent with the counts.
        let mut seen = p.sorted_slots.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..slots as i32).collect::<Vec<_>>());
        assert_eq!(p.expert_offsets.len(), experts + 1);
        assert_eq!(p.expert_offsets[0], 0);
        assert_eq!(p.expert_offsets[experts] as usize, slots);
        let counts: Vec<usize> = p
            .expert_offsets
            .windows(2)
            .map(|w| usize::try_from(w[1] - w[0]).unwrap())
            .collect();
        // An idle expert, one spanning several tiles with a partial last one, uneven counts.
        assert_eq!(counts[0], 0, "{counts:?}");
        let hot = counts.iter().copied().max().unwrap();
        assert!(hot > 64 && hot % 64 != 0, "{counts:?}");
        let busy: Vec<usize> = counts.iter().copied().filter(|&c| c > 0).collect();
        assert!(busy.iter().min() != busy.iter().max(), "{counts:?}");
        // Random, not constant, data.
        assert_ne!(p.x[0], p.x[1]);
        assert_ne!(p.w2[0], p.w2[1]);
        // Same seed, same problem; another seed, another problem.
        assert_eq!(self_check_problem(SELF_CHECK_SEED, SELF_CHECK_DIMS).x, p.x);
        assert_ne!(
            self_check_problem(SELF_CHECK_SEED + 1, SELF_CHECK_DIMS).x,
            p.x
        );
    }

    #[test]
    fn expert_sorted_act_rows_go_back_to_their_slots() {
        // Rows of 2 values; row r holds slot sorted[r].
        let act = vec![20.0, 21.0, 0.0, 1.0, 10.0, 11.0];
        let sorted = [2, 0, 1];
        let by_slot = ActOrder::ExpertSorted.in_slot_order(act.clone(), &sorted, 2, f32::NAN);
        assert_eq!(by_slot, vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        assert_eq!(
            ActOrder::Slots.in_slot_order(act.clone(), &sorted, 2, f32::NAN),
            act
        );
        // A slot no row names (a grouping that is not a permutation) stays NaN.
        let missing = ActOrder::ExpertSorted.in_slot_order(act, &[0, 0, 1], 2, f32::NAN);
        assert_eq!(&missing[..4], &[0.0, 1.0, 10.0, 11.0]);
        assert!(missing[4..].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn verdict_and_rel_l2() {
        let reference = [1.0f32, -2.0, 3.0, 0.5];
        assert_eq!(rel_l2(&reference, &reference), 0.0);
        let close = [1.001f32, -2.0, 3.0, 0.5];
        let err = rel_l2(&close, &reference);
        assert!(err > 0.0 && err < 1e-3, "{err}");
        assert_eq!(
            rel_l2(&[f32::NAN, 0.0, 0.0, 0.0], &reference),
            f64::INFINITY
        );
        assert_eq!(rel_l2(&reference, &[0.0; 4]), f64::INFINITY);
        assert_eq!(rel_l2(&reference[..3], &reference), f64::INFINITY);
        assert_eq!(
            verdict(&[1e-3, 2e-3], HOPPER_SELF_CHECK_BOUND),
            HopperCheck::Passed { rel_l2: 2e-3 }
        );
        assert_eq!(
            verdict(&[1e-3, 0.5], HOPPER_SELF_CHECK_BOUND),
            HopperCheck::Failed { rel_l2: 0.5 }
        );
        assert_eq!(
            verdict(&[f64::NAN, 0.0], HOPPER_SELF_CHECK_BOUND),
            HopperCheck::Failed {
                rel_l2: f64::INFINITY
            }
        );
        assert_eq!(
            verdict(&[f64::INFINITY, 0.0], HOPPER_SELF_CHECK_BOUND),
            HopperCheck::Failed {
                rel_l2: f64::INFINITY
            }
        );
        // Two checks that must both pass: the larger difference, or the first failure.
        let (pass, fail) = (
            HopperCheck::Passed { rel_l2: 1e-3 },
            HopperCheck::Failed { rel_l2: 0.5 },
        );
        let larger = HopperCheck::Passed { rel_l2: 2e-3 };
        assert_eq!(pass.and(larger), larger);
        assert_eq!(pass.and(fail), fail);
        assert_eq!(fail.and(pass), fail);
        assert_eq!(HopperCheck::NotHopper.and(pass), HopperCheck::NotHopper);
        assert_eq!(pass.and(HopperCheck::NotHopper), HopperCheck::NotHopper);
        assert!(verdict(&[0.0, 0.0], HOPPER_SELF_CHECK_BOUND).passed());
        assert!(!HopperCheck::NotHopper.passed());
    }
}
