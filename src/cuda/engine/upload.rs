//! Weight upload: every tensor the GPU plan reads is copied from the memory-mapped checkpoint to
//! device memory in chunks through two pinned (page-locked, write-combined) staging buffers, so
//! there is never a second full host copy: while the device copies one chunk, the host converts the
//! next into the other buffer (bf16 is copied as is, f16 / f32 are rounded to bf16 on the way).
//!
//! Layouts on the device (all bf16, row-major): per layer the fused `qkv` `[q_width + 2 kv_width,
//! hidden]` (q rows, then k, then v), `o` `[hidden, q_width]`, the two norms `[hidden]`, the router
//! `[experts, hidden]` (zeros for a dense model, whose one expert then gets weight 1), and the
//! experts stacked: `w1`, `w3` `[experts, inter, hidden]`, `w2` `[experts, hidden, inter]`. Then the
//! embedding `[vocab, hidden]`, the final norm and the LM head (the embedding's region when tied).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};
use half::bf16;

use super::super::error::CudaError;
use super::super::module::Kernels;
use super::super::ops::{fill_random, FillShape};
use super::super::region::{DeviceArena, Region};
use crate::checkpoint::LoadProgress;
use crate::config::ModelConfig;
use crate::dtype::WeightSlice;
use crate::weights::{ModelWeights, Weight};

/// Bytes of each pinned staging buffer.
const STAGING_BYTES: usize = 32 << 20;
/// Least bytes between two progress reports.
const PROGRESS_STEP: u64 = 256 << 20;

/// One decoder layer on the device.
#[derive(Debug)]
pub struct LayerRegions {
    /// Norm before attention `[hidden]`.
    pub attn_norm: Region<bf16>,
    /// Fused q/k/v projection `[q_width + 2 kv_width, hidden]`.
    pub qkv: Region<bf16>,
    /// Output projection `[hidden, q_width]`.
    pub o: Region<bf16>,
    /// Norm before the experts `[hidden]`.
    pub ffn_norm: Region<bf16>,
    /// Router `[experts, hidden]`.
    pub gate: Region<bf16>,
    /// Gate projections `[experts, inter, hidden]`.
    pub w1: Region<bf16>,
    /// Up projections `[experts, inter, hidden]`.
    pub w3: Region<bf16>,
    /// Down projections `[experts, hidden, inter]`.
    pub w2: Region<bf16>,
}

/// Every weight on the device.
#[derive(Debug)]
pub struct GpuWeights {
    /// Embedding `[vocab, hidden]`.
    pub embed: Region<bf16>,
    /// Decoder layers.
    pub layers: Vec<LayerRegions>,
    /// Final norm `[hidden]`.
    pub final_norm: Region<bf16>,
    /// LM head `[vocab, hidden]` (the embedding's region when tied).
    pub lm_head: Region<bf16>,
}

/// Bytes [`allocate_weights`] allocates for a model of `config` (`tied`: the LM head is the embedding).
pub fn device_weight_bytes(config: &ModelConfig, tied: bool) -> usize {
    let c = config;
    let h = c.hidden_size;
    let experts = c.num_experts.max(1);
    let per_layer = 2 * h
        + (c.q_width() + 2 * c.kv_width()) * h
        + h * c.q_width()
        + experts * h
        + 3 * experts * c.intermediate_size * h;
    let elements = c.num_layers * per_layer + c.vocab_size * h * if tied { 1 } else { 2 } + h;
    elements * std::mem::size_of::<bf16>()
}

/// True when the LM head is the embedding tensor.
pub fn is_tied(weights: &ModelWeights) -> bool {
    weights.lm_head.tensor.name() == weights.embed.tensor.name()
}

/// Allocates (zero-filled) every weight region of a model of `config` in `arena`.
pub fn allocate_weights(
    config: &ModelConfig,
    tied: bool,
    arena: &mut DeviceArena,
) -> Result<GpuWeights, CudaError> {
    let c = config;
    let h = c.hidden_size;
    let experts = c.num_experts.max(1);
    let inter = c.intermediate_size;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        layers.push(LayerRegions {
            attn_norm: arena.zeroed(h, &format!("layer {l} input norm"))?,
            qkv: arena.zeroed(
                (c.q_width() + 2 * c.kv_width()) * h,
                &format!("layer {l} fused q/k/v projection"),
            )?,
            o: arena.zeroed(h * c.q_width(), &format!("layer {l} o_proj"))?,
            ffn_norm: arena.zeroed(h, &format!("layer {l} ffn norm"))?,
            gate: arena.zeroed(experts * h, &format!("layer {l} router"))?,
            w1: arena.zeroed(experts * inter * h, &format!("layer {l} experts w1"))?,
            w3: arena.zeroed(experts * inter * h, &format!("layer {l} experts w3"))?,
            w2: arena.zeroed(experts * h * inter, &format!("layer {l} experts w2"))?,
        });
    }
    let embed = arena.zeroed(c.vocab_size * h, "embedding")?;
    let final_norm = arena.zeroed(h, "final norm")?;
    let lm_head = if tied {
        embed.clone()
    } else {
        arena.zeroed(c.vocab_size * h, "lm_head")?
    };
    Ok(GpuWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

/// Double-buffered pinned staging.
struct Staging<'s> {
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
    fn new(
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
    fn copy(
        &mut self,
        src: WeightSlice<'_>,
        dst: &Region<bf16>,
        offset: usize,
        name: &str,
    ) -> Result<(), CudaError> {
        let target = dst.sub(offset, src.len()).ok_or_else(|| {
            CudaError::UnsupportedModel(format!("{name} does not fit its region"))
        })?;
        let per_chunk = STAGING_BYTES / std::mem::size_of::<bf16>();
        let mut done = 0;
        while done < src.len() {
            let take = (src.len() - done).min(per_chunk);
            let i = self.next;
            self.next ^= 1;
            // The previous copy out of this buffer must be finished before it is rewritten.
            self.copied[i]
                .synchronize()
                .map_err(CudaError::driver(format!("uploading {name}")))?;
            let host = self.buffers[i]
                .as_mut_slice()
                .map_err(CudaError::driver("mapping pinned staging memory"))?;
            let bytes = &mut host[..take * 2];
            convert_to_bf16(src.slice(done..done + take), bytes);
            // SAFETY: `bytes` is pinned memory that is not touched again until `copied[i]` (recorded
            // right after) has completed; the destination range was bounds-checked above.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    target.address() + (done * 2) as u64,
                    &*bytes,
                    self.stream.cu_stream(),
                )
            }
            .map_err(CudaError::driver(format!("uploading {name}")))?;
            self.copied[i]
                .record(self.stream)
                .map_err(CudaError::driver(format!("uploading {name}")))?;
            done += take;
            self.advance((take * 2) as u64);
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

    /// Waits for every copy.
    fn finish(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("finishing the weight upload"))
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
        WeightSlice::F16(s) => {
            for (o, x) in out.chunks_exact_mut(2).zip(s) {
                o.copy_from_slice(&bf16::from_f32(x.to_f32()).to_bits().to_le_bytes());
            }
        }
        WeightSlice::F32(s) => {
            for (o, x) in out.chunks_exact_mut(2).zip(s) {
                o.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
    }
}

/// Copies `parts` one after the other into `dst`.
fn copy_stacked(
    staging: &mut Staging<'_>,
    dst: &Region<bf16>,
    parts: &[&Weight],
    what: &str,
) -> Result<(), CudaError> {
    let mut offset = 0;
    for w in parts {
        staging.copy(w.data(), dst, offset, what)?;
        offset += w.rows * w.cols;
    }
    Ok(())
}

/// Uploads `weights` into the regions of `gpu` (made by [`allocate_weights`] for the same config),
/// reporting progress in bytes uploaded.
pub fn upload_weights(
    weights: &ModelWeights,
    gpu: &GpuWeights,
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    progress: Option<&dyn Fn(LoadProgress)>,
) -> Result<(), CudaError> {
    let total = device_weight_bytes(&weights.config, is_tied(weights)) as u64;
    let mut staging = Staging::new(ctx, stream, total, progress)?;
    let st = &mut staging;
    for (l, (lw, g)) in weights.layers.iter().zip(&gpu.layers).enumerate() {
        copy_stacked(
            st,
            &g.attn_norm,
            &[&lw.attn_norm],
            &format!("layer {l} input norm"),
        )?;
        copy_stacked(
            st,
            &g.ffn_norm,
            &[&lw.ffn_norm],
            &format!("layer {l} ffn norm"),
        )?;
        copy_stacked(st, &g.o, &[&lw.o_proj], &format!("layer {l} o_proj"))?;
        copy_stacked(
            st,
            &g.qkv,
            &[&lw.q_proj, &lw.k_proj, &lw.v_proj],
            &format!("layer {l} q/k/v projections"),
        )?;
        // A dense model has no router: its zero gate gives the one expert weight 1.
        if let Some(r) = &lw.router {
            copy_stacked(st, &g.gate, &[r], &format!("layer {l} router"))?;
        }
        let w1: Vec<&Weight> = lw.experts.iter().map(|e| &e.w1).collect();
        let w3: Vec<&Weight> = lw.experts.iter().map(|e| &e.w3).collect();
        let w2: Vec<&Weight> = lw.experts.iter().map(|e| &e.w2).collect();
        copy_stacked(st, &g.w1, &w1, &format!("layer {l} experts w1"))?;
        copy_stacked(st, &g.w3, &w3, &format!("layer {l} experts w3"))?;
        copy_stacked(st, &g.w2, &w2, &format!("layer {l} experts w2"))?;
    }
    copy_stacked(st, &gpu.embed, &[&weights.embed], "embedding")?;
    copy_stacked(st, &gpu.final_norm, &[&weights.final_norm], "final norm")?;
    if !is_tied(weights) {
        copy_stacked(st, &gpu.lm_head, &[&weights.lm_head], "lm_head")?;
    }
    staging.finish()
}

/// Fills every region of `gpu` with seeded values of a sensible scale (norm weights near 1,
/// projections uniform with variance 1 / fan-in), for benchmarks of real shapes without a checkpoint.
pub fn randomize_weights(
    gpu: &GpuWeights,
    config: &ModelConfig,
    seed: u32,
    kernels: &Kernels,
    stream: &Arc<CudaStream>,
) -> Result<(), CudaError> {
    let mut next_seed = seed;
    let mut fill = |region: &Region<bf16>, fan_in: usize, shift: f32| -> Result<(), CudaError> {
        next_seed = next_seed
            .wrapping_mul(747_796_405)
            .wrapping_add(2_891_336_453);
        let scale = if shift == 0.0 {
            (3.0 / fan_in.max(1) as f32).sqrt()
        } else {
            0.1
        };
        let mut target = region.clone();
        fill_random(
            kernels,
            stream,
            &FillShape {
                len: region.len_elems(),
                seed: next_seed,
                scale,
                shift,
            },
            &mut target,
        )
    };
    let h = config.hidden_size;
    for g in &gpu.layers {
        fill(&g.attn_norm, 1, 1.0)?;
        fill(&g.ffn_norm, 1, 1.0)?;
        fill(&g.qkv, h, 0.0)?;
        fill(&g.o, config.q_width(), 0.0)?;
        fill(&g.gate, h, 0.0)?;
        fill(&g.w1, h, 0.0)?;
        fill(&g.w3, h, 0.0)?;
        fill(&g.w2, config.intermediate_size, 0.0)?;
    }
    fill(&gpu.embed, 1, 0.0)?;
    fill(&gpu.final_norm, 1, 1.0)?;
    if gpu.lm_head.address() != gpu.embed.address() {
        fill(&gpu.lm_head, h, 0.0)?;
    }
    stream
        .synchronize()
        .map_err(CudaError::driver("filling random weights"))
}
