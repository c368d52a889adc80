//! Server metrics in Prometheus' text format: request and token counters, time-to-first-token and
//! inter-token latency histograms, generated tokens per second over a sliding window, beside the
//! backend's [`Stats`] (requests running and waiting, KV blocks used and free, prefix-cache hit
//! rate, engine steps, prefill tokens, preemptions) read when `/metrics` is asked for.

use super::backend::Stats;
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds (seconds) of the inter-token latency buckets.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// The window over which tokens per second are measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// `counts[i]`: observations <= `bounds[i]` and above the previous bound; the last entry is
    /// those above every bound.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(bucket) {
            *c += 1;
        }
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total: u64 = self.counts.iter().sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

#[derive(Debug)]
struct Inner {
    ttft: Histogram,
    itl: Histogram,
    requests_ok: u64,
    requests_failed: u64,
    requests_aborted: u64,
    prompt_tokens: u64,
    generated_tokens: u64,
    /// (when, tokens) of recent generated tokens, oldest first, within [`RATE_WINDOW`].
    recent: VecDeque<(Instant, u64)>,
    started: Instant,
}

/// What the HTTP layer measures; shared by every request.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// How a request ended, for the request counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished (EOS, stop, length).
    Finished,
    /// The engine failed.
    Failed,
    /// The client went away first.
    Aborted,
}

impl Metrics {
    /// Empty metrics, the rate window starting now.
    pub fn new() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                requests_ok: 0,
                requests_failed: 0,
                requests_aborted: 0,
                prompt_tokens: 0,
                generated_tokens: 0,
                recent: VecDeque::new(),
                started: Instant::now(),
            }),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        // A poisoned lock only means another thread panicked mid-update; the counts stay usable.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner);
    }

    /// One generated token at `now`: its latency since the request arrived (the first token) or
    /// since the previous token.
    pub fn token(&self, now: Instant, first: bool, latency: Duration) {
        self.with(|m| {
            if first {
                m.ttft.observe(latency.as_secs_f64());
            } else {
                m.itl.observe(latency.as_secs_f64());
            }
            m.generated_tokens += 1;
            m.recent.push_back((now, 1));
            prune(&mut m.recent, now);
        });
    }

    /// A request ended with `prompt_tokens` prompt tokens.
    pub fn request(&self, outcome: Outcome, prompt_tokens: usize) {
        self.with(|m| {
            match outcome {
                Outcome::Finished => m.requests_ok += 1,
                Outcome::Failed => m.requests_failed += 1,
                Outcome::Aborted => m.requests_aborted += 1,
            }
            m.prompt_tokens += prompt_tokens as u64;
        });
    }

    /// The Prometheus text of these metrics and `stats`, at `now`.
    pub fn render(&self, stats: &Stats, now: Instant) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            &mut out,
            "mixtral_requests_running",
            "Sequences (one per choice) running in the engine now.",
            stats.running as f64,
        );
        gauge(
            &mut out,
            "mixtral_requests_waiting",
            "Sequences waiting for admission (new or preempted).",
            stats.waiting as f64,
        );
        gauge(
            &mut out,
            "mixtral_kv_blocks_used",
            "KV-cache blocks held by sequences.",
            stats.kv_blocks_used as f64,
        );
        gauge(
            &mut out,
            "mixtral_kv_blocks_free",
            "KV-cache blocks free.",
            stats.kv_blocks_free as f64,
        );
        let hit_rate = if stats.prefix_cache_queries == 0 {
            0.0
        } else {
            stats.prefix_cache_hits as f64 / stats.prefix_cache_queries as f64
        };
        gauge(
            &mut out,
            "mixtral_prefix_cache_hit_rate",
            "Share of prompt tokens found in the prefix cache (0 before any lookup).",
            hit_rate,
        );
        for (name, help, value) in [
            (
                "mixtral_prefix_cache_queried_tokens_total",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "mixtral_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
            (
                "mixtral_engine_steps_total",
                "Engine steps (forward passes over a batch of sequences).",
                stats.steps,
            ),
            (
                "mixtral_prefill_tokens_total",
                "Prompt tokens the engine computed (cache hits excluded, recomputation included).",
                stats.prefill_tokens,
            ),
            (
                "mixtral_preemptions_total",
                "Sequences preempted when the KV cache ran out (computed again later).",
                stats.preemptions,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
        self.with(|m| {
            prune(&mut m.recent, now);
            let window = now.duration_since(m.started).min(RATE_WINDOW).as_secs_f64();
            let recent: u64 = m.recent.iter().map(|r| r.1).sum();
            let rate = if window > 0.0 {
                recent as f64 / window
            } else {
                0.0
            };
            gauge(
                &mut out,
                "mixtral_generation_tokens_per_second",
                "Tokens generated per second over the last 10 seconds.",
                rate,
            );
            let _ = writeln!(
                out,
                "# HELP mixtral_requests_total Requests ended, by outcome."
            );
            let _ = writeln!(out, "# TYPE mixtral_requests_total counter");
            for (outcome, count) in [
                ("finished", m.requests_ok),
                ("failed", m.requests_failed),
                ("aborted", m.requests_aborted),
            ] {
                let _ = writeln!(
                    out,
                    "mixtral_requests_total{{outcome=\"{outcome}\"}} {count}"
                );
            }
            for (name, help, value) in [
                (
                    "mixtral_prompt_tokens_total",
                    "Prompt tokens of ended requests.",
                    m.prompt_tokens,
                ),
                (
                    "mixtral_generation_tokens_total",
                    "Tokens generated.",
                    m.generated_tokens,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} counter");
                let _ = writeln!(out, "{name} {value}");
            }
            m.ttft.write(
                &mut out,
                "mixtral_time_to_first_token_seconds",
                "Time from a request's arrival to its first token.",
            );
            m.itl.write(
                &mut out,
                "mixtral_inter_token_latency_seconds",
                "Time between consecutive tokens of a request.",
            );
        });
        out
    }
}

/// Drops entries older than [`RATE_WINDOW`] before `now`.
fn prune(recent: &mut VecDeque<(Instant, u64)>, now: Instant) {
    while recent
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
    {
        recent.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for x in [0.5, 1.0, 1.5, 3.0] {
            h.observe(x);
        }
        let mut out = String::new();
        h.write(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(
            out.contains("x_sum 6\n") && out.contains("x_count 4\n"),
            "{out}"
        );
    }

    #[test]
    fn tokens_per_second_counts_only_the_window() {
        let m = Metrics::new();
        let start = m.inner.lock().unwrap().started;
        let late = start + Duration::from_secs(30);
        m.token(
            start + Duration::from_secs(1),
            true,
            Duration::from_millis(5),
        );
        for _ in 0..20 {
            m.token(late, false, Duration::from_millis(5));
        }
        let text = m.render(&Stats::default(), late);
        // 20 tokens in the last 10 s; the one at 1 s fell out of the window.
        assert!(
            text.contains("mixtral_generation_tokens_per_second 2\n"),
            "{text}"
        );
        assert!(
            text.contains("mixtral_generation_tokens_total 21\n"),
            "{text}"
        );
    }
}
