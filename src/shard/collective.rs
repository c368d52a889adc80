//! The collective operations the sharded plan needs, as one trait every transport implements:
//! [`Collective::all_reduce`] (element-wise sum over the ranks of a group) and
//! [`Collective::all_gather`] (every rank's part, concatenated in rank order), over f32 and bf16
//! ([`Reducible`]).
//!
//! The buffers are the implementation's own memory type ([`Collective::Mem`]): host slices for
//! the in-process CPU ranks ([`super::cpu_ranks`]); device buffers for NCCL (feature `nccl`:
//! `mixtral::cuda::nccl::NcclRank`, `ncclAllReduce` with `ncclSum` and `ncclAllGather`, enqueued
//! on the rank's stream and complete in stream order). Every rank of a group
//! must issue the same operations in the same order with buffers of the same length (SPMD); a
//! rank that does not, or that dies, must turn into a [`CollectiveError`] on the others, never a
//! hang.

use half::bf16;
use std::time::Duration;

/// An element type the collectives move and sum: f32, and bf16 summed in f32 and rounded once.
pub trait Reducible: Copy + Send + Sync + 'static {
    /// The type's name in messages (`f32`, `bf16`).
    const NAME: &'static str;
    /// As f32 (exact for both types).
    fn to_f32(self) -> f32;
    /// From an f32 sum (round to nearest even for bf16).
    fn from_f32(v: f32) -> Self;
}

impl Reducible for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Reducible for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Which collective an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Collective::all_reduce`].
    AllReduce,
    /// [`Collective::all_gather`].
    AllGather,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::AllReduce => "all-reduce",
            Op::AllGather => "all-gather",
        })
    }
}

/// Why a collective did not complete. Each names the rank that saw it and the operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    /// Some ranks did not reach the operation in time (stuck, or never started).
    #[error("rank {rank}: {op} #{seq} timed out after {waited:?} waiting for rank(s) {missing:?}")]
    Timeout {
        /// The rank reporting.
        rank: usize,
        /// The operation.
        op: Op,
        /// Its index in the group's sequence of collectives.
        seq: u64,
        /// How long it waited.
        waited: Duration,
        /// The ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// A rank of the group is gone (its thread or process ended) before the operation completed.
    #[error("rank {rank}: {op} #{seq} cannot complete: rank {gone} has left the group")]
    PeerGone {
        /// The rank reporting.
        rank: usize,
        /// The operation.
        op: Op,
        /// Its index in the group's sequence of collectives.
        seq: u64,
        /// The rank that left.
        gone: usize,
    },
    /// The ranks called different operations, element types or lengths at the same point.
    #[error("rank {rank}: {op} #{seq}: ranks disagree: {detail}")]
    Mismatch {
        /// The rank reporting.
        rank: usize,
        /// The operation this rank called.
        op: Op,
        /// Its index in the group's sequence of collectives.
        seq: u64,
        /// What differed, per rank.
        detail: String,
    },
    /// A buffer of the wrong length for the group (`all_gather`'s output must be `size` parts).
    #[error("rank {rank}: {op}: buffer of {got} elements, expected {expected}")]
    BadLength {
        /// The rank reporting.
        rank: usize,
        /// The operation.
        op: Op,
        /// Elements given.
        got: usize,
        /// Elements needed.
        expected: usize,
    },
    /// The transport refused or failed the operation (an NCCL error).
    #[error("rank {rank}: {op} failed: {reason}")]
    Transport {
        /// The rank reporting.
        rank: usize,
        /// The operation.
        op: Op,
        /// What the transport said.
        reason: String,
    },
    /// The group failed earlier (a timeout, a departed rank, a mismatch) and accepts no more work.
    #[error("rank {rank}: the group is broken by an earlier failure: {cause}")]
    Broken {
        /// The rank reporting.
        rank: usize,
        /// The first failure.
        cause: String,
    },
}

/// One rank's handle on a group of ranks.
pub trait Collective: Send {
    /// The memory a buffer lives in (`[T]` on the host; device memory for NCCL).
    type Mem<T: Reducible>: ?Sized;

    /// This rank's index in the group.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn size(&self) -> usize;

    /// Replaces `buf` on every rank by the element-wise sum of every rank's `buf`. All ranks
    /// receive the same values; the implementation documents its summation order.
    fn all_reduce<T: Reducible>(&mut self, buf: &mut Self::Mem<T>) -> Result<(), CollectiveError>;

    /// Fills `out` (`size * part.len()` elements) on every rank with every rank's `part`, in rank
    /// order.
    fn all_gather<T: Reducible>(
        &mut self,
        part: &Self::Mem<T>,
        out: &mut Self::Mem<T>,
    ) -> Result<(), CollectiveError>;
}

/// An all-reduce of a host buffer through `exchange`, which takes this rank's values as f32 and
/// returns the group's sums: how the host transports ([`super::cpu_ranks`], [`super::tcp_ranks`])
/// implement [`Collective::all_reduce`].
pub(super) fn host_all_reduce<T: Reducible, S: std::borrow::Borrow<Vec<f32>>>(
    buf: &mut [T],
    exchange: impl FnOnce(Vec<f32>) -> Result<S, CollectiveError>,
) -> Result<(), CollectiveError> {
    let sum = exchange(buf.iter().map(|v| v.to_f32()).collect())?;
    for (b, &s) in buf.iter_mut().zip(sum.borrow().iter()) {
        *b = T::from_f32(s);
    }
    Ok(())
}

/// An all-gather of host buffers through `exchange` (this rank's part as f32 in, every part in
/// rank order out), refusing an `out` that is not `size` parts: how the host transports implement
/// [`Collective::all_gather`].
pub(super) fn host_all_gather<T: Reducible, S: std::borrow::Borrow<Vec<f32>>>(
    (rank, size): (usize, usize),
    part: &[T],
    out: &mut [T],
    exchange: impl FnOnce(Vec<f32>) -> Result<S, CollectiveError>,
) -> Result<(), CollectiveError> {
    let expected = part.len() * size;
    if out.len() != expected {
        return Err(CollectiveError::BadLength {
            rank,
            op: Op::AllGather,
            got: out.len(),
            expected,
        });
    }
    let all = exchange(part.iter().map(|v| v.to_f32()).collect())?;
    for (o, &v) in out.iter_mut().zip(all.borrow().iter()) {
        *o = T::from_f32(v);
    }
    Ok(())
}
