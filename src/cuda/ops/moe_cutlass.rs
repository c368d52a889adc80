//! The prefill expert MLPs on CUTLASS's Hopper grouped GEMM: [`moe_cutlass_gemm`] runs
//! `csrc/cutlass/moe_experts_sm90.cu` (TMA, warp-specialized cooperative, persistent; sm_90a only)
//! through its `extern "C"` entry points, declared here and nowhere else. Shapes (`S = tokens *
//! top_k` slots): x `[tokens, hidden]` bf16 is gathered into expert-sorted rows `[S, hidden]`, the
//! w1 / w3 products `[2, S, inter]` f32 become `act [S, inter]` bf16 (expert-sorted), the w2 product
//! `[S, hidden]` f32 is scattered into `out [S, hidden]` f32 per slot with its routing weight.
//!
//! The scratch rows, the GEMMs' per-group arrays and their workspace live in a
//! [`MoeCutlassScratch`] allocated once for the largest chunk; the problem shapes and pointers are
//! written on the device from the router's offsets, so the launch can be captured into a graph.
//!
//! Never run on a GPU yet: like the wgmma kernels, an engine uses it only when asked
//! (`CudaEngineOptions::cutlass_experts`) and after [`moe_cutlass_self_check`] agreed with
//! `moe_grouped` on the device.

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream};
use half::bf16;

use crate::cuda::args::{MoeArgs, MoeCutlassArgs, MoeCutlassScalars, MoeScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::{CudaError, KernelError};
use crate::cuda::memory::{DeviceArena, DeviceBuffer};
use crate::cuda::module::Kernels;
use crate::cuda::params::{MoeCutlassParams, MOE_CUTLASS_GROUP_BYTES, MOE_CUTLASS_STATUS_BASE};

use super::moe_wgmma::{compare_with_grouped, self_check_shape, ActOrder, HopperCheck};

/// The op name in errors.
const OP: &str = "moe_cutlass_gemm";

/// The one compute capability the CUTLASS shim is built for (sm_90a: H100, H200).
pub const CUTLASS_COMPUTE_CAPABILITY: (i32, i32) = (9, 0);

#[cfg(not(any(mixtral_no_kernels, mixtral_no_cutlass)))]
mod ffi {
    use crate::cuda::params::MoeCutlassParams;

    extern "C" {
        /// Workspace bytes of the grouped GEMMs of `experts` experts on `sm_count` SMs.
        pub fn mx_moe_cutlass_workspace_bytes(experts: u32, sm_count: u32) -> usize;
        /// The six steps of `csrc/cutlass/moe_experts_sm90.cu` on `stream`: 0, a `cudaError_t`, or
        /// `MOE_CUTLASS_STATUS_BASE` + a `cutlass::Status`.
        pub fn mx_moe_cutlass_run(params: *const MoeCutlassParams, stream: *mut std::ffi::c_void) -> i32;
    }
}

/// Refuses a build without the CUTLASS shim (no CUTLASS headers when it was compiled).
#[cfg(any(mixtral_no_kernels, mixtral_no_cutlass))]
mod ffi {
    use crate::cuda::params::MoeCutlassParams;

    pub unsafe fn mx_moe_cutlass_workspace_bytes(_: u32, _: u32) -> usize {
        0
    }

    pub unsafe fn mx_moe_cutlass_run(_: *const MoeCutlassParams, _: *mut std::ffi::c_void) -> i32 {
        -1
    }
}

/// Whether this build holds the CUTLASS kernels.
pub const CUTLASS_BUILT: bool = cfg!(not(any(mixtral_no_kernels, mixtral_no_cutlass)));

/// The device memory [`moe_cutlass_gemm`] works in, for chunks of up to `max_tokens` tokens of one
/// model's expert shapes on one device. It exists only for a device and build that run the CUTLASS
/// kernels ([`MoeCutlassScratch::new`] checks both), so the launcher needs no check of its own.
#[derive(Debug)]
pub struct MoeCutlassScratch {
    shape: MoeScalars,
    sm_count: u32,
    workspace_bytes: u32,
    xs: DeviceBuffer<bf16>,
    gate_up: DeviceBuffer<f32>,
    down: DeviceBuffer<f32>,
    groups: DeviceBuffer<u8>,
    workspace: DeviceBuffer<u8>,
}

impl MoeCutlassScratch {
    /// Allocates the scratch for `max` (its `tokens` = the most tokens of one chunk) in `arena`, on
    /// the device of `stream`.
    pub fn new(
        arena: &mut DeviceArena,
        stream: &CudaStream,
        max: &MoeScalars,
    ) -> Result<MoeCutlassScratch, CudaError> {
        let c = Check { op: OP };
        require_built_for(&c, stream)?;
        let sm_count = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("reading the SM count"))?;
        let sm_count = u32::try_from(sm_count).unwrap_or(1).max(1);
        // SAFETY: a pure host computation of CUTLASS over its own argument structs.
        let workspace = unsafe { ffi::mx_moe_cutlass_workspace_bytes(max.experts, sm_count) };
        let workspace_bytes = c.count("workspace bytes", workspace)?;
        c.product("tokens * top_k", &[max.tokens as usize, max.top_k as usize])?;
        let [xs, gate_up, down, groups] = lengths(max);
        let what = "the CUTLASS expert scratch";
        Ok(MoeCutlassScratch {
            shape: *max,
            sm_count,
            workspace_bytes,
            xs: arena.zeroed(xs, what)?,
            gate_up: arena.zeroed(gate_up, what)?,
            down: arena.zeroed(down, what)?,
            groups: arena.zeroed(groups, what)?,
            workspace: arena.zeroed(workspace.max(1), what)?,
        })
    }

    /// Device bytes [`MoeCutlassScratch::new`] allocates for `max`, the workspace aside (a few KiB
    /// per SM).
    pub fn bytes(max: &MoeScalars) -> usize {
        let [xs, gate_up, down, groups] = lengths(max);
        xs * 2 + gate_up * 4 + down * 4 + groups
    }
}

/// Elements of the scratch buffers for `max`: `xs` `[S, hidden]` bf16, `gate_up` `[2, S, inter]`
/// f32, `down` `[S, hidden]` f32, `groups` bytes.
fn lengths(max: &MoeScalars) -> [usize; 4] {
    let slots = max.tokens as usize * max.top_k as usize;
    let (hidden, inter) = (max.hidden as usize, max.inter as usize);
    let groups = 3 * max.experts as usize * MOE_CUTLASS_GROUP_BYTES as usize;
    [slots * hidden, 2 * slots * inter, slots * hidden, groups]
}

/// Refuses a device the sm_90a shim cannot run on, and a build without it.
fn require_built_for(c: &Check, stream: &CudaStream) -> Result<(), CudaError> {
    if !CUTLASS_BUILT {
        return Err(c.unsupported(
            "build",
            0,
            "this build has no CUTLASS kernels (CUTLASS's headers were not found: run \
             scripts/install-cuda-toolchain and rebuild)",
        ));
    }
    let capability = stream
        .context()
        .compute_capability()
        .map_err(CudaError::driver("reading the compute capability"))?;
    if capability != CUTLASS_COMPUTE_CAPABILITY {
        let (major, minor) = capability;
        return Err(c.unsupported(
            "compute capability",
            usize::try_from(major * 10 + minor).unwrap_or(0),
            format!("the CUTLASS kernels run only on compute capability 9.0, not {major}.{minor}"),
        ));
    }
    Ok(())
}

/// The parameters of one launch: `s` within the scratch's shape, hidden and inter multiples of 8
/// (16-byte TMA rows), then every buffer checked by the generated [`MoeCutlassArgs::params`].
fn plan(
    s: &MoeScalars,
    a: MoeArgs<'_>,
    scratch: &mut MoeCutlassScratch,
) -> Result<MoeCutlassParams, CudaError> {
    let c = Check { op: OP };
    let max = scratch.shape;
    if (s.hidden, s.inter, s.experts) != (max.hidden, max.inter, max.experts) {
        return Err(c.unsupported(
            "shape",
            s.hidden as usize,
            format!(
                "(hidden, inter, experts) = ({}, {}, {}) must be the scratch's ({}, {}, {})",
                s.hidden, s.inter, s.experts, max.hidden, max.inter, max.experts
            ),
        ));
    }
    let slots = s.tokens as usize * s.top_k as usize;
    let capacity = max.tokens as usize * max.top_k as usize;
    if slots > capacity {
        return Err(c.unsupported(
            "tokens * top_k",
            slots,
            format!("must be at most the scratch's {capacity} slots"),
        ));
    }
    c.multiple_of_8("hidden", s.hidden as usize)?;
    c.multiple_of_8("inter", s.inter as usize)?;
    c.at_least("experts", s.experts as usize, 1)?;
    c.at_least("top_k", s.top_k as usize, 1)?;
    let args = MoeCutlassArgs {
        x: a.x,
        w1: a.w1,
        w3: a.w3,
        w2: a.w2,
        topk_weights: a.topk_weights,
        expert_offsets: a.expert_offsets,
        sorted_slots: a.sorted_slots,
        act: a.act,
        out: a.out,
        xs: scratch.xs.view_mut(),
        gate_up: scratch.gate_up.view_mut(),
        down: scratch.down.view_mut(),
        groups: scratch.groups.view_mut(),
        workspace: scratch.workspace.view_mut(),
    };
    let scalars = MoeCutlassScalars {
        tokens: s.tokens,
        hidden: s.hidden,
        inter: s.inter,
        experts: s.experts,
        top_k: s.top_k,
        workspace_bytes: scratch.workspace_bytes,
        sm_count: scratch.sm_count,
    };
    args.params(OP, &scalars)
}

/// The routed expert MLPs of a prefill chunk on CUTLASS's Hopper grouped GEMM:
/// `out[s] = weight[s] * (w2[e] act)` per slot as [`moe_grouped_gemm`](super::moe_grouped_gemm)
/// computes it, with `act` written in expert-sorted order (row r is slot `sorted_slots[r]`), and
/// `out` 16-byte aligned. Zero tokens launch nothing.
///
/// A build without CUTLASS and a device whose compute capability is not 9.0 never get this far:
/// [`MoeCutlassScratch::new`] refuses them. A failure inside the shim is [`KernelError::Library`].
pub fn moe_cutlass_gemm(
    stream: &CudaStream,
    s: &MoeScalars,
    args: MoeArgs<'_>,
    scratch: &mut MoeCutlassScratch,
) -> Result<(), CudaError> {
    let params = plan(s, args, scratch)?;
    if s.tokens == 0 {
        return Ok(());
    }
    stream
        .context()
        .bind_to_thread()
        .map_err(CudaError::driver("making the CUDA context current"))?;
    // SAFETY: every buffer of `params` was checked against the extents the shim touches and is
    // borrowed (the scratch mutably) for this call; the shim only enqueues work on `stream`.
    let code = unsafe { ffi::mx_moe_cutlass_run(&params, stream.cu_stream().cast()) };
    match code {
        0 => Ok(()),
        code => Err(CudaError::Kernel(KernelError::Library {
            entry: "mx_moe_cutlass_run",
            code,
            reason: if code >= MOE_CUTLASS_STATUS_BASE as i32 {
                format!("cutlass::Status {}", code - MOE_CUTLASS_STATUS_BASE as i32)
            } else {
                format!("cudaError_t {code}")
            },
        })),
    }
}

/// Decides whether [`moe_cutlass_gemm`] can be used on this device: on compute capability 9.0, in
/// a build with CUTLASS, it runs `moe_grouped_gemm` and [`moe_cutlass_gemm`] on the wgmma kernels'
/// fixed seeded problem (uneven counts, an idle expert, K and N tails) and compares `act` (in slot
/// order) and `out` against [`WGMMA_SELF_CHECK_BOUND`](super::WGMMA_SELF_CHECK_BOUND). Anywhere
/// else: [`HopperCheck::NotHopper`] without any device work.
///
/// Meant to run once when an engine is built: it allocates, and synchronises the stream.
pub fn moe_cutlass_self_check(
    kernels: &Kernels,
    stream: &Arc<CudaStream>,
) -> Result<HopperCheck, CudaError> {
    if require_built_for(&Check { op: OP }, stream).is_err() {
        return Ok(HopperCheck::NotHopper);
    }
    let shape = self_check_shape();
    let mut arena = DeviceArena::new(Arc::clone(stream));
    let mut scratch = MoeCutlassScratch::new(&mut arena, stream, &shape)?;
    let mut op = |_: &Kernels, stream: &CudaStream, s: &MoeScalars, args: MoeArgs<'_>| {
        moe_cutlass_gemm(stream, s, args, &mut scratch)
    };
    compare_with_grouped(kernels, stream, (&mut op, ActOrder::ExpertSorted))
}
