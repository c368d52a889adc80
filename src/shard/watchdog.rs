//! [`Watchdog`]: a deadline on one blocking call at a time, kept by a thread of its own.
//!
//! A call runs between [`Watchdog::arm`] and [`Watchdog::disarm`]; when it is still running
//! `timeout` after it was armed, the thread runs `on_expiry` once, while the call is still blocked.
//! A rank of a sharded GPU engine aborts its NCCL communicators there: a collective that waits on a
//! peer which died or hangs never returns on its own (its kernel spins on the GPU, and the host
//! waits on the stream), and an abort from another thread is how NCCL lets it return, with an
//! error. `disarm` then says that the call expired, and the caller reports the timeout.
//!
//! Arming and disarming are one atomic store each (no lock, no allocation, no system call), so a
//! per-token step can afford them. The thread looks every `timeout / 10`, at least every 10 ms and
//! at most every second, so an expired call is caught between `timeout` and `timeout` plus that
//! tick after it was armed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// No call is armed.
const IDLE: u64 = 0;
/// The armed call expired and `on_expiry` ran (or is running) for it.
const EXPIRED: u64 = u64::MAX;

/// State shared with the watchdog's thread.
struct Shared {
    /// The origin of `armed`'s times.
    base: Instant,
    /// [`IDLE`], [`EXPIRED`], or 1 + the nanoseconds from `base` to when the call was armed.
    armed: AtomicU64,
    /// Set when the watchdog is dropped.
    stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        // 2^64 nanoseconds are 584 years: the cast does not truncate in practice.
        self.base.elapsed().as_nanos() as u64
    }
}

/// A deadline on one call at a time (see the module docs). Dropping it stops and joins its thread.
pub struct Watchdog {
    shared: Arc<Shared>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("timeout", &self.timeout)
            .field("armed", &self.shared.armed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Watchdog {
    /// Starts the thread (named `name`) that runs `on_expiry` for a call still armed after
    /// `timeout`. Fails only when the thread cannot be spawned.
    pub fn start(
        name: &str,
        timeout: Duration,
        mut on_expiry: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            base: Instant::now(),
            armed: AtomicU64::new(IDLE),
            stop: AtomicBool::new(false),
        });
        let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let limit = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || loop {
                std::thread::park_timeout(tick);
                if watched.stop.load(Ordering::Acquire) {
                    return;
                }
                let armed = watched.armed.load(Ordering::Acquire);
                if armed == IDLE || armed == EXPIRED {
                    continue;
                }
                let overdue = watched.now().saturating_sub(armed - 1) >= limit;
                // Only the call that was read expires: one disarmed (or re-armed) since keeps
                // its own state.
                if overdue
                    && watched
                        .armed
                        .compare_exchange(armed, EXPIRED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    on_expiry();
                }
            })?;
        Ok(Watchdog {
            shared,
            timeout,
            thread: Some(thread),
        })
    }

    /// How long an armed call may run.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts the deadline of a call.
    pub fn arm(&self) {
        let now = self.shared.now().min(EXPIRED - 2);
        self.shared.armed.store(now + 1, Ordering::Release);
    }

    /// Ends the deadline of the call armed last; true when it had expired (`on_expiry` ran for
    /// it, or is running).
    pub fn disarm(&self) -> bool {
        self.shared.armed.swap(IDLE, Ordering::AcqRel) == EXPIRED
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    fn counting(timeout: Duration) -> (Watchdog, Arc<AtomicUsize>) {
        let fired = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&fired);
        let dog = Watchdog::start("test watchdog", timeout, move || {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        (dog, fired)
    }

    #[test]
    fn a_call_still_armed_after_the_timeout_is_expired_once_while_it_blocks() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::start("test watchdog", Duration::from_millis(50), move || {
            tx.send(()).unwrap();
        })
        .unwrap();
        dog.arm();
        // The "call" blocks until on_expiry releases it, as an aborted collective returns.
        rx.recv_timeout(Duration::from_secs(60))
            .expect("on_expiry ran for the blocked call");
        assert!(dog.disarm(), "disarm reports the expiry");
        // Expired once: nothing more arrives while nothing is armed.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }

    #[test]
    fn a_call_disarmed_in_time_never_expires() {
        let (dog, fired) = counting(Duration::from_secs(5));
        assert_eq!(dog.timeout(), Duration::from_secs(5));
        for _ in 0..100 {
            dog.arm();
            assert!(!dog.disarm());
        }
        // Idle for several ticks (the tick is 500 ms): nothing fires without an armed call.
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn each_expired_call_runs_on_expiry_and_a_new_arming_starts_a_new_deadline() {
        let (dog, fired) = counting(Duration::from_millis(20));
        for expected in 1..=2 {
            dog.arm();
            let start = Instant::now();
            while fired.load(Ordering::SeqCst) < expected {
                assert!(start.elapsed() < Duration::from_secs(60), "never expired");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(dog.disarm());
        }
    }

    #[test]
    fn on_expiry_runs_exactly_for_the_calls_that_disarm_reports_expired() {
        // Calls that end at once, just past the deadline (so that expiries race the disarms) and,
        // one in ten, long past it (so that some surely expire): each expiry the thread commits
        // must be the one disarm reports, never a call that had ended, and never twice.
        let (dog, fired) = counting(Duration::from_millis(10));
        let mut expired = 0;
        for i in 0..120u64 {
            dog.arm();
            match i % 10 {
                0 => std::thread::sleep(Duration::from_millis(60)),
                n if n % 2 == 0 => std::thread::sleep(Duration::from_millis(10 + n)),
                _ => {}
            }
            expired += usize::from(dog.disarm());
        }
        // Joining the thread lets an expiry already committed finish its on_expiry.
        drop(dog);
        assert_eq!(fired.load(Ordering::SeqCst), expired);
        assert!(expired > 0, "no call outlived the 10 ms timeout");
    }

    #[test]
    fn dropping_the_watchdog_stops_its_thread_and_never_expires_the_armed_call() {
        // The drop unparks the thread, which sees the stop before it looks at the armed call.
        let (dog, fired) = counting(Duration::from_secs(3600));
        dog.arm();
        drop(dog);
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }
}
