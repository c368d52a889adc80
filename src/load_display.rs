//! [`LoadDisplay`]: the weight-loading progress that `mixtral-run` and `mixtral-serve` write on
//! stderr. On a terminal, one line rewritten in place (`\r`) at every report. Otherwise (a log
//! file, a service manager's journal) nothing for the first second, then one whole line each time
//! another tenth of the bytes is done, so a load adds at most eleven lines to a log.

use crate::checkpoint::LoadProgress;
use crate::model::ProgressFn;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After this long a load shows progress even when stderr is not a terminal.
const QUIET_LOAD: Duration = Duration::from_secs(1);

/// No tenth written yet.
const NONE: u64 = u64::MAX;

/// The progress display of one load (see the module docs).
#[derive(Debug)]
pub struct LoadDisplay {
    /// An in-place line was written and needs its line break.
    open_line: Arc<AtomicBool>,
}

impl LoadDisplay {
    /// A display and the callback to hand to the load (`LoadOptions::progress`, an engine's
    /// upload).
    pub fn new() -> (Self, ProgressFn) {
        let open_line = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&open_line);
        let start = Instant::now();
        let terminal = std::io::stderr().is_terminal();
        let last_tenth = AtomicU64::new(NONE);
        let callback: ProgressFn = Arc::new(move |p: LoadProgress| {
            if terminal {
                flag.store(true, Ordering::Relaxed);
                eprint!("\r{}", line(p));
            } else if start.elapsed() > QUIET_LOAD {
                let now = tenth(p);
                if last_tenth.swap(now, Ordering::Relaxed) != now {
                    eprintln!("{}", line(p));
                }
            }
        });
        (LoadDisplay { open_line }, callback)
    }

    /// Ends the in-place line, if one was written.
    pub fn finish(&self) {
        if self.open_line.swap(false, Ordering::Relaxed) {
            eprintln!();
        }
    }
}

/// `loading weights:  42.0% (1.00 / 2.38 GiB)`.
fn line(p: LoadProgress) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let percent = if p.total_bytes == 0 {
        100.0
    } else {
        p.done_bytes as f64 * 100.0 / p.total_bytes as f64
    };
    format!(
        "loading weights: {percent:5.1}% ({:.2} / {:.2} GiB)",
        gib(p.done_bytes),
        gib(p.total_bytes)
    )
}

/// The tenths of the bytes done, 0 to 10 (10 for an empty load).
fn tenth(p: LoadProgress) -> u64 {
    if p.total_bytes == 0 {
        return 10;
    }
    let done = u128::from(p.done_bytes.min(p.total_bytes));
    (done * 10 / u128::from(p.total_bytes)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(done: u64, total: u64) -> LoadProgress {
        LoadProgress {
            done_bytes: done,
            total_bytes: total,
        }
    }

    #[test]
    fn the_line_gives_the_percentage_and_the_gib() {
        assert_eq!(
            line(at(1 << 30, 4 << 30)),
            "loading weights:  25.0% (1.00 / 4.00 GiB)"
        );
        assert_eq!(line(at(0, 0)), "loading weights: 100.0% (0.00 / 0.00 GiB)");
    }

    #[test]
    fn tenths_step_once_per_tenth_of_the_bytes() {
        let total: u64 = 93 << 30;
        let mut steps: Vec<u64> = (0..=1000)
            .map(|i| tenth(at(total * i / 1000, total)))
            .collect();
        steps.dedup();
        assert_eq!(steps, (0..=10).collect::<Vec<_>>());
        // Past the total (a report rounded up) and an empty load stay at 10.
        assert_eq!(tenth(at(total + 1, total)), 10);
        assert_eq!(tenth(at(0, 0)), 10);
        assert_eq!(tenth(at(u64::MAX - 1, u64::MAX)), 9);
    }
}
