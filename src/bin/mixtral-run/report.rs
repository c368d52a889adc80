//! What `mixtral-run` writes: generated text or JSON lines on stdout (flushed per token), and the
//! timings on stderr (the weight-loading progress is `mixtral::load_display`'s).

use mixtral::generate::{GenerationOutput, Perplexity, TokenEvent};
use mixtral::quant::{MemoryEstimate, QuantFormat};
use serde_json::json;
use std::io::Write;
use std::time::Duration;

/// Writes generation events to stdout, as plain text or JSON lines, flushing each.
pub struct TokenWriter {
    json: bool,
    out: std::io::Stdout,
}

impl TokenWriter {
    /// A writer for the chosen format.
    pub fn new(json: bool) -> Self {
        TokenWriter {
            json,
            out: std::io::stdout(),
        }
    }

    /// One generated token.
    pub fn token(&mut self, event: &TokenEvent) -> std::io::Result<()> {
        let mut out = self.out.lock();
        if self.json {
            let line =
                json!({"event": "token", "id": event.id, "text": event.text, "index": event.index});
            writeln!(out, "{line}")?;
        } else {
            out.write_all(event.text.as_bytes())?;
        }
        out.flush()
    }

    /// The end of generation: a line break after plain text, the `done` object in JSON.
    pub fn done(&mut self, output: &GenerationOutput) -> std::io::Result<()> {
        let mut out = self.out.lock();
        if self.json {
            let line = json!({
                "event": "done",
                "prompt_ids": output.prompt_ids,
                "generated_ids": output.generated_ids,
                "text": output.text,
                "finish_reason": output.finish_reason.as_str(),
                "prefill_ms": millis(output.prefill),
                "decode_ms_per_token": decode_ms_per_token(output),
                "decode_steps": output.decode_steps,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out)?;
        }
        out.flush()
    }

    /// A perplexity result.
    pub fn perplexity(&mut self, ids: &[u32], scored: &Perplexity) -> std::io::Result<()> {
        let mut out = self.out.lock();
        if self.json {
            let line = json!({
                "event": "perplexity",
                "ids": ids,
                "token_logprobs": scored.token_logprobs,
                "perplexity": scored.perplexity,
            });
            writeln!(out, "{line}")?;
        } else {
            let mean =
                scored.token_logprobs.iter().sum::<f64>() / scored.token_logprobs.len() as f64;
            writeln!(
                out,
                "perplexity {:.4} over {} scored tokens (mean log-prob {mean:.4})",
                scored.perplexity,
                scored.token_logprobs.len()
            )?;
        }
        out.flush()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Mean time of a decode step in ms (0 when there was none).
fn decode_ms_per_token(output: &GenerationOutput) -> f64 {
    if output.decode_steps == 0 {
        0.0
    } else {
        millis(output.decode) / output.decode_steps as f64
    }
}

/// The timings line of a generation, on stderr.
pub fn generation_timings(load: Duration, output: &GenerationOutput) {
    let prefill_rate = output.prompt_ids.len() as f64 / output.prefill.as_secs_f64().max(1e-9);
    eprintln!(
        "load {:.2} s | prefill {} tokens, {:.1} ms, {prefill_rate:.1} tokens/s | decode {} steps, {:.2} ms/token | finish: {}",
        load.as_secs_f64(),
        output.prompt_ids.len(),
        millis(output.prefill),
        output.decode_steps,
        decode_ms_per_token(output),
        output.finish_reason
    );
}

/// The timings line of a scoring run, on stderr.
pub fn perplexity_timings(load: Duration, tokens: usize, scoring: Duration) {
    eprintln!(
        "load {:.2} s | scored {tokens} tokens in {:.1} ms, {:.1} tokens/s",
        load.as_secs_f64(),
        millis(scoring),
        tokens as f64 / scoring.as_secs_f64().max(1e-9)
    );
}

/// `bytes` in GiB, or MiB below 1 GiB.
fn size(bytes: u64) -> String {
    let mib = bytes as f64 / f64::from(1u32 << 20);
    if mib < 1024.0 {
        format!("{mib:.1} MiB")
    } else {
        format!("{:.2} GiB", mib / 1024.0)
    }
}

/// The line reporting the estimated memory of the model (see `mixtral::quant::estimate_memory`).
pub fn memory_estimate(format: QuantFormat, context: usize, m: &MemoryEstimate) -> String {
    format!(
        "memory estimate ({format}, {context}-token context, 1 sequence): weights {}, KV cache {}, \
         activations {}, total {}",
        size(m.weights_bytes),
        size(m.kv_bytes),
        size(m.activations_bytes),
        size(m.total)
    )
}
