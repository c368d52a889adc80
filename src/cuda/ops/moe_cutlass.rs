//! The prefill expert MLPs on CUTLASS's Hopper grouped GEMM (TMA, warp-specialized cooperative,
//! persistent; sm_90a only), through the `extern "C"` entry points of `csrc/cutlass/` (declared
//! in the generated `src/cuda/shims.rs`). Shapes (`S = tokens * top_k` slots): x
//! `[tokens, hidden]` bf16 is gathered into expert-sorted rows `[S, hidden]`, the w1 / w3 products
//! `[2, S, inter]` f32 become the SwiGLU activations `[S, inter]` (expert-sorted), the w2 product
//! `[S, hidden]` f32 is scattered into `out [S, hidden]` f32 per slot with its routing weight.
//! - [`moe_cutlass_gemm`]: bf16 experts (`moe_experts_sm90.cu`); `act` is written in bf16.
//! - [`moe_cutlass_q8_gemm`]: 8-bit expert stacks (FP8 E4M3 or INT8) read as packed
//!   (`moe_experts_q8.cuh`, both formats in `moe_experts_q8_sm90.cu`), 8-bit x 8-bit on the tensor
//!   cores: the rows of x and of the activations are quantized per row on the device exactly as
//!   `fp8::quantize_per_channel` / `int8::quantize_per_channel` do, so its CPU reference is
//!   [`crate::cpu::moe::expert_mlp_q8_activations`].
//!
//! The scratch rows, the GEMMs' per-group arrays and their workspace live in a scratch
//! ([`MoeCutlassScratch`], [`MoeCutlassQ8Scratch`]) allocated once for the largest chunk; the
//! problem shapes and pointers are written on the device from the router's offsets, so a launch
//! can be captured into a graph.
//!
//! Never run on a GPU yet: an engine uses them only when asked
//! (`CudaEngineOptions::cutlass_experts`) and after their self-check ([`moe_cutlass_self_check`],
//! [`moe_cutlass_q8_self_check`]) passed on the device.

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream};
use half::bf16;

use super::hopper_check::{
    compare_with_grouped, compute_capability, hopper_only, rel_l2, self_check_problem,
    self_check_shape, verdict, ActOrder, HopperCheck, SELF_CHECK_SEED,
};
use super::quant_layout::row_layout;
use crate::cpu::moe::{expert_mlp_q8_activations, Expert};
use crate::cuda::args::{
    MoeArgs, MoeCutlassArgs, MoeCutlassQ8Args, MoeCutlassScalars, MoeScalars, QMoeArgs,
};
use crate::cuda::checks::Check;
use crate::cuda::error::{CudaError, KernelError};
use crate::cuda::memory::{copy_to_host, DeviceArena, DeviceBuffer};
use crate::cuda::module::Kernels;
use crate::cuda::params::{MOE_CUTLASS_GROUP_BYTES, MOE_CUTLASS_STATUS_BASE};
use crate::cuda::shims;
use crate::dtype::WeightSlice;
use crate::quant::{packed, PackedKind, QuantFormat, Q8};

/// The op names in errors.
const OP: &str = "moe_cutlass_gemm";
const OP_Q8: &str = "moe_cutlass_q8_gemm";

/// The one compute capability the CUTLASS shim is built for (sm_90a: H100, H200).
pub const CUTLASS_COMPUTE_CAPABILITY: (i32, i32) = super::HOPPER_COMPUTE_CAPABILITY;

/// Whether this build holds the CUTLASS kernels.
pub const CUTLASS_BUILT: bool = cfg!(not(any(mixtral_no_kernels, mixtral_no_cutlass)));

/// The input element of the grouped GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    Bf16,
    Q8(Q8),
}

/// What both scratches hold: the GEMMs' f32 outputs, their per-group arrays and workspace, for
/// chunks of up to `shape.tokens` tokens of one model's expert shapes on one device. It exists only
/// for a device and build that run the CUTLASS kernels (`new` checks both), so the launchers need
/// no check of their own.
#[derive(Debug)]
struct GemmScratch {
    shape: MoeScalars,
    sm_count: u32,
    workspace_bytes: u32,
    gate_up: DeviceBuffer<f32>,
    down: DeviceBuffer<f32>,
    groups: DeviceBuffer<u8>,
    workspace: DeviceBuffer<u8>,
}

/// What the scratch allocations are called in errors.
const SCRATCH: &str = "the CUTLASS expert scratch";

impl GemmScratch {
    fn new(
        c: &Check,
        precision: Precision,
        arena: &mut DeviceArena,
        stream: &CudaStream,
        max: &MoeScalars,
    ) -> Result<GemmScratch, CudaError> {
        require_built_for(c, stream)?;
        let sm_count = sm_count(stream)?;
        // SAFETY: pure host computations of CUTLASS over its own argument structs.
        let workspace = unsafe {
            match precision {
                Precision::Bf16 => shims::mx_moe_cutlass_workspace_bytes(max.experts, sm_count),
                Precision::Q8(Q8::Fp8) => {
                    shims::mx_moe_cutlass_fp8_workspace_bytes(max.experts, sm_count)
                }
                Precision::Q8(Q8::Int8) => {
                    shims::mx_moe_cutlass_int8_workspace_bytes(max.experts, sm_count)
                }
            }
        };
        let workspace_bytes = c.count("workspace bytes", workspace)?;
        c.product("tokens * top_k", &[max.tokens as usize, max.top_k as usize])?;
        let [gate_up, down, groups] = gemm_lengths(max);
        Ok(GemmScratch {
            shape: *max,
            sm_count,
            workspace_bytes,
            gate_up: arena.zeroed(gate_up, SCRATCH)?,
            down: arena.zeroed(down, SCRATCH)?,
            groups: arena.zeroed(groups, SCRATCH)?,
            workspace: arena.zeroed(workspace.max(1), SCRATCH)?,
        })
    }

    /// The scalars of a launch over `s` with this scratch (the bf16 and 8-bit shims take the same).
    fn scalars(&self, s: &MoeScalars) -> MoeCutlassScalars {
        MoeCutlassScalars {
            tokens: s.tokens,
            hidden: s.hidden,
            inter: s.inter,
            experts: s.experts,
            top_k: s.top_k,
            workspace_bytes: self.workspace_bytes,
            sm_count: self.sm_count,
        }
    }

    /// Refuses `s` unless it has the scratch's hidden, inter and experts and at most its slots.
    fn check(&self, c: &Check, s: &MoeScalars) -> Result<(), CudaError> {
        let max = self.shape;
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
        let slots = slot_count(s);
        let capacity = slot_count(&max);
        if slots > capacity {
            return Err(c.unsupported(
                "tokens * top_k",
                slots,
                format!("must be at most the scratch's {capacity} slots"),
            ));
        }
        c.at_least("experts", s.experts as usize, 1)?;
        c.at_least("top_k", s.top_k as usize, 1)
    }
}

/// The expert-sorted rows (slots, `tokens * top_k`) of a chunk of shape `max`.
fn slot_count(max: &MoeScalars) -> usize {
    max.tokens as usize * max.top_k as usize
}

/// Elements of the shared scratch buffers for `max`: `gate_up` `[2, S, inter]` f32, `down`
/// `[S, hidden]` f32, `groups` bytes.
fn gemm_lengths(max: &MoeScalars) -> [usize; 3] {
    let slots = slot_count(max);
    let (hidden, inter) = (max.hidden as usize, max.inter as usize);
    let groups = 3 * max.experts as usize * MOE_CUTLASS_GROUP_BYTES as usize;
    [2 * slots * inter, slots * hidden, groups]
}

/// Device bytes of the shared scratch buffers for `max`, the workspace aside (a few KiB per SM).
fn gemm_bytes(max: &MoeScalars) -> usize {
    let [gate_up, down, groups] = gemm_lengths(max);
    gate_up * 4 + down * 4 + groups
}

/// The device memory [`moe_cutlass_gemm`] works in: the expert-sorted rows of x (`[S, hidden]`
/// bf16) besides the GEMMs' buffers.
#[derive(Debug)]
pub struct MoeCutlassScratch {
    gemm: GemmScratch,
    xs: DeviceBuffer<bf16>,
}

impl MoeCutlassScratch {
    /// Allocates the scratch for `max` (its `tokens` = the most tokens of one chunk) in `arena`, on
    /// the device of `stream`; refuses a build without CUTLASS and a device it does not run on.
    pub fn new(
        arena: &mut DeviceArena,
        stream: &CudaStream,
        max: &MoeScalars,
    ) -> Result<MoeCutlassScratch, CudaError> {
        let c = Check::new(OP);
        let gemm = GemmScratch::new(&c, Precision::Bf16, arena, stream, max)?;
        let slots = slot_count(max);
        let xs = arena.zeroed(slots * max.hidden as usize, SCRATCH)?;
        Ok(MoeCutlassScratch { gemm, xs })
    }

    /// Device bytes [`MoeCutlassScratch::new`] allocates for `max`, the workspace aside.
    pub fn bytes(max: &MoeScalars) -> usize {
        let slots = slot_count(max);
        gemm_bytes(max) + slots * max.hidden as usize * 2
    }
}

/// The device memory [`moe_cutlass_q8_gemm`] works in, for stacks of one 8-bit format: the codes of
/// the expert-sorted rows of x (`[S, hidden]`) and of the activations (`[S, inter]`), with one f32
/// scale per row, besides the GEMMs' buffers.
#[derive(Debug)]
pub struct MoeCutlassQ8Scratch {
    format: Q8,
    gemm: GemmScratch,
    xs: DeviceBuffer<u8>,
    xs_scales: DeviceBuffer<f32>,
    act: DeviceBuffer<u8>,
    act_scales: DeviceBuffer<f32>,
}

impl MoeCutlassQ8Scratch {
    /// [`MoeCutlassScratch::new`] for the 8-bit kernels of `format`.
    pub fn new(
        arena: &mut DeviceArena,
        stream: &CudaStream,
        max: &MoeScalars,
        format: Q8,
    ) -> Result<MoeCutlassQ8Scratch, CudaError> {
        let c = Check::new(OP_Q8);
        let gemm = GemmScratch::new(&c, Precision::Q8(format), arena, stream, max)?;
        let slots = slot_count(max);
        Ok(MoeCutlassQ8Scratch {
            format,
            gemm,
            xs: arena.zeroed(slots * max.hidden as usize, SCRATCH)?,
            xs_scales: arena.zeroed(slots, SCRATCH)?,
            act: arena.zeroed(slots * max.inter as usize, SCRATCH)?,
            act_scales: arena.zeroed(slots, SCRATCH)?,
        })
    }

    /// The 8-bit format of the stacks this scratch serves.
    pub fn format(&self) -> Q8 {
        self.format
    }

    /// Device bytes [`MoeCutlassQ8Scratch::new`] allocates for `max`, the workspace aside.
    pub fn bytes(max: &MoeScalars) -> usize {
        let slots = slot_count(max);
        gemm_bytes(max) + slots * (max.hidden as usize + max.inter as usize + 8)
    }
}

/// The device's streaming multiprocessors (the persistent grids of the CUTLASS kernels), at least 1.
pub(super) fn sm_count(stream: &CudaStream) -> Result<u32, CudaError> {
    let count = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(CudaError::driver("reading the SM count"))?;
    Ok(u32::try_from(count).unwrap_or(1).max(1))
}

/// Refuses a device the sm_90a shims cannot run on, and a build without them.
pub(super) fn require_built_for(c: &Check, stream: &CudaStream) -> Result<(), CudaError> {
    if !CUTLASS_BUILT {
        return Err(c.unsupported(
            "build",
            0,
            "this build has no CUTLASS kernels (CUTLASS's headers were not found: run \
             scripts/install-cuda-toolchain and rebuild)",
        ));
    }
    hopper_only(c, compute_capability(stream)?)
}

/// The parameters of one bf16 launch: `s` within the scratch's shape, hidden and inter multiples of
/// 8 (16-byte TMA rows), then every buffer checked by the generated [`MoeCutlassArgs::params`].
fn plan(
    s: &MoeScalars,
    a: MoeArgs<'_>,
    scratch: &mut MoeCutlassScratch,
) -> Result<crate::cuda::params::MoeCutlassParams, CudaError> {
    let c = Check::new(OP);
    let g = &mut scratch.gemm;
    g.check(&c, s)?;
    let scalars = g.scalars(s);
    c.multiple_of_8("hidden", s.hidden as usize)?;
    c.multiple_of_8("inter", s.inter as usize)?;
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
        gate_up: g.gate_up.view_mut(),
        down: g.down.view_mut(),
        groups: g.groups.view_mut(),
        workspace: g.workspace.view_mut(),
    };
    args.params(OP, &scalars)
}

/// The parameters of one 8-bit launch: `s` within the scratch's shape, three stacks of the
/// scratch's format without permutations, hidden and inter multiples of 16 (16-byte TMA rows of
/// codes), then every buffer checked by the generated [`MoeCutlassQ8Args::params`].
fn plan_q8(
    s: &MoeScalars,
    kinds: [PackedKind; 3],
    a: QMoeArgs<'_>,
    scratch: &mut MoeCutlassQ8Scratch,
) -> Result<crate::cuda::params::MoeCutlassQ8Params, CudaError> {
    let c = Check::new(OP_Q8);
    let format = scratch.format;
    let g = &mut scratch.gemm;
    g.check(&c, s)?;
    let scalars = g.scalars(s);
    if let Some(kind) = kinds.into_iter().find(|&k| k != format.kind()) {
        return Err(c.unsupported(
            "kind",
            0,
            format!("{kind:?}: this scratch serves {format:?} stacks only"),
        ));
    }
    if a.w13_perm.is_some() || a.w2_perm.is_some() || a.table.is_some() {
        return Err(c.unsupported(
            "perm",
            0,
            "the 8-bit expert kernels read stacks without column permutation or table",
        ));
    }
    row_layout(&c, format.kind(), s.hidden, "hidden")?;
    row_layout(&c, format.kind(), s.inter, "inter")?;
    let args = MoeCutlassQ8Args {
        x: a.x,
        w1: a.w1_codes,
        w1_scales: a.w1_params,
        w3: a.w3_codes,
        w3_scales: a.w3_params,
        w2: a.w2_codes,
        w2_scales: a.w2_params,
        topk_weights: a.topk_weights,
        expert_offsets: a.expert_offsets,
        sorted_slots: a.sorted_slots,
        out: a.out,
        xs: scratch.xs.view_mut(),
        xs_scales: scratch.xs_scales.view_mut(),
        gate_up: g.gate_up.view_mut(),
        act: scratch.act.view_mut(),
        act_scales: scratch.act_scales.view_mut(),
        down: g.down.view_mut(),
        groups: g.groups.view_mut(),
        workspace: g.workspace.view_mut(),
    };
    args.params(OP_Q8, &scalars)
}

/// Runs one shim entry (`run(stream)`) on `stream` with its context current, and maps its code.
pub(super) fn run_shim(
    stream: &CudaStream,
    entry: &'static str,
    run: impl FnOnce(*mut std::ffi::c_void) -> i32,
) -> Result<(), CudaError> {
    stream
        .context()
        .bind_to_thread()
        .map_err(CudaError::driver("making the CUDA context current"))?;
    match run(stream.cu_stream().cast()) {
        0 => Ok(()),
        code => Err(CudaError::Kernel(KernelError::Library {
            entry,
            code,
            reason: if code >= MOE_CUTLASS_STATUS_BASE as i32 {
                format!("cutlass::Status {}", code - MOE_CUTLASS_STATUS_BASE as i32)
            } else {
                format!("cudaError_t {code}")
            },
        })),
    }
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
    // SAFETY: every buffer of `params` was checked against the extents the shim touches and is
    // borrowed (the scratch mutably) for this call; the shim only enqueues work on the stream.
    run_shim(stream, "mx_moe_cutlass_run", |stream| unsafe {
        shims::mx_moe_cutlass_run(&params, stream)
    })
}

/// The routed expert MLPs of a prefill chunk over 8-bit expert stacks (`kinds` all the scratch's
/// format, FP8 or INT8, no permutation) on CUTLASS's Hopper grouped GEMM, 8-bit x 8-bit: per slot
/// `out[s] = weight[s] * (w2[e] q(silu(w1[e] q(x)) * (w3[e] q(x))))`, `q` the per-row quantization
/// of [`crate::cpu::moe::expert_mlp_q8_activations`] (the CPU reference). `out` is 16-byte aligned;
/// `args.act` is not written (the activations stay in the scratch as codes). Zero tokens launch
/// nothing.
///
/// As for [`moe_cutlass_gemm`], [`MoeCutlassQ8Scratch::new`] refuses builds and devices the
/// kernels do not run on; a failure inside the shim is [`KernelError::Library`].
pub fn moe_cutlass_q8_gemm(
    stream: &CudaStream,
    s: &MoeScalars,
    kinds: [PackedKind; 3],
    args: QMoeArgs<'_>,
    scratch: &mut MoeCutlassQ8Scratch,
) -> Result<(), CudaError> {
    let params = plan_q8(s, kinds, args, scratch)?;
    if s.tokens == 0 {
        return Ok(());
    }
    // SAFETY: as in `moe_cutlass_gemm`.
    match scratch.format {
        Q8::Fp8 => run_shim(stream, "mx_moe_cutlass_fp8_run", |stream| unsafe {
            shims::mx_moe_cutlass_fp8_run(&params, stream)
        }),
        Q8::Int8 => run_shim(stream, "mx_moe_cutlass_int8_run", |stream| unsafe {
            shims::mx_moe_cutlass_int8_run(&params, stream)
        }),
    }
}

/// Decides whether [`moe_cutlass_gemm`] can be used on this device: on compute capability 9.0, in
/// a build with CUTLASS, it runs `moe_grouped_gemm` and [`moe_cutlass_gemm`] on a fixed seeded
/// problem (100 tokens top-2 over 8 experts: uneven counts, an idle expert, K and N
/// tails) and compares `act` (in slot order) and `out` against
/// [`HOPPER_SELF_CHECK_BOUND`](super::HOPPER_SELF_CHECK_BOUND). Anywhere
/// else: [`HopperCheck::NotHopper`] without any device work.
///
/// Meant to run once when an engine is built: it allocates, and synchronises the stream.
pub fn moe_cutlass_self_check(
    kernels: &Kernels,
    stream: &Arc<CudaStream>,
) -> Result<HopperCheck, CudaError> {
    if require_built_for(&Check::new(OP), stream).is_err() {
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

/// Largest relative L2 difference of `out` between [`moe_cutlass_q8_gemm`] over FP8 stacks and its
/// CPU reference that [`moe_cutlass_q8_self_check`] accepts. Both sides quantize the same bf16 rows
/// of x to the same codes; they differ by the tensor cores' FP8 accumulation (about 14 bits within
/// each 128-product interval before CUTLASS promotes it to f32: modelled as 2^-10 of a sum) and,
/// through it, by the activation codes that land on the other side of an E4M3 rounding boundary,
/// one step (at most 2^-3 of the value) each. That makes the activations err by a relative RMS of
/// about sqrt(2^-3 * 2 * 2^-10) = 2^-6; through w2 on random data (no amplification), 4 times that
/// plus the accumulation itself: 0.066 (the derivation of the GPU tests' `q8_bound`,
/// tests/gpu_kernels/common.rs). A wrong scale, row or expert moves `out` by tens of percent.
pub const FP8_SELF_CHECK_BOUND: f64 = 7e-2;

/// The same for INT8 stacks. The i32 accumulation is exact, so the activations differ only by the
/// CPU's f32 sums (about 1e-5 of a value, doubled through SwiGLU: d = 2e-5); an INT8 step is the
/// row scale, amax / 127, so a code flips with probability d |a| / step and the variance per
/// element is d |a| step <= d * (a^2 + step^2) / 2: a relative RMS of about sqrt(d) = 4.5e-3 at
/// most; 4 times that is 1.8e-2, taken as 2e-2.
pub const INT8_SELF_CHECK_BOUND: f64 = 2e-2;

/// Hidden and inter of the 8-bit self-check problem: multiples of 16 (whole 16-byte rows of codes),
/// not of the 128-wide k stage nor of the 128 output columns of a tile.
const Q8_SELF_CHECK_DIMS: (u32, u32) = (272, 368);

/// Decides whether [`moe_cutlass_q8_gemm`] can be used on this device for stacks of `format`: on
/// compute capability 9.0, in a build with CUTLASS, it quantizes the self-check problem's experts
/// per row as the loaders do (`quant::packed::quantize`; hidden 272, inter 368), runs the kernels
/// and compares `out` with the CPU reference ([`expert_mlp_q8_activations`] on the dequantized
/// experts, times each slot's weight) against [`FP8_SELF_CHECK_BOUND`] or
/// [`INT8_SELF_CHECK_BOUND`]. Anywhere else: [`HopperCheck::NotHopper`] without any device work.
///
/// Meant to run once when an engine is built: it allocates, and synchronises the stream.
pub fn moe_cutlass_q8_self_check(
    stream: &Arc<CudaStream>,
    format: Q8,
) -> Result<HopperCheck, CudaError> {
    if require_built_for(&Check::new(OP_Q8), stream).is_err() {
        return Ok(HopperCheck::NotHopper);
    }
    let problem = self_check_problem(SELF_CHECK_SEED, Q8_SELF_CHECK_DIMS);
    let s = problem.shape;
    let (hidden, inter, experts) = (s.hidden as usize, s.inter as usize, s.experts as usize);
    let slots = slot_count(&s);
    let to_f32 = |w: &[bf16]| w.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    // Each stack as one `[experts * rows, cols]` matrix: the scales are per row either way.
    let quant = match format {
        Q8::Fp8 => QuantFormat::Fp8,
        Q8::Int8 => QuantFormat::Int8,
    };
    let pack = |w: &[bf16], rows: usize, cols: usize| {
        packed::quantize(quant, &to_f32(w), experts * rows, cols)
            .ok()
            .flatten()
            .ok_or_else(|| CudaError::UnsupportedModel("packing the self-check experts".into()))
    };
    let w1 = pack(&problem.w1, inter, hidden)?;
    let w3 = pack(&problem.w3, inter, hidden)?;
    let w2 = pack(&problem.w2, hidden, inter)?;

    let mut arena = DeviceArena::new(Arc::clone(stream));
    let what = "the 8-bit self-check buffers";
    let d_x = arena.upload(&problem.x, what)?;
    let (c1, s1) = (
        arena.upload(&w1.codes, what)?,
        arena.upload(&w1.params, what)?,
    );
    let (c3, s3) = (
        arena.upload(&w3.codes, what)?,
        arena.upload(&w3.params, what)?,
    );
    let (c2, s2) = (
        arena.upload(&w2.codes, what)?,
        arena.upload(&w2.params, what)?,
    );
    let d_weights = arena.upload(&problem.topk_weights, what)?;
    let d_offsets = arena.upload(&problem.expert_offsets, what)?;
    let d_sorted = arena.upload(&problem.sorted_slots, what)?;
    let mut d_act = arena.zeroed::<bf16>(slots * inter, what)?;
    let mut d_out = arena.upload(&vec![f32::NAN; slots * hidden], what)?;
    let mut scratch = MoeCutlassQ8Scratch::new(&mut arena, stream, &s, format)?;
    let args = QMoeArgs {
        x: d_x.view(),
        w1_codes: c1.view(),
        w1_params: s1.view(),
        w3_codes: c3.view(),
        w3_params: s3.view(),
        w13_perm: None,
        w2_codes: c2.view(),
        w2_params: s2.view(),
        w2_perm: None,
        table: None,
        topk_weights: d_weights.view(),
        expert_offsets: d_offsets.view(),
        sorted_slots: d_sorted.view(),
        act: d_act.view_mut(),
        out: d_out.view_mut(),
    };
    moe_cutlass_q8_gemm(stream, &s, [format.kind(); 3], args, &mut scratch)?;
    let out = copy_to_host(stream, d_out.view())?;

    // The CPU reference per slot, on the dequantized experts.
    let dequantized = [&w1, &w3, &w2].map(|m| m.dequantize());
    let x = to_f32(&problem.x);
    let mut reference = vec![0.0f32; slots * hidden];
    for e in 0..experts {
        let w13 = e * inter * hidden..(e + 1) * inter * hidden;
        let expert = Expert {
            w1: WeightSlice::F32(&dequantized[0][w13.clone()]).into(),
            w2: WeightSlice::F32(&dequantized[2][w13.clone()]).into(),
            w3: WeightSlice::F32(&dequantized[1][w13]).into(),
        };
        let rows = problem.expert_offsets[e] as usize..problem.expert_offsets[e + 1] as usize;
        for &slot in &problem.sorted_slots[rows] {
            let (slot, token) = (slot as usize, slot as usize / s.top_k as usize);
            let out_row = &mut reference[slot * hidden..(slot + 1) * hidden];
            let x_row = &x[token * hidden..(token + 1) * hidden];
            expert_mlp_q8_activations(x_row, &expert, (hidden, inter), format, out_row);
            out_row
                .iter_mut()
                .for_each(|v| *v *= problem.topk_weights[slot]);
        }
    }
    let bound = match format {
        Q8::Fp8 => FP8_SELF_CHECK_BOUND,
        Q8::Int8 => INT8_SELF_CHECK_BOUND,
    };
    Ok(verdict(&[rel_l2(&out, &reference)], bound))
}
