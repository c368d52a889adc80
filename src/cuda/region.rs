//! Device memory owned by an engine: a [`DeviceArena`] holds every allocation for the engine's
//! lifetime, and hands out [`Region`]s, typed `(address, len)` views that the ops accept wherever
//! they take a cudarc buffer.
//!
//! Regions are plain addresses, so two regions may view the same memory (q, k and v inside the fused
//! QKV activation): the engine issues every op on its one stream, and stream order is what orders
//! the accesses. A region never outlives its arena: both live inside one engine, which drops the
//! arena last.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, DriverError, SyncOnDrop,
};

use super::error::CudaError;

/// Bytes every region start is aligned to (the kernels' 16-byte vector loads need 16).
pub const REGION_ALIGN: usize = 256;

/// A typed view of `len` elements of device memory owned by a [`DeviceArena`].
#[derive(Debug)]
pub struct Region<T> {
    address: u64,
    len: usize,
    stream: Arc<CudaStream>,
    _elem: PhantomData<T>,
}

impl<T> Clone for Region<T> {
    fn clone(&self) -> Self {
        Region {
            address: self.address,
            len: self.len,
            stream: Arc::clone(&self.stream),
            _elem: PhantomData,
        }
    }
}

impl<T> Region<T> {
    /// Device address of element 0.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// Elements `offset .. offset + len` of this region; `None` when out of range.
    pub fn sub(&self, offset: usize, len: usize) -> Option<Region<T>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(Region {
            address: self.address + (offset * std::mem::size_of::<T>()) as u64,
            len,
            stream: Arc::clone(&self.stream),
            _elem: PhantomData,
        })
    }

    /// The same memory viewed as elements of `U` (whole elements only).
    pub fn cast<U>(&self) -> Region<U> {
        Region {
            address: self.address,
            len: self.bytes() / std::mem::size_of::<U>().max(1),
            stream: Arc::clone(&self.stream),
            _elem: PhantomData,
        }
    }

    /// Elements of the region.
    pub fn len_elems(&self) -> usize {
        self.len
    }

    /// Bytes of the region.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T> DeviceSlice<T> for Region<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for Region<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        // Stream order alone orders accesses (one stream per engine): nothing to wait for or record.
        (self.address, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for Region<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.address, SyncOnDrop::Sync(None))
    }
}

/// Every device allocation of one engine, freed together when the arena drops.
#[derive(Debug)]
pub struct DeviceArena {
    stream: Arc<CudaStream>,
    allocations: Vec<CudaSlice<u8>>,
    bytes: usize,
}

impl DeviceArena {
    /// An empty arena allocating on `stream`'s context.
    pub fn new(stream: Arc<CudaStream>) -> Self {
        DeviceArena {
            stream,
            allocations: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes allocated so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A zero-filled region of `len` elements; `what` names it in errors. Out of device memory is
    /// [`CudaError::OutOfMemory`], and whatever was allocated before stays owned by the arena (and is
    /// freed with it).
    pub fn zeroed<T>(&mut self, len: usize, what: &str) -> Result<Region<T>, CudaError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_next_multiple_of(REGION_ALIGN))
            .ok_or_else(|| CudaError::OutOfMemory {
                what: what.to_string(),
                bytes: usize::MAX,
                free: 0,
                total: 0,
            })?
            .max(REGION_ALIGN);
        let slice = match self.stream.alloc_zeros::<u8>(bytes) {
            Ok(slice) => slice,
            Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                let (free, total) = self.stream.context().mem_get_info().unwrap_or((0, 0));
                return Err(CudaError::OutOfMemory {
                    what: what.to_string(),
                    bytes,
                    free,
                    total,
                });
            }
            Err(source) => {
                return Err(CudaError::Driver {
                    context: format!("allocating {bytes} bytes for {what}"),
                    source,
                })
            }
        };
        let (address, _guard) = slice.device_ptr(&self.stream);
        drop(_guard);
        let region = Region {
            address,
            len,
            stream: Arc::clone(&self.stream),
            _elem: PhantomData,
        };
        self.bytes += bytes;
        self.allocations.push(slice);
        Ok(region)
    }
}

impl<T> Region<T> {
    /// The region as a read view (the engine's regions live as long as the engine).
    pub fn view(&self) -> super::memory::View<'_, T> {
        // SAFETY: the region's memory is owned by the engine's arena, alive while the engine is.
        unsafe { super::memory::View::from_raw(self.address, self.len) }
    }

    /// The region as a written view.
    pub fn view_mut(&mut self) -> super::memory::ViewMut<'_, T> {
        // SAFETY: as `view`; the engine issues every op on one stream, which orders the accesses.
        unsafe { super::memory::ViewMut::from_raw(self.address, self.len) }
    }
}
