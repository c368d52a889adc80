//! A world of processes, one rank each (`--dist-init HOST:PORT --rank R --world W`, as torchrun
//! does), rank 0 scheduling and tokenizing.
//!
//! [`join`] meets the other ranks before the model is loaded: the rendezvous ([`rendezvous`]),
//! whose blob carries the collective's bootstrap: for CPU ranks (`cpu:PORT`) a second rendezvous
//! on rank 0's host whose connections become the [`TcpRank`](super::tcp_ranks) collective; for
//! GPUs (feature `nccl`, `nccl:` and the id) rank 0's NCCL unique id. Then rank 0 opens the
//! engine the caller drives ([`Joined::lead`]: its options are sent to every rank, so that every
//! rank's limits are rank 0's; its own rank's engine runs behind a [`Leader`]), and every other
//! rank serves it ([`Joined::follow`]) until rank 0 is done.

use std::sync::Arc;
use std::time::Duration;

use super::engine::ShardedOptions;
use super::lockstep::{self, FollowError, Leader};
use super::rendezvous::{self, RendezvousError, Session};
use super::tcp_ranks::tcp_comms;
use super::{Layout, ShardError, ShardPlan, ShardedCpuEngine};
use crate::checkpoint::LoadProgress;
use crate::engine::{Device, Engine, EngineError, EngineOptions};
use crate::weights::ModelWeights;

/// Where and as which rank this process joins the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistInit {
    /// Rank 0's `HOST:PORT` (rank 0 listens there, the others connect).
    pub addr: String,
    /// This process's rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// How long to wait for the others: to join, in each collective, for each call's answers.
    pub timeout: Duration,
}

/// The flags [`DistInit::from_flags`] reads.
pub const DIST_FLAGS: [&str; 4] = ["--dist-init", "--rank", "--world", "--dist-timeout"];

/// `--dist-timeout` when not given.
pub const DEFAULT_DIST_TIMEOUT: Duration = Duration::from_secs(60);

impl DistInit {
    /// Reads `--dist-init HOST:PORT`, `--rank R` and `--world W` (all three or none) and
    /// `--dist-timeout S` (seconds, default [`DEFAULT_DIST_TIMEOUT`]) from a command line, `value`
    /// giving each flag's value when it was given; `None` when none of them was. `--world` must be
    /// `layout`'s rank count (one rank per process). A mistake is a message naming the flag and
    /// the value, as `mixtral-run` and `mixtral-serve` print them.
    pub fn from_flags<'a>(
        value: impl Fn(&str) -> Option<&'a str>,
        layout: Layout,
    ) -> Result<Option<DistInit>, String> {
        let required = &DIST_FLAGS[..3];
        let present: Vec<&str> = required
            .iter()
            .copied()
            .filter(|f| value(f).is_some())
            .collect();
        if present.is_empty() {
            if value("--dist-timeout").is_some() {
                return Err("--dist-timeout needs --dist-init".into());
            }
            return Ok(None);
        }
        if let Some(missing) = required.iter().find(|f| value(f).is_none()) {
            return Err(format!("{missing} is required with {}", present.join(", ")));
        }
        let number = |flag: &str, expected: &str| -> Result<usize, String> {
            let v = value(flag).unwrap_or_default();
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("invalid value {v:?} for {flag}: expected {expected}"))
        };
        let rank = number("--rank", "a rank number")?;
        let world = number("--world", "a positive integer")?;
        if rank >= world {
            return Err(format!(
                "invalid value \"{rank}\" for --rank: expected a rank below --world {world}"
            ));
        }
        let timeout = match value("--dist-timeout") {
            None => DEFAULT_DIST_TIMEOUT,
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|t| !t.is_zero())
                .ok_or_else(|| {
                    format!(
                        "invalid value {v:?} for --dist-timeout: expected a positive number of \
                         seconds"
                    )
                })?,
        };
        if world != layout.world() {
            return Err(format!(
                "--world {world} needs --tensor-parallel and --expert-parallel whose product is \
                 {world} (one rank per process); they give {layout}"
            ));
        }
        Ok(Some(DistInit {
            addr: value("--dist-init").unwrap_or_default().to_string(),
            rank,
            world,
            timeout,
        }))
    }
}

/// Why this process could not take its part.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The rendezvous, or a message over it, failed.
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    /// The split does not have one rank per process.
    #[error("{layout} has {} ranks, but --world is {world}", layout.world())]
    World {
        /// The split.
        layout: Layout,
        /// Processes in the world.
        world: usize,
    },
    /// This rank runs on another kind of device than rank 0.
    #[error("rank {rank} runs on {device}, but rank 0 started a world of {rank0} ranks")]
    Device {
        /// This rank.
        rank: usize,
        /// Its device.
        device: Device,
        /// Rank 0's kind of device (`cpu` or `cuda`).
        rank0: String,
    },
    /// This rank's CPU engine refused to build.
    #[error("rank {rank}: {source}")]
    Shard {
        /// This rank.
        rank: usize,
        /// Why.
        #[source]
        source: ShardError,
    },
    /// This rank's GPU engine (or NCCL) refused to build, or a CUDA rank in a build without the
    /// `nccl` feature.
    #[error("rank {rank}: {source}")]
    Gpu {
        /// This rank.
        rank: usize,
        /// Why.
        #[source]
        source: EngineError,
    },
    /// Serving rank 0 ended in a failure (this rank's, or rank 0's connection's).
    #[error(transparent)]
    Follow(#[from] FollowError),
}

/// The collective's bootstrap.
enum Bootstrap {
    /// The TCP collective's own rendezvous.
    Tcp(Session),
    /// Rank 0's NCCL unique id (read by the GPU ranks of a build with `nccl`).
    Nccl(#[cfg_attr(not(feature = "nccl"), allow(dead_code))] Vec<u8>),
}

/// This process, joined to the others (see the module docs).
pub struct Joined {
    dist: DistInit,
    device: Device,
    session: Session,
    bootstrap: Bootstrap,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("dist", &self.dist)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// `HOST` of `HOST:PORT` (an IPv6 host keeps its brackets).
fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Meets the other ranks (see the module docs); every rank calls it, each with its own `dist.rank`
/// and its `device` (every rank's of one kind). Waits at most `dist.timeout` for them.
pub fn join(dist: &DistInit, device: Device) -> Result<Joined, DistError> {
    let (rank, world, timeout) = (dist.rank, dist.world, dist.timeout);
    let (session, bootstrap) = if rank == 0 {
        match device {
            Device::Cpu => {
                let star = rendezvous::listen(&format!("{}:0", host(&dist.addr)))?;
                let port = star.local_addr().map_or(0, |a| a.port());
                let blob = format!("cpu:{port}");
                let session = rendezvous::listen(&dist.addr)?.accept_ranks(
                    world,
                    timeout,
                    blob.as_bytes(),
                )?;
                let star = star.accept_ranks(world, timeout, b"")?;
                (session, Bootstrap::Tcp(star))
            }
            Device::Cuda(_) => {
                let id = nccl_unique_id(rank)?;
                let blob = [b"nccl:".as_slice(), &id].concat();
                let session =
                    rendezvous::listen(&dist.addr)?.accept_ranks(world, timeout, &blob)?;
                (session, Bootstrap::Nccl(id))
            }
        }
    } else {
        let session = rendezvous::connect(&dist.addr, rank, world, timeout)?;
        let blob = session.blob().to_vec();
        let wrong = |rank0: &str| DistError::Device {
            rank,
            device,
            rank0: rank0.to_string(),
        };
        let bootstrap = match (device, blob.split_first_chunk::<5>()) {
            (Device::Cuda(_), Some((b"nccl:", id))) => Bootstrap::Nccl(id.to_vec()),
            (Device::Cpu, Some((b"nccl:", _))) => return Err(wrong("cuda")),
            (Device::Cpu, _) if blob.starts_with(b"cpu:") => {
                let port = String::from_utf8_lossy(&blob[4..]).into_owned();
                let addr = format!("{}:{port}", host(&dist.addr));
                Bootstrap::Tcp(rendezvous::connect(&addr, rank, world, timeout)?)
            }
            (Device::Cuda(_), _) if blob.starts_with(b"cpu:") => return Err(wrong("cpu")),
            _ => {
                return Err(DistError::Rendezvous(RendezvousError::Protocol {
                    rank,
                    peer: 0,
                    line: String::from_utf8_lossy(&blob).into_owned(),
                }))
            }
        };
        (session, bootstrap)
    };
    Ok(Joined {
        dist: dist.clone(),
        device,
        session,
        bootstrap,
    })
}

/// Rank 0's NCCL unique id (a build without `nccl` cannot run CUDA ranks).
fn nccl_unique_id(rank: usize) -> Result<Vec<u8>, DistError> {
    #[cfg(feature = "nccl")]
    {
        crate::cuda::nccl::NcclComm::unique_id().map_err(|e| DistError::Gpu {
            rank,
            source: EngineError::backend(e),
        })
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(no_nccl(rank))
    }
}

#[cfg(not(feature = "nccl"))]
fn no_nccl(rank: usize) -> DistError {
    DistError::Gpu {
        rank,
        source: EngineError::Unsupported("CUDA ranks in separate processes without feature `nccl`"),
    }
}

impl Joined {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.dist.rank
    }

    /// Rank 0: sends `options` to every rank, builds this rank's engine (shard 0 of
    /// `options.parallel`, which must have one rank per process), and returns the engine the
    /// caller drives: every call runs on every rank.
    pub fn lead(
        mut self,
        weights: &Arc<ModelWeights>,
        options: &EngineOptions,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<Box<dyn Engine>, DistError> {
        self.check_layout(options.parallel)?;
        lockstep::send_options(&mut self.session, options)?;
        let engine = self.open_rank(weights, options, progress)?;
        let timeout = self.dist.timeout;
        Ok(Box::new(Leader::new(engine, self.session, timeout)?))
    }

    /// A rank other than 0: takes rank 0's options, builds this rank's engine, and runs rank 0's
    /// calls on it until rank 0 is done (`Ok`), or fails.
    pub fn follow(
        mut self,
        weights: &Arc<ModelWeights>,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<(), DistError> {
        let options = lockstep::receive_options(&mut self.session, self.dist.timeout)?;
        self.check_layout(options.parallel)?;
        let mut engine = self.open_rank(weights, &options, progress)?;
        lockstep::follow(&mut self.session, engine.as_mut())?;
        Ok(())
    }

    fn check_layout(&self, layout: Layout) -> Result<(), DistError> {
        if layout.world() != self.dist.world {
            return Err(DistError::World {
                layout,
                world: self.dist.world,
            });
        }
        Ok(())
    }

    /// This rank's engine, its collectives over the bootstrap.
    fn open_rank(
        &mut self,
        weights: &Arc<ModelWeights>,
        options: &EngineOptions,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<Box<dyn Engine>, DistError> {
        let rank = self.dist.rank;
        let layout = options.parallel;
        let shard_error = |source: ShardError| DistError::Shard { rank, source };
        let bootstrap = std::mem::replace(&mut self.bootstrap, Bootstrap::Nccl(Vec::new()));
        match (self.device, bootstrap) {
            (Device::Cpu, Bootstrap::Tcp(star)) => {
                let _ = progress;
                let plan =
                    ShardPlan::new(&weights.config, layout).map_err(|e| shard_error(e.into()))?;
                let shard = plan
                    .ranks
                    .get(rank)
                    .ok_or(shard_error(ShardError::NoSuchRank { rank, layout }))?;
                let comms = tcp_comms(star, shard, layout)?;
                let sharded = ShardedOptions {
                    layout,
                    cpu: options.cpu(),
                    timeout: self.dist.timeout,
                };
                let engine = ShardedCpuEngine::one_rank(weights, &sharded, rank, comms)
                    .map_err(shard_error)?;
                Ok(Box::new(engine))
            }
            #[cfg(feature = "nccl")]
            (Device::Cuda(ordinal), Bootstrap::Nccl(id)) => {
                let session = &mut self.session;
                let agree = |mine: usize| {
                    session
                        .agree_min(mine as u64)
                        .map(|n| n as usize)
                        .map_err(|e| e.to_string())
                };
                let engine = crate::cuda::open_process_rank(
                    weights,
                    layout,
                    rank,
                    &id,
                    &options.cuda(ordinal),
                    self.dist.timeout,
                    agree,
                    progress,
                )
                .map_err(|e| DistError::Gpu {
                    rank,
                    source: EngineError::backend(e),
                })?;
                Ok(Box::new(engine))
            }
            #[cfg(not(feature = "nccl"))]
            (Device::Cuda(_), _) => Err(no_nccl(rank)),
            (device, _) => Err(DistError::Device {
                rank,
                device,
                rank0: "another kind of".to_string(),
            }),
        }
    }
}
