//! `mixtral-serve`: an OpenAI-compatible HTTP server for a Mixtral-family model directory. See
//! `mixtral-serve --help`; a failure to start is one `error: ...` line on stderr, exit status 2 for
//! command-line mistakes and 1 for everything else.

use mixtral::engine::{check_parallel_supported, open_device, Device};
use mixtral::load_display::LoadDisplay;
use mixtral::quant::loaded_format;
use mixtral::server::args::{self, ServeArgs, ServeCommand, UsageError};
use mixtral::server::{router, HandleBackend, ServedModel, ServerState};
use mixtral::shard::world;
use mixtral::shard::{memory, rank_memory};
use mixtral::ModelConfig;
use mixtral::{LoadOptions, Model};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Prints `error: <message>` as exactly one line.
fn print_error(message: &str) {
    let line: String = message
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    eprintln!("error: {line}");
}

/// The message of `error` followed by those of its sources not already part of it.
fn chain(error: &dyn std::error::Error) -> String {
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
    message
}

fn main() -> ExitCode {
    match args::parse(std::env::args_os().skip(1)) {
        Err(UsageError(message)) => {
            print_error(&format!("{message} (see mixtral-serve --help)"));
            ExitCode::from(2)
        }
        Ok(ServeCommand::Help) => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(ServeCommand::Version) => {
            println!("mixtral-serve {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(ServeCommand::Serve(a)) => match serve(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                print_error(&message);
                ExitCode::FAILURE
            }
        },
    }
}

/// Loads the model, starts the engine thread (the serving core: continuous batching, prefix
/// caching) and serves until Ctrl-C or SIGTERM.
fn serve(a: &ServeArgs) -> Result<(), String> {
    a.device.check_supported().map_err(|e| chain(&e))?;
    check_parallel_supported(a.device, a.parallel).map_err(|e| chain(&e))?;
    if let Some(plan) = split_plan(a)? {
        eprintln!("mixtral-serve: {plan}");
    }
    // Ranks in separate processes meet before the (long) load.
    let joined = match &a.dist {
        Some(dist) => Some(world::join(dist, a.device).map_err(|e| chain(&e))?),
        None => None,
    };
    let started = Instant::now();
    let (display, progress) = LoadDisplay::new();
    let options = LoadOptions {
        // On a GPU the engine's upload reads every weight once and reports it instead.
        progress: matches!(a.device, Device::Cpu).then(|| Arc::clone(&progress)),
        require_tokenizer: true,
        quant: a.quantize,
    };
    let loaded = Model::load(&a.model, &options);
    display.finish();
    let mut model = loaded.map_err(|e| chain(&e))?;
    let tokenizer = model.tokenizer.take().map(Arc::new).ok_or_else(|| {
        format!(
            "{}: the model directory has no tokenizer.json",
            a.model.display()
        )
    })?;
    let engine_options = a.engine_options(model.config.max_position_embeddings);
    let (display, progress) = LoadDisplay::new();
    let engine = match joined {
        // Another rank: runs rank 0's calls until rank 0 stops; it serves no HTTP itself.
        Some(j) if j.rank() != 0 => {
            let rank = j.rank();
            eprintln!("mixtral-serve: rank {rank} loaded; following rank 0");
            let followed = j.follow(&model.weights, Some(&*progress));
            display.finish();
            followed.map_err(|e| chain(&e))?;
            eprintln!("mixtral-serve: rank {rank}: rank 0 stopped");
            return Ok(());
        }
        Some(leader) => leader
            .lead(&model.weights, &engine_options, Some(&*progress))
            .map_err(|e| chain(&e)),
        None => open_device(a.device, &model.weights, &engine_options, Some(&*progress))
            .map_err(|e| chain(&e)),
    };
    display.finish();
    let engine = engine?;
    if let Some(line) = engine.describe() {
        eprintln!("{line}");
    }
    let served = ServedModel {
        id: a.model_id(),
        tokenizer: Arc::clone(&tokenizer),
        max_context: engine.max_context(),
        vocab: model.config.vocab_size,
    };
    let mut eos = model.config.eos_token_ids.clone();
    for &id in tokenizer.eos_ids() {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let scheduler = a.scheduler_options();
    eprintln!(
        "mixtral-serve: KV cache of {} blocks; up to {} sequences and {} tokens per step",
        engine.total_kv_blocks(),
        scheduler.max_num_seqs,
        scheduler.max_num_batched_tokens
    );
    let backend = HandleBackend::start(engine, tokenizer, eos, scheduler).map_err(|e| chain(&e))?;
    let id = served.id.clone();
    let app = router(Arc::new(ServerState::new(Arc::new(backend), served)));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let address = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| format!("cannot listen on {address}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        eprintln!(
            "mixtral-serve: model {id:?} loaded in {:.1} s; listening on http://{local}",
            started.elapsed().as_secs_f64()
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| format!("server failed: {e}"))
    })
}

/// For a `--tensor-parallel` / `--expert-parallel` split, its per-rank memory plan (weights in the
/// format they will have, KV cache for `--max-num-seqs` full contexts), from config.json before the
/// weights are read; a split the model's sizes do not divide is refused here. `None` for one rank,
/// or when config.json cannot be read (loading then says why).
fn split_plan(a: &ServeArgs) -> Result<Option<String>, String> {
    if !a.parallel.is_sharded() {
        return Ok(None);
    }
    let config_path = a.model.join("config.json");
    let Ok(config) = ModelConfig::from_file(&config_path) else {
        return Ok(None);
    };
    let format = loaded_format(&config_path, a.quantize);
    let context = a.max_context.unwrap_or(config.max_position_embeddings);
    let plan =
        rank_memory(&config, format, a.parallel, context, a.max_num_seqs).map_err(|e| chain(&e))?;
    Ok(Some(memory::describe(&plan, a.parallel, format, context)))
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    eprintln!("mixtral-serve: shutting down");
}
