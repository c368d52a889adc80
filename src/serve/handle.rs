//! [`EngineHandle`]: one thread owns an engine and its [`Scheduler`]; requests come from any thread
//! or async task ([`EngineHandle::submit`]) and their events stream back through a channel per
//! request ([`RequestStream`]), readable with `.recv().await` in an async runtime (tokio) or
//! `blocking_recv()` on a plain thread. Dropping a stream aborts its request.
//!
//! The thread loop: take every queued command (submit, abort), run one scheduler step, publish the
//! stats, send each event to its request's channel (a closed channel aborts the request); sleep on
//! the command queue while there is nothing to do.

use super::event::Event;
use super::request::{Request, RequestId, RequestLimits, ServeError};
use super::scheduler::{Scheduler, SchedulerOptions};
use super::stats::ServeStats;
use crate::engine::Engine;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What the engine thread is told.
enum Command {
    Submit {
        id: RequestId,
        request: Request,
        events: UnboundedSender<Event>,
    },
    Abort(RequestId),
    Shutdown,
}

/// A running engine thread. `Send + Sync`: share it (e.g. in an `Arc`) between request handlers.
/// Dropping it stops the thread (every active request's stream ends) and waits for it.
pub struct EngineHandle {
    commands: Sender<Command>,
    stats: Arc<Mutex<ServeStats>>,
    limits: RequestLimits,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Starts the thread that owns `engine`, scheduling with `options` and detokenizing with
    /// `tokenizer`. Fails only when the thread cannot be started.
    pub fn spawn(
        engine: Box<dyn Engine>,
        tokenizer: Arc<Tokenizer>,
        options: SchedulerOptions,
    ) -> Result<EngineHandle, ServeError> {
        let scheduler = Scheduler::new(engine.as_ref(), tokenizer, options);
        let limits = scheduler.limits();
        let stats = Arc::new(Mutex::new(scheduler.stats(engine.as_ref())));
        let (commands, queue) = mpsc::channel();
        let published = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("mixtral-engine".into())
            .spawn(move || run(engine, scheduler, queue, published))
            .map_err(|e| ServeError::Spawn(Arc::new(e)))?;
        Ok(EngineHandle {
            commands,
            stats,
            limits,
            next_id: AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    /// What requests are checked against (the engine's context and vocabulary).
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Queues `request` (checked here first: [`Request::validate`]) and returns the stream of its
    /// events. Never blocks. [`ServeError::Stopped`] when the engine thread is gone.
    pub fn submit(&self, request: Request) -> Result<RequestStream, ServeError> {
        request.validate(&self.limits)?;
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = unbounded_channel();
        self.commands
            .send(Command::Submit {
                id,
                request,
                events: tx,
            })
            .map_err(|_| ServeError::Stopped)?;
        Ok(RequestStream {
            id,
            events: rx,
            commands: self.commands.clone(),
        })
    }

    /// The scheduler's counts and gauges after its latest step.
    pub fn stats(&self) -> ServeStats {
        match self.stats.lock() {
            Ok(s) => *s,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// False once the engine thread has exited (shut down, or panicked); requests are then
    /// refused with [`ServeError::Stopped`].
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread and waits for it (what dropping the handle does).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The events of one submitted request, in order; ends (`None`) after the last choice's
/// `Finished` or an `Error`. Dropping it aborts the request (its KV blocks are freed within one
/// engine step).
#[derive(Debug)]
pub struct RequestStream {
    id: RequestId,
    events: UnboundedReceiver<Event>,
    commands: Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Submit { id, .. } => write!(f, "Submit({id:?})"),
            Command::Abort(id) => write!(f, "Abort({id:?})"),
            Command::Shutdown => f.write_str("Shutdown"),
        }
    }
}

impl RequestStream {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event, waiting without blocking the async runtime; `None` at the end.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the calling thread; `None` at the end. Not for use inside an
    /// async runtime (use [`RequestStream::recv`] there).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    /// Polls for the next event (for writing a `Stream` adapter): `Ready(None)` at the end.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }

    /// Aborts the request: every unfinished choice ends with reason `Cancelled` (still delivered
    /// to this stream).
    pub fn abort(&self) {
        let _ = self.commands.send(Command::Abort(self.id));
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Abort(self.id));
    }
}

/// Applies one command; false on `Shutdown`.
fn apply(
    command: Command,
    scheduler: &mut Scheduler,
    senders: &mut HashMap<RequestId, UnboundedSender<Event>>,
) -> bool {
    match command {
        Command::Submit {
            id,
            request,
            events,
        } => match scheduler.add(id, &request) {
            Ok(()) => {
                senders.insert(id, events);
            }
            Err(e) => {
                let _ = events.send(Event::Error(e));
            }
        },
        Command::Abort(id) => {
            scheduler.abort(id);
        }
        Command::Shutdown => return false,
    }
    true
}

/// The engine thread's loop (see the module docs).
fn run(
    mut engine: Box<dyn Engine>,
    mut scheduler: Scheduler,
    queue: Receiver<Command>,
    stats: Arc<Mutex<ServeStats>>,
) {
    let mut senders: HashMap<RequestId, UnboundedSender<Event>> = HashMap::new();
    loop {
        if scheduler.is_idle() {
            match queue.recv() {
                Ok(command) => {
                    if !apply(command, &mut scheduler, &mut senders) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        loop {
            match queue.try_recv() {
                Ok(command) => {
                    if !apply(command, &mut scheduler, &mut senders) {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let events = scheduler.step(engine.as_mut());
        // Published before the events go out, so that a client that has seen its request end
        // reads stats in which it has ended.
        publish(&stats, scheduler.stats(engine.as_ref()));
        let mut aborted = false;
        for (id, event) in events {
            let delivered = senders.get(&id).is_some_and(|tx| tx.send(event).is_ok());
            if !delivered {
                aborted |= scheduler.abort(id);
            }
        }
        senders.retain(|id, _| scheduler.is_active(*id));
        if aborted {
            publish(&stats, scheduler.stats(engine.as_ref()));
        }
    }
}

/// Replaces the published stats with `now`.
fn publish(stats: &Mutex<ServeStats>, now: ServeStats) {
    match stats.lock() {
        Ok(mut s) => *s = now,
        Err(poisoned) => *poisoned.into_inner() = now,
    }
}
