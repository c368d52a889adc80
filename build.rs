//! Build script. Without the `cuda` feature it only declares the `mixtral_no_kernels` cfg, so the
//! default build needs no CUDA toolchain. With it, it compiles every `csrc/*.cu` into a fatbin
//! (SASS for sm_80 and sm_90a plus compute_90 PTX) in OUT_DIR and writes `OUT_DIR/kernels.rs`:
//! `pub static KERNELS: &[(&str, &[u8])]` = (file stem, fatbin bytes) via `include_bytes!`.
//!
//! nvcc is found through `$NVCC`, `$CUDA_HOME/bin/nvcc`, `PATH`, or the repository's `.cuda/` venv
//! made by `scripts/install-cuda-toolchain` (not looked at when `MIXTRAL_NO_LOCAL_CUDA` is set, so
//! that CI can build as a machine without a toolchain would). A file is recompiled only when its
//! fingerprint (nvcc path, flags, the file and every header) changed. Fatbins are kept under their
//! fingerprints in `mixtral-kernel-cache/` beside the profile folders of the target directory, so
//! the builds of other feature sets and profiles (clippy, test, release) reuse them instead of
//! running nvcc again; files that do need nvcc compile in parallel (`NUM_JOBS` at a time).
//!
//! CUTLASS: `csrc/cutlass/*.cu` (host code that launches CUTLASS's Hopper kernels, behind
//! `extern "C"` entry points; the headers they share are `csrc/cutlass/*.cuh`) compile with nvcc
//! into position-independent objects, cached the same way, archived by the `cc` crate into the static library `mixtral_cutlass` and linked with the
//! static CUDA runtime. CUTLASS's headers come from `$CUTLASS_DIR` or the `.cuda/` venv; without
//! them the script warns and sets `cfg(mixtral_no_cutlass)`, and only the CUTLASS kernels are
//! missing.
//!
//! Without the kernels: when no nvcc is found, or when `DOCS_RS` is set (docs.rs builds
//! documentation only), the script does not fail. It warns that the kernels were not built and
//! why, writes an empty `KERNELS` table and sets `cfg(mixtral_no_kernels)`; `src/lib.rs` then stops
//! every compilation except rustdoc's (`cfg(doc)`) with an error saying how to get nvcc. So
//! `cargo doc --features cuda` works with no toolchain, and `cargo build --features cuda` still
//! fails, clearly. While nvcc is missing the script watches every place it looked (missing files
//! count as changed), so it runs on every build until a toolchain appears.
//!
//! Binaries: `cargo doc` compiles the library with rustc, not rustdoc (so without `cfg(doc)`), for
//! every binary it documents, which the error above would stop. `mixtral-run` is therefore not
//! documented (`doc = false` in Cargo.toml): its interface is `mixtral-run --help`.
//!
//! An explicit `$NVCC` is used even when it does not exist, so that the error names it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Files compiled with `--use_fast_math`. None: every kernel's math is accuracy-critical (norms,
/// softmax, RoPE angles, SwiGLU) or trivial (embedding, argmax), and the hot kernels are bound by
/// memory bandwidth, not by the cost of accurate expf / rsqrtf.
const FAST_MATH_FILES: &[&str] = &[];

/// Code generated for each kernel: SASS for A100 (sm_80) and H100/H200 (sm_90a), and compute_90 PTX
/// that newer GPUs JIT-compile.
const GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
];

/// The cfg set when the kernels were not built (see the header comment).
const NO_KERNELS_CFG: &str = "mixtral_no_kernels";

/// When set, the repository's `.cuda/` venv is not looked at.
const NO_LOCAL_CUDA_ENV: &str = "MIXTRAL_NO_LOCAL_CUDA";

/// The cfg set when the kernels were built but the CUTLASS shim was not (no CUTLASS headers).
const NO_CUTLASS_CFG: &str = "mixtral_no_cutlass";

/// CUTLASS's source tree, when not the `.cuda/` venv's.
const CUTLASS_DIR_ENV: &str = "CUTLASS_DIR";

fn main() -> ExitCode {
    println!("cargo::rustc-check-cfg=cfg({NO_KERNELS_CFG})");
    println!("cargo::rustc-check-cfg=cfg({NO_CUTLASS_CFG})");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return ExitCode::SUCCESS;
    }
    match build_kernels() {
        Ok(Built::Kernels) => ExitCode::SUCCESS,
        Ok(Built::Skipped { reason, fix }) => {
            println!("cargo::warning=feature `cuda`: the CUDA kernels were not built: {reason}.");
            println!("cargo::warning=Only documentation builds work like this; {fix}.");
            println!("cargo::rustc-cfg={NO_KERNELS_CFG}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            for line in message.lines() {
                println!("cargo::warning={line}");
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What [`build_kernels`] did.
enum Built {
    /// Every kernel compiled, and the table of their fatbins written.
    Kernels,
    /// No kernel compiled, and an empty table written, because of `reason`; `fix` says how to get
    /// the kernels built.
    Skipped { reason: String, fix: &'static str },
}

fn build_kernels() -> Result<Built, String> {
    let root = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let kernels_rs = out_dir.join("kernels.rs");
    let csrc = root.join("csrc");
    for var in ["NVCC", "CUDA_HOME", "DOCS_RS", NO_LOCAL_CUDA_ENV] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed={}", csrc.display());

    let skipped = |reason: String, fix: &'static str| {
        write(&kernels_rs, &kernel_table(&[]))?;
        Ok(Built::Skipped { reason, fix })
    };
    if std::env::var_os("DOCS_RS").is_some() {
        return skipped(
            "DOCS_RS is set (a docs.rs documentation build)".into(),
            "unset DOCS_RS to build the crate",
        );
    }
    let nvcc = match find_nvcc(&root) {
        Nvcc::Found(path) => path,
        Nvcc::Missing { looked_at } => {
            println!("cargo::rerun-if-env-changed=PATH");
            for path in &looked_at {
                println!("cargo::rerun-if-changed={}", path.display());
            }
            let places = if std::env::var_os(NO_LOCAL_CUDA_ENV).is_some() {
                format!(
                    "$CUDA_HOME/bin or PATH (the repository's .cuda/ venv was not looked at: \
                     {NO_LOCAL_CUDA_ENV} is set)"
                )
            } else {
                "$CUDA_HOME/bin, PATH or the repository's .cuda/ venv".into()
            };
            return skipped(
                format!("no nvcc (CUDA 13.0) was found: $NVCC is not set, and none is in {places}"),
                "run `scripts/install-cuda-toolchain` (no GPU needed) or set NVCC / CUDA_HOME to \
                 build the crate",
            );
        }
    };
    println!("cargo::rerun-if-changed={}", nvcc.display());

    let sources = list_files(&csrc, "cu")?;
    let mut headers = list_files(&csrc, "cuh")?;
    headers.extend(list_files(&csrc.join("generated"), "cuh")?);
    headers.extend(list_files(&csrc.join("generated"), "h")?);
    for path in sources.iter().chain(&headers) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    let mut header_bytes = Vec::new();
    for header in &headers {
        header_bytes.extend(read(header)?);
    }

    let cache = kernel_cache(&out_dir);
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let cached = Cached {
        nvcc: &nvcc,
        cache: &cache,
        identity: &header_bytes,
    };
    let kernels = cached.plan(&sources, "fatbin", |stem| nvcc_args(stem, &csrc))?;
    let cutlass = plan_cutlass(&nvcc, &root, &cache, &header_bytes)?;
    // One queue for every nvcc run, the longest first, so that no long compile starts last while
    // the other workers have nothing left: CUTLASS's objects (about 45-60 s of a core each on a
    // 2-core VM), then the kernel files by how many variants they instantiate.
    let variants = variant_counts(&String::from_utf8_lossy(&read(
        &csrc.join("generated/instantiations.cuh"),
    )?));
    let mut jobs: Vec<&Job> = cutlass.iter().flat_map(|c| &c.jobs).collect();
    let mut kernel_jobs: Vec<&Job> = kernels.jobs.iter().collect();
    kernel_jobs.sort_by_key(|job| std::cmp::Reverse(variants.get(&job.stem).copied().unwrap_or(0)));
    jobs.extend(kernel_jobs);
    compile_all(&nvcc, &jobs, &out_dir)?;
    prune_cache(&cache, &kernels.outputs);
    // The table names copies in OUT_DIR, so that cleaning the cache never breaks a built crate.
    let mut fatbins = kernels.outputs;
    for (stem, cached) in &mut fatbins {
        let copy = out_dir.join(format!("{stem}.fatbin"));
        std::fs::copy(&*cached, &copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        *cached = copy;
    }
    write(&kernels_rs, &kernel_table(&fatbins))?;
    // The tests read the compiled kernels' resource usage (registers, stack, shared memory) with
    // the cuobjdump beside this nvcc.
    println!(
        "cargo::rustc-env=MIXTRAL_CUOBJDUMP={}",
        nvcc.with_file_name("cuobjdump").display()
    );
    if let Some(cutlass) = cutlass {
        prune_cache(&cache, &cutlass.outputs);
        link_cutlass(&nvcc, &cutlass.outputs)?;
    }
    if std::env::var_os("CARGO_FEATURE_TESTING").is_some() {
        build_emulator(&csrc, &sources)?;
        build_emulated_driver(&csrc, &out_dir)?;
    }
    Ok(Built::Kernels)
}

/// The kernel emulator of feature `testing` (`src/cuda/emulator.rs`): every kernel file, as C++17 with `csrc/emulator/cuda_emulator.h` force-included and
/// the empty CUDA headers of `csrc/emulator/include/` first on the include path, and the
/// emulator's runtime and self-test kernels, compiled by the host C++ compiler into the static
/// library `mixtral_emulator`.
fn build_emulator(csrc: &Path, sources: &[PathBuf]) -> Result<(), String> {
    let emulator = csrc.join("emulator");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("MX_EMULATOR", None)
        .include(emulator.join("include"))
        .include(csrc)
        .flag("-include")
        .flag(emulator.join("cuda_emulator.h").to_string_lossy().as_ref())
        // nvcc's own pragmas; the kernels' signed/unsigned comparisons and unroll constants.
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-sign-compare")
        .flag("-Wno-unused-variable")
        // No contraction of a * b + c (ISO C++'s default, said outright): the kernels' products
        // and sums round as written.
        .flag("-ffp-contract=off")
        // The runtime's functions call each other directly (and inline) instead of through the
        // shared library's symbol table: nothing outside replaces them.
        .flag("-fno-semantic-interposition")
        // Frames over a page touch each page on the way down, so one that outgrows its emulated
        // stack faults on the guard page under it (runtime.cpp) instead of jumping past it.
        .flag("-fstack-clash-protection")
        // What a GPU faults on or computes differently from this CPU ends the launch with the
        // kernel's source line (runtime.cpp's handlers; no sanitizer runtime is linked): a typed
        // access not aligned for its type, an index past a fixed-size (shared, local) array, a
        // shift by the type's width or more, a signed overflow, a division by zero, a float
        // converted to an integer that cannot hold it.
        .flag("-fsanitize=alignment,bounds,shift,signed-integer-overflow,integer-divide-by-zero")
        .flag("-fsanitize=float-cast-overflow")
        .flag("-x")
        .flag("c++");
    // The fused multiply-adds the kernels and the emulated tensor cores ask for (fmaf) as
    // instructions instead of library calls, where the machine building (and running) the tests
    // has them: the same correctly rounded results, much faster.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        build.flag("-mfma");
    }
    for source in sources {
        build.file(source);
    }
    build.file(emulator.join("runtime.cpp"));
    build.file(emulator.join("self_test.cpp"));
    build
        .try_compile("mixtral_emulator")
        .map_err(|e| format!("the kernel emulator (feature `testing`): {e}"))
}

/// The emulated CUDA device of feature `testing` (`csrc/emulator/driver.cpp`): the driver API calls
/// the engine makes, over the kernel emulator, and the NCCL calls of the sharded engine
/// (`csrc/emulator/nccl.cpp`), as `OUT_DIR/emulated-cuda/libcuda.so` (the emulator's own symbols
/// kept inside it), also linked as `libnccl.so` there. `scripts/emulated-gpu` puts that folder
/// first on the loader's path, so that cudarc loads it instead of a driver and NCCL, and
/// `tests/gpu_engine.rs` and `tests/gpu_multi.rs` run on the CPU.
fn build_emulated_driver(csrc: &Path, out_dir: &Path) -> Result<(), String> {
    let fail =
        |e: &dyn std::fmt::Display| format!("the emulated CUDA device (feature `testing`): {e}");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .flag("-fvisibility=hidden")
        .file(csrc.join("emulator/driver.cpp"))
        .file(csrc.join("emulator/nccl.cpp"));
    let objects = build.try_compile_intermediates().map_err(|e| fail(&e))?;
    let folder = out_dir.join("emulated-cuda");
    std::fs::create_dir_all(&folder).map_err(|e| fail(&e))?;
    let library = folder.join("libcuda.so");
    let status = build
        .get_compiler()
        .to_command()
        .arg("-shared")
        .arg("-o")
        .arg(&library)
        .args(&objects)
        .arg("-Wl,--whole-archive")
        .arg(out_dir.join("libmixtral_emulator.a"))
        .arg("-Wl,--no-whole-archive")
        .arg("-Wl,--exclude-libs,ALL")
        .arg("-lpthread")
        .status()
        .map_err(|e| fail(&e))?;
    if !status.success() {
        return Err(fail(&format!(
            "linking {} failed: {status}",
            library.display()
        )));
    }
    // The name cudarc's NCCL looks for; the loader maps the one library once under both names.
    let nccl = folder.join("libnccl.so");
    match std::fs::remove_file(&nccl) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(&e)),
        _ => {}
    }
    std::os::unix::fs::symlink("libcuda.so", &nccl).map_err(|e| fail(&e))
}

/// The CUTLASS shim (`csrc/cutlass/*.cu`: host code and sm_90a kernels), compiled by nvcc into
/// objects kept under their fingerprints in the kernel cache like the fatbins (the compiles are
/// returned, to be run with the kernels'), and linked by [`link_cutlass`]. Without CUTLASS's
/// headers it warns, sets `cfg(mixtral_no_cutlass)` and returns `None`: the rest of the crate
/// builds, and the CUTLASS kernels report that they were not built.
fn plan_cutlass(
    nvcc: &Path,
    root: &Path,
    cache: &Path,
    header_bytes: &[u8],
) -> Result<Option<Planned>, String> {
    let shim = root.join("csrc/cutlass");
    let sources = list_files(&shim, "cu")?;
    println!("cargo::rerun-if-env-changed={CUTLASS_DIR_ENV}");
    let Some(cutlass) = find_cutlass(root) else {
        println!(
            "cargo::warning=feature `cuda`: CUTLASS was not found (${CUTLASS_DIR_ENV}, or the \
             .cuda/ venv's nvidia-cutlass): the CUTLASS kernels were not built; run \
             `scripts/install-cuda-toolchain` to build them."
        );
        println!("cargo::rustc-cfg={NO_CUTLASS_CFG}");
        return Ok(None);
    };
    let shim_headers = list_files(&shim, "cuh")?;
    for path in sources.iter().chain(&shim_headers) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    let mut identity = header_bytes.to_vec();
    for header in &shim_headers {
        identity.extend(read(header)?);
    }
    identity.extend(read(&cutlass.join("include/cutlass/version.h"))?);
    let cached = Cached {
        nvcc,
        cache,
        identity: &identity,
    };
    cached
        .plan(&sources, "o", |_| cutlass_args(root, &cutlass))
        .map(Some)
}

/// Archives the CUTLASS shim's compiled `objects` (stem, path) into the static library
/// `mixtral_cutlass` (by the `cc` crate) and links it with the static CUDA runtime CUTLASS
/// launches through.
fn link_cutlass(nvcc: &Path, objects: &[(String, PathBuf)]) -> Result<(), String> {
    let mut archive = cc::Build::new();
    archive.cargo_metadata(true).cargo_warnings(true);
    for (_, object) in objects {
        archive.object(object);
    }
    archive
        .try_compile("mixtral_cutlass")
        .map_err(|e| format!("archiving the CUTLASS objects: {e}"))?;
    // The static CUDA runtime sits beside nvcc (`<cuda>/bin/nvcc`, `<cuda>/lib*/libcudart_static.a`).
    let cuda = nvcc
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    for lib in ["lib", "lib64", "lib/x86_64-linux-gnu"] {
        if cuda.join(lib).join("libcudart_static.a").is_file() {
            println!(
                "cargo::rustc-link-search=native={}",
                cuda.join(lib).display()
            );
        }
    }
    for lib in ["static=cudart_static", "stdc++", "dl", "rt", "pthread"] {
        println!("cargo::rustc-link-lib={lib}");
    }
    Ok(())
}

/// CUTLASS's source tree (holding `include/` and `tools/util/include/`): `$CUTLASS_DIR`, or the
/// `nvidia-cutlass` wheel in the repository's `.cuda/` venv.
fn find_cutlass(root: &Path) -> Option<PathBuf> {
    let has_headers = |dir: &Path| dir.join("include/cutlass/cutlass.h").is_file();
    if let Some(dir) = std::env::var_os(CUTLASS_DIR_ENV) {
        return Some(PathBuf::from(dir)).filter(|d| has_headers(d));
    }
    if std::env::var_os(NO_LOCAL_CUDA_ENV).is_some() {
        return None;
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(root.join(".cuda/lib"))
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join("site-packages/cutlass_library/source"))
        .filter(|dir| has_headers(dir))
        .collect();
    candidates.sort();
    candidates.pop()
}

/// nvcc's flags for a CUTLASS shim file: host and device code into one position-independent
/// object (the crate is also a `cdylib`), sm_90a only, `-DNDEBUG` (without it ptxas serializes
/// the warpgroup MMAs).
fn cutlass_args(root: &Path, cutlass: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-c".into(),
        "-std=c++17".into(),
        "-O3".into(),
        "-DNDEBUG".into(),
        "--expt-relaxed-constexpr".into(),
        "-Xcompiler=-fPIC".into(),
        "-lineinfo".into(),
        "-Xptxas=-warn-spills,-warn-lmem-usage".into(),
        "-gencode=arch=compute_90a,code=sm_90a".into(),
        format!("-I{}", root.join("csrc").display()),
        format!("-I{}", cutlass.join("include").display()),
        format!("-I{}", cutlass.join("tools/util/include").display()),
    ];
    // Warnings from CUTLASS's own headers are not this crate's to fix.
    args.push("-diag-suppress=20013,20015".into());
    args
}

/// nvcc outputs kept in the cache under the fingerprint of everything that determines them.
struct Cached<'a> {
    nvcc: &'a Path,
    cache: &'a Path,
    /// Bytes besides the source and flags that the outputs depend on (headers, versions).
    identity: &'a [u8],
}

/// What [`Cached::plan`] found: every source's output, and the compiles still to run for them.
struct Planned {
    /// (file stem, cached output) for each source, in the order of the sources.
    outputs: Vec<(String, PathBuf)>,
    /// The sources whose output is not cached yet.
    jobs: Vec<Job>,
}

/// One nvcc run: `source` (file stem `stem`) with `args` into `output`.
struct Job {
    stem: String,
    args: Vec<String>,
    source: PathBuf,
    output: PathBuf,
}

impl Cached<'_> {
    /// The cached output ending in `.ext` of each source (compiled with `args(stem)`), and the
    /// jobs that compile those not cached yet.
    fn plan(
        &self,
        sources: &[PathBuf],
        ext: &str,
        args: impl Fn(&str) -> Vec<String>,
    ) -> Result<Planned, String> {
        let mut outputs = Vec::new();
        let mut jobs = Vec::new();
        for source in sources {
            let stem = source
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| format!("{}: file name is not UTF-8", source.display()))?;
            let args = args(stem);
            let fingerprint = fingerprint(self.nvcc, &args, &read(source)?, self.identity);
            let cached = self.cache.join(format!("{stem}-{fingerprint}.{ext}"));
            if !cached.exists() {
                jobs.push(Job {
                    stem: stem.to_string(),
                    args,
                    source: source.clone(),
                    output: cached.clone(),
                });
            }
            outputs.push((stem.to_string(), cached));
        }
        Ok(Planned { outputs, jobs })
    }
}

/// How many kernel variants each `csrc/<stem>.cu` instantiates: the `X(...)` rows of the generated
/// instantiation lists under each heading that names the file. The compile order of the kernel
/// files, most first: nvcc's time grows with the variants (qmoe.cu's 50 took about 60 s of a core
/// on a 2-core VM, a one-variant file a few seconds).
fn variant_counts(instantiations: &str) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    let mut file = None;
    for line in instantiations.lines() {
        if let Some(heading) = line.strip_prefix("// ") {
            file = heading
                .split_once("(csrc/")
                .and_then(|(_, rest)| rest.split_once(".cu"))
                .map(|(stem, _)| stem.to_string());
        } else if line.trim_start().starts_with("X(") {
            if let Some(stem) = &file {
                *counts.entry(stem.clone()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// The text of `kernels.rs` for these (file stem, fatbin path) pairs.
fn kernel_table(fatbins: &[(String, PathBuf)]) -> String {
    let mut table = String::from("/// (csrc file stem, fatbin) for every kernel file.\n");
    table.push_str("pub static KERNELS: &[(&str, &[u8])] = &[\n");
    for (stem, fatbin) in fatbins {
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
    }
    table.push_str("];\n");
    table
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn env_var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Files of `dir` ending in `.ext`, sorted (a missing directory has none).
fn list_files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == ext) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Where nvcc is.
enum Nvcc {
    /// At this path (an explicit `$NVCC` even when it does not exist).
    Found(PathBuf),
    /// Nowhere: these are the paths looked at.
    Missing { looked_at: Vec<PathBuf> },
}

fn find_nvcc(root: &Path) -> Nvcc {
    if let Some(path) = std::env::var_os("NVCC") {
        // An explicit choice: used even when missing, so that the error names it.
        return Nvcc::Found(PathBuf::from(path));
    }
    let mut looked_at = Vec::new();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        looked_at.push(PathBuf::from(home).join("bin/nvcc"));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        looked_at.extend(std::env::split_paths(&paths).map(|dir| dir.join("nvcc")));
    }
    if let Some(path) = looked_at.iter().find(|p| p.is_file()) {
        return Nvcc::Found(path.clone());
    }
    if std::env::var_os(NO_LOCAL_CUDA_ENV).is_none() {
        // .cuda/lib/python3.X/site-packages/nvidia/cu13/bin/nvcc, made by
        // scripts/install-cuda-toolchain.
        let lib = root.join(".cuda/lib");
        let mut candidates: Vec<PathBuf> = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.path().join("site-packages/nvidia/cu13/bin/nvcc"))
            .filter(|path| path.is_file())
            .collect();
        candidates.sort();
        if let Some(path) = candidates.pop() {
            return Nvcc::Found(path);
        }
        looked_at.push(lib);
    }
    Nvcc::Missing { looked_at }
}

/// Where fatbins are kept under their fingerprints for every build of this target directory:
/// `mixtral-kernel-cache/` beside the profile folders (OUT_DIR is
/// `<target>/<profile>/build/mixtral-<hash>/out`), or OUT_DIR itself in any other layout.
fn kernel_cache(out_dir: &Path) -> PathBuf {
    let build = out_dir
        .ancestors()
        .nth(2)
        .filter(|dir| dir.ends_with("build"));
    match build
        .and_then(|dir| dir.parent())
        .and_then(|profile| profile.parent())
    {
        Some(target) => target.join("mixtral-kernel-cache"),
        None => out_dir.to_path_buf(),
    }
}

/// Removes the cache's older fatbins of the files in `current` (other fingerprints of the same
/// stem), so that editing a kernel does not grow the cache; failures are ignored.
fn prune_cache(cache: &Path, current: &[(String, PathBuf)]) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let stale = current.iter().any(|(stem, kept)| {
            let fingerprinted = name
                .strip_prefix(stem.as_str())
                .and_then(|r| r.strip_prefix('-'));
            let hex = fingerprinted
                .and_then(|r| r.strip_suffix(".fatbin").or_else(|| r.strip_suffix(".o")));
            hex.is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                && kept.as_path() != path
        });
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// nvcc's flags for `stem`, without the output and input paths.
fn nvcc_args(stem: &str, csrc: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-fatbin".into(),
        // Uncompressed, whatever the size: the kernel names stay readable in the embedded bytes
        // (src/cuda/module.rs checks every instantiation against them).
        "-no-compress".into(),
        "-std=c++17".into(),
        "-O3".into(),
        "-lineinfo".into(),
        "-Xptxas=-warn-spills,-warn-lmem-usage".into(),
        format!("-I{}", csrc.display()),
    ];
    args.extend(GENCODE.iter().map(|s| s.to_string()));
    if FAST_MATH_FILES.contains(&stem) {
        args.push("--use_fast_math".into());
    }
    args
}

/// Runs the jobs, `NUM_JOBS` (cargo's job count) at a time, each worker taking the next in order.
fn compile_all(nvcc: &Path, jobs: &[&Job], out_dir: &Path) -> Result<(), String> {
    let workers = std::env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else {
                        return Ok(());
                    };
                    compile(nvcc, &job.args, &job.source, &job.output, out_dir)?;
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("an nvcc worker thread panicked".into()))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Runs nvcc on `source` into a temporary file of `out_dir`, then moves the result to `fatbin`
/// (a finished fatbin is never seen half written).
fn compile(
    nvcc: &Path,
    args: &[String],
    source: &Path,
    fatbin: &Path,
    out_dir: &Path,
) -> Result<(), String> {
    let name = fatbin
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("kernel.fatbin");
    let partial = out_dir.join(format!("{name}.partial"));
    let output = Command::new(nvcc)
        .args(args)
        .arg("-o")
        .arg(&partial)
        .arg(source)
        .output()
        .map_err(|e| {
            format!(
                "running {}: {e}\nRun `scripts/install-cuda-toolchain`, or point NVCC / CUDA_HOME at a CUDA 13.0 nvcc.",
                nvcc.display()
            )
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{stderr}", source.display()));
    }
    // ptxas spill / local-memory warnings and compiler warnings are shown, not swallowed.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo::warning={}: {line}", source.display());
    }
    // A rename within one file system; across two (an unusual OUT_DIR), a copy.
    std::fs::rename(&partial, fatbin)
        .or_else(|_| std::fs::copy(&partial, fatbin).map(drop))
        .map_err(|e| format!("{}: {e}", fatbin.display()))
}

/// FNV-1a over everything that determines a fatbin's bytes.
fn fingerprint(nvcc: &Path, args: &[String], source: &[u8], headers: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(nvcc.display().to_string().as_bytes());
    for arg in args {
        feed(arg.as_bytes());
    }
    feed(source);
    feed(headers);
    format!("{hash:016x}")
}
