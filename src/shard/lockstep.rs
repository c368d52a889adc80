//! Ranks in separate processes kept in lockstep over their rendezvous [`Session`]: rank 0's
//! [`Leader`] is the [`Engine`] the caller drives (rank 0 schedules and tokenizes); every call
//! that changes an engine's state is sent to every other rank, run on rank 0's own engine, and
//! answered by each other rank, which [`follow`]s: it runs each call it receives on its own
//! engine. The engines' collectives (TCP or NCCL) join their forward passes.
//!
//! As with [`super::replicas`] (the same scheme for threads), engines whose bookkeeping is
//! deterministic (the paged KV cache) stay identical, so calls that only read state are answered
//! by rank 0 alone. Rank 0's answer is returned. A refusal every rank makes (a bad request)
//! leaves the group usable; a rank that answers differently, fails alone, or does not answer
//! within the timeout makes the leader dead: every later call fails with the first failure. A call
//! waits at most the timeout for the others' answers after rank 0's own part, which a GPU rank
//! bounds by the same timeout (its watchdog aborts a collective stuck on a dead peer), so no call
//! waits more than twice the timeout, and a dead peer is seen after about one. Sampled ids are rank 0's; every rank draws with a copy
//! of rank 0's samplers, so the device sampling paths run alike.
//!
//! Protocol: one JSON text line per message on the session's connections: `OPTIONS <json>`
//! (rank 0's [`EngineOptions`], before the engines are built: [`send_options`] /
//! [`receive_options`]); `CALL <json>` from rank 0, answered by `DONE <json>` from each other
//! rank; the call `Stop` ends [`follow`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rendezvous::{RendezvousError, Session};
use super::replicas::{borrowed, owned_steps, OwnedStep};
use crate::config::ModelConfig;
use crate::engine::StepOutput;
use crate::engine::{Engine, EngineError, EngineOptions, RowSampler, SeqId, SeqStep};
use crate::sampling::{Rng, Sampler, SamplingParams};

/// Why a follower stopped other than by rank 0's `Stop`, or stopped after its engine failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FollowError {
    /// The connection to rank 0 failed (rank 0 is gone, or sent something else).
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    /// This rank's engine failed (rank 0 was told; the first failure is kept).
    #[error("rank {rank}: {error}")]
    Engine {
        /// This rank.
        rank: usize,
        /// Its engine's error.
        error: EngineError,
    },
}

/// One row's sampler and history.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireRow {
    params: SamplingParams,
    rng: [u64; 4],
    history: Vec<u32>,
}

/// An engine call that changes state.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Call {
    NewSequence,
    FreeSequence(SeqId),
    Step(Vec<OwnedStep>),
    StepTokens(Vec<OwnedStep>, Vec<WireRow>),
    ReusePrefix(SeqId, Vec<u32>),
    ForkSequence(SeqId),
    Stop,
}

/// A follower's answer: what it got (compared with rank 0's), or its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Answer {
    Done(String),
    Refused(String),
    Dead(String),
}

/// What every rank compares of a step's logits: their rows and length (the values are gathered
/// identically on every rank, and a NaN would not compare equal to itself).
fn logits_digest(out: &StepOutput) -> String {
    format!("{} values, rows {:?}", out.logits.len(), out.rows)
}

/// A call's state-changing part run on `engine`, as the digest every rank compares.
fn run_call<E: Engine + ?Sized>(engine: &mut E, call: &Call) -> Result<String, EngineError> {
    Ok(match call {
        Call::NewSequence => format!("{:?}", engine.new_sequence()?),
        Call::FreeSequence(seq) => format!("{:?}", engine.free_sequence(*seq)?),
        Call::Step(steps) => logits_digest(&engine.step(&borrowed(steps))?),
        Call::StepTokens(steps, rows) => {
            let mut samplers = samplers(rows)?;
            let mut row_samplers: Vec<RowSampler<'_>> = samplers
                .iter_mut()
                .zip(rows)
                .map(|(s, r)| RowSampler::new(s, &r.history))
                .collect();
            let ids = engine.step_tokens(&borrowed(steps), &mut row_samplers)?;
            format!("{} ids", ids.len())
        }
        Call::ReusePrefix(seq, tokens) => format!("{}", engine.reuse_prefix(*seq, tokens)?),
        Call::ForkSequence(seq) => format!("{:?}", engine.fork_sequence(*seq)?),
        Call::Stop => String::new(),
    })
}

/// The samplers of `rows`, at rank 0's positions of their streams.
fn samplers(rows: &[WireRow]) -> Result<Vec<Sampler>, EngineError> {
    rows.iter()
        .map(|r| {
            let mut s = Sampler::new(r.params)
                .map_err(|e| EngineError::backend(format!("rank 0 sent a bad sampler: {e}")))?;
            s.set_rng(Rng::from_state(r.rng));
            Ok(s)
        })
        .collect()
}

/// Rank 0: sends `options` to every other rank (before the engines are built, so that every
/// rank's limits, and so its KV bookkeeping, are rank 0's).
pub fn send_options(session: &mut Session, options: &EngineOptions) -> Result<(), RendezvousError> {
    let line = format!("OPTIONS {}", to_json(options));
    for peer in session.peers() {
        session.send_to(peer, &line)?;
    }
    Ok(())
}

/// A rank other than 0: rank 0's engine options, waiting at most `wait` (rank 0 sends them once
/// it has loaded the model and read the request).
pub fn receive_options(
    session: &mut Session,
    wait: Duration,
) -> Result<EngineOptions, RendezvousError> {
    let line = session.receive_from(0, Some(wait))?;
    line.strip_prefix("OPTIONS ")
        .and_then(|json| serde_json::from_str(json).ok())
        .ok_or(RendezvousError::Protocol {
            rank: session.rank(),
            peer: 0,
            line,
        })
}

/// A value of this module's own types as JSON (which cannot fail for them: no maps with
/// non-string keys, no failing `Serialize` impls).
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// A rank other than 0: runs every call rank 0 sends on `engine` and answers, until rank 0 sends
/// `Stop` (then `Ok`, or the first failure of this rank's engine) or its connection fails.
pub fn follow<E: Engine + ?Sized>(
    session: &mut Session,
    engine: &mut E,
) -> Result<(), FollowError> {
    let me = session.rank();
    let mut failure: Option<EngineError> = None;
    loop {
        let line = session.receive_from(0, None)?;
        let call: Call = line
            .strip_prefix("CALL ")
            .and_then(|json| serde_json::from_str(json).ok())
            .ok_or_else(|| RendezvousError::Protocol {
                rank: me,
                peer: 0,
                line: line.clone(),
            })?;
        if matches!(call, Call::Stop) {
            return failure.map_or(Ok(()), |error| Err(FollowError::Engine { rank: me, error }));
        }
        let answer = match run_call(engine, &call) {
            Ok(digest) => Answer::Done(digest),
            Err(e) if e.is_dead() => {
                let text = e.to_string();
                failure.get_or_insert(e);
                Answer::Dead(text)
            }
            Err(e) => Answer::Refused(e.to_string()),
        };
        session.send_to(0, &format!("DONE {}", to_json(&answer)))?;
    }
}

/// Rank 0's engine in a world of processes (see the module docs).
pub struct Leader<E: Engine + ?Sized> {
    session: Session,
    timeout: Duration,
    dead: Option<EngineError>,
    engine: Box<E>,
}

impl<E: Engine + ?Sized> std::fmt::Debug for Leader<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader")
            .field("world", &self.session.world())
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// A rank that failed the group (no answer, a different answer, a failure of its own).
#[derive(Debug, thiserror::Error)]
#[error("rank {rank}: {why}")]
pub struct RankFailure {
    /// The rank.
    pub rank: usize,
    /// What happened.
    pub why: String,
}

impl<E: Engine + ?Sized> Leader<E> {
    /// Rank 0's `engine`, leading the other ranks of `session` (which must be rank 0's); each
    /// call waits at most `timeout` for their answers.
    pub fn new(
        engine: Box<E>,
        session: Session,
        timeout: Duration,
    ) -> Result<Self, RendezvousError> {
        if session.rank() != 0 {
            return Err(RendezvousError::BadRank {
                rank: session.rank(),
                world: session.world(),
            });
        }
        Ok(Leader {
            session,
            timeout,
            dead: None,
            engine,
        })
    }

    /// Marks the leader dead after `error` (the first failure is kept) and returns it.
    fn kill(&mut self, error: EngineError) -> EngineError {
        self.dead.get_or_insert(error).clone()
    }

    /// Runs `call` on every rank: sends it, runs `local` (the same call on rank 0's engine, its
    /// collectives meeting the others'), then reads every answer and compares it with rank 0's. A
    /// connection that fails is the rendezvous's own error, which names the peer.
    fn on_all<T>(
        &mut self,
        call: &Call,
        local: impl FnOnce(&mut E) -> Result<T, EngineError>,
        digest: impl Fn(&T) -> String,
    ) -> Result<T, EngineError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let line = format!("CALL {}", to_json(call));
        let peers = self.session.peers();
        for &peer in &peers {
            if let Err(e) = self.session.send_to(peer, &line) {
                return Err(self.kill(EngineError::dead(e)));
            }
        }
        let mine = local(&mut self.engine);
        let mut first_failure = None;
        for &peer in &peers {
            let failure = match self.session.receive_from(peer, Some(self.timeout)) {
                Err(e) => Some(EngineError::dead(e)),
                Ok(reply) => match reply
                    .strip_prefix("DONE ")
                    .and_then(|json| serde_json::from_str::<Answer>(json).ok())
                {
                    None => Some(failed(peer, format!("answered {reply:?}"))),
                    Some(answer) => compare(peer, &mine, &digest, answer),
                },
            };
            // Every answer is read, so the connections stay in step for the next call.
            first_failure = first_failure.or(failure);
        }
        if let Err(e) = &mine {
            if e.is_dead() {
                return Err(self.kill(e.clone()));
            }
        }
        match first_failure {
            Some(error) => Err(self.kill(error)),
            None => mine,
        }
    }
}

/// The dead error of rank `rank`.
fn failed(rank: usize, why: String) -> EngineError {
    EngineError::dead(RankFailure { rank, why })
}

/// `None` when `peer`'s answer agrees with rank 0's result, else the failure it makes.
fn compare<T>(
    peer: usize,
    mine: &Result<T, EngineError>,
    digest: impl Fn(&T) -> String,
    answer: Answer,
) -> Option<EngineError> {
    let rank0 = match mine {
        Ok(value) => format!("got {}", digest(value)),
        Err(e) => format!("failed with {e}"),
    };
    match (mine, answer) {
        (Ok(value), Answer::Done(theirs)) if digest(value) == theirs => None,
        (Err(e), Answer::Refused(_)) if !e.is_dead() => None,
        (_, Answer::Dead(why)) => Some(failed(peer, why)),
        (_, Answer::Done(theirs)) => {
            Some(failed(peer, format!("got {theirs}, where rank 0 {rank0}")))
        }
        (_, Answer::Refused(why)) => Some(failed(
            peer,
            format!("refused ({why}), where rank 0 {rank0}"),
        )),
    }
}

impl<E: Engine + ?Sized> Drop for Leader<E> {
    /// Tells every other rank to stop (as far as they can still be reached).
    fn drop(&mut self) {
        let line = format!("CALL {}", to_json(&Call::Stop));
        for peer in self.session.peers() {
            let _ = self.session.send_to(peer, &line);
        }
    }
}

impl<E: Engine + ?Sized> Engine for Leader<E> {
    fn config(&self) -> &ModelConfig {
        self.engine.config()
    }

    fn max_context(&self) -> usize {
        self.engine.max_context()
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.on_all(
            &Call::NewSequence,
            |e| e.new_sequence(),
            |s| format!("{s:?}"),
        )
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let call = Call::FreeSequence(seq);
        self.on_all(&call, |e| e.free_sequence(seq), |s| format!("{s:?}"))
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        match &self.dead {
            Some(e) => Err(e.clone()),
            None => self.engine.sequence_len(seq),
        }
    }

    fn free_kv_blocks(&self) -> usize {
        self.engine.free_kv_blocks()
    }

    fn total_kv_blocks(&self) -> usize {
        self.engine.total_kv_blocks()
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        let call = Call::Step(owned_steps(batch));
        self.on_all(&call, |e| e.step(batch), logits_digest)
    }

    fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        let rows = samplers
            .iter()
            .map(|s| WireRow {
                params: *s.sampler.params(),
                rng: s.sampler.rng().state(),
                history: s.history.to_vec(),
            })
            .collect();
        let call = Call::StepTokens(owned_steps(batch), rows);
        self.on_all(
            &call,
            |e| e.step_tokens(batch, samplers),
            |ids| format!("{} ids", ids.len()),
        )
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        let call = Call::ReusePrefix(seq, tokens.to_vec());
        self.on_all(&call, |e| e.reuse_prefix(seq, tokens), |n| n.to_string())
    }

    fn fork_sequence(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        let call = Call::ForkSequence(seq);
        self.on_all(&call, |e| e.fork_sequence(seq), |s| format!("{s:?}"))
    }

    fn kv_block_size(&self) -> Option<usize> {
        self.engine.kv_block_size()
    }

    fn describe(&self) -> Option<String> {
        let mine = self.engine.describe().unwrap_or_default();
        Some(format!(
            "{} ranks in separate processes, rank 0 scheduling; rank 0: {mine}",
            self.session.world()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuEngine;
    use crate::shard::rendezvous;
    use crate::shard::test_support::{answers_like_one_engine, cpu, tiny_model};
    use crate::Model;
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};

    fn model() -> Arc<Model> {
        Arc::new(tiny_model())
    }

    /// A leader over a CPU engine allowing `sequences[0]` sequences, and one follower thread per
    /// further entry (each a whole CPU engine: no collectives, only the lockstep), over
    /// 127.0.0.1.
    fn world(
        model: &Arc<Model>,
        sequences: &[usize],
    ) -> (Leader<CpuEngine>, Vec<JoinHandle<Result<(), FollowError>>>) {
        let timeout = Duration::from_secs(30);
        let listener = rendezvous::listen("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let world = sequences.len();
        let followers = (1..world)
            .map(|r| {
                let (addr, model, n) = (addr.clone(), Arc::clone(model), sequences[r]);
                thread::spawn(move || {
                    let mut session = rendezvous::connect(&addr, r, world, timeout).unwrap();
                    follow(&mut session, &mut cpu(&model, n))
                })
            })
            .collect();
        let session = listener.accept_ranks(world, timeout, b"").unwrap();
        let leader = Leader::new(Box::new(cpu(model, sequences[0])), session, timeout).unwrap();
        (leader, followers)
    }

    #[test]
    fn a_leader_answers_what_one_engine_answers_and_its_drop_ends_the_followers() {
        let model = model();
        let (mut three, followers) = world(&model, &[4, 4, 4]);
        answers_like_one_engine(&mut cpu(&model, 4), &mut three);
        drop(three);
        for f in followers {
            assert_eq!(f.join().unwrap(), Ok(()));
        }
    }

    #[test]
    fn a_rank_that_refuses_alone_makes_the_leader_dead() {
        let model = model();
        // Rank 1 allows one sequence, rank 0 two: the second new sequence succeeds on rank 0 only.
        let (mut leader, followers) = world(&model, &[2, 1]);
        leader.new_sequence().unwrap();
        let error = leader.new_sequence().unwrap_err();
        assert!(error.is_dead(), "{error}");
        assert!(error.to_string().contains("rank 1: refused"), "{error}");
        assert_eq!(leader.new_sequence().unwrap_err(), error);
        drop(leader);
        // A refusal is not a failure of rank 1's engine: it ends when told to.
        for f in followers {
            assert_eq!(f.join().unwrap(), Ok(()));
        }
    }

    #[test]
    fn a_rank_that_is_gone_is_a_dead_error_naming_it() {
        let model = model();
        let timeout = Duration::from_secs(30);
        let listener = rendezvous::listen("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let gone = thread::spawn(move || drop(rendezvous::connect(&addr, 1, 2, timeout).unwrap()));
        let session = listener.accept_ranks(2, timeout, b"").unwrap();
        gone.join().unwrap();
        let mut leader = Leader::new(Box::new(cpu(&model, 2)), session, timeout).unwrap();
        let error = leader.new_sequence().unwrap_err();
        assert!(error.is_dead(), "{error}");
        assert!(error.to_string().contains("rank 1"), "{error}");
    }

    #[test]
    fn options_reach_every_rank() {
        let timeout = Duration::from_secs(30);
        let listener = rendezvous::listen("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let follower = thread::spawn(move || {
            let mut s = rendezvous::connect(&addr, 1, 2, timeout).unwrap();
            receive_options(&mut s, timeout).unwrap()
        });
        let mut session = listener.accept_ranks(2, timeout, b"").unwrap();
        let options = EngineOptions {
            max_context: Some(77),
            kv_blocks: Some(5),
            parallel: crate::shard::Layout { tp: 2, ep: 1 },
            ..EngineOptions::default()
        };
        send_options(&mut session, &options).unwrap();
        assert_eq!(follower.join().unwrap(), options);
    }
}
