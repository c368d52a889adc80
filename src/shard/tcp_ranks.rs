//! [`TcpRank`]: the [`Collective`] of CPU ranks in separate processes (`mixtral-run --device cpu
//! --dist-init`), over TCP through rank 0.
//!
//! Every rank holds one connection to rank 0, and rank 0 one to each other rank: the streams of
//! a rendezvous [`Session`] made for this purpose, taken over by [`tcp_comms`]. Each operation
//! is one exchange through rank 0: every rank sends its buffer (as f32) with the group it is for;
//! rank 0 receives from every rank in rank order, combines each group's buffers with the
//! in-process ranks' rule ([`super::cpu_ranks`]: group rank 0 first, summed in f32, bf16 rounded
//! once; gathered parts in group-rank order), and sends each rank its group's result. Results are
//! therefore bit-identical to the in-process ranks'.
//!
//! One exchange serves every group at once, so the groups used at one point must partition the
//! world, and every rank must issue its operations in the same order: the sharded plan does (the
//! world, or every TP group at the same point). Anything else is a [`CollectiveError::Mismatch`].
//!
//! Liveness: rank 0 waits for each rank at most the timeout ([`CollectiveError::Timeout`] naming
//! it); a closed connection is [`CollectiveError::PeerGone`]; rank 0 then tells every other rank
//! why, and they fail with [`CollectiveError::Broken`] carrying rank 0's error. The other ranks
//! wait for rank 0 at most twice the timeout (rank 0 may itself wait a whole timeout for one
//! rank). After a failure every operation is `Broken`.
//!
//! A frame is a 32-byte little-endian header: `kind` u8 (0 deposit, 1 result, 2 failure),
//! `dtype` u8 (0 f32, 1 bf16), `op` u8 (0 all-reduce, 1 all-gather), one zero byte, `color` u32
//! (the group: 0 the world, `1 + ep_rank` a TP group), `group_rank` u32, `group_size` u32, `seq`
//! u64 (the operation's index), `len` u64; then `len` f32 values, or `len` bytes of UTF-8 text for
//! a failure.

use super::collective::{
    host_all_gather, host_all_reduce, Collective, CollectiveError, Op, Reducible,
};
use super::cpu_ranks::{combine, Deposit};
use super::plan::{Layout, RankShard};
use super::rank::RankComms;
use super::rendezvous::{RendezvousError, Session};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of a frame header.
const HEADER: usize = 32;
/// Largest payload accepted, in elements (a frame claiming more is not this protocol).
const MAX_LEN: u64 = 1 << 31;

const DEPOSIT: u8 = 0;
const RESULT: u8 = 1;
const FAILURE: u8 = 2;

/// One frame.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    kind: u8,
    ty: &'static str,
    op: Op,
    color: u32,
    group_rank: u32,
    group_size: u32,
    seq: u64,
    /// The values (deposit, result), empty for a failure.
    data: Vec<f32>,
    /// A failure's text.
    text: String,
}

fn dtype_code(ty: &str) -> u8 {
    if ty == "bf16" {
        1
    } else {
        0
    }
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::AllReduce => 0,
        Op::AllGather => 1,
    }
}

impl Frame {
    /// The same header with no payload.
    fn header(&self) -> Frame {
        Frame {
            data: Vec::new(),
            text: String::new(),
            ..*self
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let len = if self.kind == FAILURE {
            self.text.len()
        } else {
            self.data.len()
        };
        let mut out = Vec::with_capacity(HEADER + len * 4);
        out.extend_from_slice(&[self.kind, dtype_code(self.ty), op_code(self.op), 0]);
        out.extend_from_slice(&self.color.to_le_bytes());
        out.extend_from_slice(&self.group_rank.to_le_bytes());
        out.extend_from_slice(&self.group_size.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(len as u64).to_le_bytes());
        if self.kind == FAILURE {
            out.extend_from_slice(self.text.as_bytes());
        } else {
            self.data
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        out
    }
}

/// Why one transfer with a peer failed.
#[derive(Debug)]
enum Fail {
    /// Nothing within the wait.
    Timeout(usize),
    /// The connection closed.
    Gone(usize),
    /// Bytes that are not a frame of this protocol.
    Garbled(usize, String),
}

/// Reads one frame from `peer`, waiting until `deadline` at most.
fn read_frame(stream: &mut TcpStream, peer: usize, deadline: Instant) -> Result<Frame, Fail> {
    let mut read = |buf: &mut [u8]| -> Result<(), Fail> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail::Timeout(peer));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|_| Fail::Gone(peer))?;
        stream.read_exact(buf).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Fail::Timeout(peer),
            _ => Fail::Gone(peer),
        })
    };
    let mut h = [0u8; HEADER];
    read(&mut h)?;
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
    let garbled = |what: String| Fail::Garbled(peer, what);
    let (kind, len) = (h[0], u64_at(24));
    if kind > FAILURE || h[1] > 1 || h[2] > 1 || len > MAX_LEN {
        return Err(garbled(format!("a frame header {h:?}")));
    }
    let mut payload = vec![0u8; if kind == FAILURE { len } else { len * 4 } as usize];
    read(&mut payload)?;
    let (data, text) = if kind == FAILURE {
        (Vec::new(), String::from_utf8_lossy(&payload).into_owned())
    } else {
        let values = payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (values, String::new())
    };
    Ok(Frame {
        kind,
        ty: if h[1] == 1 { "bf16" } else { "f32" },
        op: if h[2] == 1 {
            Op::AllGather
        } else {
            Op::AllReduce
        },
        color: u32_at(4),
        group_rank: u32_at(8),
        group_size: u32_at(12),
        seq: u64_at(16),
        data,
        text,
    })
}

/// The connections and the state every handle of one process shares.
#[derive(Debug)]
struct Star {
    /// This process's world rank.
    rank: usize,
    timeout: Duration,
    /// Rank 0: a stream to each other rank, in rank order; the others: one to rank 0.
    links: Vec<(usize, TcpStream)>,
    /// Index of the next operation.
    seq: u64,
    /// The first failure, after which nothing is accepted.
    broken: Option<String>,
}

impl Star {
    /// The collective error of a transfer failure in operation `op`.
    fn error(&self, op: Op, fail: Fail) -> CollectiveError {
        let (rank, seq) = (self.rank, self.seq);
        match fail {
            Fail::Timeout(peer) => CollectiveError::Timeout {
                rank,
                op,
                seq,
                waited: if rank == 0 {
                    self.timeout
                } else {
                    self.timeout * 2
                },
                missing: vec![peer],
            },
            Fail::Gone(gone) => CollectiveError::PeerGone {
                rank,
                op,
                seq,
                gone,
            },
            Fail::Garbled(peer, what) => CollectiveError::Transport {
                rank,
                op,
                reason: format!("rank {peer} sent {what}"),
            },
        }
    }

    /// Sends `mine` through the exchange and returns its group's result.
    fn exchange(&mut self, mine: Frame) -> Result<Vec<f32>, CollectiveError> {
        let op = mine.op;
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Broken {
                rank: self.rank,
                cause: cause.clone(),
            });
        }
        let result = if self.rank == 0 {
            self.hub(mine)
        } else {
            self.spoke(mine)
        };
        match result {
            Ok(values) => {
                self.seq += 1;
                Ok(values)
            }
            Err(error) => {
                self.broken = Some(error.to_string());
                if self.rank == 0 {
                    self.tell_everyone(op, &error.to_string());
                }
                Err(error)
            }
        }
    }

    /// A rank other than 0: sends its deposit, waits for its group's result.
    fn spoke(&mut self, mine: Frame) -> Result<Vec<f32>, CollectiveError> {
        let op = mine.op;
        let deadline = Instant::now() + self.timeout * 2;
        let (peer, stream) = &mut self.links[0];
        let peer = *peer;
        let sent = stream
            .write_all(&mine.bytes())
            .and_then(|()| stream.flush());
        let answer = match sent {
            Ok(()) => read_frame(stream, peer, deadline),
            Err(_) => Err(Fail::Gone(peer)),
        };
        let answer = answer.map_err(|fail| self.error(op, fail))?;
        match answer.kind {
            RESULT if answer.seq == self.seq => Ok(answer.data),
            FAILURE => Err(CollectiveError::Broken {
                rank: self.rank,
                cause: answer.text,
            }),
            _ => Err(CollectiveError::Transport {
                rank: self.rank,
                op,
                reason: format!(
                    "rank 0 answered operation #{} with a frame of kind {} for #{}",
                    self.seq, answer.kind, answer.seq
                ),
            }),
        }
    }

    /// Rank 0: receives every rank's deposit, combines each group's, sends the results.
    fn hub(&mut self, mine: Frame) -> Result<Vec<f32>, CollectiveError> {
        let op = mine.op;
        let deadline = Instant::now() + self.timeout;
        let mut frames = vec![mine];
        for i in 0..self.links.len() {
            let (peer, stream) = &mut self.links[i];
            let peer = *peer;
            let frame = read_frame(stream, peer, deadline).map_err(|fail| self.error(op, fail))?;
            frames.push(frame);
        }
        let mut results = self.combine_groups(&frames)?;
        let mine = std::mem::take(&mut results[0]);
        for ((peer, stream), data) in self.links.iter_mut().zip(results.into_iter().skip(1)) {
            let frame = Frame {
                kind: RESULT,
                data,
                text: String::new(),
                ..frames[0].header()
            };
            let sent = stream
                .write_all(&frame.bytes())
                .and_then(|()| stream.flush());
            if sent.is_err() {
                let gone = *peer;
                return Err(self.error(op, Fail::Gone(gone)));
            }
        }
        Ok(mine)
    }

    /// Each rank's result (by world rank) from every rank's deposit `frames` (by world rank).
    fn combine_groups(&self, frames: &[Frame]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        let mine = &frames[0];
        let mismatch = |detail: String| CollectiveError::Mismatch {
            rank: 0,
            op: mine.op,
            seq: self.seq,
            detail,
        };
        let calls = || {
            let calls: Vec<String> = frames
                .iter()
                .enumerate()
                .map(|(r, f)| {
                    format!(
                        "rank {r}: #{} {} of {} {} as rank {} of {} in group {}",
                        f.seq,
                        f.op,
                        f.data.len(),
                        f.ty,
                        f.group_rank,
                        f.group_size,
                        f.color
                    )
                })
                .collect();
            calls.join(", ")
        };
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (r, f) in frames.iter().enumerate() {
            if f.kind != DEPOSIT || f.seq != self.seq {
                return Err(mismatch(calls()));
            }
            groups.entry(f.color).or_default().push(r);
        }
        let mut results = vec![Vec::new(); frames.len()];
        for members in groups.values() {
            let size = members.len();
            let mut deposits: Vec<Option<Deposit>> = (0..size).map(|_| None).collect();
            for &r in members {
                let f = &frames[r];
                let slot = deposits.get_mut(f.group_rank as usize);
                match slot {
                    Some(slot @ None) if f.group_size as usize == size => {
                        *slot = Some(Deposit {
                            op: f.op,
                            ty: f.ty,
                            data: f.data.clone(),
                        });
                    }
                    _ => return Err(mismatch(calls())),
                }
            }
            let combined = combine(&deposits).map_err(|_| mismatch(calls()))?;
            for &r in members {
                results[r] = combined.clone();
            }
        }
        Ok(results)
    }

    /// Rank 0 after a failure: tells every other rank (as far as they can still be reached).
    fn tell_everyone(&mut self, op: Op, why: &str) {
        let frame = Frame {
            kind: FAILURE,
            ty: "f32",
            op,
            color: 0,
            group_rank: 0,
            group_size: 0,
            seq: self.seq,
            data: Vec::new(),
            text: why.to_string(),
        };
        let bytes = frame.bytes();
        for (_, stream) in &mut self.links {
            let _ = stream.write_all(&bytes).and_then(|()| stream.flush());
        }
    }
}

/// One rank's handle on one group of processes over TCP (see the module docs).
#[derive(Debug)]
pub struct TcpRank {
    star: Arc<Mutex<Star>>,
    color: u32,
    rank: usize,
    size: usize,
}

impl TcpRank {
    /// The shared connections; a panic while holding them leaves nothing half-written that a
    /// later operation would read (the group is then broken by the peers' timeouts anyway).
    fn star(&self) -> MutexGuard<'_, Star> {
        self.star.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exchange(
        &self,
        op: Op,
        ty: &'static str,
        data: Vec<f32>,
    ) -> Result<Vec<f32>, CollectiveError> {
        let mut star = self.star();
        let frame = Frame {
            kind: DEPOSIT,
            ty,
            op,
            color: self.color,
            group_rank: self.rank as u32,
            group_size: self.size as u32,
            seq: star.seq,
            data,
            text: String::new(),
        };
        star.exchange(frame)
    }
}

/// This process's handles on its world and its TP group, over the connections of `session` (a
/// rendezvous made for the collective, joined by every rank of `layout`; its timeout is the
/// collectives'). `shard` is this process's rank.
pub fn tcp_comms(
    session: Session,
    shard: &RankShard,
    layout: Layout,
) -> Result<RankComms<TcpRank>, RendezvousError> {
    if session.world() != layout.world() || session.rank() != shard.rank {
        return Err(RendezvousError::BadRank {
            rank: shard.rank,
            world: session.world(),
        });
    }
    let star = Arc::new(Mutex::new(Star {
        rank: session.rank(),
        timeout: session.timeout(),
        seq: 0,
        broken: None,
        links: session.into_streams()?,
    }));
    Ok(RankComms {
        world: TcpRank {
            star: Arc::clone(&star),
            color: 0,
            rank: shard.rank,
            size: layout.world(),
        },
        tp: TcpRank {
            star,
            color: 1 + shard.ep_rank as u32,
            rank: shard.tp_rank,
            size: layout.tp,
        },
    })
}

impl Collective for TcpRank {
    type Mem<T: Reducible> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce<T: Reducible>(&mut self, buf: &mut [T]) -> Result<(), CollectiveError> {
        host_all_reduce(buf, |data| self.exchange(Op::AllReduce, T::NAME, data))
    }

    fn all_gather<T: Reducible>(
        &mut self,
        part: &[T],
        out: &mut [T],
    ) -> Result<(), CollectiveError> {
        let group = (self.rank, self.size);
        host_all_gather(group, part, out, |data| {
            self.exchange(Op::AllGather, T::NAME, data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::shard::cpu_ranks::{cpu_group, CpuRank};
    use crate::shard::{rendezvous, ShardPlan};
    use half::bf16;
    use std::thread;

    /// The shards of `layout` over tiny-mixtral's config (only their rank numbers matter here).
    fn shards(layout: Layout) -> Vec<RankShard> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        ShardPlan::new(&config, layout).unwrap().ranks
    }

    /// Runs `f(rank, comms)` on one thread per rank of `layout`, joined over 127.0.0.1 with
    /// `timeout`; the results in rank order.
    fn on_tcp_ranks<R: Send + 'static>(
        layout: Layout,
        timeout: Duration,
        f: impl Fn(usize, RankComms<TcpRank>) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let listener = rendezvous::listen("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shards = shards(layout);
        let world = layout.world();
        let mut threads = Vec::new();
        for shard in shards.iter().skip(1).cloned() {
            let (f, addr) = (Arc::clone(&f), addr.clone());
            threads.push(thread::spawn(move || {
                let session = rendezvous::connect(&addr, shard.rank, world, timeout).unwrap();
                f(shard.rank, tcp_comms(session, &shard, layout).unwrap())
            }));
        }
        let session = listener.accept_ranks(world, timeout, b"").unwrap();
        let mine = f(0, tcp_comms(session, &shards[0], layout).unwrap());
        let mut all = vec![mine];
        all.extend(threads.into_iter().map(|t| t.join().unwrap()));
        all
    }

    /// Rank `r`'s buffer: magnitudes from 1e-4 to 1e4, so that the summation order shows in the
    /// low bits.
    fn data(r: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let e = ((i * 7 + r * 3) % 9) as i32 - 4;
                (1.0 + 0.37 * (r as f32) + 0.011 * i as f32) * 10f32.powi(e)
            })
            .collect()
    }

    /// One rank's world all-reduce (f32), TP all-reduce (bf16) and world all-gather, with `C`.
    fn collectives<C: Collective<Mem<f32> = [f32]> + Collective<Mem<bf16> = [bf16]>>(
        r: usize,
        world: &mut C,
        tp: &mut C,
    ) -> (Vec<f32>, Vec<bf16>, Vec<f32>) {
        let mut sum = data(r, 64);
        world.all_reduce::<f32>(&mut sum[..]).unwrap();
        let mut tp_sum: Vec<bf16> = data(r + 10, 32).into_iter().map(bf16::from_f32).collect();
        tp.all_reduce::<bf16>(&mut tp_sum[..]).unwrap();
        let part = data(r + 20, 5);
        let mut gathered = vec![0.0; 5 * world.size()];
        world
            .all_gather::<f32>(&part[..], &mut gathered[..])
            .unwrap();
        (sum, tp_sum, gathered)
    }

    #[test]
    fn sums_and_gathers_bit_for_bit_like_the_in_process_ranks() {
        let layout = Layout { tp: 2, ep: 2 };
        let timeout = Duration::from_secs(30);
        let got = on_tcp_ranks(layout, timeout, |r, mut c| {
            collectives(r, &mut c.world, &mut c.tp)
        });
        let mut world = cpu_group(4, timeout).into_iter();
        let mut tps: Vec<Vec<CpuRank>> = (0..2).map(|_| cpu_group(2, timeout)).collect();
        let threads: Vec<_> = shards(layout)
            .into_iter()
            .map(|s| {
                let mut w = world.next().unwrap();
                let mut t = tps[s.ep_rank].remove(0);
                thread::spawn(move || collectives(s.rank, &mut w, &mut t))
            })
            .collect();
        let want: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(got, want);
        // The TP groups reduced apart: ranks 0 and 2 (different groups) differ.
        assert_ne!(got[0].1, got[2].1);
        assert_eq!(got[0].1, got[1].1);
    }

    #[test]
    fn a_rank_that_leaves_fails_every_other_rank_at_once() {
        let layout = Layout { tp: 1, ep: 4 };
        let started = Instant::now();
        let errors = on_tcp_ranks(layout, Duration::from_secs(60), |r, mut c| {
            if r == 3 {
                return None;
            }
            let mut buf = [1.0f32; 8];
            Some(c.world.all_reduce(&mut buf[..]).unwrap_err())
        });
        assert!(matches!(
            errors[0],
            Some(CollectiveError::PeerGone {
                rank: 0,
                gone: 3,
                ..
            })
        ));
        for e in &errors[1..3] {
            match e {
                Some(CollectiveError::Broken { cause, .. }) => {
                    assert!(cause.contains("rank 3 has left"), "{cause}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_silent_rank_is_a_timeout_naming_it_and_the_group_stays_broken() {
        let layout = Layout { tp: 1, ep: 2 };
        let timeout = Duration::from_millis(500);
        let errors = on_tcp_ranks(layout, timeout, move |r, mut c| {
            let mut buf = [1.0f32; 8];
            if r == 1 {
                // Alive but late past rank 0's timeout.
                thread::sleep(timeout * 2);
            }
            let first = c.world.all_reduce(&mut buf[..]).unwrap_err();
            let second = c.world.all_reduce(&mut buf[..]).unwrap_err();
            (first, second)
        });
        match &errors[0].0 {
            CollectiveError::Timeout {
                rank: 0, missing, ..
            } => assert_eq!(missing, &vec![1]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            errors[0].1,
            CollectiveError::Broken { rank: 0, .. }
        ));
        assert!(
            matches!(errors[1].0, CollectiveError::Broken { rank: 1, .. }),
            "{:?}",
            errors[1]
        );
    }

    #[test]
    fn ranks_calling_different_operations_are_a_mismatch_everywhere() {
        let layout = Layout { tp: 1, ep: 2 };
        let errors = on_tcp_ranks(layout, Duration::from_secs(30), |r, mut c| {
            if r == 0 {
                let mut buf = [1.0f32; 4];
                c.world.all_reduce(&mut buf[..]).unwrap_err()
            } else {
                let mut out = [0.0f32; 8];
                c.world
                    .all_gather(&[1.0f32; 4][..], &mut out[..])
                    .unwrap_err()
            }
        });
        match &errors[0] {
            CollectiveError::Mismatch { detail, .. } => {
                assert!(detail.contains("all-gather"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&errors[1], CollectiveError::Broken { cause, .. } if cause.contains("disagree"))
        );
    }
}
