//! `model.safetensors.index.json` from the input, in a directory holding two valid shards
//! (tensors `a`, `b` in the first, `c` in the second), a subdirectory, a symlink to a valid shard
//! outside the directory and a symlink to a shard inside it. Opening must either fail with a
//! `CheckpointError` or give exactly the tensors of the shards the index names, all readable, none
//! of them outside the directory unless allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::checkpoint::{write_raw_safetensors, Checkpoint, OpenOptions, INDEX_FILE};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The scratch root and the model directory inside it.
static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

/// Writes a shard holding f32 tensors `names`, each of shape `[2]`.
fn shard(path: &Path, names: &[&str]) {
    let entries: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                r#""{n}":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}"#,
                i * 8,
                i * 8 + 8
            )
        })
        .collect();
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let data: Vec<u8> = (0..names.len() * 2)
        .flat_map(|i| (i as f32 + 0.5).to_le_bytes())
        .collect();
    write_raw_safetensors(path, &header, &data).expect("write a shard");
}

fn setup() -> (PathBuf, PathBuf) {
    let root = mixtral_fuzz::scratch_dir("shard-index");
    let model = root.join("model");
    let outside = root.join("outside");
    for d in [&model, &outside, &model.join("sub")] {
        std::fs::create_dir_all(d).expect("create a directory");
    }
    shard(&model.join("model-00001-of-00002.safetensors"), &["a", "b"]);
    shard(&model.join("model-00002-of-00002.safetensors"), &["c"]);
    shard(&model.join("sub/nested.safetensors"), &["d"]);
    shard(&outside.join("elsewhere.safetensors"), &["e"]);
    std::os::unix::fs::symlink(
        outside.join("elsewhere.safetensors"),
        model.join("linked-outside.safetensors"),
    )
    .expect("symlink");
    std::os::unix::fs::symlink(
        "model-00002-of-00002.safetensors",
        model.join("linked-inside.safetensors"),
    )
    .expect("symlink");
    (root, model)
}

fuzz_target!(|data: &[u8]| {
    let (root, model) = DIRS.get_or_init(setup);
    mixtral_fuzz::write(&model.join(INDEX_FILE), data);
    for allow in [false, true] {
        let options = OpenOptions {
            allow_symlinks_outside: allow,
        };
        let Ok(checkpoint) = Checkpoint::open_with(model, options) else {
            continue;
        };
        std::hint::black_box(mixtral_fuzz::touch_all(&checkpoint));
        let canonical_root = std::fs::canonicalize(root).expect("canonical root");
        let canonical_model = std::fs::canonicalize(model).expect("canonical model dir");
        for file in checkpoint.files() {
            let resolved = std::fs::canonicalize(file).expect("an opened file exists");
            assert!(
                resolved.starts_with(&canonical_root),
                "{} resolves outside the scratch root",
                file.display()
            );
            assert!(
                allow || resolved.starts_with(&canonical_model),
                "{} resolves outside the model directory without allow_symlinks_outside",
                file.display()
            );
        }
    }
});
