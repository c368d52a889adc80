//! Memory-mapped safetensors checkpoints: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json`, validated and exposed as zero-copy [`TensorView`]s.
//!
//! Each file is mapped read-only once; its tensors share the mapping through an `Arc`, so a
//! tensor's data is never copied. Opening validates every header completely (lengths, dtypes,
//! shapes, byte ranges, overlaps, alignment) and the index against the shards, so that afterwards
//! [`TensorView::data`] cannot fail.
//!
//! The files must not be modified while mapped (truncating a mapped file is outside what any
//! reader can guard against).
//!
//! The module also writes safetensors files ([`write_safetensors`], [`write_raw_safetensors`]).

mod error;
mod header;
mod index;
mod json;
mod writer;

pub use error::CheckpointError;
pub use writer::{
    safetensors_header, write_raw_safetensors, write_safetensors, FillFn, TensorSource,
};

use crate::dtype::{DType, WeightSlice};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// A read-only view of one tensor inside a memory-mapped shard.
#[derive(Debug, Clone)]
pub struct TensorView {
    shard: Arc<Shard>,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// First byte within the file (validated: in bounds, and aligned for `dtype` unless empty).
    start: usize,
    /// Length in bytes (`num_elements() * dtype.size()`).
    len: usize,
}

impl TensorView {
    /// Tensor name as written in the header.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Storage type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape, outermost first (weights are `[out, in]`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The shard file holding it.
    pub fn path(&self) -> &Path {
        &self.shard.path
    }
    /// Number of elements (product of the shape).
    pub fn num_elements(&self) -> usize {
        self.len / self.dtype.size()
    }
    /// Absolute byte offset of the data within its file.
    pub fn file_offset(&self) -> usize {
        self.start
    }
    /// The raw little-endian bytes, borrowed from the mapping (`num_elements() * dtype().size()`).
    pub fn bytes(&self) -> &[u8] {
        // In bounds: checked against the file length when the checkpoint was opened.
        &self.shard.map[self.start..self.start + self.len]
    }
    /// The elements, borrowed from the mapping.
    pub fn data(&self) -> WeightSlice<'_> {
        // Alignment to the element size was checked when the checkpoint was opened, and the
        // mapping never moves, so these casts cannot fail.
        let bytes = self.bytes();
        if bytes.is_empty() {
            // An empty tensor's offset need not be aligned.
            return match self.dtype {
                DType::BF16 => WeightSlice::BF16(&[]),
                DType::F16 => WeightSlice::F16(&[]),
                DType::F32 => WeightSlice::F32(&[]),
            };
        }
        match self.dtype {
            DType::BF16 => WeightSlice::BF16(bytemuck::cast_slice(bytes)),
            DType::F16 => WeightSlice::F16(bytemuck::cast_slice(bytes)),
            DType::F32 => WeightSlice::F32(bytemuck::cast_slice(bytes)),
        }
    }
    /// Asks the OS to start reading this tensor's pages in (a hint; errors are ignored).
    pub(crate) fn will_need(&self) {
        #[cfg(unix)]
        {
            let _ = self
                .shard
                .map
                .advise_range(memmap2::Advice::WillNeed, self.start, self.len);
        }
    }
    /// True when both views cover the same bytes of the same mapping.
    pub(crate) fn same_data(&self, other: &TensorView) -> bool {
        Arc::ptr_eq(&self.shard, &other.shard) && self.start == other.start && self.len == other.len
    }
}

/// Progress of a long load, reported to a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    /// Bytes processed so far.
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
}

/// How to open a checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Accept shards that are symlinks resolving outside the model directory (the Hugging Face hub
    /// cache links `snapshots/<rev>/*.safetensors` to `../../blobs/`). `..` and absolute names in
    /// the index are rejected regardless.
    pub allow_symlinks_outside: bool,
}

/// Every tensor of a model directory's safetensors files.
#[derive(Debug)]
pub struct Checkpoint {
    tensors: BTreeMap<String, TensorView>,
    files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens and validates `dir/model.safetensors` or the shards of `dir/model.safetensors.index.json`
    /// (the single file wins when both exist). Shards named by the index must resolve inside `dir`,
    /// symlinks included (see [`OpenOptions::allow_symlinks_outside`]).
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        Self::open_with(dir, OpenOptions::default())
    }

    /// [`Checkpoint::open`] with options.
    pub fn open_with(dir: &Path, options: OpenOptions) -> Result<Self, CheckpointError> {
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        if single.is_file() {
            let shard = map_file(&single)?;
            let entries = header::parse(&shard.path, &shard.map)?;
            let mut tensors = BTreeMap::new();
            insert_entries(&mut tensors, &shard, entries)?;
            return Ok(Checkpoint {
                tensors,
                files: vec![single],
            });
        }
        if !index_path.exists() {
            return Err(CheckpointError::NoCheckpoint {
                path: dir.to_path_buf(),
            });
        }
        Self::open_sharded(dir, &index_path, options)
    }

    fn open_sharded(
        dir: &Path,
        index_path: &Path,
        options: OpenOptions,
    ) -> Result<Self, CheckpointError> {
        let index = index::Index::read(index_path)?;
        let canonical_dir = std::fs::canonicalize(dir).map_err(|e| CheckpointError::io(dir, e))?;
        // Resolve every shard name before mapping anything.
        let mut shard_paths = Vec::new();
        for (name, tensor) in index.shards() {
            let path = index::resolve_shard(
                dir,
                &canonical_dir,
                index_path,
                name,
                tensor,
                options.allow_symlinks_outside,
            )?;
            shard_paths.push((name, path));
        }
        let mut parsed = Vec::new();
        for (name, path) in shard_paths {
            let shard = map_file(&path)?;
            let entries = header::parse(&shard.path, &shard.map)?;
            parsed.push((name, shard, entries));
        }
        // Duplicates across shards first, so that they are reported naming both files.
        let mut tensors = BTreeMap::new();
        let mut files = Vec::new();
        let mut held_by = Vec::new();
        for (name, shard, entries) in parsed {
            held_by.extend(
                entries
                    .iter()
                    .map(|e| (e.name.clone(), name, Arc::clone(&shard))),
            );
            insert_entries(&mut tensors, &shard, entries)?;
            files.push(shard.path.clone());
        }
        for (tensor, name, shard) in held_by {
            match index.weight_map.get(&tensor) {
                Some(mapped) if mapped == name => {}
                other => {
                    return Err(CheckpointError::NotIndexed {
                        path: shard.path.clone(),
                        tensor,
                        index: index_path.to_path_buf(),
                        mapped_to: other.map_or_else(|| "nothing".into(), |m| m.clone()),
                    })
                }
            }
        }
        for (tensor, shard) in &index.weight_map {
            if !tensors.contains_key(tensor) {
                return Err(CheckpointError::NotInShard {
                    path: dir.join(shard),
                    tensor: tensor.clone(),
                    index: index_path.to_path_buf(),
                });
            }
        }
        Ok(Checkpoint { tensors, files })
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorView> {
        self.tensors.get(name)
    }
    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.len as u64).sum()
    }
    /// Every tensor, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &TensorView> {
        self.tensors.values()
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Maps `path` read-only.
fn map_file(path: &Path) -> Result<Arc<Shard>, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| CheckpointError::io(path, e))?
        .len();
    if len < 8 {
        return Err(CheckpointError::TooShort {
            path: path.to_path_buf(),
            file_len: len,
        });
    }
    // SAFETY: the mapping is read-only and private to this process; the files of a model
    // directory are not expected to change while it is loaded (documented on the module).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
    Ok(Arc::new(Shard {
        path: path.to_path_buf(),
        map,
    }))
}

/// Adds the validated `entries` of `shard`, rejecting names already present.
fn insert_entries(
    tensors: &mut BTreeMap<String, TensorView>,
    shard: &Arc<Shard>,
    entries: Vec<header::Entry>,
) -> Result<(), CheckpointError> {
    for entry in entries {
        if let Some(first) = tensors.get(&entry.name) {
            return Err(CheckpointError::DuplicateTensor {
                path: shard.path.clone(),
                tensor: entry.name,
                first: first.path().to_path_buf(),
            });
        }
        let view = TensorView {
            shard: Arc::clone(shard),
            name: entry.name.clone(),
            dtype: entry.dtype,
            shape: entry.shape,
            start: entry.start,
            len: entry.len,
        };
        tensors.insert(entry.name, view);
    }
    Ok(())
}
