//! `mixtral-serve`'s command line: flags (`--name value`, `--name=value`) into a [`ServeCommand`],
//! every mistake a [`UsageError`] naming the flag and the value. `--device`, `--cuda-kernels` and
//! `--quantize` take what `mixtral-run` takes.

use crate::engine::{Device, EngineOptions, OptInKernels};
use crate::quant::QuantFormat;
use crate::serve::SchedulerOptions;
use crate::shard::world::{DistInit, DIST_FLAGS};
use crate::shard::Layout;
use std::ffi::OsString;
use std::path::PathBuf;

/// The usage text of `--help`.
pub const USAGE: &str = "\
mixtral-serve: an OpenAI-compatible HTTP server for a Mixtral-family model directory

usage:
    mixtral-serve --model DIR [--host 127.0.0.1] [--port 8000] [--device cpu|cuda|cuda:N]
                  [--cuda-kernels LIST] [--quantize fp8|int8|int4] [--served-model-name NAME] [--max-num-seqs N]
                  [--max-num-batched-tokens N] [--max-context N] [--kv-blocks N]
                  [--tensor-parallel N] [--expert-parallel N]
                  [--dist-init HOST:PORT --rank R --world W [--dist-timeout S]]
    mixtral-serve --help | --version

options:
    --model DIR                  Hugging Face model directory (config.json, safetensors, tokenizer.json)
    --host HOST                  address to listen on (default 127.0.0.1)
    --port PORT                  port to listen on (default 8000; 0 picks a free one)
    --device D                   cpu (default), cuda or cuda:N
    --cuda-kernels LIST          CUDA kernels that are off by default (cutlass, mma-decode, pdl,
                                 fast-sample; comma-separated), as mixtral-run --cuda-kernels (default none)
    --quantize F                 quantize the attention and expert weights on load: fp8, int8 or
                                 int4 (bf16 keeps them as stored), as mixtral-run --quantize
    --served-model-name NAME     the model id clients give (default: the model directory's name)
    --max-num-seqs N             most sequences (choices) running together (default 8)
    --max-num-batched-tokens N   most tokens in one engine step, decodes and prompt chunks
                                 together (default 512)
    --max-context N              longest sequence in tokens (default: the model's max_position_embeddings)
    --kv-blocks N                KV-cache blocks of 16 tokens (default: enough for --max-num-seqs
                                 full contexts; on CUDA at most what the free GPU memory holds).
                                 Freed blocks stay in the pool as the prefix cache, so on the CPU
                                 memory can grow to the whole pool
    --tensor-parallel N          split the model over N ranks as mixtral-run --tensor-parallel does:
                                 with --device cuda:F on GPUs F..F+N-1 of this process (a build with
                                 the nccl feature), with --device cpu on N simulated ranks (default 1)
    --expert-parallel N          give each of N ranks (times --tensor-parallel) whole experts, as
                                 mixtral-run --expert-parallel (default 1). A split is checked against
                                 the model and its per-rank memory plan printed before loading
    --dist-init HOST:PORT        run the split's ranks in separate processes (one per GPU, on one
                                 machine or several), as mixtral-run --dist-init: every process gets
                                 the same command but its own --rank; rank 0 listens on HOST:PORT
                                 for the others, then serves HTTP (--host, --port); the others serve
                                 rank 0 until it stops. GPU ranks need the nccl feature
    --rank R                     this process's rank (with --dist-init)
    --world W                    ranks in all (with --dist-init): --tensor-parallel times
                                 --expert-parallel
    --dist-timeout S             seconds to wait for the other ranks to join, in each collective
                                 and for each step's answers (default 60)
    -h, --help                   this text
    -V, --version                the version

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
The listening address is printed on stderr once the model is loaded.";

/// A command-line mistake; its message names the flag and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

/// The server's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeArgs {
    /// The model directory.
    pub model: PathBuf,
    /// Address to listen on.
    pub host: String,
    /// Port (0 = any free one).
    pub port: u16,
    /// Where to run.
    pub device: Device,
    /// Opt-in CUDA kernels (`--cuda-kernels`).
    pub opt_in: OptInKernels,
    /// Quantize on load.
    pub quantize: Option<QuantFormat>,
    /// The model id clients give.
    pub served_model_name: Option<String>,
    /// Most sequences at once.
    pub max_num_seqs: usize,
    /// Most tokens per forward pass.
    pub max_num_batched_tokens: Option<usize>,
    /// Longest sequence.
    pub max_context: Option<usize>,
    /// KV-cache blocks.
    pub kv_blocks: Option<usize>,
    /// `--tensor-parallel` x `--expert-parallel` (1 x 1 when not given).
    pub parallel: Layout,
    /// `--dist-init HOST:PORT --rank R --world W`: this process is one rank of a world of
    /// processes.
    pub dist: Option<DistInit>,
}

impl ServeArgs {
    /// The id clients give as `model`: `--served-model-name`, else the directory's last component.
    pub fn model_id(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            self.model
                .components()
                .next_back()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .filter(|name| name != "." && name != "..")
                .unwrap_or_else(|| self.model.display().to_string())
        })
    }

    /// The engine's options for a model of `max_position_embeddings`: the context, the sequence
    /// and step-token limits, and the KV pool. On the CPU the pool is always sized (`--kv-blocks`,
    /// else `--max-num-seqs` full contexts), as only a sized CPU pool caches prefixes; on CUDA it
    /// is left to the engine unless `--kv-blocks` is given.
    pub fn engine_options(&self, max_position_embeddings: usize) -> EngineOptions {
        let max_context = self.max_context.unwrap_or(max_position_embeddings).max(1);
        let defaults = EngineOptions::default();
        let kv_blocks = self.kv_blocks.or_else(|| {
            (self.device == Device::Cpu).then(|| {
                let block_size = defaults.cpu().block_size.max(1);
                max_context
                    .div_ceil(block_size)
                    .saturating_mul(self.max_num_seqs)
            })
        });
        EngineOptions {
            max_context: Some(max_context),
            max_sequences: Some(self.max_num_seqs),
            max_step_tokens: self.max_num_batched_tokens,
            kv_blocks,
            opt_in: self.opt_in,
            parallel: self.parallel,
            ..defaults
        }
    }

    /// The scheduler's options: `--max-num-seqs`, `--max-num-batched-tokens` (default 512),
    /// prefix caching on.
    pub fn scheduler_options(&self) -> SchedulerOptions {
        let defaults = SchedulerOptions::default();
        SchedulerOptions {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self
                .max_num_batched_tokens
                .unwrap_or(defaults.max_num_batched_tokens),
            prefix_caching: true,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ServeCommand {
    /// Print the usage.
    Help,
    /// Print the version.
    Version,
    /// Run the server.
    Serve(Box<ServeArgs>),
}

/// Flags, all of which take a value.
const FLAGS: &[&str] = &[
    "--model",
    "--host",
    "--port",
    "--device",
    "--cuda-kernels",
    "--quantize",
    "--served-model-name",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--max-context",
    "--kv-blocks",
    "--tensor-parallel",
    "--expert-parallel",
];

/// Parses the arguments after the program name.
pub fn parse(raw: impl IntoIterator<Item = OsString>) -> Result<ServeCommand, UsageError> {
    let mut args = Vec::new();
    for (i, arg) in raw.into_iter().enumerate() {
        let arg = arg
            .into_string()
            .map_err(|a| UsageError(format!("argument {} ({a:?}) is not valid UTF-8", i + 1)))?;
        args.push(arg);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(ServeCommand::Help);
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        return Ok(ServeCommand::Version);
    }
    let mut given: Vec<(&'static str, String)> = Vec::new();
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let Some(&flag) = FLAGS.iter().chain(&DIST_FLAGS).find(|f| **f == name) else {
            return Err(UsageError(if name.starts_with('-') {
                format!("unknown flag {name}")
            } else {
                format!("unexpected argument {arg:?} (every input is given by a flag)")
            }));
        };
        if given.iter().any(|(f, _)| *f == flag) {
            return Err(UsageError(format!("{flag} given more than once")));
        }
        let value = match inline {
            Some(v) => v,
            None => rest
                .next()
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))?,
        };
        given.push((flag, value));
    }
    let value = |flag: &str| {
        given
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| v.as_str())
    };
    let parsed = |flag: &str, expected: &str| -> Result<Option<usize>, UsageError> {
        value(flag)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        UsageError(format!(
                            "invalid value {v:?} for {flag}: expected {expected}"
                        ))
                    })
            })
            .transpose()
    };
    let model = value("--model").ok_or_else(|| UsageError("--model DIR is required".into()))?;
    let port = match value("--port") {
        None => 8000,
        Some(v) => v.trim().parse::<u16>().map_err(|_| {
            UsageError(format!(
                "invalid value {v:?} for --port: expected 0..=65535"
            ))
        })?,
    };
    let host = value("--host").unwrap_or("127.0.0.1").to_string();
    if host.is_empty() {
        return Err(UsageError("--host needs a non-empty address".into()));
    }
    let device = match value("--device") {
        None => Device::Cpu,
        Some(v) => Device::parse(v).map_err(|e| UsageError(format!("--device: {e}")))?,
    };
    let opt_in = OptInKernels::from_flag(value("--cuda-kernels"), device)
        .map_err(|e| UsageError(e.to_string()))?;
    let quantize = value("--quantize")
        .map(|v| {
            v.trim().parse::<QuantFormat>().map_err(|_| {
                UsageError(format!(
                    "invalid value {v:?} for --quantize: expected bf16, fp8, int8 or int4"
                ))
            })
        })
        .transpose()?;
    let served_model_name = value("--served-model-name").map(str::to_string);
    if served_model_name.as_deref() == Some("") {
        return Err(UsageError(
            "--served-model-name needs a non-empty name".into(),
        ));
    }
    let parallel = Layout {
        tp: parsed("--tensor-parallel", "a positive integer")?.unwrap_or(1),
        ep: parsed("--expert-parallel", "a positive integer")?.unwrap_or(1),
    };
    let dist = DistInit::from_flags(value, parallel).map_err(UsageError)?;
    Ok(ServeCommand::Serve(Box::new(ServeArgs {
        model: PathBuf::from(model),
        host,
        port,
        device,
        opt_in,
        quantize,
        served_model_name,
        max_num_seqs: parsed("--max-num-seqs", "a positive integer")?.unwrap_or(8),
        max_num_batched_tokens: parsed("--max-num-batched-tokens", "a positive integer")?,
        max_context: parsed("--max-context", "a positive integer")?,
        kv_blocks: parsed("--kv-blocks", "a positive integer")?,
        parallel,
        dist,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<ServeCommand, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn serve(args: &[&str]) -> ServeArgs {
        match parse_str(args) {
            Ok(ServeCommand::Serve(a)) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_and_every_flag() {
        let a = serve(&["--model", "models/mini-mixtral"]);
        assert_eq!(
            (
                a.host.as_str(),
                a.port,
                a.device,
                a.quantize,
                a.max_num_seqs
            ),
            ("127.0.0.1", 8000, Device::Cpu, None, 8)
        );
        assert_eq!(a.parallel, Layout { tp: 1, ep: 1 });
        assert_eq!(a.dist, None);
        assert_eq!(a.model_id(), "mini-mixtral");
        assert_eq!(
            serve(&["--model", "models/mini-mixtral/"]).model_id(),
            "mini-mixtral"
        );
        let a = serve(&[
            "--model=m",
            "--host",
            "0.0.0.0",
            "--port=0",
            "--device",
            "cuda:1",
            "--cuda-kernels=pdl",
            "--quantize",
            "int8",
            "--served-model-name",
            "mx",
            "--max-num-seqs",
            "32",
            "--max-num-batched-tokens",
            "2048",
            "--max-context=1024",
            "--kv-blocks",
            "300",
            "--tensor-parallel",
            "2",
            "--expert-parallel=4",
        ]);
        assert_eq!(a.host, "0.0.0.0");
        assert_eq!(a.port, 0);
        assert_eq!(a.device, Device::Cuda(1));
        assert!(a.engine_options(4096).opt_in.dependent_launches);
        assert_eq!(a.opt_in.to_string(), "pdl");
        assert_eq!(a.quantize, Some(QuantFormat::Int8));
        assert_eq!(a.model_id(), "mx");
        assert_eq!(
            (a.max_num_seqs, a.max_num_batched_tokens, a.max_context),
            (32, Some(2048), Some(1024))
        );
        assert_eq!(a.kv_blocks, Some(300));
        assert_eq!(a.parallel, Layout { tp: 2, ep: 4 });
        assert_eq!(a.engine_options(4096).parallel, Layout { tp: 2, ep: 4 });
        let a = serve(&[
            "--model",
            "m",
            "--tensor-parallel=2",
            "--dist-init",
            "10.0.0.1:29500",
            "--rank",
            "1",
            "--world",
            "2",
            "--dist-timeout=2.5",
        ]);
        let dist = a.dist.expect("--dist-init given");
        assert_eq!(
            (dist.addr.as_str(), dist.rank, dist.world, dist.timeout),
            (
                "10.0.0.1:29500",
                1,
                2,
                std::time::Duration::from_millis(2500)
            )
        );
        assert_eq!(parse_str(&["--port", "x", "-h"]), Ok(ServeCommand::Help));
    }

    #[test]
    fn options_reach_the_engine_and_the_scheduler() {
        let a = serve(&[
            "--model",
            "m",
            "--max-num-seqs",
            "4",
            "--max-context",
            "100",
        ]);
        let e = a.engine_options(4096);
        assert_eq!((e.max_context, e.max_sequences), (Some(100), Some(4)));
        // 100 tokens are 7 blocks of 16; 4 full contexts.
        assert_eq!((e.kv_blocks, e.max_step_tokens), (Some(28), None));
        let s = a.scheduler_options();
        assert_eq!((s.max_num_seqs, s.max_num_batched_tokens), (4, 512));
        assert!(s.prefix_caching);

        let a = serve(&[
            "--model",
            "m",
            "--kv-blocks",
            "9",
            "--max-num-batched-tokens",
            "64",
        ]);
        let e = a.engine_options(4096);
        assert_eq!(
            (e.max_context, e.kv_blocks, e.max_step_tokens),
            (Some(4096), Some(9), Some(64))
        );
        assert_eq!(a.scheduler_options().max_num_batched_tokens, 64);
        // On CUDA the pool is the engine's unless given.
        let a = serve(&["--model", "m", "--device", "cuda"]);
        assert_eq!(a.engine_options(4096).kv_blocks, None);
    }

    #[test]
    fn mistakes_name_the_flag_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--model"),
            (&["--model", "m", "--port", "70000"], "--port"),
            (&["--model", "m", "--port"], "--port needs a value"),
            (&["--model", "m", "--device", "tpu"], "\"tpu\""),
            (&["--model", "m", "--quantize", "int3"], "int3"),
            (
                &["--model", "m", "--device", "cuda", "--cuda-kernels", "fa3"],
                "\"fa3\"",
            ),
            (
                &["--model", "m", "--cuda-kernels", "cutlass"],
                "needs --device cuda",
            ),
            (&["--model", "m", "--max-num-seqs", "0"], "--max-num-seqs"),
            (
                &["--model", "m", "--max-num-batched-tokens", "-1"],
                "--max-num-batched-tokens",
            ),
            (&["--model", "m", "--kv-blocks", "0"], "--kv-blocks"),
            (
                &["--model", "m", "--tensor-parallel", "0"],
                "--tensor-parallel",
            ),
            (
                &["--model", "m", "--expert-parallel", "two"],
                "--expert-parallel",
            ),
            (&["--model", "m", "--frob", "1"], "--frob"),
            (
                &["--model", "m", "--dist-init", "h:1", "--rank", "0"],
                "--world is required",
            ),
            (
                &[
                    "--model",
                    "m",
                    "--dist-init",
                    "h:1",
                    "--rank",
                    "0",
                    "--world",
                    "2",
                ],
                "--world 2 needs --tensor-parallel and --expert-parallel whose product is 2",
            ),
            (
                &["--model", "m", "--dist-timeout", "3"],
                "needs --dist-init",
            ),
            (&["--model", "m", "stray"], "stray"),
            (&["--model", "m", "--model", "n"], "more than once"),
            (
                &["--model", "m", "--served-model-name="],
                "--served-model-name",
            ),
        ];
        for (args, needle) in cases {
            match parse_str(args) {
                Err(UsageError(msg)) => assert!(msg.contains(needle), "{args:?}: {msg}"),
                Ok(c) => panic!("{args:?} accepted: {c:?}"),
            }
        }
    }
}
