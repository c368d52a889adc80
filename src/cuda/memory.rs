//! Device memory, sound by its types: a [`DeviceBuffer`] owns one allocation (freed in stream order
//! when it drops), and the kernels take only views borrowed from buffers:
//! - [`View`] (`Copy`, read) borrows `&DeviceBuffer`; [`ViewMut`] (written) borrows
//!   `&mut DeviceBuffer` and is never `Clone`, so an output has exactly one writer and no reader;
//! - [`Rows`] / [`RowsMut`]: one column group of a row-major matrix (q, k and v inside the fused QKV
//!   activation), split off a `ViewMut` so the groups are disjoint by construction;
//! - [`AnyView`] / [`AnyViewMut`]: a bf16 or f32 view where the kernel variant follows the type.
//!
//! A view cannot outlive its buffer, and a buffer cannot be written while viewed, so safe code cannot
//! launch on freed memory or alias an output (`SoundnessExamples`, compiled by `cargo test --doc
//! --features cuda,testing`, shows the refused code).
//!
//! Kernels run asynchronously on the device's one stream; a buffer dropped after a launch is freed in
//! stream order (after the kernel), so the borrow of the launch call is all the safety needed.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError};
use half::bf16;

use super::error::CudaError;

/// A view cannot outlive its buffer, and a buffer cannot be written while viewed, so safe code cannot
/// launch on freed memory or alias an output:
///
/// ```compile_fail,E0505
/// # fn launch(_: mixtral::cuda::memory::View<'_, f32>) {}
/// # fn f(arena: &mut mixtral::cuda::memory::DeviceArena) -> Result<(), mixtral::cuda::CudaError> {
/// let buffer = arena.zeroed::<f32>(16, "x")?;
/// let view = buffer.view();
/// drop(buffer); // error: `buffer` is still borrowed by `view`
/// launch(view);
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0499
/// # fn launch(_: mixtral::cuda::memory::ViewMut<'_, f32>, _: mixtral::cuda::memory::ViewMut<'_, f32>) {}
/// # fn f(arena: &mut mixtral::cuda::memory::DeviceArena) -> Result<(), mixtral::cuda::CudaError> {
/// let mut out = arena.zeroed::<f32>(16, "out")?;
/// launch(out.view_mut(), out.view_mut()); // error: two writers of one buffer
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0502
/// # fn launch(_: mixtral::cuda::memory::View<'_, f32>, _: mixtral::cuda::memory::ViewMut<'_, f32>) {}
/// # fn f(arena: &mut mixtral::cuda::memory::DeviceArena) -> Result<(), mixtral::cuda::CudaError> {
/// let mut x = arena.zeroed::<f32>(16, "x")?;
/// launch(x.view(), x.view_mut()); // error: an output aliasing an input
/// # Ok(()) }
/// ```
///
/// The same calls on distinct buffers compile:
///
/// ```
/// # fn launch(_: mixtral::cuda::memory::View<'_, f32>, _: mixtral::cuda::memory::ViewMut<'_, f32>) {}
/// # fn f(arena: &mut mixtral::cuda::memory::DeviceArena) -> Result<(), mixtral::cuda::CudaError> {
/// let x = arena.zeroed::<f32>(16, "x")?;
/// let mut out = arena.zeroed::<f32>(16, "out")?;
/// launch(x.view(), out.view_mut());
/// # Ok(()) }
/// ```
#[cfg(all(doctest, feature = "testing"))]
pub struct SoundnessExamples;

/// Bytes every allocation is rounded up to (the kernels' 16-byte vector loads need 16).
pub const BUFFER_ALIGN: usize = 256;

/// One device allocation of `len` elements of `T`, freed (in stream order) when dropped.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    /// The allocation, held only to be freed on drop: the kernels use `address`. `None` only for
    /// the buffers of a sizing arena (inside [`DeviceArena::sized`]), which are never launched on.
    _allocation: Option<CudaSlice<u8>>,
    address: u64,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> DeviceBuffer<T> {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer, read.
    pub fn view(&self) -> View<'_, T> {
        View::new(self.address, self.len)
    }

    /// The whole buffer, written.
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut::new(self.address, self.len)
    }

    /// Starts copying elements `src..src + len` over `dst..dst + len` of this buffer (stream
    /// ordered, no host sync). Refuses ranges out of bounds or overlapping.
    pub fn copy_within(
        &mut self,
        stream: &CudaStream,
        src: usize,
        dst: usize,
        len: usize,
    ) -> Result<(), CudaError> {
        let bad = || {
            CudaError::Dead(format!(
                "copying elements {src}..+{len} to {dst}..+{len} within a buffer of {}",
                self.len
            ))
        };
        let (Some(from), Some(to)) = (
            sub_range::<T>(self.address, self.len, src, len),
            sub_range::<T>(self.address, self.len, dst, len),
        ) else {
            return Err(bad());
        };
        if src.abs_diff(dst) < len {
            return Err(bad());
        }
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: both ranges lie inside this live, exclusively borrowed allocation and do not
        // overlap; the copy is ordered on `stream` with every kernel touching the buffer.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(to.0, from.0, bytes, stream.cu_stream())
        }
        .map_err(CudaError::driver("copying within a device buffer"))
    }
}

/// Allocates device buffers on one stream's context and counts the bytes it handed out.
#[derive(Debug)]
pub struct DeviceArena {
    /// `None`: a sizing arena.
    stream: Option<Arc<CudaStream>>,
    bytes: usize,
}

impl DeviceArena {
    /// An allocator on `stream`'s context.
    pub fn new(stream: Arc<CudaStream>) -> Self {
        DeviceArena {
            stream: Some(stream),
            bytes: 0,
        }
    }

    /// An arena that allocates nothing and only counts what it would allocate, with no device. Its
    /// buffers hold no device memory (address 0): they never leave [`DeviceArena::sized`].
    fn sizing() -> Self {
        DeviceArena {
            stream: None,
            bytes: 0,
        }
    }

    /// The bytes `allocate` allocates, counted by running it on a sizing arena with no device
    /// (and dropping what it built): the code that allocates a model's buffers is also what sizes
    /// them before a build. `usize::MAX` when it fails (a length overflows).
    pub(crate) fn sized<T>(
        allocate: impl FnOnce(&mut DeviceArena) -> Result<T, CudaError>,
    ) -> usize {
        let mut arena = DeviceArena::sizing();
        match allocate(&mut arena) {
            Ok(_) => arena.bytes,
            Err(_) => usize::MAX,
        }
    }

    /// Bytes allocated through this arena so far (buffers dropped since included).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A zero-filled buffer of `len` elements; `what` names it in errors. Out of device memory is
    /// [`CudaError::OutOfMemory`].
    pub fn zeroed<T>(&mut self, len: usize, what: &str) -> Result<DeviceBuffer<T>, CudaError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_next_multiple_of(BUFFER_ALIGN))
            .ok_or_else(|| CudaError::OutOfMemory {
                what: what.to_string(),
                bytes: usize::MAX,
                free: 0,
                total: 0,
            })?
            .max(BUFFER_ALIGN);
        let Some(stream) = &self.stream else {
            self.bytes += bytes;
            return Ok(DeviceBuffer {
                _allocation: None,
                address: 0,
                len,
                _elem: PhantomData,
            });
        };
        let slice = match stream.alloc_zeros::<u8>(bytes) {
            Ok(slice) => slice,
            Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                let (free, total) = stream.context().mem_get_info().unwrap_or((0, 0));
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
        let (address, guard) = slice.device_ptr(stream);
        drop(guard);
        self.bytes += bytes;
        Ok(DeviceBuffer {
            _allocation: Some(slice),
            address,
            len,
            _elem: PhantomData,
        })
    }

    /// A buffer holding a copy of `host` (synchronous: for set-up and tests, never per token).
    pub fn upload<T: DeviceRepr>(
        &mut self,
        host: &[T],
        what: &str,
    ) -> Result<DeviceBuffer<T>, CudaError> {
        let mut buffer = self.zeroed::<T>(host.len(), what)?;
        if let Some(stream) = &self.stream {
            copy_to_device(stream, buffer.view_mut(), host, what)?;
        }
        Ok(buffer)
    }
}

/// Copies `host` into the start of `dst` and waits for the copy (set-up only, never per token).
pub fn copy_to_device<T: DeviceRepr>(
    stream: &CudaStream,
    dst: ViewMut<'_, T>,
    host: &[T],
    what: &str,
) -> Result<(), CudaError> {
    let capacity = dst.len();
    let Some(target) = dst.sub(0, host.len()) else {
        return Err(CudaError::UnsupportedModel(format!(
            "{what}: {} elements do not fit a buffer of {capacity}",
            host.len()
        )));
    };
    // SAFETY: the destination range is inside a live, exclusively borrowed buffer; the host slice
    // stays borrowed until the stream is synchronised below.
    unsafe {
        cudarc::driver::result::memcpy_htod_async(target.address(), host, stream.cu_stream())
    }
    .map_err(CudaError::driver(format!("uploading {what}")))?;
    stream
        .synchronize()
        .map_err(CudaError::driver(format!("uploading {what}")))
}

/// Reads `src` back to the host, waiting for the stream (a host sync).
pub fn copy_to_host<T: DeviceRepr + Default + Clone>(
    stream: &CudaStream,
    src: View<'_, T>,
) -> Result<Vec<T>, CudaError> {
    let mut host = vec![T::default(); src.len()];
    // SAFETY: `host` holds `src.len()` elements and stays alive until the synchronise below; the
    // source is a live borrowed buffer.
    unsafe {
        cudarc::driver::result::memcpy_dtoh_async(&mut host, src.address(), stream.cu_stream())
    }
    .map_err(CudaError::driver("reading results back"))?;
    stream
        .synchronize()
        .map_err(CudaError::driver("reading results back"))?;
    Ok(host)
}

/// A read-only view of `len` elements of a [`DeviceBuffer`].
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    address: u64,
    len: usize,
    _borrow: PhantomData<&'a [T]>,
}

/// A written view of `len` elements of a [`DeviceBuffer`]: the only access to them while it lives.
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    address: u64,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

/// The methods [`View`] and [`ViewMut`] share: construction, address, length, sub-ranges and casts
/// (each keeps its borrow: a sub-view of a written view is written).
macro_rules! view_methods {
    ($view:ident) => {
        impl<'a, T> $view<'a, T> {
            fn new(address: u64, len: usize) -> Self {
                $view {
                    address,
                    len,
                    _borrow: PhantomData,
                }
            }

            /// Device address of element 0.
            pub fn address(&self) -> u64 {
                self.address
            }

            /// Elements viewed.
            pub fn len(&self) -> usize {
                self.len
            }

            /// True when no element is viewed.
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }

            /// Elements `offset .. offset + len`; `None` when out of range.
            pub fn sub(self, offset: usize, len: usize) -> Option<$view<'a, T>> {
                let (address, len) = sub_range::<T>(self.address, self.len, offset, len)?;
                Some($view::new(address, len))
            }

            /// The same memory as whole elements of `U` (both plain data).
            pub fn cast<U: bytemuck::Pod>(self) -> $view<'a, U>
            where
                T: bytemuck::Pod,
            {
                $view::new(self.address, cast_len::<T, U>(self.len))
            }
        }
    };
}

view_methods!(View);
view_methods!(ViewMut);

impl<'a, T> View<'a, T> {
    /// The whole of a cudarc allocation, read.
    pub fn of(slice: &'a CudaSlice<T>) -> Self {
        let (address, guard) = slice.device_ptr(slice.stream());
        drop(guard);
        View::new(address, slice.len())
    }

    /// A view of host memory, for the kernel emulator ([`emulator`](crate::cuda::emulator)).
    ///
    /// # Safety
    /// The view is given to emulated launches only, never to a device launcher: a device's
    /// stream-ordered kernel could touch the memory after the borrow ends.
    #[cfg(feature = "testing")]
    pub unsafe fn of_host(slice: &'a [T]) -> Self {
        View::new(slice.as_ptr() as u64, slice.len())
    }

    /// A view of memory the caller vouches for (planner tests: such a view is never launched on).
    ///
    /// # Safety
    /// `len` elements at `address` must stay valid device memory, not written, for `'a`.
    pub unsafe fn from_raw(address: u64, len: usize) -> Self {
        View::new(address, len)
    }

    /// The first `rows * width` elements as `rows` contiguous rows of `width`; `None` when the view
    /// holds fewer.
    pub fn rows(self, rows: usize, width: usize) -> Option<Rows<'a, T>> {
        if rows.checked_mul(width)? > self.len {
            return None;
        }
        Some(Rows {
            address: self.address,
            rows,
            stride: width,
            width,
            _borrow: PhantomData,
        })
    }
}

impl<'a, T> ViewMut<'a, T> {
    /// The whole of a cudarc allocation, written.
    pub fn of(slice: &'a mut CudaSlice<T>) -> Self {
        let stream = Arc::clone(slice.stream());
        let (address, guard) = slice.device_ptr_mut(&stream);
        drop(guard);
        ViewMut::new(address, slice.len())
    }

    /// A written view of host memory, for the kernel emulator
    /// ([`emulator`](crate::cuda::emulator)).
    ///
    /// # Safety
    /// As [`View::of_host`]: for emulated launches only.
    #[cfg(feature = "testing")]
    pub unsafe fn of_host(slice: &'a mut [T]) -> Self {
        ViewMut::new(slice.as_mut_ptr() as u64, slice.len())
    }

    /// A written view of memory the caller vouches for (planner tests: never launched on).
    ///
    /// # Safety
    /// `len` elements at `address` must stay valid device memory, accessed through nothing else,
    /// for `'a`.
    pub unsafe fn from_raw(address: u64, len: usize) -> Self {
        ViewMut::new(address, len)
    }

    /// A shorter-lived written view of the same elements (to pass to one launch and keep this one).
    pub fn reborrow(&mut self) -> ViewMut<'_, T> {
        ViewMut::new(self.address, self.len)
    }

    /// A read view of the same elements, while this one is not used.
    pub fn as_view(&self) -> View<'_, T> {
        View::new(self.address, self.len)
    }

    /// The first `mid` elements and the rest, both written; `None` when `mid > len`.
    pub fn split_at(self, mid: usize) -> Option<(ViewMut<'a, T>, ViewMut<'a, T>)> {
        let rest = self.len.checked_sub(mid)?;
        let first = ViewMut::new(self.address, mid);
        let second = ViewMut::new(self.address + byte_offset::<T>(mid), rest);
        Some((first, second))
    }

    /// The whole view as `[len / row, row]` rows, cut into column groups of the given widths
    /// (which must add up to `row`): group `g` of row `r` starts at `r * row + sum(widths[..g])`.
    /// `None` when the widths do not add up to a positive row length dividing `len`.
    pub fn column_groups<const N: usize>(self, widths: [usize; N]) -> Option<[RowsMut<'a, T>; N]> {
        let row: usize = widths.iter().sum();
        if row == 0 || !self.len.is_multiple_of(row) {
            return None;
        }
        let rows = self.len / row;
        let mut start = 0;
        Some(widths.map(|width| {
            let group = RowsMut {
                inner: Rows {
                    address: self.address + byte_offset::<T>(start),
                    rows,
                    stride: row,
                    width,
                    _borrow: PhantomData,
                },
                _write: PhantomData,
            };
            start += width;
            group
        }))
    }
}

impl<'a, T> From<ViewMut<'a, T>> for View<'a, T> {
    fn from(view: ViewMut<'a, T>) -> Self {
        View::new(view.address, view.len)
    }
}

/// `rows` rows of `width` elements, `stride` elements apart, read: one column group of a wider
/// row-major matrix.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a, T> {
    address: u64,
    rows: usize,
    stride: usize,
    width: usize,
    _borrow: PhantomData<&'a [T]>,
}

/// A written [`Rows`]: the only access to its elements while it lives.
#[derive(Debug)]
pub struct RowsMut<'a, T> {
    inner: Rows<'a, T>,
    _write: PhantomData<&'a mut [T]>,
}

impl<'a, T> Rows<'a, T> {
    /// Device address of the first element of row 0.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// Rows viewed.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements between the starts of consecutive rows.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Elements viewed per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows `first .. first + count`; `None` when out of range.
    pub fn sub_rows(self, first: usize, count: usize) -> Option<Rows<'a, T>> {
        if first.checked_add(count)? > self.rows {
            return None;
        }
        Some(Rows {
            address: self.address + byte_offset::<T>(first * self.stride),
            rows: count,
            ..self
        })
    }
}

impl<'a, T> RowsMut<'a, T> {
    /// Device address of the first element of row 0.
    pub fn address(&self) -> u64 {
        self.inner.address
    }

    /// Rows viewed.
    pub fn rows(&self) -> usize {
        self.inner.rows
    }

    /// Elements between the starts of consecutive rows.
    pub fn stride(&self) -> usize {
        self.inner.stride
    }

    /// Elements viewed per row.
    pub fn width(&self) -> usize {
        self.inner.width
    }

    /// A shorter-lived written view of the same rows.
    pub fn reborrow(&mut self) -> RowsMut<'_, T> {
        RowsMut {
            inner: Rows { ..self.inner },
            _write: PhantomData,
        }
    }

    /// A read view of the same rows, while this one is not used.
    pub fn as_rows(&self) -> Rows<'_, T> {
        Rows { ..self.inner }
    }
}

impl<'a, T> From<RowsMut<'a, T>> for Rows<'a, T> {
    fn from(rows: RowsMut<'a, T>) -> Self {
        rows.inner
    }
}

/// A read view whose element type picks the kernel variant.
#[derive(Debug, Clone, Copy)]
pub enum AnyView<'a> {
    /// bf16 elements.
    Bf16(View<'a, bf16>),
    /// f32 elements.
    F32(View<'a, f32>),
}

/// A written view whose element type picks the kernel variant.
#[derive(Debug)]
pub enum AnyViewMut<'a> {
    /// bf16 elements.
    Bf16(ViewMut<'a, bf16>),
    /// f32 elements.
    F32(ViewMut<'a, f32>),
}

/// The methods [`AnyView`] and [`AnyViewMut`] share, and their conversions from typed views.
macro_rules! any_view_methods {
    ($any:ident, $view:ident) => {
        impl $any<'_> {
            /// Device address of element 0.
            pub fn address(&self) -> u64 {
                match self {
                    $any::Bf16(v) => v.address(),
                    $any::F32(v) => v.address(),
                }
            }

            /// Elements viewed.
            pub fn len(&self) -> usize {
                match self {
                    $any::Bf16(v) => v.len(),
                    $any::F32(v) => v.len(),
                }
            }

            /// True when no element is viewed.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }

            /// True for f32 elements.
            pub fn is_f32(&self) -> bool {
                matches!(self, $any::F32(_))
            }
        }

        impl<'a> From<$view<'a, bf16>> for $any<'a> {
            fn from(view: $view<'a, bf16>) -> Self {
                $any::Bf16(view)
            }
        }

        impl<'a> From<$view<'a, f32>> for $any<'a> {
            fn from(view: $view<'a, f32>) -> Self {
                $any::F32(view)
            }
        }
    };
}

any_view_methods!(AnyView, View);
any_view_methods!(AnyViewMut, ViewMut);

fn byte_offset<T>(elements: usize) -> u64 {
    (elements * std::mem::size_of::<T>()) as u64
}

fn sub_range<T>(address: u64, len: usize, offset: usize, count: usize) -> Option<(u64, usize)> {
    if offset.checked_add(count)? > len {
        return None;
    }
    Some((address + byte_offset::<T>(offset), count))
}

fn cast_len<T, U>(len: usize) -> usize {
    len * std::mem::size_of::<T>() / std::mem::size_of::<U>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 256-byte aligned address nothing dereferences.
    const BASE: u64 = 0x7f00_0000_0000;

    fn view_mut<T>(len: usize) -> ViewMut<'static, T> {
        // SAFETY: only addresses and lengths are inspected; nothing is launched on the view.
        unsafe { ViewMut::from_raw(BASE, len) }
    }

    fn view<T>(len: usize) -> View<'static, T> {
        // SAFETY: as `view_mut`.
        unsafe { View::from_raw(BASE, len) }
    }

    fn at<T>(v: &ViewMut<'_, T>) -> (u64, usize) {
        (v.address() - BASE, v.len())
    }

    fn rows_at<T>(r: &Rows<'_, T>) -> (u64, usize, usize, usize) {
        (r.address() - BASE, r.rows(), r.stride(), r.width())
    }

    #[test]
    fn a_sizing_arena_counts_what_it_would_allocate() {
        let mut arena = DeviceArena::sizing();
        let a = arena.zeroed::<f32>(10, "a").unwrap();
        assert_eq!((a.len(), arena.bytes()), (10, BUFFER_ALIGN));
        arena.zeroed::<u8>(BUFFER_ALIGN + 1, "b").unwrap();
        arena.zeroed::<bf16>(0, "c").unwrap();
        arena.upload(&[1u32; 100], "d").unwrap();
        assert_eq!(arena.bytes(), 6 * BUFFER_ALIGN);
        assert!(matches!(
            arena.zeroed::<u64>(usize::MAX / 4, "e"),
            Err(CudaError::OutOfMemory { .. })
        ));
        assert_eq!(arena.bytes(), 6 * BUFFER_ALIGN);
    }

    #[test]
    fn sub_offsets_by_whole_elements_and_refuses_out_of_range() {
        assert_eq!(at(&view_mut::<f32>(10).sub(3, 7).unwrap()), (12, 7));
        assert_eq!(at(&view_mut::<bf16>(10).sub(10, 0).unwrap()), (20, 0));
        assert!(view_mut::<f32>(10).sub(3, 8).is_none());
        assert!(view_mut::<f32>(10).sub(11, 0).is_none());
        assert!(view_mut::<f32>(10).sub(usize::MAX, 2).is_none());
        let v = view::<u64>(10).sub(2, 3).unwrap();
        assert_eq!((v.address() - BASE, v.len()), (16, 3));
        assert!(view::<u64>(10).sub(8, 3).is_none());
    }

    #[test]
    fn split_at_gives_two_adjacent_views() {
        let (a, b) = view_mut::<f32>(10).split_at(4).unwrap();
        assert_eq!((at(&a), at(&b)), ((0, 4), (16, 6)));
        let (a, b) = view_mut::<u64>(3).split_at(3).unwrap();
        assert_eq!((at(&a), at(&b)), ((0, 3), (24, 0)));
        assert!(view_mut::<f32>(10).split_at(11).is_none());
    }

    #[test]
    fn cast_keeps_the_address_and_counts_whole_elements() {
        assert_eq!(at(&view_mut::<bf16>(7).cast::<u32>()), (0, 3));
        assert_eq!(at(&view_mut::<f32>(5).cast::<u8>()), (0, 20));
        let v = view::<u8>(17).cast::<u64>();
        assert_eq!((v.address(), v.len()), (BASE, 2));
        let v = view_mut::<f32>(100).sub(10, 4).unwrap().cast::<bf16>();
        assert_eq!(at(&v), (40, 8));
    }

    #[test]
    fn column_groups_cut_each_row_in_order() {
        // 3 rows of 2 + 3 + 1 f32 columns.
        let [q, k, v] = view_mut::<f32>(18).column_groups([2, 3, 1]).unwrap();
        assert_eq!(rows_at(&q.into()), (0, 3, 6, 2));
        assert_eq!(rows_at(&k.into()), (8, 3, 6, 3));
        assert_eq!(rows_at(&v.into()), (20, 3, 6, 1));
        let [whole] = view_mut::<bf16>(8).column_groups([4]).unwrap();
        assert_eq!(
            (whole.address() - BASE, whole.rows(), whole.stride()),
            (0, 2, 4)
        );
        assert!(view_mut::<f32>(19).column_groups([2, 3, 1]).is_none());
        assert!(view_mut::<f32>(18).column_groups([0, 0]).is_none());
        assert!(view_mut::<f32>(18).column_groups::<0>([]).is_none());
    }

    #[test]
    fn rows_are_the_leading_elements_back_to_back() {
        assert_eq!(rows_at(&view::<f32>(10).rows(3, 3).unwrap()), (0, 3, 3, 3));
        assert_eq!(rows_at(&view::<f32>(9).rows(3, 3).unwrap()), (0, 3, 3, 3));
        assert_eq!(rows_at(&view::<bf16>(0).rows(0, 5).unwrap()), (0, 0, 5, 5));
        assert!(view::<f32>(8).rows(3, 3).is_none());
        assert!(view::<f32>(8).rows(usize::MAX, 2).is_none());
    }

    #[test]
    fn sub_rows_moves_by_whole_strides() {
        let [_, k] = view_mut::<bf16>(40).column_groups([6, 2]).unwrap();
        let k = Rows::from(k);
        assert_eq!(rows_at(&k), (12, 5, 8, 2));
        assert_eq!(rows_at(&k.sub_rows(2, 3).unwrap()), (12 + 2 * 16, 3, 8, 2));
        assert_eq!(rows_at(&k.sub_rows(5, 0).unwrap()), (12 + 5 * 16, 0, 8, 2));
        assert!(k.sub_rows(3, 3).is_none());
        assert!(k.sub_rows(6, 0).is_none());
        assert!(k.sub_rows(usize::MAX, 2).is_none());
    }

    #[test]
    fn reborrowed_and_read_views_see_the_same_elements() {
        let mut v = view_mut::<f32>(6).sub(1, 4).unwrap();
        assert_eq!(at(&v.reborrow()), (4, 4));
        let r = v.as_view();
        assert_eq!((r.address() - BASE, r.len()), (4, 4));
        let [mut g, _] = view_mut::<f32>(6).column_groups([1, 2]).unwrap();
        assert_eq!(rows_at(&g.reborrow().into()), (0, 2, 3, 1));
        assert_eq!(rows_at(&g.as_rows()), (0, 2, 3, 1));
    }
}
