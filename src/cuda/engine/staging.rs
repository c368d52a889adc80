//! Page-locked host memory for everything a step sends to or reads from the device, so that a
//! decode step allocates nothing and waits for the device once.
//!
//! Up (asynchronous copies): the step inputs `[4, max_tokens]` i32, changed block-table rows of
//! `[max_sequences, max_blocks_per_seq]` i32, and the sampling parameters (`[max_tokens]`
//! temperature, top-k and top-p, `[max_tokens, RNG_STATE_WORDS]` random states). Down: greedy ids,
//! drawn ids and the advanced random states. [`StepStaging::finish`] then synchronises the stream once.
//!
//! Soundness: a copy keeps reading or writing its host buffer after the call returns, so every
//! buffer remembers that a copy is pending, and its host side is refused ([`Pinned::host`]) until
//! `finish` has waited for the stream. The engine's `Drop` waits for the stream before the buffers
//! are freed.

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use std::sync::Arc;

use super::plan::PlanSizes;
use crate::cuda::error::CudaError;
use crate::cuda::memory::{View, ViewMut};
use crate::cuda::ops::RNG_STATE_WORDS;

/// One page-locked host buffer and whether a copy from or into it may still be running.
pub struct Pinned<T> {
    slice: PinnedHostSlice<T>,
    pending: bool,
}

impl<T: DeviceRepr + ValidAsZeroBits> Pinned<T> {
    /// `len` elements; `read_back` buffers are cached (the host reads them), the others
    /// write-combined (the host only writes them).
    fn new(ctx: &Arc<CudaContext>, len: usize, read_back: bool) -> Result<Self, CudaError> {
        let flags = if read_back {
            0
        } else {
            cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
        };
        // SAFETY: the memory is zeroed below before any reference to it is made.
        let mut slice = unsafe { ctx.alloc_pinned_with_flags::<T>(len.max(1), flags) }
            .map_err(CudaError::driver("allocating pinned staging memory"))?;
        let start = slice
            .as_mut_ptr()
            .map_err(CudaError::driver("mapping pinned staging memory"))?;
        // SAFETY: `start` points to `len.max(1)` elements of `T`, for which all-zero bits are valid.
        unsafe { start.write_bytes(0, len.max(1)) };
        Ok(Pinned {
            slice,
            pending: false,
        })
    }

    /// The host side, once no copy is pending.
    pub fn host(&mut self) -> Result<&mut [T], CudaError> {
        if self.pending {
            return Err(CudaError::Dead(
                "pinned staging memory touched while a copy may be running".into(),
            ));
        }
        // Copies here are raw driver calls, so the slice's own event is never recorded and this
        // does not wait; `pending` is what guards the host side.
        self.raw()
    }

    /// The host side without the pending check, for enqueuing more copies: the stream orders them
    /// after the pending ones, and the host still touches nothing until `finish`.
    fn raw(&mut self) -> Result<&mut [T], CudaError> {
        self.slice
            .as_mut_slice()
            .map_err(CudaError::driver("mapping pinned staging memory"))
    }

    /// Starts copying host elements `offset..offset + dst.len()` into `dst` (no host sync).
    pub fn upload(
        &mut self,
        stream: &CudaStream,
        offset: usize,
        dst: ViewMut<'_, T>,
    ) -> Result<(), CudaError> {
        let host = self.raw()?;
        let capacity = host.len();
        let Some(part) = host.get(offset..offset.saturating_add(dst.len())) else {
            return Err(too_small(offset.saturating_add(dst.len()), capacity));
        };
        // SAFETY: `dst` is a live, exclusively borrowed device range of `part.len()` elements; the
        // host range stays allocated and unwritten until `finish` has waited for the stream
        // (`pending` refuses `host` until then; the engine waits for the stream before dropping).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.address(), part, stream.cu_stream())
        }
        .map_err(CudaError::driver("uploading staged step data"))?;
        self.pending = true;
        Ok(())
    }

    /// Starts copying `src` into the first `src.len()` host elements (no host sync).
    pub fn download(&mut self, stream: &CudaStream, src: View<'_, T>) -> Result<(), CudaError> {
        let host = self.raw()?;
        let capacity = host.len();
        let Some(part) = host.get_mut(..src.len()) else {
            return Err(too_small(src.len(), capacity));
        };
        // SAFETY: `src` is a live device range of `part.len()` elements; the host range stays
        // allocated and untouched until `finish` has waited for the stream (`pending`).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(part, src.address(), stream.cu_stream())
        }
        .map_err(CudaError::driver("reading step results back"))?;
        self.pending = true;
        Ok(())
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Pinned<T> {
    /// Starts copying the first `len` host elements into the first `len` elements of `dst`.
    pub fn upload_first(
        &mut self,
        stream: &CudaStream,
        dst: ViewMut<'_, T>,
        len: usize,
    ) -> Result<(), CudaError> {
        let capacity = dst.len();
        let dst = dst.sub(0, len).ok_or_else(|| short(len, capacity))?;
        self.upload(stream, 0, dst)
    }

    /// Starts copying the first `len` elements of `src` into the first `len` host elements.
    pub fn download_first(
        &mut self,
        stream: &CudaStream,
        src: View<'_, T>,
        len: usize,
    ) -> Result<(), CudaError> {
        let capacity = src.len();
        let src = src.sub(0, len).ok_or_else(|| short(len, capacity))?;
        self.download(stream, src)
    }
}

/// A device buffer shorter than a step needs (the plan is sized for `max_tokens`, so a bug).
fn short(wanted: usize, capacity: usize) -> CudaError {
    CudaError::Dead(format!(
        "a step needs {wanted} elements of a plan buffer of {capacity}"
    ))
}

fn too_small(wanted: usize, capacity: usize) -> CudaError {
    CudaError::Dead(format!(
        "{wanted} elements do not fit the pinned staging buffer of {capacity}"
    ))
}

/// The step's page-locked buffers (see the module docs).
pub struct StepStaging {
    /// `[4, max_tokens]` token ids, positions, sequence rows and logit rows.
    pub inputs: Pinned<i32>,
    /// `[max_sequences, max_blocks_per_seq]` block tables: the host copy of the device tables.
    pub tables: Pinned<i32>,
    /// `[max_tokens]` temperatures.
    pub temperature: Pinned<f32>,
    /// `[max_tokens]` top-k.
    pub top_k: Pinned<u32>,
    /// `[max_tokens]` top-p.
    pub top_p: Pinned<f32>,
    /// `[max_tokens, RNG_STATE_WORDS]` random states, up and back.
    pub rng_state: Pinned<u64>,
    /// `[max_tokens]` greedy ids read back.
    pub greedy: Pinned<u32>,
    /// `[max_tokens]` drawn ids read back.
    pub drawn: Pinned<u32>,
    /// `[max_tokens, RNG_STATE_WORDS]` advanced random states read back.
    pub rng_after: Pinned<u64>,
}

impl StepStaging {
    /// Allocates every buffer for `sizes`; block tables start at -1 (no block).
    pub fn new(ctx: &Arc<CudaContext>, sizes: &PlanSizes) -> Result<StepStaging, CudaError> {
        let m = sizes.max_tokens;
        let mut staging = StepStaging {
            inputs: Pinned::new(ctx, 4 * m, false)?,
            tables: Pinned::new(ctx, sizes.max_sequences * sizes.max_blocks_per_seq, true)?,
            temperature: Pinned::new(ctx, m, false)?,
            top_k: Pinned::new(ctx, m, false)?,
            top_p: Pinned::new(ctx, m, false)?,
            rng_state: Pinned::new(ctx, m * RNG_STATE_WORDS, false)?,
            greedy: Pinned::new(ctx, m, true)?,
            drawn: Pinned::new(ctx, m, true)?,
            rng_after: Pinned::new(ctx, m * RNG_STATE_WORDS, true)?,
        };
        staging.tables.host()?.fill(-1);
        Ok(staging)
    }

    /// Waits for the stream, after which every host side may be read and written again.
    pub fn finish(&mut self, stream: &CudaStream) -> Result<(), CudaError> {
        stream
            .synchronize()
            .map_err(CudaError::driver("finishing a step"))?;
        for pending in [
            &mut self.inputs.pending,
            &mut self.tables.pending,
            &mut self.temperature.pending,
            &mut self.top_k.pending,
            &mut self.top_p.pending,
            &mut self.rng_state.pending,
            &mut self.greedy.pending,
            &mut self.drawn.pending,
            &mut self.rng_after.pending,
        ] {
            *pending = false;
        }
        Ok(())
    }
}
