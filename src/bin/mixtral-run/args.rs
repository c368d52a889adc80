//! Command-line parsing of `mixtral-run`: flags (`--name value`, `--name=value`) into a
//! [`Command`], every mistake a [`UsageError`] naming the flag and the value.

pub use mixtral::engine::{Device, OptInKernels};
use mixtral::quant::QuantFormat;
use mixtral::sampling::{SamplingError, SamplingParams};
pub use mixtral::shard::Layout;
use std::ffi::OsString;
use std::path::PathBuf;

/// The usage text of `--help`.
pub const USAGE: &str = "\
mixtral-run: generate text with, or score text under, a Mixtral-family model directory

usage:
    mixtral-run --model DIR (--prompt TEXT | --prompt-file FILE) [--chat] [-n|--max-new-tokens N]
                [--temperature T] [--top-k K] [--top-p P] [--repeat-penalty R] [--seed S]
                [--stop TEXT]... [--device cpu|cuda|cuda:N] [--cuda-kernels LIST] [--max-context N]
                [--quantize fp8|int8|int4] [--tensor-parallel N] [--expert-parallel N] [--json]
    mixtral-run --model DIR --perplexity FILE [--device ...] [--max-context N] [--quantize ...]
                [--tensor-parallel N] [--expert-parallel N] [--json]
    mixtral-run ... --dist-init HOST:PORT --rank R --world W [--dist-timeout S]
    mixtral-run --explain | --help | --version

options:
    --model DIR            Hugging Face model directory (config.json, safetensors, tokenizer.json)
    --prompt TEXT          prompt text (a BOS token is added)
    --prompt-file FILE     read the prompt from FILE (one trailing line break is removed)
    --chat                 wrap the prompt as one user message in the model's chat template
    -n, --max-new-tokens N most tokens to generate (default 64)
    --temperature T        sample at temperature T (default: greedy, temperature 0)
    --top-k K              sample only from the K most likely tokens (needs --temperature)
    --top-p P              sample only from the smallest set reaching probability P (needs --temperature)
    --repeat-penalty R     CTRL repetition penalty over the prompt and output (default 1 = off)
    --seed S               seed of the sampler (default 0; needs --temperature)
    --stop TEXT            stop when TEXT appears in the output (repeatable; TEXT is not printed)
    --device D             cpu (default), cuda or cuda:N
    --cuda-kernels LIST    CUDA kernels that are off by default, comma-separated: cutlass
                           (CUTLASS's Hopper GEMMs for the prefill experts and projections), mma-decode (tensor-core decode
                           products and attention scores), pdl (programmatic dependent launches, H100/H200),
                           fast-sample (device sampling in a few passes); each checks itself at
                           load where it can (default none)
    --max-context N        longest sequence in tokens (default: the model's max_position_embeddings)
    --perplexity FILE      score BOS + the tokens of FILE (one trailing line break is removed)
    --quantize F           quantize the attention and expert weights on load: fp8 (E4M3, a scale
                           per output channel), int8 (a scale per output channel) or int4 (RTN,
                           groups of 128, asymmetric); bf16 keeps them as stored. Pre-quantized
                           directories (FP8, GPTQ) load without this flag
    --tensor-parallel N    split attention (by KV-head groups), every expert (by intermediate rows)
                           and the vocabulary over N ranks; with --device cpu the ranks are
                           simulated, one thread each (how the sharded plan is tested); with cuda
                           one GPU per rank from the device given on, over NCCL (a build with
                           feature `nccl`; unverified on GPUs so far)
    --expert-parallel N    give each of N ranks (times the tensor-parallel size) whole experts
    --dist-init HOST:PORT  run the split's ranks in separate processes, one each, every process
                           given the same command but its own --rank (as torchrun does): rank 0
                           listens on HOST:PORT, schedules and prints; the others connect and serve
                           it, printing nothing. CPU ranks meet over TCP; GPU ranks (one per
                           process, --device cuda:N) over NCCL (feature `nccl`, unverified on GPUs).
                           A rank that does not join or dies is an error on every rank within
                           --dist-timeout
    --rank R               this process's rank (with --dist-init)
    --world W              number of ranks (with --dist-init): --tensor-parallel times
                           --expert-parallel
    --dist-timeout S       seconds to wait for the other ranks to join, in each collective and for
                           each step's answers (default 60)
    --json                 one JSON object per line on stdout instead of plain text
    --explain              print which CUDA kernels run each op, by token count, weight format and
                           device (the kernel-selection table; needs a build with feature `cuda`)
    -h, --help             this text
    -V, --version          the version

Generated text streams to stdout; load progress and timings go to stderr.";

/// A command-line mistake; its message names the flag and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

/// Settings shared by both modes.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// The model directory.
    pub model: PathBuf,
    /// Where to run.
    pub device: Device,
    /// JSON lines on stdout.
    pub json: bool,
    /// Longest sequence, when capped by the user.
    pub max_context: Option<usize>,
    /// Quantize on load (`--quantize`).
    pub quantize: Option<QuantFormat>,
    /// `--tensor-parallel` x `--expert-parallel` (1 x 1 when not given).
    pub parallel: Layout,
    /// `--dist-init HOST:PORT --rank R --world W`.
    pub dist: Option<DistInit>,
    /// `--cuda-kernels` (none when not given).
    pub opt_in: OptInKernels,
}

pub use mixtral::shard::world::DistInit;

/// Where the prompt comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// `--prompt TEXT`.
    Text(String),
    /// `--prompt-file FILE`.
    File(PathBuf),
}

/// `mixtral-run --prompt ...`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateArgs {
    /// Shared settings.
    pub common: Common,
    /// The prompt.
    pub prompt: Prompt,
    /// Wrap the prompt as a chat user message.
    pub chat: bool,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Sampling parameters (validated).
    pub sampling: SamplingParams,
    /// Stop strings (non-empty).
    pub stops: Vec<String>,
}

/// `mixtral-run --perplexity FILE`.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityArgs {
    /// Shared settings.
    pub common: Common,
    /// The text file to score.
    pub file: PathBuf,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Print the usage.
    Help,
    /// Print the version.
    Version,
    /// Print the CUDA kernel-selection table.
    Explain,
    /// Generate text.
    Generate(GenerateArgs),
    /// Score a file.
    Perplexity(PerplexityArgs),
}

/// Flags that take a value.
const VALUE_FLAGS: &[&str] = &[
    "--model",
    "--prompt",
    "--prompt-file",
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--repeat-penalty",
    "--seed",
    "--stop",
    "--device",
    "--cuda-kernels",
    "--max-context",
    "--perplexity",
    "--quantize",
    "--tensor-parallel",
    "--expert-parallel",
    "--dist-init",
    "--rank",
    "--world",
    "--dist-timeout",
];

/// Flags without a value.
const SWITCHES: &[&str] = &["--chat", "--json"];

/// Flags that only apply to generation.
const GENERATION_FLAGS: &[&str] = &[
    "--chat",
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--repeat-penalty",
    "--seed",
    "--stop",
];

/// The flags given, in order, with their values (`None` for switches).
struct Given(Vec<(&'static str, Option<String>)>);

impl Given {
    /// The value of a flag that may appear once.
    fn value(&self, flag: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, _)| *f == flag)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|(f, _)| *f == flag)
    }

    /// Parses a flag's value with `parse`, naming the flag, the value and `expected` on failure.
    fn parsed<T: std::str::FromStr>(
        &self,
        flag: &str,
        expected: &str,
    ) -> Result<Option<T>, UsageError> {
        self.value(flag)
            .map(|v| {
                v.trim().parse::<T>().map_err(|_| {
                    UsageError(format!(
                        "invalid value {v:?} for {flag}: expected {expected}"
                    ))
                })
            })
            .transpose()
    }
}

/// Canonical name of a flag as typed (`-n` is `--max-new-tokens`), or `None` when unknown.
fn canonical(name: &str) -> Option<&'static str> {
    if name == "-n" {
        return Some("--max-new-tokens");
    }
    VALUE_FLAGS
        .iter()
        .chain(SWITCHES)
        .find(|f| **f == name)
        .copied()
}

/// Splits the raw arguments into flags and values.
fn collect(args: Vec<String>) -> Result<Given, UsageError> {
    let mut given = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') || arg == "-" {
            return Err(UsageError(format!(
                "unexpected argument {arg:?} (every input is given by a flag)"
            )));
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let flag = canonical(name).ok_or_else(|| UsageError(format!("unknown flag {name}")))?;
        if flag != "--stop" && given.iter().any(|(f, _)| *f == flag) {
            return Err(UsageError(format!("{flag} given more than once")));
        }
        if SWITCHES.contains(&flag) {
            if inline.is_some() {
                return Err(UsageError(format!("{flag} takes no value")));
            }
            given.push((flag, None));
            continue;
        }
        let value = match inline {
            Some(value) => value,
            None => args
                .next()
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))?,
        };
        given.push((flag, Some(value)));
    }
    Ok(Given(given))
}

/// Parses `--device` (whether this build can run it is checked when the command runs).
fn device(value: &str) -> Result<Device, UsageError> {
    Device::parse(value).map_err(|e| UsageError(format!("--device: {e}")))
}

/// The flag that sets a sampling parameter.
fn sampling_flag(name: &str) -> &'static str {
    match name {
        "temperature" => "--temperature",
        "top_p" => "--top-p",
        _ => "--repeat-penalty",
    }
}

/// Parses the arguments after the program name.
pub fn parse(raw: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    let mut args = Vec::new();
    for (i, arg) in raw.into_iter().enumerate() {
        let arg = arg
            .into_string()
            .map_err(|a| UsageError(format!("argument {} ({a:?}) is not valid UTF-8", i + 1)))?;
        args.push(arg);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Command::Help);
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        return Ok(Command::Version);
    }
    if args.iter().any(|a| a == "--explain") {
        return Ok(Command::Explain);
    }
    let given = collect(args)?;

    let model = given
        .value("--model")
        .ok_or_else(|| UsageError("--model DIR is required".into()))?;
    let max_context = given.parsed::<usize>("--max-context", "a positive integer")?;
    if max_context == Some(0) {
        return Err(UsageError(
            "invalid value \"0\" for --max-context: expected a positive integer".into(),
        ));
    }
    let positive = |flag: &str| -> Result<Option<usize>, UsageError> {
        match given.parsed::<usize>(flag, "a positive integer")? {
            Some(0) => Err(UsageError(format!(
                "invalid value \"0\" for {flag}: expected a positive integer"
            ))),
            n => Ok(n),
        }
    };
    let parallel = Layout {
        tp: positive("--tensor-parallel")?.unwrap_or(1),
        ep: positive("--expert-parallel")?.unwrap_or(1),
    };
    let dist = DistInit::from_flags(|flag| given.value(flag), parallel).map_err(UsageError)?;
    let run_on = given
        .value("--device")
        .map(device)
        .transpose()?
        .unwrap_or(Device::Cpu);
    let opt_in = OptInKernels::from_flag(given.value("--cuda-kernels"), run_on)
        .map_err(|e| UsageError(e.to_string()))?;
    let common = Common {
        model: PathBuf::from(model),
        device: run_on,
        json: given.has("--json"),
        max_context,
        quantize: given.parsed::<QuantFormat>("--quantize", "bf16, fp8, int8 or int4")?,
        parallel,
        dist,
        opt_in,
    };

    let sources: Vec<&str> = ["--prompt", "--prompt-file", "--perplexity"]
        .into_iter()
        .filter(|f| given.has(f))
        .collect();
    match sources.as_slice() {
        [] => Err(UsageError(
            "one of --prompt, --prompt-file or --perplexity is required".into(),
        )),
        ["--perplexity"] => {
            if let Some(flag) = GENERATION_FLAGS.iter().find(|f| given.has(f)) {
                return Err(UsageError(format!(
                    "{flag} cannot be used with --perplexity"
                )));
            }
            let file = given.value("--perplexity").unwrap_or_default();
            Ok(Command::Perplexity(PerplexityArgs {
                common,
                file: PathBuf::from(file),
            }))
        }
        [one] => generation(&given, common, one),
        [a, b, ..] => Err(UsageError(format!("{a} and {b} cannot be used together"))),
    }
}

/// The generation mode's flags; `source` is `--prompt` or `--prompt-file`.
fn generation(given: &Given, common: Common, source: &str) -> Result<Command, UsageError> {
    let value = given.value(source).unwrap_or_default().to_string();
    let prompt = if source == "--prompt" {
        Prompt::Text(value)
    } else {
        Prompt::File(PathBuf::from(value))
    };
    let temperature = given.parsed::<f32>("--temperature", "a number >= 0")?;
    if temperature.is_none() {
        if let Some(flag) = ["--top-k", "--top-p", "--seed"]
            .into_iter()
            .find(|f| given.has(f))
        {
            return Err(UsageError(format!(
                "{flag} needs --temperature (decoding is greedy by default)"
            )));
        }
    }
    let greedy = SamplingParams::greedy();
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(greedy.temperature),
        top_k: given
            .parsed("--top-k", "a non-negative integer (0 = off)")?
            .unwrap_or(greedy.top_k),
        top_p: given
            .parsed("--top-p", "a number in (0, 1]")?
            .unwrap_or(greedy.top_p),
        repetition_penalty: given
            .parsed("--repeat-penalty", "a number > 0")?
            .unwrap_or(greedy.repetition_penalty),
        seed: given
            .parsed("--seed", "a non-negative integer")?
            .unwrap_or(greedy.seed),
    };
    if let Err(SamplingError::InvalidParameter {
        name,
        value,
        expected,
    }) = sampling.validate()
    {
        return Err(UsageError(format!(
            "invalid value {value} for {}: {expected}",
            sampling_flag(name)
        )));
    }
    let stops: Vec<String> = given
        .0
        .iter()
        .filter(|(f, _)| *f == "--stop")
        .filter_map(|(_, v)| v.clone())
        .collect();
    if stops.iter().any(String::is_empty) {
        return Err(UsageError("--stop needs a non-empty text".into()));
    }
    Ok(Command::Generate(GenerateArgs {
        common,
        prompt,
        chat: given.has("--chat"),
        max_new_tokens: given
            .parsed("--max-new-tokens", "a non-negative integer")?
            .unwrap_or(64),
        sampling,
        stops,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn generate_args(args: &[&str]) -> GenerateArgs {
        match parse_str(args) {
            Ok(Command::Generate(g)) => g,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_greedy_64_tokens_on_cpu() {
        let g = generate_args(&["--model", "m", "--prompt", "hi"]);
        assert_eq!(g.common.model, PathBuf::from("m"));
        assert_eq!(g.common.device, Device::Cpu);
        assert_eq!(g.prompt, Prompt::Text("hi".into()));
        assert_eq!(g.max_new_tokens, 64);
        assert_eq!(g.sampling, SamplingParams::greedy());
        assert!(!g.chat && !g.common.json && g.stops.is_empty());
    }

    #[test]
    fn every_flag_in_both_spellings() {
        let g = generate_args(&[
            "--model=m",
            "--prompt-file",
            "p.txt",
            "--chat",
            "-n",
            "7",
            "--temperature=0.8",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--repeat-penalty",
            "1.1",
            "--seed",
            "99",
            "--stop",
            "END",
            "--stop=\n\n",
            "--device",
            "cuda:1",
            "--cuda-kernels=cutlass,mma-decode",
            "--max-context",
            "128",
            "--json",
        ]);
        assert_eq!(g.prompt, Prompt::File("p.txt".into()));
        assert!(g.chat && g.common.json);
        assert_eq!(g.max_new_tokens, 7);
        assert_eq!(
            g.sampling,
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                repetition_penalty: 1.1,
                seed: 99
            }
        );
        assert_eq!(g.stops, ["END", "\n\n"]);
        assert_eq!(g.common.device, Device::Cuda(1));
        assert_eq!(
            g.common.opt_in,
            OptInKernels {
                cutlass: true,
                mma_decode: true,
                dependent_launches: false,
                fast_sampling: false
            }
        );
        assert_eq!(g.common.max_context, Some(128));
        // A value that starts with a dash is still the flag's value.
        let g = generate_args(&["--model", "m", "--prompt", "-x", "--max-new-tokens", "3"]);
        assert_eq!(g.prompt, Prompt::Text("-x".into()));
        assert_eq!(g.max_new_tokens, 3);
    }

    #[test]
    fn perplexity_mode() {
        match parse_str(&["--model", "m", "--perplexity", "t.txt", "--json"]) {
            Ok(Command::Perplexity(p)) => {
                assert_eq!(p.file, PathBuf::from("t.txt"));
                assert!(p.common.json);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn help_and_version_win() {
        assert_eq!(parse_str(&["--bogus", "-h"]), Ok(Command::Help));
        assert_eq!(parse_str(&["--version"]), Ok(Command::Version));
    }

    #[test]
    fn mistakes_name_the_flag_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (&["--prompt", "x"], "--model"),
            (&["--model", "m"], "--prompt"),
            (
                &["--model", "m", "--prompt", "x", "--frobnicate"],
                "--frobnicate",
            ),
            (&["--model", "m", "--prompt", "x", "stray"], "stray"),
            (&["--model", "m", "--prompt"], "--prompt needs a value"),
            (&["--model", "m", "--prompt", "x", "-n", "many"], "\"many\""),
            (
                &["--model", "m", "--prompt", "x", "-n", "-3"],
                "--max-new-tokens",
            ),
            (
                &["--model", "m", "--prompt", "x", "--temperature", "-1"],
                "--temperature",
            ),
            (
                &["--model", "m", "--prompt", "x", "--temperature", "NaN"],
                "--temperature",
            ),
            (
                &[
                    "--model",
                    "m",
                    "--prompt",
                    "x",
                    "--temperature",
                    "1",
                    "--top-p",
                    "0",
                ],
                "--top-p",
            ),
            (
                &["--model", "m", "--prompt", "x", "--repeat-penalty", "0"],
                "--repeat-penalty",
            ),
            (
                &["--model", "m", "--prompt", "x", "--top-k", "5"],
                "--top-k needs --temperature",
            ),
            (
                &["--model", "m", "--prompt", "x", "--device", "tpu"],
                "\"tpu\"",
            ),
            (
                &["--model", "m", "--prompt", "x", "--device", "cuda:x"],
                "--device",
            ),
            (
                &["--model", "m", "--prompt", "x", "--max-context", "0"],
                "--max-context",
            ),
            (&["--model", "m", "--prompt", "x", "--stop", ""], "--stop"),
            (
                &[
                    "--model",
                    "m",
                    "--prompt",
                    "x",
                    "--device",
                    "cuda",
                    "--cuda-kernels",
                    "cutlas",
                ],
                "\"cutlas\"",
            ),
            (
                &["--model", "m", "--prompt", "x", "--cuda-kernels", "pdl"],
                "--cuda-kernels pdl needs --device cuda",
            ),
            (
                &["--model", "m", "--prompt", "x", "--prompt-file", "f"],
                "cannot be used together",
            ),
            (
                &["--model", "m", "--perplexity", "f", "--chat"],
                "--chat cannot be used",
            ),
            (
                &["--model", "m", "--model", "n", "--prompt", "x"],
                "more than once",
            ),
            (
                &["--model", "m", "--prompt", "x", "--json=yes"],
                "--json takes no value",
            ),
        ];
        for (args, needle) in cases {
            match parse_str(args) {
                Err(UsageError(msg)) => assert!(msg.contains(needle), "{args:?}: {msg}"),
                Ok(c) => panic!("{args:?} accepted: {c:?}"),
            }
        }
    }

    #[test]
    fn parallel_and_dist_flags() {
        let g = generate_args(&["--model", "m", "--prompt", "x"]);
        assert_eq!(g.common.parallel, Layout { tp: 1, ep: 1 });
        assert_eq!(g.common.dist, None);
        let g = generate_args(&[
            "--model",
            "m",
            "--prompt",
            "x",
            "--tensor-parallel",
            "2",
            "--expert-parallel=4",
        ]);
        assert_eq!(g.common.parallel, Layout { tp: 2, ep: 4 });
        let g = generate_args(&[
            "--model",
            "m",
            "--prompt",
            "x",
            "--dist-init",
            "127.0.0.1:29500",
            "--rank",
            "1",
            "--world",
            "2",
            "--dist-timeout",
            "0.5",
            "--tensor-parallel",
            "2",
        ]);
        let dist = g.common.dist.unwrap();
        assert_eq!(
            (dist.addr.as_str(), dist.rank, dist.world),
            ("127.0.0.1:29500", 1, 2)
        );
        assert_eq!(dist.timeout, std::time::Duration::from_millis(500));
        let cases: &[(&[&str], &str)] = &[
            (&["--tensor-parallel", "0"], "--tensor-parallel"),
            (&["--expert-parallel", "two"], "--expert-parallel"),
            (
                &["--dist-init", "h:1", "--rank", "0"],
                "--world is required",
            ),
            (&["--rank", "0", "--world", "2"], "--dist-init is required"),
            (
                &["--dist-init", "h:1", "--rank", "2", "--world", "2"],
                "--rank",
            ),
            (&["--dist-timeout", "3"], "--dist-timeout needs --dist-init"),
            (
                &["--dist-init", "h:1", "--rank", "0", "--world", "2"],
                "--world 2 needs --tensor-parallel and --expert-parallel whose product is 2",
            ),
            (
                &[
                    "--dist-init",
                    "h:1",
                    "--rank",
                    "0",
                    "--world",
                    "2",
                    "--dist-timeout",
                    "0",
                ],
                "--dist-timeout",
            ),
        ];
        for (extra, needle) in cases {
            let mut args = vec!["--model", "m", "--prompt", "x"];
            args.extend_from_slice(extra);
            match parse_str(&args) {
                Err(UsageError(msg)) => assert!(msg.contains(needle), "{args:?}: {msg}"),
                Ok(c) => panic!("{args:?} accepted: {c:?}"),
            }
        }
    }

    #[test]
    fn quantize_flag() {
        let g = generate_args(&["--model", "m", "--prompt", "x", "--quantize", "int4"]);
        assert_eq!(g.common.quantize, Some(QuantFormat::Int4));
        assert_eq!(
            generate_args(&["--model", "m", "--prompt", "x"])
                .common
                .quantize,
            None
        );
        match parse_str(&["--model", "m", "--perplexity", "f", "--quantize=fp8"]) {
            Ok(Command::Perplexity(p)) => assert_eq!(p.common.quantize, Some(QuantFormat::Fp8)),
            other => panic!("{other:?}"),
        }
        let err = parse_str(&["--model", "m", "--prompt", "x", "--quantize", "int3"]).unwrap_err();
        assert!(
            err.0.contains("--quantize") && err.0.contains("int3"),
            "{}",
            err.0
        );
    }
}
