//! `linear_cutlass` (`csrc/cutlass/linear_sm90.cuh`): the dense projections of prefill chunks
//! (q/k/v, o, the LM head) on CUTLASS's Hopper GEMM (TMA, warp-specialized cooperative, stream-K;
//! sm_90a only): `out [tokens, out_features]` bf16 or f32 = `x [tokens, in_features]` bf16 ·
//! `w [out_features, in_features]^T` bf16 with f32 accumulation, as [`linear`](super::linear)
//! computes it. Where a chunk's output tiles are fewer than the SMs, stream-K splits their K loops
//! between blocks, which meet in the workspace of a [`LinearCutlassScratch`] (sized once for an
//! engine's largest problems, so nothing is allocated per chunk).
//!
//! Never run on a GPU yet: an engine uses it only when asked
//! (`CudaEngineOptions::cutlass_experts`) and after [`linear_cutlass_self_check`] passed on the
//! device.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;

use super::hopper_check::{random_bf16, rel_l2, verdict, HopperCheck};
use super::moe_cutlass::{require_built_for, run_shim, sm_count};
use crate::cuda::args::{LinearArgs, LinearCutlassArgs, LinearCutlassScalars, LinearScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::memory::{copy_to_host, AnyViewMut, DeviceArena, DeviceBuffer, ViewMut};
use crate::cuda::module::Kernels;
use crate::cuda::params::LinearCutlassParams;
use crate::cuda::shims;
use crate::sampling::Rng;

/// The op name in errors.
const OP: &str = "linear_cutlass";

/// One output type's run entry of the shim.
type Entry = unsafe extern "C" fn(*const LinearCutlassParams, *mut std::ffi::c_void) -> i32;

/// The workspace of [`linear_cutlass`] on one device, for problems of given feature counts and up
/// to a given number of tokens. It exists only for a device and build that run the CUTLASS kernels
/// ([`LinearCutlassScratch::new`] checks both).
#[derive(Debug)]
pub struct LinearCutlassScratch {
    sm_count: u32,
    workspace_bytes: u32,
    workspace: DeviceBuffer<u8>,
}

/// The parameters of a problem's shape alone (no buffers), for the workspace queries.
fn shape_params(
    tokens: u32,
    (in_features, out_features): (u32, u32),
    sm_count: u32,
) -> LinearCutlassParams {
    LinearCutlassParams {
        x: 0,
        w: 0,
        out: 0,
        workspace: 0,
        tokens,
        in_features,
        out_features,
        workspace_bytes: 0,
        sm_count,
    }
}

impl LinearCutlassScratch {
    /// Allocates in `arena` the workspace every problem of `features` (`(in, out)` pairs) with
    /// 1 to `max_tokens` tokens needs, either output type, on the device of `stream`; refuses a
    /// build without CUTLASS and a device it does not run on.
    pub fn new(
        arena: &mut DeviceArena,
        stream: &CudaStream,
        features: &[(u32, u32)],
        max_tokens: u32,
    ) -> Result<LinearCutlassScratch, CudaError> {
        let c = Check::new(OP);
        require_built_for(&c, stream)?;
        let sm_count = sm_count(stream)?;
        let bytes = Self::bytes(features, max_tokens, sm_count);
        Ok(LinearCutlassScratch {
            sm_count,
            workspace_bytes: c.count("workspace bytes", bytes)?,
            workspace: arena.zeroed(bytes.max(1), "the CUTLASS projection workspace")?,
        })
    }

    /// The workspace bytes [`LinearCutlassScratch::new`] allocates: the most any of those problems
    /// needs on `sm_count` SMs (CUTLASS's own query; no device work).
    pub fn bytes(features: &[(u32, u32)], max_tokens: u32, sm_count: u32) -> usize {
        let mut most = 0;
        for &pair in features {
            for tokens in 1..=max_tokens {
                let p = shape_params(tokens, pair, sm_count);
                // SAFETY: pure host computations of CUTLASS over its own argument structs.
                let (b, f) = unsafe {
                    (
                        shims::mx_linear_cutlass_bf16_workspace_bytes(&p),
                        shims::mx_linear_cutlass_f32_workspace_bytes(&p),
                    )
                };
                most = most.max(b).max(f);
            }
        }
        most
    }
}

/// The parameters of one launch over `s` with a workspace of `workspace_bytes` bytes on
/// `sm_count` SMs: in_features and out_features multiples of 8 (16-byte TMA rows), then every buffer
/// checked by the generated [`LinearCutlassArgs::params`] (extents, 16-byte alignment).
fn plan(
    s: &LinearScalars,
    a: LinearArgs<'_>,
    (sm_count, workspace_bytes): (u32, u32),
    workspace: ViewMut<'_, u8>,
) -> Result<LinearCutlassParams, CudaError> {
    let c = Check::new(OP);
    for (what, value) in [
        ("in_features", s.in_features),
        ("out_features", s.out_features),
    ] {
        c.at_least(what, value as usize, 1)?;
        c.multiple_of_8(what, value as usize)?;
    }
    let scalars = LinearCutlassScalars {
        tokens: s.tokens,
        in_features: s.in_features,
        out_features: s.out_features,
        workspace_bytes,
        sm_count,
    };
    let args = LinearCutlassArgs {
        x: a.x,
        w: a.w,
        out: a.out,
        workspace,
    };
    args.params(OP, &scalars)
}

/// `out[t, o] = sum_i x[t, i] * w[o, i]` with f32 accumulation on CUTLASS's Hopper GEMM, out bf16
/// or f32 as its view is; in_features and out_features multiples of 8 and every buffer 16-byte
/// aligned (TMA rows). Zero tokens launch nothing.
///
/// A build without CUTLASS and a device whose compute capability is not 9.0 never get this far:
/// [`LinearCutlassScratch::new`] refuses them. A problem whose workspace exceeds the scratch's, or
/// a failure inside the shim, is [`KernelError::Library`](crate::cuda::KernelError::Library).
pub fn linear_cutlass(
    stream: &CudaStream,
    s: &LinearScalars,
    a: LinearArgs<'_>,
    scratch: &mut LinearCutlassScratch,
) -> Result<(), CudaError> {
    let out_f32 = a.out.is_f32();
    let sizes = (scratch.sm_count, scratch.workspace_bytes);
    let params = plan(s, a, sizes, scratch.workspace.view_mut())?;
    if s.tokens == 0 {
        return Ok(());
    }
    let (entry, run): (_, Entry) = if out_f32 {
        (
            "mx_linear_cutlass_f32_run",
            shims::mx_linear_cutlass_f32_run,
        )
    } else {
        (
            "mx_linear_cutlass_bf16_run",
            shims::mx_linear_cutlass_bf16_run,
        )
    };
    // SAFETY: every buffer of `params` was checked against the extents the shim touches and is
    // borrowed (the output and the scratch mutably) for this call; the shim only enqueues work on
    // the stream.
    run_shim(stream, entry, |stream| unsafe { run(&params, stream) })
}

/// Largest relative L2 difference between [`linear_cutlass`] and `linear` on f32 outputs that
/// [`linear_cutlass_self_check`] accepts: both multiply the same bf16 values and add in f32, in
/// another order, which moves a sum of K random products by about sqrt(K) f32 roundings of its
/// terms (about 2e-6 of it at K = 1032); an accumulation in bf16 or a lost K split moves it by
/// 1e-3 or more.
pub const LINEAR_CUTLASS_F32_BOUND: f64 = 1e-5;

/// The same for bf16 outputs: each side rounds its f32 sum once, so an element differs by at most
/// one bf16 step (2^-8 of it, relative) where the two sums straddle a rounding boundary.
pub const LINEAR_CUTLASS_BF16_BOUND: f64 = 1.0 / 256.0;

/// `(in_features, out_features)` of the self-check problem: multiples of 8, not of the 64-wide k
/// stage nor of the 128-row tile; with 40 tokens that is 4 output tiles on a device of 132 SMs, so
/// stream-K splits their K loops; with 300 tokens, 12 tiles with a partial last column.
const SELF_CHECK_FEATURES: (u32, u32) = (1032, 392);

/// Decides whether [`linear_cutlass`] can be used on this device: on compute capability 9.0, in a
/// build with CUTLASS, it runs `linear` and [`linear_cutlass`] on a fixed seeded problem
/// (1032 input by 392 output features, 40 and 300 tokens, both output types) and compares them against
/// [`LINEAR_CUTLASS_F32_BOUND`] and [`LINEAR_CUTLASS_BF16_BOUND`]; the verdict reports the larger
/// difference. Anywhere else: [`HopperCheck::NotHopper`] without any device work.
///
/// Meant to run once when an engine is built: it allocates, and synchronises the stream.
pub fn linear_cutlass_self_check(
    kernels: &Kernels,
    stream: &Arc<CudaStream>,
) -> Result<HopperCheck, CudaError> {
    if require_built_for(&Check::new(OP), stream).is_err() {
        return Ok(HopperCheck::NotHopper);
    }
    let (in_features, out_features) = SELF_CHECK_FEATURES;
    let mut arena = DeviceArena::new(Arc::clone(stream));
    let mut scratch = LinearCutlassScratch::new(&mut arena, stream, &[SELF_CHECK_FEATURES], 300)?;
    let what = "the CUTLASS projection self-check";
    let mut rng = Rng::new(0x5eed_1105);
    let mut random = |len: usize, scale: f64| random_bf16(&mut rng, len, scale);
    let w_host = random(
        (out_features * in_features) as usize,
        1.0 / f64::from(in_features).sqrt(),
    );
    let w = arena.upload(&w_host, what)?;
    // Relative L2 differences of the bf16 and of the f32 outputs.
    let mut differences = [Vec::new(), Vec::new()];
    for tokens in [40u32, 300] {
        let x = arena.upload(&random((tokens * in_features) as usize, 1.0), what)?;
        let s = LinearScalars {
            tokens,
            in_features,
            out_features,
        };
        let len = (tokens * out_features) as usize;
        for out_f32 in [false, true] {
            let mut outputs = Vec::new();
            for cutlass in [false, true] {
                let mut out_f = arena.upload(&vec![f32::NAN; len], what)?;
                let mut out_b = arena.upload(&vec![bf16::NAN; len], what)?;
                let out: AnyViewMut<'_> = if out_f32 {
                    out_f.view_mut().into()
                } else {
                    out_b.view_mut().into()
                };
                let args = LinearArgs {
                    x: x.view(),
                    w: w.view(),
                    out,
                };
                if cutlass {
                    linear_cutlass(stream, &s, args, &mut scratch)?;
                } else {
                    super::linear(kernels, stream, &s, args)?;
                }
                outputs.push(if out_f32 {
                    copy_to_host(stream, out_f.view())?
                } else {
                    let b = copy_to_host(stream, out_b.view())?;
                    b.iter().map(|v| v.to_f32()).collect()
                });
            }
            differences[usize::from(out_f32)].push(rel_l2(&outputs[1], &outputs[0]));
        }
    }
    let [bf16_out, f32_out] = differences;
    Ok(verdict(&bf16_out, LINEAR_CUTLASS_BF16_BOUND)
        .and(verdict(&f32_out, LINEAR_CUTLASS_F32_BOUND)))
}

#[cfg(test)]
mod tests {
    //! GPU-free tests of the planner: the feature rules, the buffers checked by name, the scalars
    //! passed on.

    use super::*;
    use crate::cuda::ops::fake::{
        any_view_mut, linear_args as args, linear_scalars as scalars, misaligned, too_small,
        unsupported, view, view_mut,
    };

    fn planned(s: &LinearScalars, a: LinearArgs<'_>) -> Result<LinearCutlassParams, CudaError> {
        plan(s, a, (132, 4096), view_mut(4096))
    }

    #[test]
    fn params_carry_the_shape_and_the_scratch_sizes() {
        let s = scalars(17, 4096, 6144);
        let p = planned(&s, args(&s, false)).unwrap();
        assert_eq!((p.tokens, p.in_features, p.out_features), (17, 4096, 6144));
        assert_eq!((p.sm_count, p.workspace_bytes), (132, 4096));
        assert!(planned(&s, args(&s, true)).is_ok());
        // Zero tokens are checked too (the launcher then launches nothing).
        let none = scalars(0, 4096, 6144);
        assert_eq!(planned(&none, args(&none, true)).unwrap().tokens, 0);
    }

    #[test]
    fn feature_counts_must_be_positive_whole_16_byte_rows() {
        for (s, what) in [
            (scalars(17, 4100, 6144), "in_features"),
            (scalars(17, 4096, 6146), "out_features"),
            (scalars(17, 0, 6144), "in_features"),
            (scalars(17, 4096, 0), "out_features"),
        ] {
            unsupported(planned(&s, args(&s, false)), what);
        }
    }

    #[test]
    fn every_buffer_short_or_misaligned_is_refused_by_name() {
        let s = scalars(20, 64, 48);
        for name in ["x", "w", "out"] {
            // The buffers of `s` (f32 out), `name` one element short.
            let mut a = args(&s, true);
            match name {
                "x" => a.x = view(20 * 64 - 1),
                "w" => a.w = view(48 * 64 - 1),
                _ => a.out = any_view_mut(20 * 48 - 1, true),
            }
            too_small(planned(&s, a), name);
        }
        too_small(
            plan(&s, args(&s, false), (132, 4096), view_mut(4095)),
            "workspace",
        );
        let shifted = view_mut::<f32>(20 * 48 + 1).sub(1, 20 * 48).unwrap();
        misaligned(
            planned(
                &s,
                LinearArgs {
                    out: shifted.into(),
                    ..args(&s, true)
                },
            ),
            "out",
        );
    }
}
