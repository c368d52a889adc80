//! Weight upload: every tensor the GPU plan reads is copied from the memory-mapped checkpoint to
//! device memory in chunks through two pinned (page-locked, write-combined) staging buffers, so
//! there is never a second full host copy: while the device copies one chunk, the host converts the
//! next into the other buffer (bf16 is copied as is, f16 / f32 are rounded to bf16 on the way).
//!
//! Layouts on the device (row-major): per layer the fused `qkv` `[q_width + 2 kv_width, hidden]`
//! (q rows, then k, then v), `o` `[hidden, q_width]`, the two norms `[hidden]`, the router
//! `[experts, hidden]` (zeros for a dense model, whose one expert then gets weight 1), and the
//! experts stacked: `w1`, `w3` `[experts, inter, hidden]`, `w2` `[experts, hidden, inter]`. Then the
//! embedding `[vocab, hidden]`, the final norm and the LM head (the embedding's region when tied).
//! Norms, router, embedding and LM head are bf16; each projection stack is bf16 or, when its
//! matrices are quantized ([`weight_formats`]), packed (codes, scales, permutation, and the table of
//! 4-bit table codes: see [`super::matrix`]), copied as it is held in memory.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};
use half::bf16;

use super::super::error::CudaError;
use super::super::memory::{DeviceArena, DeviceBuffer, View, ViewMut};
use super::super::module::Kernels;
use super::super::ops::{fill_random, FillValues};
use super::super::select::{select, Choice, Device, Format, Op};
use super::host::{upload_bytes, HostModel, HostTensor};
use super::matrix::{
    stack_format, table_values, DeviceMatrix, PackedStack, ProductScratch, StackFormat,
};
use crate::checkpoint::LoadProgress;
use crate::config::ModelConfig;
use crate::dtype::WeightSlice;
use crate::packed::int4_device_word;
use crate::quant::PackedKind;
use crate::weights::ModelWeights;

/// Bytes of each pinned staging buffer.
const STAGING_BYTES: usize = 32 << 20;
/// Least bytes between two progress reports.
const PROGRESS_STEP: u64 = 256 << 20;

/// One decoder layer on the device.
#[derive(Debug)]
pub struct LayerWeights {
    /// Norm before attention `[hidden]`.
    pub attn_norm: DeviceBuffer<bf16>,
    /// Fused q/k/v projection `[q_width + 2 kv_width, hidden]`.
    pub qkv: DeviceMatrix,
    /// Output projection `[hidden, q_width]`.
    pub o: DeviceMatrix,
    /// Norm before the experts `[hidden]`.
    pub ffn_norm: DeviceBuffer<bf16>,
    /// Router `[experts, hidden]`.
    pub gate: DeviceBuffer<bf16>,
    /// Gate projections `[experts, inter, hidden]`.
    pub w1: DeviceMatrix,
    /// Up projections `[experts, inter, hidden]` (read with w1's permutation when packed).
    pub w3: DeviceMatrix,
    /// Down projections `[experts, hidden, inter]`.
    pub w2: DeviceMatrix,
}

/// Every weight on the device.
#[derive(Debug)]
pub struct GpuWeights {
    /// Embedding `[vocab, hidden]`.
    pub embed: DeviceBuffer<bf16>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final norm `[hidden]`.
    pub final_norm: DeviceBuffer<bf16>,
    /// LM head `[vocab, hidden]`; `None` when it is the embedding (tied).
    pub lm_head: Option<DeviceBuffer<bf16>>,
    /// Where packed stacks are expanded for large chunks (empty when nothing is packed), and
    /// CUTLASS's dense-GEMM workspace where the engine uses it.
    pub scratch: ProductScratch,
}

impl GpuWeights {
    /// The LM head and the products' scratch, borrowed together.
    pub fn head_and_scratch(&mut self) -> (View<'_, bf16>, &mut ProductScratch) {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).view();
        (head, &mut self.scratch)
    }
}

/// How each stack of one layer is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerFormats {
    /// Fused q/k/v.
    pub qkv: StackFormat,
    /// o_proj.
    pub o: StackFormat,
    /// The w1 and w3 stacks (one format: they share their permutation).
    pub w13: StackFormat,
    /// The w2 stack.
    pub w2: StackFormat,
}

impl LayerFormats {
    /// Every stack in `format`.
    pub fn all(format: StackFormat) -> LayerFormats {
        LayerFormats {
            qkv: format,
            o: format,
            w13: format,
            w2: format,
        }
    }
}

/// The storage of every layer's stacks for `weights` (a model's, or a rank's shard): packed where
/// [`stack_format`] allows.
pub fn weight_formats<M: HostModel>(weights: &M) -> Vec<LayerFormats> {
    weights
        .host_layers()
        .iter()
        .map(|l| {
            let w13: Vec<[&M::Tensor; 2]> =
                l.experts.iter().map(|[w1, w3, _]| [*w1, *w3]).collect();
            let w13: Vec<&[&M::Tensor]> = w13.iter().map(|g| g.as_slice()).collect();
            let w2: Vec<[&M::Tensor; 1]> = l.experts.iter().map(|[_, _, w2]| [*w2]).collect();
            LayerFormats {
                qkv: stack_format(&[&l.qkv]),
                o: stack_format(&[&[l.o]]),
                w13: stack_format(&w13),
                w2: stack_format(&singles(&w2)),
            }
        })
        .collect()
}

/// Bytes [`allocate_weights`] allocates for a model of `config` (`tied`: the LM head is the
/// embedding) with `formats` per layer and chunks of up to `max_tokens` tokens (the dequantization
/// scratch): it runs on a sizing arena; `usize::MAX` when a length overflows.
pub fn device_weight_bytes(
    config: &ModelConfig,
    tied: bool,
    formats: &[LayerFormats],
    max_tokens: usize,
) -> usize {
    DeviceArena::sized(|arena| allocate_weights(config, tied, formats, max_tokens, arena))
}

/// bf16 elements of the scratch buffers (dense, w1, w3, w2; 0 = none) packed stacks need for chunks
/// of up to `max_tokens` tokens.
fn scratch_elements(
    config: &ModelConfig,
    formats: &[LayerFormats],
    max_tokens: usize,
) -> [usize; 4] {
    let c = config;
    let h = c.hidden_size;
    let experts = c.num_experts.max(1);
    let mut dense = 0;
    let mut expert = [0; 3];
    for f in formats {
        let largest = |op| select(op, max_tokens, Format::Packed, Device::default());
        if largest(Op::Projection) == Choice::DequantizeThenLinearMma {
            if f.qkv != StackFormat::Bf16 {
                dense = dense.max((c.q_width() + 2 * c.kv_width()) * h);
            }
            if f.o != StackFormat::Bf16 {
                dense = dense.max(h * c.q_width());
            }
        }
        let packed = [f.w13, f.w2].map(|f| f != StackFormat::Bf16);
        // Mixed stacks (one bf16, or packed in two kinds, which `qmoe` cannot take together)
        // run the bf16 kernels at every size, expanding the packed ones.
        let expands = f.w13.kind() != f.w2.kind() || largest(Op::Experts) != Choice::QMoeGemv;
        if packed.contains(&true) && expands {
            let n = experts * c.intermediate_size * h;
            expert = [n, n, n];
        }
    }
    [dense, expert[0], expert[1], expert[2]]
}

/// True when the LM head is the embedding tensor.
pub fn is_tied(weights: &ModelWeights) -> bool {
    weights.lm_head.tensor.name() == weights.embed.tensor.name()
}

/// Allocates one stack of `count` matrices `[rows, cols]` in `format` (without a permutation
/// buffer unless `own_perm`: w3 reads w1's).
fn allocate_stack(
    arena: &mut DeviceArena,
    format: StackFormat,
    shape: (usize, usize, usize),
    own_perm: bool,
    what: &str,
) -> Result<DeviceMatrix, CudaError> {
    let (count, rows, cols) = shape;
    match format {
        StackFormat::Bf16 => Ok(DeviceMatrix::Bf16(arena.zeroed(count * rows * cols, what)?)),
        StackFormat::Packed { kind, perm } => {
            let stack = PackedStack::allocate(arena, (kind, perm && own_perm), shape, what)?;
            Ok(DeviceMatrix::Packed(Box::new(stack)))
        }
    }
}

/// Allocates (zero-filled) every weight region of a model of `config` with `formats` per layer in
/// `arena`, and the dequantization scratch for chunks of up to `max_tokens` tokens.
pub fn allocate_weights(
    config: &ModelConfig,
    tied: bool,
    formats: &[LayerFormats],
    max_tokens: usize,
    arena: &mut DeviceArena,
) -> Result<GpuWeights, CudaError> {
    let c = config;
    let h = c.hidden_size;
    let experts = c.num_experts.max(1);
    let inter = c.intermediate_size;
    let mut layers = Vec::with_capacity(c.num_layers);
    for (l, f) in formats.iter().enumerate().take(c.num_layers) {
        let layer = |what: &str| format!("layer {l} {what}");
        let attn_norm = arena.zeroed(h, &layer("input norm"))?;
        // A stack of `shape` in `format` (with its own permutation buffer unless it is w3).
        let mut stack = |format, shape, own_perm, what: &str| {
            allocate_stack(arena, format, shape, own_perm, &layer(what))
        };
        let qkv_rows = c.q_width() + 2 * c.kv_width();
        let qkv = stack(f.qkv, (1, qkv_rows, h), true, "fused q/k/v projection")?;
        let o = stack(f.o, (1, h, c.q_width()), true, "o_proj")?;
        let w1 = stack(f.w13, (experts, inter, h), true, "experts w1")?;
        let w3 = stack(f.w13, (experts, inter, h), false, "experts w3")?;
        let w2 = stack(f.w2, (experts, h, inter), true, "experts w2")?;
        let ffn_norm = arena.zeroed(h, &layer("ffn norm"))?;
        let gate = arena.zeroed(experts * h, &layer("router"))?;
        layers.push(LayerWeights {
            attn_norm,
            qkv,
            o,
            ffn_norm,
            gate,
            w1,
            w3,
            w2,
        });
    }
    let embed = arena.zeroed(c.vocab_size * h, "embedding")?;
    let final_norm = arena.zeroed(h, "final norm")?;
    let lm_head = if tied {
        None
    } else {
        Some(arena.zeroed(c.vocab_size * h, "lm_head")?)
    };
    let [dense, w1, w3, w2] = scratch_elements(config, formats, max_tokens);
    let mut scratch_region =
        |n: usize, what: &str| -> Result<Option<DeviceBuffer<bf16>>, CudaError> {
            if n == 0 {
                Ok(None)
            } else {
                arena.zeroed(n, what).map(Some)
            }
        };
    let scratch = ProductScratch {
        dense: scratch_region(dense, "dequantized projection scratch")?,
        w1: scratch_region(w1, "dequantized w1 scratch")?,
        w3: scratch_region(w3, "dequantized w3 scratch")?,
        w2: scratch_region(w2, "dequantized w2 scratch")?,
        linear: None,
    };
    Ok(GpuWeights {
        embed,
        layers,
        final_norm,
        lm_head,
        scratch,
    })
}

/// Double-buffered pinned staging.
pub(super) struct Staging<'s> {
    stream: &'s Arc<CudaStream>,
    buffers: [PinnedHostSlice<u8>; 2],
    copied: [CudaEvent; 2],
    next: usize,
    done_bytes: u64,
    total_bytes: u64,
    reported: u64,
    progress: Option<&'s dyn Fn(LoadProgress)>,
}

impl<'s> Staging<'s> {
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        stream: &'s Arc<CudaStream>,
        total_bytes: u64,
        progress: Option<&'s dyn Fn(LoadProgress)>,
    ) -> Result<Self, CudaError> {
        let pinned = || {
            // SAFETY: the buffer is only written (whole chunks) before it is read by a copy.
            unsafe { ctx.alloc_pinned::<u8>(STAGING_BYTES) }
                .map_err(CudaError::driver("allocating pinned staging memory"))
        };
        let event = || {
            ctx.new_event(None)
                .map_err(CudaError::driver("creating a staging event"))
        };
        Ok(Staging {
            stream,
            buffers: [pinned()?, pinned()?],
            copied: [event()?, event()?],
            next: 0,
            done_bytes: 0,
            total_bytes,
            reported: 0,
            progress,
        })
    }

    /// Copies `src` (converted to bf16) to `dst[offset ..]`.
    pub(super) fn copy(
        &mut self,
        src: WeightSlice<'_>,
        dst: ViewMut<'_, bf16>,
        offset: usize,
        name: &str,
    ) -> Result<(), CudaError> {
        let target = dst.sub(offset, src.len()).ok_or_else(|| {
            CudaError::UnsupportedModel(format!("{name} does not fit its buffer"))
        })?;
        self.copy_bytes(target.cast::<u8>(), name, &mut |at, out| {
            let (first, count) = (at / 2, out.len() / 2);
            convert_to_bf16(src.slice(first..first + count), out);
        })
    }

    /// Fills all of `target` through the staging buffers: `fill(byte offset, chunk)` writes the
    /// bytes of each chunk (an even length, at an even offset).
    fn copy_bytes(
        &mut self,
        target: ViewMut<'_, u8>,
        name: &str,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<(), CudaError> {
        let total = target.len();
        let mut done = 0;
        while done < total {
            let take = (total - done).min(STAGING_BYTES);
            let i = self.next;
            self.next ^= 1;
            // The previous copy out of this buffer must be finished before it is rewritten.
            self.copied[i]
                .synchronize()
                .map_err(CudaError::driver(format!("uploading {name}")))?;
            let host = self.buffers[i]
                .as_mut_slice()
                .map_err(CudaError::driver("mapping pinned staging memory"))?;
            let bytes = &mut host[..take];
            fill(done, bytes);
            // SAFETY: `bytes` is pinned memory that is not touched again until `copied[i]` (recorded
            // right after) has completed; `target` is a live, exclusively borrowed buffer of `total`
            // bytes.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    target.address() + done as u64,
                    &*bytes,
                    self.stream.cu_stream(),
                )
            }
            .map_err(CudaError::driver(format!("uploading {name}")))?;
            self.copied[i]
                .record(self.stream)
                .map_err(CudaError::driver(format!("uploading {name}")))?;
            done += take;
            self.advance(take as u64);
        }
        Ok(())
    }

    fn advance(&mut self, bytes: u64) {
        self.done_bytes += bytes;
        if let Some(progress) = self.progress {
            if self.done_bytes - self.reported >= PROGRESS_STEP
                || self.done_bytes == self.total_bytes
            {
                self.reported = self.done_bytes;
                progress(LoadProgress {
                    done_bytes: self.done_bytes,
                    total_bytes: self.total_bytes,
                });
            }
        }
    }

    /// Waits for every copy, then reports the end (`done_bytes == total_bytes`: the total was an
    /// upper bound).
    pub(super) fn finish(&mut self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("finishing the weight upload"))?;
        if let Some(progress) = self.progress {
            if self.reported != self.done_bytes || self.total_bytes != self.done_bytes {
                progress(LoadProgress {
                    done_bytes: self.done_bytes,
                    total_bytes: self.done_bytes,
                });
            }
        }
        Ok(())
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        // A failed upload may leave copies in flight: the pinned buffers must outlive them.
        let _ = self.stream.synchronize();
    }
}

/// Writes `src` as little-endian bf16 bytes into `out` (`2 * src.len()` bytes).
fn convert_to_bf16(src: WeightSlice<'_>, out: &mut [u8]) {
    match src {
        WeightSlice::BF16(s) => out.copy_from_slice(bytemuck::cast_slice(s)),
        WeightSlice::F16(s) => write_bf16(s.iter().map(|x| x.to_f32()), out),
        WeightSlice::F32(s) => write_bf16(s.iter().copied(), out),
    }
}

/// Writes each of `values` rounded to bf16, little-endian, into the next two bytes of `out`.
fn write_bf16(values: impl Iterator<Item = f32>, out: &mut [u8]) {
    for (o, x) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
    }
}

/// Copies `parts` one after the other into `dst` (converted to bf16).
pub(super) fn copy_stacked<T: HostTensor>(
    staging: &mut Staging<'_>,
    dst: &mut DeviceBuffer<bf16>,
    parts: &[&T],
    what: &str,
) -> Result<(), CudaError> {
    let mut offset = 0;
    for part in parts {
        let data = part.data();
        let len = data.len();
        staging.copy(data, dst.view_mut(), offset, what)?;
        offset += len;
    }
    Ok(())
}

/// Copies `src` into `dst[offset ..]` of a byte view.
fn copy_raw(
    staging: &mut Staging<'_>,
    dst: ViewMut<'_, u8>,
    offset: usize,
    src: &[u8],
    what: &str,
) -> Result<(), CudaError> {
    let target = dst
        .sub(offset, src.len())
        .ok_or_else(|| CudaError::UnsupportedModel(format!("{what} does not fit its buffer")))?;
    staging.copy_bytes(target, what, &mut |at, out| {
        out.copy_from_slice(&src[at..at + out.len()])
    })
}

/// Copies a stack whose matrix `m` is `matrices[m]` (row blocks stored one after the other, e.g.
/// q, k, v) into `dst`, with the permutation where the stack has a buffer for it.
fn copy_matrices<T: HostTensor>(
    staging: &mut Staging<'_>,
    dst: &mut DeviceMatrix,
    matrices: &[&[&T]],
    what: &str,
) -> Result<(), CudaError> {
    let p = match dst {
        DeviceMatrix::Bf16(region) => {
            let parts: Vec<&T> = matrices.iter().flat_map(|m| m.iter().copied()).collect();
            return copy_stacked(staging, region, &parts, what);
        }
        DeviceMatrix::Packed(p) => p,
    };
    let (mut codes, mut params) = (0, 0);
    for (m, blocks) in matrices.iter().enumerate() {
        for (b, w) in blocks.iter().enumerate() {
            let packed = w.packed().ok_or_else(|| {
                CudaError::UnsupportedModel(format!("{what}: {} is not packed", w.name()))
            })?;
            copy_raw(staging, p.codes.view_mut(), codes, &packed.codes, what)?;
            codes += packed.codes.len();
            let words = packed
                .device_params()
                .map_err(|e| CudaError::UnsupportedModel(format!("{what}: {}: {e}", w.name())))?;
            copy_raw(
                staging,
                p.params.view_mut().cast(),
                params,
                bytemuck::cast_slice(&words),
                what,
            )?;
            params += 4 * words.len();
            if let (0, Some(buffer), Some(perm)) = (b, &mut p.perm, &packed.perm) {
                let at = 4 * m * p.cols;
                copy_raw(
                    staging,
                    buffer.view_mut().cast(),
                    at,
                    bytemuck::cast_slice(perm),
                    what,
                )?;
            }
        }
        // A matrix without a permutation in a stack that has one gets the identity.
        let first = blocks.first().and_then(|w| w.packed());
        if let (Some(buffer), Some(None)) = (&mut p.perm, first.map(|f| &f.perm)) {
            let identity: Vec<u32> = (0..p.cols as u32).collect();
            let at = 4 * m * p.cols;
            copy_raw(
                staging,
                buffer.view_mut().cast(),
                at,
                bytemuck::cast_slice(&identity),
                what,
            )?;
        }
    }
    copy_table(staging, p, what)
}

/// Copies the table of a LUT4 stack (its kind's values); nothing for the other kinds.
fn copy_table(staging: &mut Staging<'_>, p: &mut PackedStack, what: &str) -> Result<(), CudaError> {
    if let (Some(buffer), Some(values)) = (&mut p.table, table_values(p.kind)) {
        copy_raw(
            staging,
            buffer.view_mut().cast(),
            0,
            bytemuck::cast_slice(&values),
            what,
        )?;
    }
    Ok(())
}

/// One matrix per entry (a stack of single-block matrices).
fn singles<'w, T>(v: &'w [[&'w T; 1]]) -> Vec<&'w [&'w T]> {
    v.iter().map(|m| m.as_slice()).collect()
}

/// Uploads `weights` (a model's, or a rank's shard) into the regions of `gpu` (made by
/// [`allocate_weights`] for their sizes and the [`weight_formats`] of `weights`), reporting
/// progress in bytes uploaded.
pub fn upload_weights<M: HostModel>(
    weights: &M,
    gpu: &mut GpuWeights,
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    progress: Option<&dyn Fn(LoadProgress)>,
) -> Result<(), CudaError> {
    let layers = weights.host_layers();
    let [embed, final_norm, lm_head] = weights.ends();
    let head = gpu.lm_head.is_some().then_some(lm_head);
    let mut total = [embed, final_norm]
        .into_iter()
        .chain(head)
        .map(upload_bytes)
        .sum::<u64>();
    for l in &layers {
        let norms_and_router = [l.attn_norm, l.ffn_norm].into_iter().chain(l.router);
        let tensors = norms_and_router
            .chain([l.o])
            .chain(l.qkv)
            .chain(l.experts.concat());
        total += tensors.map(upload_bytes).sum::<u64>();
    }
    let mut staging = Staging::new(ctx, stream, total, progress)?;
    let st = &mut staging;
    for (l, (lw, g)) in layers.iter().zip(&mut gpu.layers).enumerate() {
        copy_stacked(
            st,
            &mut g.attn_norm,
            &[lw.attn_norm],
            &format!("layer {l} input norm"),
        )?;
        copy_stacked(
            st,
            &mut g.ffn_norm,
            &[lw.ffn_norm],
            &format!("layer {l} ffn norm"),
        )?;
        copy_matrices(st, &mut g.o, &[&[lw.o]], &format!("layer {l} o_proj"))?;
        copy_matrices(
            st,
            &mut g.qkv,
            &[&lw.qkv],
            &format!("layer {l} q/k/v projections"),
        )?;
        // A dense model has no router: its zero gate gives the one expert weight 1.
        if let Some(r) = lw.router {
            copy_stacked(st, &mut g.gate, &[r], &format!("layer {l} router"))?;
        }
        // w3 has no permutation buffer of its own: it reads w1's.
        for (stack, m, name) in [
            (&mut g.w1, 0, "w1"),
            (&mut g.w3, 1, "w3"),
            (&mut g.w2, 2, "w2"),
        ] {
            let matrices: Vec<[&M::Tensor; 1]> = lw.experts.iter().map(|e| [e[m]]).collect();
            copy_matrices(
                st,
                stack,
                &singles(&matrices),
                &format!("layer {l} experts {name}"),
            )?;
        }
    }
    copy_stacked(st, &mut gpu.embed, &[embed], "embedding")?;
    copy_stacked(st, &mut gpu.final_norm, &[final_norm], "final norm")?;
    if let Some(region) = &mut gpu.lm_head {
        copy_stacked(st, region, &[lm_head], "lm_head")?;
    }
    staging.finish()
}

/// Fills a packed stack with seeded codes from the host (every byte a valid code: FP8 NaN codes
/// are moved to the largest finite code) and parameters giving weights of about the variance
/// `1 / cols` (4-bit: zero 8). For benchmarks: the values mean nothing.
fn randomize_packed(
    staging: &mut Staging<'_>,
    p: &mut PackedStack,
    seed: u64,
) -> Result<(), CudaError> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let fp8 = p.kind == PackedKind::Fp8;
    staging.copy_bytes(p.codes.view_mut(), "random packed codes", &mut |_, out| {
        for chunk in out.chunks_mut(8) {
            let word = next().to_le_bytes();
            for (o, b) in chunk.iter_mut().zip(word) {
                *o = if fp8 && b & 0x7F == 0x7F { b ^ 1 } else { b };
            }
        }
    })?;
    let spread = 1.0 / (p.cols.max(1) as f32).sqrt();
    // One parameter word for every row or group.
    let word: f32 = match p.kind {
        // Random E4M3 codes are mostly within 2^-7..2^8 in magnitude.
        PackedKind::Fp8 => spread / 64.0,
        PackedKind::Int8 => spread * 3f32.sqrt() / 128.0,
        PackedKind::Int4 { .. } => {
            let scale = half::f16::from_f32(spread * 3f32.sqrt() / 8.0).to_f32();
            let word = int4_device_word(scale, 8.0).ok_or_else(|| {
                CudaError::UnsupportedModel(format!("random 4-bit scale {scale} out of f16 range"))
            })?;
            f32::from_bits(word)
        }
        // Table values lie in [-1, 1]; one scale per group (the table itself is the kind's).
        PackedKind::Lut4 { .. } => spread * 3f32.sqrt(),
    };
    copy_table(staging, p, "random packed stack")?;
    let params = p.params.view_mut().cast::<u8>();
    staging.copy_bytes(params, "random packed scales", &mut |_, out| {
        for o in out.chunks_exact_mut(4) {
            o.copy_from_slice(&word.to_le_bytes());
        }
    })?;
    let cols = p.cols;
    if let Some(perm) = &mut p.perm {
        staging.copy_bytes(
            perm.view_mut().cast(),
            "random permutation",
            &mut |at, out| {
                for (i, o) in out.chunks_exact_mut(4).enumerate() {
                    // The reversed column order of each matrix: a valid permutation.
                    let element = at / 4 + i;
                    let j = element % cols.max(1);
                    o.copy_from_slice(&((cols - 1 - j) as u32).to_le_bytes());
                }
            },
        )?;
    }
    Ok(())
}

/// Fills every region of `gpu` with seeded values of a sensible scale (norm weights near 1,
/// projections uniform with variance 1 / fan-in; packed stacks as `randomize_packed` says), for
/// benchmarks of real shapes without a checkpoint.
pub fn randomize_weights(
    gpu: &mut GpuWeights,
    config: &ModelConfig,
    seed: u32,
    kernels: &Kernels,
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
) -> Result<(), CudaError> {
    let mut next_seed = seed;
    let mut new_seed = move || {
        next_seed = next_seed
            .wrapping_mul(747_796_405)
            .wrapping_add(2_891_336_453);
        next_seed
    };
    let fill = |buffer: &mut DeviceBuffer<bf16>, fan_in: usize, shift: f32, seed: u32| {
        let scale = if shift == 0.0 {
            (3.0 / fan_in.max(1) as f32).sqrt()
        } else {
            0.1
        };
        let values = FillValues { seed, scale, shift };
        fill_random(kernels, stream, &values, buffer.view_mut())
    };
    let mut staging = Staging::new(ctx, stream, 0, None)?;
    let mut fill_matrix = |m: &mut DeviceMatrix, fan_in: usize, seed: u32| match m {
        DeviceMatrix::Bf16(buffer) => fill(buffer, fan_in, 0.0, seed),
        DeviceMatrix::Packed(p) => randomize_packed(&mut staging, p, u64::from(seed) << 17 | 1),
    };
    let h = config.hidden_size;
    for g in &mut gpu.layers {
        fill(&mut g.attn_norm, 1, 1.0, new_seed())?;
        fill(&mut g.ffn_norm, 1, 1.0, new_seed())?;
        fill_matrix(&mut g.qkv, h, new_seed())?;
        fill_matrix(&mut g.o, config.q_width(), new_seed())?;
        fill(&mut g.gate, h, 0.0, new_seed())?;
        fill_matrix(&mut g.w1, h, new_seed())?;
        fill_matrix(&mut g.w3, h, new_seed())?;
        fill_matrix(&mut g.w2, config.intermediate_size, new_seed())?;
    }
    fill(&mut gpu.embed, 1, 0.0, new_seed())?;
    fill(&mut gpu.final_norm, 1, 1.0, new_seed())?;
    if let Some(lm_head) = &mut gpu.lm_head {
        fill(lm_head, h, 0.0, new_seed())?;
    }
    staging.finish()?;
    stream
        .synchronize()
        .map_err(CudaError::driver("filling random weights"))
}
