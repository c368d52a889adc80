//! `model.safetensors.index.json`: its `weight_map` (tensor name -> shard file name), and the
//! resolution of each shard name to a file that stays inside the model directory.

use super::error::CheckpointError;
use super::json::Pairs;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Largest index file accepted.
const MAX_INDEX_LEN: u64 = 100_000_000;

/// The parts of the index file that matter.
#[derive(Deserialize)]
struct IndexFile {
    weight_map: Pairs<String>,
}

/// A parsed index: tensor name -> shard name as written.
pub(crate) struct Index {
    /// Tensor name -> shard file name (relative to the model directory).
    pub weight_map: BTreeMap<String, String>,
}

impl Index {
    /// Reads and parses the index at `path`; a tensor listed twice is an error.
    pub(crate) fn read(path: &Path) -> Result<Index, CheckpointError> {
        let len = std::fs::metadata(path)
            .map_err(|e| CheckpointError::io(path, e))?
            .len();
        if len > MAX_INDEX_LEN {
            return Err(CheckpointError::IndexJson {
                path: path.to_path_buf(),
                message: format!("{len} bytes is larger than the {MAX_INDEX_LEN} byte limit"),
            });
        }
        let text = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
        let file: IndexFile =
            serde_json::from_slice(&text).map_err(|e| CheckpointError::IndexJson {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let mut weight_map = BTreeMap::new();
        for (tensor, shard) in file.weight_map.0 {
            if let Some(previous) = weight_map.insert(tensor.clone(), shard.clone()) {
                return Err(CheckpointError::IndexJson {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor `{tensor}` is listed twice in weight_map ({previous} and {shard})"
                    ),
                });
            }
        }
        Ok(Index { weight_map })
    }

    /// The distinct shard names, sorted, each with one tensor mapped to it (for error messages).
    pub(crate) fn shards(&self) -> BTreeMap<&str, &str> {
        let mut shards = BTreeMap::new();
        for (tensor, shard) in &self.weight_map {
            shards.entry(shard.as_str()).or_insert(tensor.as_str());
        }
        shards
    }
}

/// The `blobs/` folder that a Hugging Face hub cache snapshot (`<repo>/snapshots/<rev>/`) links its
/// files into, when `canonical_dir` is such a snapshot.
fn hub_cache_blobs(canonical_dir: &Path) -> Option<PathBuf> {
    let snapshots = canonical_dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let blobs = snapshots.parent()?.join("blobs");
    blobs.is_dir().then_some(blobs)
}

/// Resolves the shard `name` (as written in the index at `index`) against the model directory
/// `dir`, whose canonical form is `canonical_dir`. Rejects empty, absolute and `..` names, names
/// that resolve (through symlinks) outside the directory unless `allow_outside` (links from a hub
/// cache snapshot into its own `blobs/` folder are always accepted), and non-files.
pub(crate) fn resolve_shard(
    dir: &Path,
    canonical_dir: &Path,
    index: &Path,
    name: &str,
    tensor: &str,
    allow_outside: bool,
) -> Result<PathBuf, CheckpointError> {
    let reject = |reason: String| CheckpointError::ShardPath {
        path: index.to_path_buf(),
        shard: name.to_string(),
        reason,
    };
    let relative = Path::new(name);
    if name.is_empty() {
        return Err(reject("empty file name".into()));
    }
    for component in relative.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(reject("contains `..`".into())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(reject("is an absolute path".into()))
            }
        }
    }
    let path = dir.join(relative);
    let canonical = match std::fs::canonicalize(&path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingShard {
                path,
                index: index.to_path_buf(),
                tensor: tensor.to_string(),
            })
        }
        Err(e) => return Err(CheckpointError::io(&path, e)),
    };
    if !allow_outside
        && !canonical.starts_with(canonical_dir)
        && !hub_cache_blobs(canonical_dir).is_some_and(|blobs| canonical.starts_with(blobs))
    {
        return Err(reject(format!(
            "resolves to {}, outside the model directory {}",
            canonical.display(),
            canonical_dir.display()
        )));
    }
    if !canonical.is_file() {
        return Err(reject("is not a regular file".into()));
    }
    Ok(path)
}
