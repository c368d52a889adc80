//! `mixtral-run`: generates text with (or scores a text file under) a Mixtral-family model
//! directory. See `mixtral-run --help`; every failure is one `error: ...` line on stderr, exit
//! status 2 for command-line mistakes and 1 for everything else.

mod args;
mod report;

use args::{Command, Common, Device, GenerateArgs, PerplexityArgs, Prompt, UsageError};
use mixtral::engine::{check_parallel_supported, open_device, EngineOptions};
use mixtral::generate::{generate, perplexity, GenerateOptions};
use mixtral::load_display::LoadDisplay;
use mixtral::quant::{estimate_memory, loaded_format};
use mixtral::shard::world::{self, Joined};
use mixtral::shard::{memory, rank_memory};
use mixtral::tokenizer::{ChatMessage, Tokenizer};
use mixtral::{Engine, LoadOptions, Model, ModelConfig};
use report::TokenWriter;
use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// A failure after the command line was understood: one line of text.
struct Failure(String);

impl<E: std::error::Error> From<E> for Failure {
    /// The error's message followed by those of its sources not already part of it.
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(inner) = source {
            let text = inner.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = inner.source();
        }
        Failure(message)
    }
}

/// Prints `error: <message>` as exactly one line.
fn print_error(message: &str) {
    let line: String = message
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    eprintln!("error: {line}");
}

/// Prints the CUDA kernel-selection table (a build without feature `cuda` has no CUDA kernels).
fn explain() -> ExitCode {
    #[cfg(feature = "cuda")]
    {
        print!("{}", mixtral::cuda::kernel_selection_table());
        ExitCode::SUCCESS
    }
    #[cfg(not(feature = "cuda"))]
    {
        print_error("--explain needs a build with feature `cuda` (this one has no CUDA kernels)");
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    match args::parse(std::env::args_os().skip(1)) {
        Err(UsageError(message)) => {
            print_error(&format!("{message} (see mixtral-run --help)"));
            ExitCode::from(2)
        }
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("mixtral-run {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Explain) => explain(),
        Ok(command) => {
            if let Err(e) = mixtral::cpu::matmul::Kernel::from_env() {
                print_error(&e.to_string());
                return ExitCode::from(2);
            }
            let result = match command {
                Command::Generate(a) => run_generate(&a),
                Command::Perplexity(a) => run_perplexity(&a),
                Command::Help | Command::Version | Command::Explain => Ok(()),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(Failure(message)) => {
                    print_error(&message);
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A loaded model directory.
struct Loaded {
    model: Model,
    tokenizer: Tokenizer,
    load_time: Duration,
    /// The memory estimate line, when not yet shown.
    estimate: Option<String>,
    /// Rank 0 of ranks in separate processes (`--dist-init`), joined.
    leader: Option<Joined>,
}

/// Loads the model directory (tokenizer required), showing progress. With `--dist-init`, joins
/// the other ranks first; a rank other than 0 then serves rank 0 until it is done, and `None`
/// says there is nothing left to do.
fn load(common: &Common) -> Result<Option<Loaded>, Failure> {
    // A device this build cannot use, or a split it cannot run, is refused before the (long)
    // load.
    check_parallel_supported(common.device, common.parallel)?;
    common.device.check_supported()?;
    // On a terminal the estimate (per rank, for a split) comes before the (long) load; otherwise
    // with the timings of a successful run, so that a failure stays a single `error:` line. A
    // split the model cannot take is refused here, before joining other ranks.
    let mut estimate = preflight(common)?;
    if std::io::stderr().is_terminal() {
        if let Some(line) = estimate.take() {
            eprintln!("{line}");
        }
    }
    let joined = match &common.dist {
        Some(dist) => Some(world::join(dist, common.device)?),
        None => None,
    };
    let started = Instant::now();
    let (display, progress) = LoadDisplay::new();
    let options = LoadOptions {
        // On a GPU the upload reads every weight once and shows its own progress.
        progress: matches!(common.device, Device::Cpu).then_some(progress),
        require_tokenizer: true,
        quant: common.quantize,
    };
    let loaded = Model::load(&common.model, &options);
    display.finish();
    let mut model = loaded?;
    let tokenizer = model.tokenizer.take().ok_or_else(|| {
        Failure(format!(
            "{}: the model directory has no tokenizer.json",
            common.model.display()
        ))
    })?;
    let leader = match joined {
        Some(j) if j.rank() != 0 => {
            let (display, progress) = LoadDisplay::new();
            let served = j.follow(&model.weights, Some(&*progress));
            display.finish();
            served?;
            return Ok(None);
        }
        leader => leader,
    };
    Ok(Some(Loaded {
        model,
        tokenizer,
        load_time: started.elapsed(),
        estimate,
        leader,
    }))
}

/// The memory the model needs (weights in the format it will have, a KV cache for the context
/// allowed, one sequence), estimated from config.json before the weights are read: for one device,
/// or per rank of a `--tensor-parallel` / `--expert-parallel` split (a split the model's sizes do
/// not divide is refused here). `None` when config.json cannot be read: loading reports that.
fn preflight(common: &Common) -> Result<Option<String>, Failure> {
    let Ok(config) = ModelConfig::from_file(&common.model.join("config.json")) else {
        return Ok(None);
    };
    let format = loaded_format(&common.model.join("config.json"), common.quantize);
    let context = common.max_context.unwrap_or(config.max_position_embeddings);
    if common.parallel.is_sharded() {
        let plan = rank_memory(&config, format, common.parallel, context, 1)?;
        return Ok(Some(memory::describe(
            &plan,
            common.parallel,
            format,
            context,
        )));
    }
    let estimate = estimate_memory(&config, format, context, 1);
    Ok(Some(report::memory_estimate(format, context, &estimate)))
}

/// The context the user allows (`--max-context`, or the model's).
fn context_limit(model: &Model, common: &Common) -> usize {
    common
        .max_context
        .unwrap_or(model.config.max_position_embeddings)
}

/// An engine on `--device` for one sequence of `needed` tokens: its context (and so its KV cache)
/// is `needed` capped by [`context_limit`]; a request past the cap is then refused by
/// `generate`/`perplexity` with the limit in the message. A GPU engine shows its weight upload's
/// progress, then one line on what it holds. With `leader` (rank 0 of ranks in separate
/// processes) the engine is this rank's, leading the others.
fn engine(
    model: &Model,
    common: &Common,
    needed: usize,
    leader: Option<Joined>,
) -> Result<Box<dyn Engine>, Failure> {
    let options = EngineOptions {
        max_context: Some(context_limit(model, common).min(needed).max(1)),
        max_sequences: Some(1),
        parallel: common.parallel,
        opt_in: common.opt_in,
        ..EngineOptions::default()
    };
    let (display, progress) = LoadDisplay::new();
    let built = match leader {
        Some(leader) => leader
            .lead(&model.weights, &options, Some(&*progress))
            .map_err(Failure::from),
        None => open_device(common.device, &model.weights, &options, Some(&*progress))
            .map_err(Failure::from),
    };
    display.finish();
    let engine = built?;
    if let Some(line) = engine.describe() {
        eprintln!("{line}");
    }
    Ok(engine)
}

/// Reads a text file, removing one trailing line break (editors add one).
fn read_text(path: &Path, what: &str) -> Result<String, Failure> {
    let mut text = std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read {what} {}: {e}", path.display())))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

fn run_generate(a: &GenerateArgs) -> Result<(), Failure> {
    // Read the prompt first: a missing file is reported before a long load.
    let text = match &a.prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::File(path) => read_text(path, "prompt file")?,
    };
    let Some(loaded) = load(&a.common)? else {
        return Ok(());
    };
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let prompt = if a.chat {
        tokenizer.encode_chat(&[ChatMessage::user(text)])?
    } else {
        tokenizer.encode(&text, true)?
    };
    let needed = prompt.len().saturating_add(a.max_new_tokens);
    let mut engine = engine(model, &a.common, needed, loaded.leader)?;
    let mut options = GenerateOptions::greedy(a.max_new_tokens)
        .with_sampling(a.sampling)
        .with_eos(&model.config.eos_token_ids)
        .with_eos(tokenizer.eos_ids());
    options.stop_strings = a.stops.clone();

    let mut writer = TokenWriter::new(a.common.json);
    let mut write_error = None;
    let output = generate(
        engine.as_mut(),
        tokenizer,
        &prompt,
        &options,
        |event| match writer.token(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(Failure(format!("cannot write to stdout: {e}")));
    }
    writer
        .done(&output)
        .map_err(|e| Failure(format!("cannot write to stdout: {e}")))?;
    loaded.estimate.iter().for_each(|line| eprintln!("{line}"));
    report::generation_timings(loaded.load_time, &output);
    Ok(())
}

fn run_perplexity(a: &PerplexityArgs) -> Result<(), Failure> {
    let text = read_text(&a.file, "text file")?;
    let Some(loaded) = load(&a.common)? else {
        return Ok(());
    };
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let ids = tokenizer.encode(&text, true)?;
    // The last token is scored, never fed.
    let fed = ids.len().saturating_sub(1);
    let mut engine = engine(model, &a.common, fed, loaded.leader)?;
    let started = Instant::now();
    let scored = perplexity(engine.as_mut(), &ids)?;
    let scoring = started.elapsed();
    TokenWriter::new(a.common.json)
        .perplexity(&ids, &scored)
        .map_err(|e| Failure(format!("cannot write to stdout: {e}")))?;
    loaded.estimate.iter().for_each(|line| eprintln!("{line}"));
    report::perplexity_timings(loaded.load_time, fed, scoring);
    Ok(())
}
