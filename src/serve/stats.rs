//! [`ServeStats`]: a snapshot of what a scheduler is doing and has done, for metrics.

/// Counts and gauges of a [`super::Scheduler`] (and of an [`super::EngineHandle`]'s engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests accepted and not yet ended.
    pub requests: usize,
    /// Sequences (choices) holding an engine sequence.
    pub running: usize,
    /// Sequences waiting for admission (new or preempted).
    pub waiting: usize,
    /// KV blocks in the engine's pool.
    pub kv_blocks_total: usize,
    /// KV blocks free (including cached blocks no sequence uses).
    pub kv_blocks_free: usize,
    /// Prompt tokens looked up in the prefix cache (at admissions).
    pub prefix_cache_queries: u64,
    /// Of those, tokens whose KV came from the cache.
    pub prefix_cache_hits: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Prompt (and recomputed) tokens fed to the engine.
    pub prefill_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Choices started by forking choice 0's engine sequence (sharing its prompt's KV).
    pub forks: u64,
    /// Sequences preempted (their KV freed, to be computed again).
    pub preemptions: u64,
    /// Requests that ended normally (every choice finished).
    pub requests_finished: u64,
    /// Requests aborted.
    pub requests_aborted: u64,
    /// Requests that failed with an error.
    pub requests_failed: u64,
}

impl ServeStats {
    /// KV blocks in use: total minus free.
    pub fn kv_blocks_used(&self) -> usize {
        self.kv_blocks_total - self.kv_blocks_free.min(self.kv_blocks_total)
    }

    /// Fraction of looked-up prompt tokens found in the prefix cache (0 when none were looked up).
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        if self.prefix_cache_queries == 0 {
            0.0
        } else {
            self.prefix_cache_hits as f64 / self.prefix_cache_queries as f64
        }
    }
}
