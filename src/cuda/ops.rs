//! One safe launcher per kernel family in `csrc/`. Each takes the shapes (a plain `*Shape` struct a
//! static plan can keep) and the device buffers (a `*Buffers` struct of cudarc slices or views),
//! checks every buffer's length (and 16-byte alignment where the kernel uses vector loads) against
//! what the kernel will touch for those shapes, picks the compiled instantiation and the grid, and
//! launches on the given stream. Nothing is allocated on the device and nothing synchronises, so the
//! calls can be captured into a CUDA graph. A shape with zero tokens / rows launches nothing.
//!
//! Layouts (row-major): activations `[tokens, hidden]` bf16, residual stream `[tokens, hidden]` f32,
//! weights `[out, in]` bf16, paged KV cache `[num_blocks, block_size, n_kv_heads, head_dim]` bf16 per
//! layer, block tables `[num_seqs, max_blocks_per_seq]` i32. The exact semantics of each kernel are in
//! the header comment of its `csrc/*.cu` file and on its parameter struct in [`params`](super::params).

use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use half::bf16;

use super::error::CudaError;
use super::module::Kernels;
use super::params::{
    KernelFamily, KernelVariant, MoeParams, RouterParams, KERNEL_VARIANTS, MOE_DOWN_ROWS_PER_WARP,
    MOE_WARPS, ROUTER_GROUP_THREADS, ROUTER_MAX_EXPERTS, ROUTER_MAX_TOP_K, ROUTER_THREADS,
};

/// Largest count (and product of counts) the kernels index with 32-bit integers.
const MAX_INDEX: usize = i32::MAX as usize;
/// Largest grid y / z dimension.
const MAX_GRID_YZ: usize = 65_535;

// ---------------------------------------------------------------------------------------------
// Shared plumbing

/// A device buffer as the checks see it: its address and its length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Buf {
    address: u64,
    len: usize,
}

fn read<'a, T>(buffer: &'a dyn DevicePtr<T>, stream: &'a CudaStream) -> (Buf, SyncOnDrop<'a>) {
    let len = buffer.len();
    let (address, guard) = buffer.device_ptr(stream);
    (Buf { address, len }, guard)
}

fn write<'a, T>(
    buffer: &'a mut dyn DevicePtrMut<T>,
    stream: &'a CudaStream,
) -> (Buf, SyncOnDrop<'a>) {
    let len = buffer.len();
    let (address, guard) = buffer.device_ptr_mut(stream);
    (Buf { address, len }, guard)
}

/// A checked launch: the instantiation (index into [`KERNEL_VARIANTS`]), geometry and parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Launch<P> {
    variant: usize,
    grid: (u32, u32, u32),
    block: u32,
    shared_bytes: u32,
    params: P,
}

fn launch<P: DeviceRepr>(
    kernels: &Kernels,
    stream: &CudaStream,
    plan: &Launch<P>,
) -> Result<(), CudaError> {
    let variant: &'static KernelVariant = &KERNEL_VARIANTS[plan.variant];
    let function = kernels
        .function(plan.variant)
        .ok_or(CudaError::MissingKernel {
            symbol: variant.symbol,
            module: variant.module,
        })?;
    let config = LaunchConfig {
        grid_dim: plan.grid,
        block_dim: (plan.block, 1, 1),
        shared_mem_bytes: plan.shared_bytes,
    };
    let mut builder = stream.launch_builder(function);
    builder.arg(&plan.params);
    // SAFETY: the function takes exactly one argument, the `#[repr(C)]` struct `P` whose layout is
    // asserted equal to the C definition (params.rs / params.h). Every pointer in it comes from a
    // live cudarc buffer whose guard outlives this call, and the planner checked that each buffer
    // covers every element (and alignment) the kernel touches for the shapes in `params`; the
    // geometry and shared memory are the ones the kernel was written for.
    unsafe { builder.launch(config) }.map_err(|source| CudaError::Launch {
        symbol: variant.symbol,
        source,
    })?;
    Ok(())
}

/// Checks against one op's name.
struct Check {
    op: &'static str,
}

impl Check {
    fn len(&self, buffer: &'static str, buf: Buf, expected: usize) -> Result<(), CudaError> {
        if buf.len < expected {
            return Err(CudaError::BufferTooSmall {
                op: self.op,
                buffer,
                expected,
                actual: buf.len,
            });
        }
        Ok(())
    }

    fn aligned16(&self, buffer: &'static str, buf: Buf) -> Result<(), CudaError> {
        if !buf.address.is_multiple_of(16) {
            return Err(CudaError::Misaligned {
                op: self.op,
                buffer,
                address: buf.address,
            });
        }
        Ok(())
    }

    fn unsupported(
        &self,
        what: &'static str,
        value: usize,
        reason: impl Into<String>,
    ) -> CudaError {
        CudaError::Unsupported {
            op: self.op,
            what,
            value,
            reason: reason.into(),
        }
    }

    /// `value` as the kernels' 32-bit count (below 2^31).
    fn count(&self, what: &'static str, value: usize) -> Result<u32, CudaError> {
        if value > MAX_INDEX {
            return Err(self.unsupported(what, value, "must be below 2^31"));
        }
        Ok(value as u32)
    }

    fn at_least(&self, what: &'static str, value: usize, min: usize) -> Result<(), CudaError> {
        if value < min {
            return Err(self.unsupported(what, value, format!("must be at least {min}")));
        }
        Ok(())
    }

    fn multiple_of_8(&self, what: &'static str, value: usize) -> Result<(), CudaError> {
        if value == 0 || !value.is_multiple_of(8) {
            return Err(self.unsupported(
                what,
                value,
                "must be a positive multiple of 8 (16-byte vector loads)",
            ));
        }
        Ok(())
    }

    fn grid_yz(&self, what: &'static str, value: usize) -> Result<u32, CudaError> {
        if value > MAX_GRID_YZ {
            return Err(self.unsupported(
                what,
                value,
                format!("must be at most {MAX_GRID_YZ} (a grid dimension)"),
            ));
        }
        Ok(value as u32)
    }

    /// Product of counts, which must stay a valid 32-bit index.
    fn product(&self, what: &'static str, factors: &[usize]) -> Result<usize, CudaError> {
        let mut total: usize = 1;
        for &f in factors {
            total = total
                .checked_mul(f)
                .ok_or_else(|| self.unsupported(what, usize::MAX, "overflows"))?;
        }
        if total > MAX_INDEX {
            return Err(self.unsupported(what, total, "must be below 2^31"));
        }
        Ok(total)
    }

    /// The compiled instantiation of `family` for `consts`.
    fn variant(
        &self,
        family: KernelFamily,
        what: &'static str,
        consts: &[u32],
    ) -> Result<usize, CudaError> {
        if let Some(index) = KERNEL_VARIANTS
            .iter()
            .position(|v| v.family == family && v.consts == consts)
        {
            return Ok(index);
        }
        let compiled: Vec<String> = KERNEL_VARIANTS
            .iter()
            .filter(|v| v.family == family)
            .map(|v| format!("{:?}", v.consts))
            .collect();
        let value = consts.first().map_or(0, |&c| c as usize);
        Err(self.unsupported(
            what,
            value,
            format!(
                "no compiled {} kernel for {:?} = {consts:?}; compiled: {}",
                family.name(),
                family.axes(),
                compiled.join(", ")
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// router

/// Shapes of [`router`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterShape {
    /// Tokens.
    pub tokens: usize,
    /// Hidden size (a multiple of 8).
    pub hidden: usize,
    /// Experts (at most ROUTER_MAX_EXPERTS).
    pub experts: usize,
    /// Experts per token (at most ROUTER_MAX_TOP_K and at most `experts`).
    pub top_k: usize,
}

/// Buffers of [`router`].
pub struct RouterBuffers<'a> {
    /// `[tokens, hidden]` normalised hidden states (16-byte aligned).
    pub x: &'a dyn DevicePtr<bf16>,
    /// `[experts, hidden]` gate weight (16-byte aligned).
    pub gate: &'a dyn DevicePtr<bf16>,
    /// `[tokens, experts]` f32 logits.
    pub logits: &'a mut dyn DevicePtrMut<f32>,
    /// `[tokens, top_k]` chosen experts, best first.
    pub topk_ids: &'a mut dyn DevicePtrMut<i32>,
    /// `[tokens, top_k]` renormalised routing weights.
    pub topk_weights: &'a mut dyn DevicePtrMut<f32>,
    /// `[experts]` slots per expert.
    pub expert_counts: &'a mut dyn DevicePtrMut<i32>,
    /// `[experts + 1]` exclusive prefix sum of the counts.
    pub expert_offsets: &'a mut dyn DevicePtrMut<i32>,
    /// `[tokens * top_k]` slots grouped by expert, ascending within an expert.
    pub sorted_slots: &'a mut dyn DevicePtrMut<i32>,
}

struct RouterBufs {
    x: Buf,
    gate: Buf,
    logits: Buf,
    topk_ids: Buf,
    topk_weights: Buf,
    expert_counts: Buf,
    expert_offsets: Buf,
    sorted_slots: Buf,
}

fn plan_router(
    s: &RouterShape,
    b: &RouterBufs,
) -> Result<Option<[Launch<RouterParams>; 2]>, CudaError> {
    let c = Check { op: "router" };
    c.multiple_of_8("hidden", s.hidden)?;
    if s.experts == 0 || s.experts > ROUTER_MAX_EXPERTS as usize {
        return Err(c.unsupported(
            "experts",
            s.experts,
            format!("must be in 1..={ROUTER_MAX_EXPERTS}"),
        ));
    }
    if s.top_k == 0 || s.top_k > s.experts || s.top_k > ROUTER_MAX_TOP_K as usize {
        return Err(c.unsupported(
            "top_k",
            s.top_k,
            format!("must be in 1..={} and at most experts", ROUTER_MAX_TOP_K),
        ));
    }
    let tokens = c.count("tokens", s.tokens)?;
    let slots = c.product("tokens * top_k", &[s.tokens, s.top_k])?;
    c.aligned16("x", b.x)?;
    c.aligned16("gate", b.gate)?;
    c.len(
        "x",
        b.x,
        c.product("tokens * hidden", &[s.tokens, s.hidden])?,
    )?;
    c.len(
        "gate",
        b.gate,
        c.product("experts * hidden", &[s.experts, s.hidden])?,
    )?;
    c.len(
        "logits",
        b.logits,
        c.product("tokens * experts", &[s.tokens, s.experts])?,
    )?;
    c.len("topk_ids", b.topk_ids, slots)?;
    c.len("topk_weights", b.topk_weights, slots)?;
    c.len("expert_counts", b.expert_counts, s.experts)?;
    c.len("expert_offsets", b.expert_offsets, s.experts + 1)?;
    c.len("sorted_slots", b.sorted_slots, slots)?;
    let topk = c.variant(KernelFamily::RouterTopk, "router_topk", &[])?;
    let group = c.variant(KernelFamily::RouterGroup, "router_group", &[])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let params = RouterParams {
        x: b.x.address,
        gate: b.gate.address,
        logits: b.logits.address,
        topk_ids: b.topk_ids.address,
        topk_weights: b.topk_weights.address,
        expert_counts: b.expert_counts.address,
        expert_offsets: b.expert_offsets.address,
        sorted_slots: b.sorted_slots.address,
        tokens,
        hidden: c.count("hidden", s.hidden)?,
        experts: s.experts as u32,
        top_k: s.top_k as u32,
    };
    Ok(Some([
        Launch {
            variant: topk,
            grid: (tokens, 1, 1),
            block: ROUTER_THREADS,
            shared_bytes: 0,
            params,
        },
        Launch {
            variant: group,
            grid: (1, 1, 1),
            block: ROUTER_GROUP_THREADS,
            shared_bytes: 0,
            params,
        },
    ]))
}

/// Router logits, softmax, top-k with renormalised weights, and the grouping of slots per expert.
pub fn router(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RouterShape,
    b: RouterBuffers<'_>,
) -> Result<(), CudaError> {
    let (x, _x) = read(b.x, stream);
    let (gate, _gate) = read(b.gate, stream);
    let (logits, _logits) = write(b.logits, stream);
    let (topk_ids, _topk_ids) = write(b.topk_ids, stream);
    let (topk_weights, _topk_weights) = write(b.topk_weights, stream);
    let (expert_counts, _expert_counts) = write(b.expert_counts, stream);
    let (expert_offsets, _expert_offsets) = write(b.expert_offsets, stream);
    let (sorted_slots, _sorted_slots) = write(b.sorted_slots, stream);
    let bufs = RouterBufs {
        x,
        gate,
        logits,
        topk_ids,
        topk_weights,
        expert_counts,
        expert_offsets,
        sorted_slots,
    };
    if let Some(plans) = plan_router(shape, &bufs)? {
        for plan in &plans {
            launch(kernels, stream, plan)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// moe (decode-batch GEMV)

/// Shapes of [`moe_gemv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    /// Tokens.
    pub tokens: usize,
    /// Hidden size (a multiple of 8).
    pub hidden: usize,
    /// Expert intermediate size (a multiple of 8).
    pub inter: usize,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
}

/// Buffers of [`moe_gemv`]; every bf16 buffer is 16-byte aligned.
pub struct MoeBuffers<'a> {
    /// `[tokens, hidden]` normalised hidden states.
    pub x: &'a dyn DevicePtr<bf16>,
    /// `[experts, inter, hidden]` gate projections.
    pub w1: &'a dyn DevicePtr<bf16>,
    /// `[experts, inter, hidden]` up projections.
    pub w3: &'a dyn DevicePtr<bf16>,
    /// `[experts, hidden, inter]` down projections.
    pub w2: &'a dyn DevicePtr<bf16>,
    /// `[tokens, top_k]` routing weights (from [`router`]).
    pub topk_weights: &'a dyn DevicePtr<f32>,
    /// `[experts + 1]` slot offsets per expert (from [`router`]).
    pub expert_offsets: &'a dyn DevicePtr<i32>,
    /// `[tokens * top_k]` slots grouped by expert (from [`router`]).
    pub sorted_slots: &'a dyn DevicePtr<i32>,
    /// `[tokens * top_k, inter]` scratch: SwiGLU activations per slot.
    pub act: &'a mut dyn DevicePtrMut<bf16>,
    /// `[tokens * top_k, hidden]` weighted expert output per slot (sum over the slots of a token with
    /// [`rmsnorm`]'s f32 addend).
    pub out: &'a mut dyn DevicePtrMut<f32>,
}

struct MoeBufs {
    x: Buf,
    w1: Buf,
    w3: Buf,
    w2: Buf,
    topk_weights: Buf,
    expert_offsets: Buf,
    sorted_slots: Buf,
    act: Buf,
    out: Buf,
}

/// Slots handled per weight pass: the smallest compiled tile covering `tokens` (the most slots one
/// expert can get), capped at the largest tile.
fn moe_tile(tokens: usize) -> u32 {
    match tokens {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    }
}

/// The checks both expert kernels share (sizes, the 16-byte alignment of x, the weights and act,
/// every buffer's length) and their parameters; returns them with the slot count.
fn moe_params(c: &Check, s: &MoeShape, b: &MoeBufs) -> Result<(MoeParams, usize), CudaError> {
    c.multiple_of_8("hidden", s.hidden)?;
    c.multiple_of_8("inter", s.inter)?;
    c.at_least("experts", s.experts, 1)?;
    if s.top_k == 0 || s.top_k > s.experts {
        return Err(c.unsupported("top_k", s.top_k, "must be in 1..=experts"));
    }
    let tokens = c.count("tokens", s.tokens)?;
    let slots = c.product("tokens * top_k", &[s.tokens, s.top_k])?;
    for (name, buf) in [
        ("x", b.x),
        ("w1", b.w1),
        ("w3", b.w3),
        ("w2", b.w2),
        ("act", b.act),
    ] {
        c.aligned16(name, buf)?;
    }
    // Weight offsets are computed in 64 bits; only the totals must exist.
    let weights = s
        .experts
        .checked_mul(s.inter)
        .and_then(|n| n.checked_mul(s.hidden))
        .ok_or_else(|| c.unsupported("expert weight elements", usize::MAX, "overflows"))?;
    c.len(
        "x",
        b.x,
        c.product("tokens * hidden", &[s.tokens, s.hidden])?,
    )?;
    c.len("w1", b.w1, weights)?;
    c.len("w3", b.w3, weights)?;
    c.len("w2", b.w2, weights)?;
    c.len("topk_weights", b.topk_weights, slots)?;
    c.len("expert_offsets", b.expert_offsets, s.experts + 1)?;
    c.len("sorted_slots", b.sorted_slots, slots)?;
    let elements = |what: &'static str, width: usize| {
        slots
            .checked_mul(width)
            .ok_or_else(|| c.unsupported(what, usize::MAX, "overflows"))
    };
    c.len("act", b.act, elements("act elements", s.inter)?)?;
    c.len("out", b.out, elements("out elements", s.hidden)?)?;
    let params = MoeParams {
        x: b.x.address,
        w1: b.w1.address,
        w3: b.w3.address,
        w2: b.w2.address,
        topk_weights: b.topk_weights.address,
        expert_offsets: b.expert_offsets.address,
        sorted_slots: b.sorted_slots.address,
        act: b.act.address,
        out: b.out.address,
        tokens,
        hidden: c.count("hidden", s.hidden)?,
        inter: c.count("inter", s.inter)?,
        experts: c.count("experts", s.experts)?,
        top_k: c.count("top_k", s.top_k)?,
    };
    Ok((params, slots))
}

fn plan_moe(s: &MoeShape, b: &MoeBufs) -> Result<Option<[Launch<MoeParams>; 2]>, CudaError> {
    let c = Check { op: "moe_gemv" };
    let experts = c.grid_yz("experts", s.experts)?;
    let (params, _) = moe_params(&c, s, b)?;
    let tile = moe_tile(s.tokens);
    let up = c.variant(KernelFamily::MoeUp, "tile", &[tile])?;
    let down = c.variant(KernelFamily::MoeDown, "tile", &[tile])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let block = MOE_WARPS * 32;
    let up_rows_per_block = MOE_WARPS as usize;
    let down_rows_per_block = (MOE_WARPS * MOE_DOWN_ROWS_PER_WARP) as usize;
    Ok(Some([
        Launch {
            variant: up,
            grid: (
                c.count("inter blocks", s.inter.div_ceil(up_rows_per_block))?,
                experts,
                1,
            ),
            block,
            shared_bytes: 0,
            params,
        },
        Launch {
            variant: down,
            grid: (
                c.count("hidden blocks", s.hidden.div_ceil(down_rows_per_block))?,
                experts,
                1,
            ),
            block,
            shared_bytes: 0,
            params,
        },
    ]))
}

/// The routed expert MLPs of a decode batch: `act = silu(w1 x) * (w3 x)`, `out = weight * (w2 act)`
/// per slot.
pub fn moe_gemv(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeShape,
    b: MoeBuffers<'_>,
) -> Result<(), CudaError> {
    launch_moe(kernels, stream, shape, b, plan_moe)
}

/// A planner of the expert kernels: the two launches (up, down) for the shapes and buffers, or none.
type MoePlanner = fn(&MoeShape, &MoeBufs) -> Result<Option<[Launch<MoeParams>; 2]>, CudaError>;

/// Takes the addresses of `b`, plans the two expert launches with `planner` and issues them (the
/// shared body of [`moe_gemv`] and [`moe_grouped_gemm`]).
fn launch_moe(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeShape,
    b: MoeBuffers<'_>,
    planner: MoePlanner,
) -> Result<(), CudaError> {
    let (x, _x) = read(b.x, stream);
    let (w1, _w1) = read(b.w1, stream);
    let (w3, _w3) = read(b.w3, stream);
    let (w2, _w2) = read(b.w2, stream);
    let (topk_weights, _topk_weights) = read(b.topk_weights, stream);
    let (expert_offsets, _expert_offsets) = read(b.expert_offsets, stream);
    let (sorted_slots, _sorted_slots) = read(b.sorted_slots, stream);
    let (act, _act) = write(b.act, stream);
    let (out, _out) = write(b.out, stream);
    let bufs = MoeBufs {
        x,
        w1,
        w3,
        w2,
        topk_weights,
        expert_offsets,
        sorted_slots,
        act,
        out,
    };
    if let Some(plans) = planner(shape, &bufs)? {
        for plan in &plans {
            launch(kernels, stream, plan)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ops in their own files (each child module uses the checked plumbing above).

mod argmax;
pub use argmax::*;

mod embedding;
pub use embedding::*;

mod rmsnorm;
pub use rmsnorm::*;

#[cfg(test)]
pub(crate) mod fake;

mod linear;
pub use linear::*;

mod moe_grouped;
pub use moe_grouped::*;

mod paged_cache;
pub use paged_cache::{attention_splits, PagedCacheShape};

mod rope_kv;
pub use rope_kv::*;

mod attention_decode;
pub use attention_decode::*;

mod attention_prefill;
pub use attention_prefill::*;

mod sample;
pub use sample::*;

mod fill;
pub use fill::*;

#[cfg(test)]
mod tests;

mod quant_layout;
pub use quant_layout::PackedView;

mod qlinear;
pub use qlinear::*;

mod qmoe;
pub use qmoe::*;

mod dequant;
pub use dequant::*;

mod moe_wgmma;
pub use moe_wgmma::*;
