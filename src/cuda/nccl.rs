//! NCCL over device memory (feature `nccl`): communicators ([`NcclComm`]), the
//! [`Collective`] implementation of one rank on one stream
//! ([`NcclRank`]: `ncclAllReduce` with `ncclSum` and `ncclAllGather`, f32 and bf16), and the
//! collectives of a sharded CUDA engine's rank ([`NcclGroups`]: its world and its tensor-parallel
//! group).
//!
//! The library is loaded at run time through cudarc (`libnccl.so` on the loader's path), so a
//! build with the feature links and runs without it: [`load`] answers a typed
//! [`NcclError::Missing`] naming the library, never a panic, and refuses a version without the
//! calls used here ([`MIN_VERSION`]); every constructor calls it first.
//!
//! Communicators: one process driving several GPUs makes them all at once ([`NcclComm::init_all`],
//! `ncclCommInitAll`); processes join one world through a unique id ([`NcclComm::unique_id`],
//! passed in the TCP rendezvous blob, then [`NcclComm::join`]); a tensor-parallel group is split
//! from the world ([`NcclComm::split`], `ncclCommSplit`). Every operation is enqueued on the
//! caller's stream, completes in stream order, and is captured into a CUDA graph when the stream
//! is capturing (NCCL 2.9 and later support capture).

use std::any::TypeId;
use std::cell::Cell;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result, sys};
use half::bf16;

use super::engine::rank::{DeviceCollectives, Group};
use super::error::CudaError;
use super::memory::{DeviceBuffer, Rows, View, ViewMut};
use crate::shard::collective::Op;
use crate::shard::{Collective, CollectiveError, Reducible};

/// Oldest NCCL (as `ncclGetVersion` codes it: `major * 10000 + minor * 100 + patch`) with every
/// call used here: 2.18, the first with `ncclCommSplit`.
pub const MIN_VERSION: i32 = 21800;

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Why an NCCL call could not be made or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    /// The library cannot be loaded.
    #[error(
        "the NCCL library cannot be loaded: none of {tried} is on the loader's path (put the \
         directory holding libnccl.so on LD_LIBRARY_PATH; PyTorch's wheels carry \
         nvidia/nccl/lib/libnccl.so.2, which needs a libnccl.so link beside it)"
    )]
    Missing {
        /// The file names tried.
        tried: String,
    },
    /// The library is older than [`MIN_VERSION`].
    #[error("NCCL {found} is loaded, but 2.18 or newer is needed (ncclCommSplit)")]
    TooOld {
        /// The version found, as `major.minor.patch`.
        found: String,
    },
    /// An NCCL call returned an error.
    #[error("NCCL {call} failed: {code}{detail}")]
    Call {
        /// The call.
        call: &'static str,
        /// NCCL's name of the result.
        code: String,
        /// NCCL's last error message for the communicator, if any (with a leading `: `).
        detail: String,
    },
    /// An element type NCCL is not asked to move here.
    #[error("NCCL collectives here move f32 and bf16, not {0}")]
    UnsupportedType(&'static str),
    /// A buffer of the wrong length.
    #[error("{op}: buffer of {got} elements, expected {expected}")]
    BadLength {
        /// The operation.
        op: &'static str,
        /// Elements given.
        got: usize,
        /// Elements needed.
        expected: usize,
    },
    /// A unique id of the wrong size (from the rendezvous blob).
    #[error("an NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {0}")]
    BadId(usize),
    /// No rank or an empty device list.
    #[error("an NCCL communicator needs at least one rank")]
    NoRanks,
    /// The communicator was aborted (a collective waited past its timeout, or the rank is
    /// shutting down).
    #[error("the NCCL communicator was aborted")]
    Aborted,
}

impl From<NcclError> for CudaError {
    fn from(e: NcclError) -> Self {
        CudaError::Collective(e.to_string())
    }
}

/// `major.minor.patch` of an `ncclGetVersion` code.
fn version_text(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
}

/// Loads the NCCL library (once) and returns its version code; a missing library or one older
/// than [`MIN_VERSION`] is an error, never a panic.
pub fn load() -> Result<i32, NcclError> {
    // SAFETY: only tries to dlopen the library by its candidate names; no NCCL call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(NcclError::Missing {
            tried: cudarc::get_lib_name_candidates("nccl").join(", "),
        });
    }
    // The library loads, so cudarc's lookup of `ncclGetVersion` (in every NCCL 2) succeeds.
    let version = result::get_nccl_version().map_err(|e| call_error("ncclGetVersion", e, None))?;
    if version < MIN_VERSION {
        return Err(NcclError::TooOld {
            found: version_text(version),
        });
    }
    Ok(version)
}

/// The typed error of a failed call, with NCCL's own words for it. `comm`: the communicator the
/// call was made on, unless it has been aborted since (a freed handle is never passed on).
fn call_error(
    call: &'static str,
    e: result::NcclError,
    comm: Option<sys::ncclComm_t>,
) -> NcclError {
    // SAFETY: ncclGetErrorString returns a static string for any result code; ncclGetLastError
    // a string owned by the library, valid until the next NCCL call on this thread.
    let code = unsafe { CStr::from_ptr(sys::ncclGetErrorString(e.0)) }
        .to_string_lossy()
        .into_owned();
    let last =
        unsafe { CStr::from_ptr(sys::ncclGetLastError(comm.unwrap_or(std::ptr::null_mut()))) }
            .to_string_lossy()
            .into_owned();
    NcclError::Call {
        call,
        code: format!("{code} ({:?})", e.0),
        detail: if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        },
    }
}

/// NCCL's element type for `T` (f32 or bf16).
fn data_type<T: 'static>(name: &'static str) -> Result<sys::ncclDataType_t, NcclError> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        Ok(sys::ncclDataType_t::ncclFloat32)
    } else if TypeId::of::<T>() == TypeId::of::<bf16>() {
        Ok(sys::ncclDataType_t::ncclBfloat16)
    } else {
        Err(NcclError::UnsupportedType(name))
    }
}

/// The raw communicator, aborted exactly once: by the first of [`CommHandle::abort`] (from any
/// thread, to unblock a collective that waits on a dead peer) and the drop of the last holder.
#[derive(Debug)]
struct CommHandle(AtomicPtr<sys::ncclComm>);

impl CommHandle {
    /// The live handle, or [`NcclError::Aborted`].
    fn live(&self) -> Result<sys::ncclComm_t, NcclError> {
        let comm = self.0.load(Ordering::Acquire);
        if comm.is_null() {
            Err(NcclError::Aborted)
        } else {
            Ok(comm)
        }
    }

    /// Aborts the communicator unless that was done before: its operations still in flight or
    /// blocked in a call on another thread return (with an error); later calls fail.
    fn abort(&self) {
        let comm = self.0.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !comm.is_null() {
            // SAFETY: the handle came from NCCL, and the swap hands it to one caller only.
            // ncclCommAbort may run while another thread is blocked in a call on the same
            // communicator: that is what it is for (a watchdog unblocking a hung collective).
            let _ = unsafe { result::comm_abort(comm) };
        }
    }
}

impl Drop for CommHandle {
    fn drop(&mut self) {
        self.abort();
    }
}

/// One rank's handle on an NCCL communicator. Aborted when dropped (nothing in flight survives
/// it: drop it after the stream has finished, or to unblock ranks stuck on a dead peer), or
/// earlier through an [`NcclAbort`] from another thread.
///
/// It may move between threads but is not `Sync`: NCCL takes one call at a time on a
/// communicator. The one call made from elsewhere is the abort ([`NcclAbort`]), which NCCL allows
/// while another thread is blocked in a call.
#[derive(Debug)]
pub struct NcclComm {
    comm: Arc<CommHandle>,
    rank: usize,
    size: usize,
    not_sync: PhantomData<Cell<()>>,
}

/// Aborts some communicators from any thread (see [`NcclComm::aborter`]).
#[derive(Debug, Clone)]
pub struct NcclAbort(Vec<Arc<CommHandle>>);

impl NcclAbort {
    /// Aborts every communicator not aborted yet: their collectives in flight return (with an
    /// error) instead of waiting on a dead peer, and every later call on them fails.
    pub fn abort(&self) {
        for comm in &self.0 {
            comm.abort();
        }
    }
}

impl NcclComm {
    fn new(comm: sys::ncclComm_t, rank: usize, size: usize) -> Self {
        NcclComm {
            comm: Arc::new(CommHandle(AtomicPtr::new(comm))),
            rank,
            size,
            not_sync: PhantomData,
        }
    }

    /// A handle that aborts this communicator from any thread.
    pub fn aborter(&self) -> NcclAbort {
        NcclAbort(vec![Arc::clone(&self.comm)])
    }

    /// One communicator per device of `ordinals` (rank `i` on `ordinals[i]`), made by one
    /// process at once (`ncclCommInitAll`).
    pub fn init_all(ordinals: &[usize]) -> Result<Vec<NcclComm>, NcclError> {
        load()?;
        if ordinals.is_empty() {
            return Err(NcclError::NoRanks);
        }
        let devices: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one handle per device of `devices`.
        unsafe {
            result::comm_init_all(comms.as_mut_ptr(), devices.len() as i32, devices.as_ptr())
        }
        .map_err(|e| call_error("ncclCommInitAll", e, None))?;
        let size = comms.len();
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| NcclComm::new(comm, rank, size))
            .collect())
    }

    /// A new unique id (rank 0 makes it and hands it to the others, e.g. in the rendezvous blob).
    pub fn unique_id() -> Result<Vec<u8>, NcclError> {
        load()?;
        let id = result::get_uniqueid().map_err(|e| call_error("ncclGetUniqueId", e, None))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// Joins the world of `size` ranks named by `id` as `rank`, on device `ordinal`
    /// (`ncclCommInitRank`; blocks until every rank has joined).
    pub fn join(
        id: &[u8],
        rank: usize,
        size: usize,
        ctx: &Arc<CudaContext>,
    ) -> Result<NcclComm, NcclError> {
        load()?;
        let bytes: [u8; UNIQUE_ID_BYTES] = id.try_into().map_err(|_| NcclError::BadId(id.len()))?;
        let id = sys::ncclUniqueId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        };
        // NCCL joins on the current device.
        ctx.bind_to_thread().map_err(|e| NcclError::Call {
            call: "cuCtxSetCurrent",
            code: e.to_string(),
            detail: String::new(),
        })?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the handle; `id` is a unique id of `size` bytes.
        unsafe { result::comm_init_rank(&mut comm, size as i32, id, rank as i32) }
            .map_err(|e| call_error("ncclCommInitRank", e, None))?;
        Ok(NcclComm::new(comm, rank, size))
    }

    /// The sub-communicator of the ranks that pass the same `color`, ordered by `key`
    /// (`ncclCommSplit`; every rank of this communicator calls it).
    pub fn split(&self, color: usize, key: usize) -> Result<NcclComm, NcclError> {
        let parent = self.comm.live()?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `parent` is live; a null config inherits this communicator's.
        let r = unsafe {
            sys::ncclCommSplit(
                parent,
                color as i32,
                key as i32,
                &mut comm,
                std::ptr::null_mut(),
            )
        };
        r.result()
            .map_err(|e| call_error("ncclCommSplit", e, self.comm.live().ok()))?;
        let mut size = 0;
        // SAFETY: `comm` is the live handle just made.
        unsafe { sys::ncclCommCount(comm, &mut size) }
            .result()
            .map_err(|e| call_error("ncclCommCount", e, Some(comm)))?;
        let mut rank = 0;
        // SAFETY: as above.
        unsafe { sys::ncclCommUserRank(comm, &mut rank) }
            .result()
            .map_err(|e| call_error("ncclCommUserRank", e, Some(comm)))?;
        Ok(NcclComm::new(comm, rank as usize, size as usize))
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Enqueues the in-place sum of `count` elements of type `dtype` at device address `buf`.
    ///
    /// # Safety
    /// `buf` must hold `count` elements of `dtype`, live and not used by other streams until the
    /// operation has completed on `stream`.
    unsafe fn all_reduce_raw(
        &self,
        dtype: sys::ncclDataType_t,
        buf: u64,
        count: usize,
        stream: &CudaStream,
    ) -> Result<(), NcclError> {
        let ptr = buf as *mut std::ffi::c_void;
        let comm = self.comm.live()?;
        result::all_reduce(
            ptr,
            ptr,
            count,
            dtype,
            sys::ncclRedOp_t::ncclSum,
            comm,
            stream.cu_stream() as _,
        )
        .map(|_| ())
        .map_err(|e| call_error("ncclAllReduce", e, self.comm.live().ok()))
    }

    /// Enqueues the gather of `count` elements at `part` from every rank into `out`
    /// (`size * count` elements, rank order).
    ///
    /// # Safety
    /// As [`NcclComm::all_reduce_raw`], for both buffers; `out` holds `size * count` elements.
    unsafe fn all_gather_raw(
        &self,
        dtype: sys::ncclDataType_t,
        part: u64,
        out: u64,
        count: usize,
        stream: &CudaStream,
    ) -> Result<(), NcclError> {
        let comm = self.comm.live()?;
        result::all_gather(
            part as *const std::ffi::c_void,
            out as *mut std::ffi::c_void,
            count,
            dtype,
            comm,
            stream.cu_stream() as _,
        )
        .map(|_| ())
        .map_err(|e| call_error("ncclAllGather", e, self.comm.live().ok()))
    }

    /// Sums `buf` over the communicator, in place, on `stream`.
    pub fn all_reduce<T: Reducible>(
        &self,
        stream: &CudaStream,
        buf: ViewMut<'_, T>,
    ) -> Result<(), NcclError> {
        let dtype = data_type::<T>(T::NAME)?;
        // SAFETY: the view is a live, exclusively borrowed range of `buf.len()` elements, and the
        // crate issues every op on the stream that owns it.
        unsafe { self.all_reduce_raw(dtype, buf.address(), buf.len(), stream) }
    }

    /// Gathers every rank's `part` into `out` (`size * part.len()` elements, rank order), on
    /// `stream`.
    pub fn all_gather<T: Reducible>(
        &self,
        stream: &CudaStream,
        part: View<'_, T>,
        out: ViewMut<'_, T>,
    ) -> Result<(), NcclError> {
        let dtype = data_type::<T>(T::NAME)?;
        if out.len() != self.size * part.len() {
            return Err(NcclError::BadLength {
                op: "all-gather",
                got: out.len(),
                expected: self.size * part.len(),
            });
        }
        // SAFETY: both views are live ranges of the lengths checked above, issued on the stream
        // that owns them.
        unsafe { self.all_gather_raw(dtype, part.address(), out.address(), part.len(), stream) }
    }
}

/// An NCCL communicator bound to the stream its operations run on: the [`Collective`] of one rank
/// over device memory (whole device buffers; the engine issues the same operations on parts
/// of its buffers through [`NcclGroups`]).
#[derive(Debug)]
pub struct NcclRank {
    /// The communicator.
    pub comm: NcclComm,
    /// The stream every operation is enqueued on.
    pub stream: Arc<CudaStream>,
}

impl NcclRank {
    fn failed(&self, op: Op, e: NcclError) -> CollectiveError {
        CollectiveError::Transport {
            rank: self.comm.rank,
            op,
            reason: e.to_string(),
        }
    }
}

impl Collective for NcclRank {
    type Mem<T: Reducible> = DeviceBuffer<T>;

    fn rank(&self) -> usize {
        self.comm.rank
    }

    fn size(&self) -> usize {
        self.comm.size
    }

    /// Enqueues `ncclAllReduce` (sum) on the rank's stream; bf16 is summed by NCCL in its own
    /// order (not the CPU ranks' fixed order).
    fn all_reduce<T: Reducible>(
        &mut self,
        buf: &mut DeviceBuffer<T>,
    ) -> Result<(), CollectiveError> {
        self.comm
            .all_reduce(&self.stream, buf.view_mut())
            .map_err(|e| self.failed(Op::AllReduce, e))
    }

    fn all_gather<T: Reducible>(
        &mut self,
        part: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<(), CollectiveError> {
        if out.len() != self.comm.size * part.len() {
            return Err(CollectiveError::BadLength {
                rank: self.comm.rank,
                op: Op::AllGather,
                got: out.len(),
                expected: self.comm.size * part.len(),
            });
        }
        self.comm
            .all_gather(&self.stream, part.view(), out.view_mut())
            .map_err(|e| self.failed(Op::AllGather, e))
    }
}

/// A sharded engine rank's tensor-parallel group.
#[derive(Debug)]
pub enum TpComm {
    /// The TP group is the whole world (no expert parallelism).
    World,
    /// The rank is its own TP group (no tensor parallelism): nothing to reduce.
    Alone,
    /// Its own communicator.
    Own(NcclComm),
}

/// The collectives of one rank of a sharded CUDA engine.
#[derive(Debug)]
pub struct NcclGroups {
    /// Every rank.
    pub world: NcclComm,
    /// The rank's TP group.
    pub tp: TpComm,
}

impl NcclGroups {
    fn comm(&self, group: Group) -> Option<&NcclComm> {
        match (group, &self.tp) {
            (Group::World, _) | (Group::Tp, TpComm::World) => Some(&self.world),
            (Group::Tp, TpComm::Alone) => None,
            (Group::Tp, TpComm::Own(c)) => Some(c),
        }
    }
}

impl DeviceCollectives for NcclGroups {
    /// Aborts the world's communicator and the TP group's own.
    fn aborter(&self) -> Box<dyn Fn() + Send> {
        let mut comms = self.world.aborter();
        if let TpComm::Own(tp) = &self.tp {
            comms.0.extend(tp.aborter().0);
        }
        Box::new(move || comms.abort())
    }

    fn size(&self, group: Group) -> usize {
        self.comm(group).map_or(1, NcclComm::size)
    }

    fn all_reduce(
        &self,
        group: Group,
        stream: &CudaStream,
        buf: ViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        match self.comm(group) {
            Some(c) => Ok(c.all_reduce(stream, buf)?),
            None => Ok(()),
        }
    }

    /// One `ncclAllGather` per row, in one NCCL group (one launch); a single row gathers
    /// straight into `out`.
    fn all_gather_rows(
        &self,
        stream: &CudaStream,
        part: Rows<'_, f32>,
        out: ViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let c = &self.world;
        let (rows, width) = (part.rows(), part.width());
        let line = c.size * width;
        if out.len() < rows * line {
            return Err(NcclError::BadLength {
                op: "all-gather of logits rows",
                got: out.len(),
                expected: rows * line,
            }
            .into());
        }
        let dtype = sys::ncclDataType_t::ncclFloat32;
        let (from, to) = (part.address(), out.address());
        if rows == 1 {
            // SAFETY: bounds checked above; both live views, issued on their stream.
            return Ok(unsafe { c.all_gather_raw(dtype, from, to, width, stream) }?);
        }
        result::group_start().map_err(|e| call_error("ncclGroupStart", e, c.comm.live().ok()))?;
        let mut issued = Ok(());
        for r in 0..rows {
            let (p, o) = ((r * part.stride() * 4) as u64, (r * line * 4) as u64);
            // SAFETY: row `r` of both views lies inside them (bounds checked above).
            issued = unsafe { c.all_gather_raw(dtype, from + p, to + o, width, stream) };
            if issued.is_err() {
                break;
            }
        }
        // The group must be closed whatever happened inside it.
        let ended =
            result::group_end().map_err(|e| call_error("ncclGroupEnd", e, c.comm.live().ok()));
        issued?;
        ended?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_nccl_codes_them() {
        assert_eq!(version_text(21805), "2.18.5");
        assert_eq!(version_text(22703), "2.27.3");
    }

    #[test]
    fn only_f32_and_bf16_have_an_nccl_type() {
        assert_eq!(
            data_type::<f32>("f32"),
            Ok(sys::ncclDataType_t::ncclFloat32)
        );
        assert_eq!(
            data_type::<bf16>("bf16"),
            Ok(sys::ncclDataType_t::ncclBfloat16)
        );
        assert_eq!(data_type::<u8>("u8"), Err(NcclError::UnsupportedType("u8")));
    }

    /// A machine without libnccl gets the typed error naming the library, never a panic; with
    /// it, a version (or a typed refusal of an old one).
    #[test]
    fn loading_never_panics_and_names_the_library() {
        match load() {
            Err(NcclError::Missing { tried }) => assert!(tried.contains("libnccl.so"), "{tried}"),
            Err(NcclError::TooOld { found }) => assert!(found.starts_with("2."), "{found}"),
            Ok(version) => assert!(version >= MIN_VERSION),
            Err(other) => panic!("{other}"),
        }
        let e = NcclComm::init_all(&[]).map(|_| ()).unwrap_err();
        assert!(
            matches!(
                e,
                NcclError::NoRanks | NcclError::Missing { .. } | NcclError::TooOld { .. }
            ),
            "{e}"
        );
    }
}
