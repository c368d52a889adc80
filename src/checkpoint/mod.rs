//! Memory-mapped safetensors checkpoints: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json`, validated and exposed as zero-copy [`TensorView`]s.
//!
//! Each file is mapped read-only once; its tensors share the mapping through an `Arc`, so a
//! tensor's data is not copied: [`TensorView::bytes`] and [`RawTensor::bytes`] always borrow the
//! mapping. The format does not require a tensor to be aligned to its element size (a header
//! written without padding leaves tensors at odd offsets); [`TensorView::data`], a typed slice,
//! borrows the mapping when the data are aligned and otherwise makes one aligned copy, on first
//! use, kept with the view. Opening validates every header completely (lengths, dtypes, shapes,
//! byte ranges, overlaps) and the index against the shards, so that afterwards
//! [`TensorView::data`] cannot fail.
//!
//! The files must not be modified while mapped (truncating a mapped file is outside what any
//! reader can guard against).
//!
//! The module also writes safetensors files ([`write_safetensors`], [`write_raw_safetensors`]).
//!
//! It uses only [`crate::dtype`] and [`crate::packed`] (a quantized matrix held as a tensor,
//! [`TensorView::from_packed`]); [`crate::weights`] and [`crate::quant`] read checkpoints, never
//! the reverse.

mod error;
mod header;
mod index;
mod json;
mod writer;

pub use error::CheckpointError;
pub use writer::{
    safetensors_header, safetensors_header_with, write_raw_safetensors, write_safetensors,
    write_safetensors_with, write_tensor_bytes, FillFn, HeaderPadding, TensorBytes, TensorSource,
};

use crate::dtype::{DType, RawDType, WeightSlice};
use crate::packed::PackedMatrix;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped file, or tensor data computed at load time (dequantized weights) held in memory.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: ShardBytes,
}

/// Where a shard's bytes live.
#[derive(Debug)]
enum ShardBytes {
    /// A read-only file mapping.
    Mapped(Mmap),
    /// f32 elements owned in memory (so the bytes are aligned for f32).
    OwnedF32(Vec<f32>),
    /// A quantized matrix in the packed layout; its f32 elements are dequantized on first use
    /// (the CPU path) and never otherwise (the GPU uploads the packed form).
    Packed {
        /// The packed matrix.
        packed: Arc<PackedMatrix>,
        /// Its dequantized elements, once asked for.
        values: OnceLock<Vec<f32>>,
    },
}

impl std::ops::Deref for ShardBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(m) => m,
            ShardBytes::OwnedF32(v) => bytemuck::cast_slice(v),
            ShardBytes::Packed { packed, values } => {
                bytemuck::cast_slice(values.get_or_init(|| packed.dequantize()))
            }
        }
    }
}

/// An aligned copy of a tensor's bytes, made on the first typed read of data that are not aligned
/// for their element type in the mapping (u64 words: aligned for every element type).
type AlignedCopy = Arc<OnceLock<Vec<u64>>>;

/// A read-only view of one tensor inside a memory-mapped shard (or, for weights computed at load
/// such as dequantized ones, of f32 data owned in memory: [`TensorView::from_f32`]).
#[derive(Debug, Clone)]
pub struct TensorView {
    shard: Arc<Shard>,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// First byte within the file (validated: in bounds; not necessarily aligned for `dtype`).
    start: usize,
    /// Length in bytes (`num_elements() * dtype.size()`).
    len: usize,
    /// The aligned copy [`TensorView::data`] reads when the mapped bytes are not aligned; shared by
    /// clones, so it is made at most once per tensor.
    aligned: AlignedCopy,
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
    /// Absolute byte offset of the data within its file (0 for owned data).
    pub fn file_offset(&self) -> usize {
        self.start
    }
    /// The raw little-endian bytes, borrowed from the mapping (`num_elements() * dtype().size()`).
    pub fn bytes(&self) -> &[u8] {
        // In bounds: checked against the file length when the checkpoint was opened.
        &self.shard.map[self.start..self.start + self.len]
    }
    /// The elements: borrowed from the mapping when the data are aligned to the element size there,
    /// else from an aligned copy made on the first call (and kept, shared by clones of the view).
    pub fn data(&self) -> WeightSlice<'_> {
        // `aligned_bytes` is aligned to the element size, so these casts cannot fail.
        let bytes = self.aligned_bytes();
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
    /// The raw bytes at an address aligned for `dtype`: the mapping itself when it is, else the
    /// aligned copy (made here on first use).
    fn aligned_bytes(&self) -> &[u8] {
        let bytes = self.bytes();
        if bytes.as_ptr().align_offset(self.dtype.size()) == 0 {
            return bytes;
        }
        let words = self.aligned.get_or_init(|| {
            let mut words = vec![0u64; bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
            words
        });
        &bytemuck::cast_slice::<u64, u8>(words)[..self.len]
    }
    /// True when [`TensorView::data`] reads an aligned copy rather than the mapping (the data sit
    /// at an address not aligned to the element size, as in a file whose header is not padded).
    pub fn is_unaligned(&self) -> bool {
        self.bytes().as_ptr().align_offset(self.dtype.size()) != 0
    }
    /// Matrix `block.0` of a stored 3-D tensor, rows `block.1..block.1 + shape[0]`, as a view of
    /// `shape` `[rows, cols]` called `name` (the fused experts of a transformers 5 checkpoint).
    /// `None` when the block does not lie inside this tensor (which must have 3 dimensions, the
    /// last equal to `cols`).
    pub(crate) fn block(
        &self,
        name: String,
        shape: [usize; 2],
        (index, first_row): (usize, usize),
    ) -> Option<TensorView> {
        let [_, rows_per_matrix, cols] = *self.shape.as_slice() else {
            return None;
        };
        let [rows, block_cols] = shape;
        if block_cols != cols || index >= self.shape[0] {
            return None;
        }
        if first_row.checked_add(rows)? > rows_per_matrix {
            return None;
        }
        let first = (index * rows_per_matrix + first_row) * cols * self.dtype.size();
        let len = rows * cols * self.dtype.size();
        Some(TensorView {
            shard: Arc::clone(&self.shard),
            name,
            dtype: self.dtype,
            shape: shape.to_vec(),
            start: self.start + first,
            len,
            aligned: AlignedCopy::default(),
        })
    }
    /// Asks the OS to start reading this tensor's pages in (a hint; errors are ignored).
    pub(crate) fn will_need(&self) {
        #[cfg(unix)]
        if let ShardBytes::Mapped(map) = &self.shard.map {
            let _ = map.advise_range(memmap2::Advice::WillNeed, self.start, self.len);
        }
    }
    /// A tensor whose f32 elements are owned in memory rather than mapped from a file (e.g. a
    /// weight dequantized at load). `path` is the file it was derived from, for messages.
    /// `None` when `data.len()` is not the product of `shape`.
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
        path: impl Into<PathBuf>,
    ) -> Option<TensorView> {
        let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        if elements != data.len() {
            return None;
        }
        let len = std::mem::size_of_val(data.as_slice());
        Some(TensorView {
            shard: Arc::new(Shard {
                path: path.into(),
                map: ShardBytes::OwnedF32(data),
            }),
            name: name.into(),
            dtype: DType::F32,
            shape,
            start: 0,
            len,
            aligned: AlignedCopy::default(),
        })
    }
    /// A quantized matrix held packed (`shape` `[rows, cols]` of `packed`): its f32 elements are
    /// computed by [`PackedMatrix::dequantize`] the first time [`TensorView::data`] or
    /// [`TensorView::bytes`] is called, and [`TensorView::packed`] gives the packed form. `path` is
    /// the file it was derived from. `None` when `shape` is not `[packed.rows, packed.cols]`.
    pub fn from_packed(
        name: impl Into<String>,
        shape: Vec<usize>,
        packed: Arc<PackedMatrix>,
        path: impl Into<PathBuf>,
    ) -> Option<TensorView> {
        if shape != [packed.rows, packed.cols] {
            return None;
        }
        let len = packed.rows.checked_mul(packed.cols)?.checked_mul(4)?;
        Some(TensorView {
            shard: Arc::new(Shard {
                path: path.into(),
                map: ShardBytes::Packed {
                    packed,
                    values: OnceLock::new(),
                },
            }),
            name: name.into(),
            dtype: DType::F32,
            shape,
            start: 0,
            len,
            aligned: AlignedCopy::default(),
        })
    }
    /// The packed form of a quantized matrix ([`TensorView::from_packed`]), else `None`.
    pub fn packed(&self) -> Option<&Arc<PackedMatrix>> {
        match &self.shard.map {
            ShardBytes::Packed { packed, .. } => Some(packed),
            _ => None,
        }
    }
    /// True when the data is owned in memory ([`TensorView::from_f32`], [`TensorView::from_packed`])
    /// rather than mapped.
    pub fn is_owned(&self) -> bool {
        !matches!(self.shard.map, ShardBytes::Mapped(_))
    }
    /// Bytes the data occupies as held: the mapped or owned bytes, or a packed matrix's codes,
    /// parameters and permutation (without forcing its dequantization).
    pub fn stored_bytes(&self) -> usize {
        match &self.shard.map {
            ShardBytes::Packed { packed, .. } => packed.stored_bytes(),
            _ => self.len,
        }
    }
    /// True when both views cover the same bytes of the same mapping.
    pub(crate) fn same_data(&self, other: &TensorView) -> bool {
        Arc::ptr_eq(&self.shard, &other.shard) && self.start == other.start && self.len == other.len
    }
}

/// A read-only view of any tensor of a checkpoint opened with [`Checkpoint::open_with_packed`],
/// packed types included: its raw little-endian bytes, validated against shape and dtype.
#[derive(Debug, Clone)]
pub struct RawTensor {
    shard: Arc<Shard>,
    name: String,
    dtype: RawDType,
    shape: Vec<usize>,
    start: usize,
    len: usize,
    /// Shared with the float view ([`RawTensor::as_float`]).
    aligned: AlignedCopy,
}

impl RawTensor {
    /// Tensor name as written in the header.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Storage type.
    pub fn dtype(&self) -> RawDType {
        self.dtype
    }
    /// Shape, outermost first.
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
    /// The raw little-endian bytes (`num_elements() * dtype().size()`), borrowed from the mapping:
    /// not necessarily aligned to the element size (read them with `from_le_bytes`, or through
    /// [`RawTensor::as_float`] for a typed view).
    pub fn bytes(&self) -> &[u8] {
        // In bounds: checked against the file length when the checkpoint was opened.
        &self.shard.map[self.start..self.start + self.len]
    }
    /// The float view of this tensor, when its dtype is a float weight type.
    pub fn as_float(&self) -> Option<TensorView> {
        Some(TensorView {
            shard: Arc::clone(&self.shard),
            name: self.name.clone(),
            dtype: self.dtype.float()?,
            shape: self.shape.clone(),
            start: self.start,
            len: self.len,
            aligned: Arc::clone(&self.aligned),
        })
    }
}

/// Progress of a long load, reported to a callback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// Tensors of packed types (only with [`Checkpoint::open_with_packed`]).
    packed: BTreeMap<String, RawTensor>,
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
        Self::open_inner(dir, options, false)
    }

    /// [`Checkpoint::open_with`], also accepting the packed tensor types of pre-quantized
    /// checkpoints (`F8_E4M3`, `I32`, `I8`, `U8`). Those are not weights the engine can read
    /// directly: [`Checkpoint::tensor`] does not return them; [`Checkpoint::raw_tensor`] does.
    pub fn open_with_packed(dir: &Path, options: OpenOptions) -> Result<Self, CheckpointError> {
        Self::open_inner(dir, options, true)
    }

    fn open_inner(
        dir: &Path,
        options: OpenOptions,
        accept_packed: bool,
    ) -> Result<Self, CheckpointError> {
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        if single.is_file() {
            let shard = map_file(&single)?;
            let entries = header::parse(&shard.path, &shard.map, accept_packed)?;
            let mut checkpoint = Checkpoint {
                tensors: BTreeMap::new(),
                packed: BTreeMap::new(),
                files: vec![single],
            };
            checkpoint.insert_entries(&shard, entries)?;
            return Ok(checkpoint);
        }
        if !index_path.exists() {
            return Err(CheckpointError::NoCheckpoint {
                path: dir.to_path_buf(),
            });
        }
        Self::open_sharded(dir, &index_path, options, accept_packed)
    }

    fn open_sharded(
        dir: &Path,
        index_path: &Path,
        options: OpenOptions,
        accept_packed: bool,
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
            let entries = header::parse(&shard.path, &shard.map, accept_packed)?;
            parsed.push((name, shard, entries));
        }
        // Duplicates across shards first, so that they are reported naming both files.
        let mut checkpoint = Checkpoint {
            tensors: BTreeMap::new(),
            packed: BTreeMap::new(),
            files: Vec::new(),
        };
        let mut held_by = Vec::new();
        for (name, shard, entries) in parsed {
            held_by.extend(
                entries
                    .iter()
                    .map(|e| (e.name.clone(), name, Arc::clone(&shard))),
            );
            checkpoint.insert_entries(&shard, entries)?;
            checkpoint.files.push(shard.path.clone());
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
            if !checkpoint.contains(tensor) {
                return Err(CheckpointError::NotInShard {
                    path: dir.join(shard),
                    tensor: tensor.clone(),
                    index: index_path.to_path_buf(),
                });
            }
        }
        Ok(checkpoint)
    }

    /// True when a tensor (of any accepted type) is called `name`.
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.packed.contains_key(name)
    }

    /// Adds the validated `entries` of `shard`, rejecting names already present.
    fn insert_entries(
        &mut self,
        shard: &Arc<Shard>,
        entries: Vec<header::Entry>,
    ) -> Result<(), CheckpointError> {
        for entry in entries {
            if let Some(first) = self.raw_tensor(&entry.name) {
                return Err(CheckpointError::DuplicateTensor {
                    path: shard.path.clone(),
                    tensor: entry.name,
                    first: first.path().to_path_buf(),
                });
            }
            let raw = RawTensor {
                shard: Arc::clone(shard),
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: entry.shape,
                start: entry.start,
                len: entry.len,
                aligned: AlignedCopy::default(),
            };
            if let Some(view) = raw.as_float() {
                self.tensors.insert(entry.name, view);
            } else {
                self.packed.insert(entry.name, raw);
            }
        }
        Ok(())
    }

    /// Any tensor called `name`, packed types included.
    pub fn raw_tensor(&self, name: &str) -> Option<RawTensor> {
        if let Some(t) = self.tensors.get(name) {
            return Some(RawTensor {
                shard: Arc::clone(&t.shard),
                name: t.name.clone(),
                dtype: RawDType::Float(t.dtype),
                shape: t.shape.clone(),
                start: t.start,
                len: t.len,
                aligned: Arc::clone(&t.aligned),
            });
        }
        self.packed.get(name).cloned()
    }
    /// Names of the tensors of packed types, sorted (see [`Checkpoint::open_with_packed`]).
    pub fn packed_names(&self) -> Vec<&str> {
        self.packed.keys().map(String::as_str).collect()
    }
    /// True when the checkpoint holds tensors of packed types (a pre-quantized checkpoint).
    pub fn has_packed(&self) -> bool {
        !self.packed.is_empty()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorView> {
        self.tensors.get(name)
    }
    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
    /// Total bytes of tensor data (packed tensors included).
    pub fn total_bytes(&self) -> u64 {
        let packed: u64 = self.packed.values().map(|t| t.len as u64).sum();
        self.tensors.values().map(|t| t.len as u64).sum::<u64>() + packed
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
        map: ShardBytes::Mapped(map),
    }))
}
