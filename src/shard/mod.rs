//! Running one model on several ranks: tensor parallelism (TP), expert parallelism (EP) and the
//! two combined.
//!
//! - [`plan`]: which heads, rows, columns, experts and token ids each rank owns ([`ShardPlan`]);
//! - [`memory`]: the bytes each rank holds, from the config alone ([`rank_memory`]);
//! - [`weights`]: a rank's part of the weights, reading only its own bytes ([`RankWeights`]);
//! - [`collective`]: the all-reduce / all-gather interface every transport implements
//!   ([`Collective`]); [`cpu_ranks`]: its in-process implementation, one thread per rank, a fixed
//!   summation order and a timeout ([`cpu_group`]);
//! - [`rank`]: one rank's forward pass with the CPU reference kernels;
//! - [`engine`]: [`ShardedCpuEngine`], N simulated ranks behind the [`Engine`](crate::Engine)
//!   trait (`mixtral-run --device cpu --tensor-parallel N`), the way the sharded plan is tested;
//! - [`replicas`]: N whole engines in lockstep behind one [`Engine`](crate::Engine), each on its
//!   own thread, rank 0 answering (how the sharded CUDA engine schedules its GPUs);
//! - [`rendezvous`]: the TCP bootstrap of ranks in separate processes (`--dist-init HOST:PORT
//!   --rank R --world W`) and their liveness;
//! - [`tcp_ranks`]: the [`Collective`] of CPU ranks in separate processes, over TCP through rank 0;
//! - [`lockstep`]: rank 0's [`lockstep::Leader`] engine and the other ranks' [`lockstep::follow`],
//!   which keep the processes' engines in step;
//! - [`world`]: joining a world of processes and opening this process's rank ([`world::join`]);
//! - `watchdog`: the deadline of a GPU rank's step, which aborts its NCCL communicators when a
//!   collective waits too long on a dead or stuck peer.
//!
//! On GPUs (feature `nccl`): `mixtral::cuda::nccl::NcclRank` is the NCCL [`Collective`] over
//! device memory, and `mixtral::cuda::ShardedCudaEngine` runs this plan with one CUDA engine per
//! GPU of one process, the collectives inside its decode graphs (`mixtral-run --device cuda
//! --tensor-parallel N`); `mixtral::cuda::open_process_rank` is one such rank in a process of its
//! own, its NCCL world joined through the rendezvous. Their tests run on emulated GPUs with an
//! emulated NCCL (`scripts/emulated-gpu`); they have not yet run on GPUs.

pub mod collective;
pub mod cpu_ranks;
pub mod engine;
pub mod lockstep;
pub mod memory;
pub mod plan;
pub mod rank;
pub mod rendezvous;
pub mod replicas;
pub mod tcp_ranks;
#[cfg(test)]
mod test_support;
#[cfg(any(test, feature = "cuda"))]
pub(crate) mod watchdog;
pub mod weights;
pub mod world;

pub use collective::{Collective, CollectiveError, Reducible};
pub use cpu_ranks::{cpu_group, CpuRank};
pub use engine::{ShardedCpuEngine, ShardedOptions};
pub use memory::{rank_memory, RankMemory};
pub use plan::{Layout, PlanError, RankShard, ShardPlan};
pub use weights::{RankWeights, ReadLog, ShardWeightError};

use crate::engine::EngineError;

/// Why a sharded engine could not be built or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShardError {
    /// The model cannot be split by the layout.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A weight cannot be cut as planned.
    #[error(transparent)]
    Weights(#[from] ShardWeightError),
    /// A collective failed (timeout, departed rank, mismatch).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The cache options were refused.
    #[error(transparent)]
    Options(#[from] EngineError),
    /// A rank the layout does not have.
    #[error("rank {rank} is not a rank of {layout} ({} ranks)", layout.world())]
    NoSuchRank {
        /// The rank asked for.
        rank: usize,
        /// The split.
        layout: Layout,
    },
    /// A rank's thread ended without answering (it panicked).
    #[error("rank {rank} died without answering")]
    RankDied {
        /// The rank.
        rank: usize,
    },
    /// A rank's thread could not be started.
    #[error("cannot start the thread of rank {rank}: {reason}")]
    Spawn {
        /// The rank.
        rank: usize,
        /// What the OS said.
        reason: String,
    },
}
