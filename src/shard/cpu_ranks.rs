//! [`CpuRank`]: the in-process [`Collective`], one handle per rank thread of a group made by
//! [`cpu_group`].
//!
//! Each operation is a rendezvous on one shared board: every rank deposits its buffer; the last
//! to arrive computes the result once and every rank copies it out. The summation order is fixed:
//! element `i` of an all-reduce is `((x_0[i] + x_1[i]) + x_2[i]) + ... + x_{n-1}[i]` in f32, rank
//! 0 first (bf16 buffers are summed the same way in f32 and rounded to bf16 once), so results are
//! deterministic and identical on every rank. An all-gather concatenates the parts in rank order.
//!
//! Liveness: a rank that has not arrived when the group's timeout expires makes the waiting ranks
//! fail with [`CollectiveError::Timeout`] naming it; a handle dropped (its thread ended or
//! panicked) makes them fail at once with [`CollectiveError::PeerGone`]. Either failure breaks the
//! group: every later operation on any rank is [`CollectiveError::Broken`]. Nothing waits forever.

use super::collective::{
    host_all_gather, host_all_reduce, Collective, CollectiveError, Op, Reducible,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One rank's deposit.
#[derive(Debug)]
pub(super) struct Deposit {
    pub(super) op: Op,
    pub(super) ty: &'static str,
    pub(super) data: Vec<f32>,
}

/// The board of the operation being assembled.
#[derive(Debug)]
struct Board {
    /// Index of the operation being assembled.
    seq: u64,
    /// Deposits of this operation, by rank.
    arrived: Vec<Option<Deposit>>,
    /// The result, once every rank has arrived.
    result: Option<Arc<Vec<f32>>>,
    /// Ranks that have copied the result out.
    taken: Vec<bool>,
    /// Ranks whose handle was dropped.
    gone: Vec<bool>,
    /// The first failure, after which the group accepts nothing.
    broken: Option<String>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Duration,
    board: Mutex<Board>,
    changed: Condvar,
}

impl Shared {
    /// The board; a panic of another rank while holding it leaves consistent data (every update
    /// is completed before anything can panic), so a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank of an in-process group (see the module docs).
#[derive(Debug)]
pub struct CpuRank {
    shared: Arc<Shared>,
    rank: usize,
    /// Index of this rank's next operation.
    seq: u64,
}

/// A group of `size` in-process ranks whose operations time out after `timeout`; hand one
/// [`CpuRank`] to each rank's thread.
pub fn cpu_group(size: usize, timeout: Duration) -> Vec<CpuRank> {
    let shared = Arc::new(Shared {
        size,
        timeout,
        board: Mutex::new(Board {
            seq: 0,
            arrived: (0..size).map(|_| None).collect(),
            result: None,
            taken: vec![false; size],
            gone: vec![false; size],
            broken: None,
        }),
        changed: Condvar::new(),
    });
    (0..size)
        .map(|rank| CpuRank {
            shared: Arc::clone(&shared),
            rank,
            seq: 0,
        })
        .collect()
}

impl Drop for CpuRank {
    fn drop(&mut self) {
        let mut board = self.shared.lock();
        board.gone[self.rank] = true;
        self.shared.changed.notify_all();
    }
}

/// What a waiting rank is waiting for.
#[derive(Clone, Copy)]
enum Phase {
    /// Its turn: the previous operation drained by every rank.
    Turn,
    /// The other ranks' deposits.
    Arrivals,
}

impl CpuRank {
    /// Waits on the board until `ready` holds, failing on a broken group, a departed rank (that
    /// the phase still needs) or the deadline; a failure breaks the group.
    fn wait<'a>(
        &self,
        mut board: MutexGuard<'a, Board>,
        op: Op,
        phase: Phase,
        started: Instant,
        ready: impl Fn(&Board) -> bool,
    ) -> Result<MutexGuard<'a, Board>, CollectiveError> {
        let shared = &self.shared;
        loop {
            if let Some(cause) = &board.broken {
                return Err(CollectiveError::Broken {
                    rank: self.rank,
                    cause: cause.clone(),
                });
            }
            if ready(&board) {
                return Ok(board);
            }
            // Ranks this phase still waits for.
            let missing: Vec<usize> = (0..shared.size)
                .filter(|&r| match phase {
                    Phase::Turn => board.arrived[r].is_some() && !board.taken[r],
                    Phase::Arrivals => board.arrived[r].is_none(),
                })
                .collect();
            let failure = if let Some(&gone) = missing.iter().find(|&&r| board.gone[r]) {
                Some(CollectiveError::PeerGone {
                    rank: self.rank,
                    op,
                    seq: self.seq,
                    gone,
                })
            } else {
                let waited = started.elapsed();
                (waited >= shared.timeout).then(|| CollectiveError::Timeout {
                    rank: self.rank,
                    op,
                    seq: self.seq,
                    waited,
                    missing: missing.clone(),
                })
            };
            if let Some(error) = failure {
                board.broken = Some(error.to_string());
                shared.changed.notify_all();
                return Err(error);
            }
            let left = shared.timeout.saturating_sub(started.elapsed());
            board = shared
                .changed
                .wait_timeout(board, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Deposits `data`, waits for every rank's, and returns the combined result.
    fn exchange(
        &mut self,
        op: Op,
        ty: &'static str,
        data: Vec<f32>,
    ) -> Result<Arc<Vec<f32>>, CollectiveError> {
        let started = Instant::now();
        let seq = self.seq;
        let board = self.shared.lock();
        let mut board = self.wait(board, op, Phase::Turn, started, |b| b.seq == seq)?;
        board.arrived[self.rank] = Some(Deposit { op, ty, data });
        if board.arrived.iter().all(Option::is_some) {
            match combine(&board.arrived) {
                Ok(result) => board.result = Some(Arc::new(result)),
                Err(detail) => {
                    let error = CollectiveError::Mismatch {
                        rank: self.rank,
                        op,
                        seq,
                        detail,
                    };
                    board.broken = Some(error.to_string());
                    self.shared.changed.notify_all();
                    return Err(error);
                }
            }
            self.shared.changed.notify_all();
        }
        let mut board = self.wait(board, op, Phase::Arrivals, started, |b| b.result.is_some())?;
        let result = board.result.clone().unwrap_or_default();
        board.taken[self.rank] = true;
        if board.taken.iter().all(|&t| t) {
            board.seq += 1;
            board.arrived.iter_mut().for_each(|a| *a = None);
            board.taken.iter_mut().for_each(|t| *t = false);
            board.result = None;
            self.shared.changed.notify_all();
        }
        self.seq += 1;
        Ok(result)
    }
}

/// The result of a full board: the sum in rank order, or the concatenation in rank order; a
/// description of the disagreement when the ranks called different things. Also the TCP
/// collective's ([`super::tcp_ranks`]), so both sum alike.
pub(super) fn combine(arrived: &[Option<Deposit>]) -> Result<Vec<f32>, String> {
    let deposits: Vec<&Deposit> = arrived.iter().flatten().collect();
    let first = deposits[0];
    let agree = deposits
        .iter()
        .all(|d| d.op == first.op && d.ty == first.ty && d.data.len() == first.data.len());
    if !agree {
        let calls: Vec<String> = deposits
            .iter()
            .enumerate()
            .map(|(r, d)| format!("rank {r}: {} of {} {}", d.op, d.data.len(), d.ty))
            .collect();
        return Err(calls.join(", "));
    }
    Ok(match first.op {
        Op::AllReduce => {
            let mut sum = first.data.clone();
            for d in &deposits[1..] {
                for (s, &v) in sum.iter_mut().zip(&d.data) {
                    *s += v;
                }
            }
            sum
        }
        Op::AllGather => deposits
            .iter()
            .flat_map(|d| d.data.iter().copied())
            .collect(),
    })
}

impl Collective for CpuRank {
    type Mem<T: Reducible> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce<T: Reducible>(&mut self, buf: &mut [T]) -> Result<(), CollectiveError> {
        host_all_reduce(buf, |data| self.exchange(Op::AllReduce, T::NAME, data))
    }

    fn all_gather<T: Reducible>(
        &mut self,
        part: &[T],
        out: &mut [T],
    ) -> Result<(), CollectiveError> {
        let group = (self.rank, self.shared.size);
        host_all_gather(group, part, out, |data| {
            self.exchange(Op::AllGather, T::NAME, data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use std::thread;

    /// Runs `f(rank)` on one thread per rank of a fresh group and returns the results in rank
    /// order.
    fn on_ranks<R: Send + 'static>(
        size: usize,
        timeout: Duration,
        f: impl Fn(CpuRank) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let handles: Vec<_> = cpu_group(size, timeout)
            .into_iter()
            .map(|rank| {
                let f = Arc::clone(&f);
                thread::spawn(move || f(rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_identically_on_every_rank() {
        // Values chosen so that the order matters in f32: (1e8 + 1) - 1e8 = 0 but
        // (1e8 - 1e8) + 1 = 1. Rank order gives ((x0 + x1) + x2).
        let inputs = [vec![1e8f32, 1.0], vec![1.0, 2.0], vec![-1e8, 3.0]];
        let expected = vec![(1e8f32 + 1.0) - 1e8, (1.0f32 + 2.0) + 3.0];
        assert_eq!(expected[0], 0.0);
        let results = on_ranks(3, Duration::from_secs(10), move |mut c| {
            let mut buf = inputs[c.rank()].clone();
            for _ in 0..3 {
                // Repeated rounds reuse the board.
                let mut again = buf.clone();
                c.all_reduce(&mut again).unwrap();
                assert_eq!(again, vec![(1e8f32 + 1.0) - 1e8, 6.0]);
            }
            c.all_reduce(&mut buf).unwrap();
            buf
        });
        for r in results {
            assert_eq!(r, expected);
        }
    }

    #[test]
    fn bf16_is_summed_in_f32_and_rounded_once() {
        // 1 + 2^-9 + 2^-9 = 1 + 2^-8: exact in bf16 only when summed in f32 before rounding
        // (rounding after each add would lose each 2^-9 to round-to-even).
        let small = bf16::from_f32(2f32.powi(-9));
        let results = on_ranks(3, Duration::from_secs(10), move |mut c| {
            let mut buf = [if c.rank() == 0 { bf16::ONE } else { small }];
            c.all_reduce(&mut buf).unwrap();
            buf[0]
        });
        for r in results {
            assert_eq!(r, bf16::from_f32(1.0 + 2f32.powi(-8)));
        }
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        let results = on_ranks(4, Duration::from_secs(10), |mut c| {
            let part = [c.rank() as f32, 10.0 + c.rank() as f32];
            let mut out = [0.0f32; 8];
            c.all_gather(&part, &mut out).unwrap();
            let mut short = [0.0f32; 7];
            let error = c.all_gather(&part, &mut short).unwrap_err();
            assert!(matches!(
                error,
                CollectiveError::BadLength { expected: 8, .. }
            ));
            out
        });
        for r in results {
            assert_eq!(r, [0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0]);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_at_once() {
        let started = Instant::now();
        let results = on_ranks(3, Duration::from_secs(60), |mut c| {
            if c.rank() == 2 {
                return None; // leaves: the handle is dropped without calling
            }
            Some(c.all_reduce(&mut [1.0f32]).unwrap_err())
        });
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for the timeout"
        );
        for e in results.into_iter().flatten() {
            match &e {
                CollectiveError::PeerGone { gone: 2, .. } | CollectiveError::Broken { .. } => {}
                other => panic!("{other:?}"),
            }
            assert!(e.to_string().contains("rank 2"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_is_a_timeout_naming_it() {
        let results = on_ranks(3, Duration::from_millis(200), |mut c| {
            if c.rank() == 1 {
                thread::sleep(Duration::from_millis(800));
                return c.all_reduce(&mut [1.0f32]).unwrap_err();
            }
            c.all_reduce(&mut [1.0f32]).unwrap_err()
        });
        let timeouts: Vec<&CollectiveError> = results
            .iter()
            .filter(|e| matches!(e, CollectiveError::Timeout { .. }))
            .collect();
        assert!(!timeouts.is_empty(), "{results:?}");
        for e in &results {
            assert!(e.to_string().contains('1'), "{e}");
        }
        match timeouts[0] {
            CollectiveError::Timeout { missing, .. } => assert_eq!(missing, &vec![1]),
            _ => unreachable!(),
        }
        // The late rank finds the group broken.
        assert!(
            matches!(results[1], CollectiveError::Broken { .. }),
            "{:?}",
            results[1]
        );
    }

    #[test]
    fn ranks_calling_different_operations_are_a_mismatch() {
        let results = on_ranks(2, Duration::from_secs(10), |mut c| {
            if c.rank() == 0 {
                c.all_reduce(&mut [1.0f32, 2.0]).unwrap_err()
            } else {
                c.all_reduce(&mut [1.0f32]).unwrap_err()
            }
        });
        let text: Vec<String> = results.iter().map(|e| e.to_string()).collect();
        assert!(text.iter().any(|t| t.contains("disagree")), "{text:?}");
    }
}
