//! The one error type of checkpoint opening: every variant names the file and, where there is one,
//! the tensor.

use std::path::PathBuf;

/// What was wrong with a checkpoint directory, index or safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Neither `model.safetensors` nor `model.safetensors.index.json` exists in the directory.
    #[error("{path}: no model.safetensors or model.safetensors.index.json in this directory")]
    NoCheckpoint {
        /// The model directory.
        path: PathBuf,
    },
    /// A file could not be opened, read or memory-mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is too short to hold the 8-byte header length.
    #[error("{path}: file holds only {file_len} bytes, too short for a safetensors header")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        file_len: u64,
    },
    /// The 8-byte header length is absurd or points past the end of the file.
    #[error(
        "{path}: header length {header_len} is invalid for a file of {file_len} bytes: {reason}"
    )]
    HeaderLength {
        /// The file.
        path: PathBuf,
        /// The header length as read from the file.
        header_len: u64,
        /// The file length in bytes.
        file_len: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The header is not a JSON object.
    #[error("{path}: header is not a valid JSON object: {message}")]
    HeaderJson {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A tensor's header entry lacks `dtype`, `shape` or `data_offsets`, or has the wrong types.
    #[error("{path}: tensor `{tensor}`: malformed header entry: {message}")]
    HeaderEntry {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The parser's message.
        message: String,
    },
    /// A tensor is stored in a type other than BF16, F16 or F32 (or, when packed types are
    /// accepted, F8_E4M3, I32, I8 or U8).
    #[error("{path}: tensor `{tensor}` has unsupported dtype {dtype} (expected BF16, F16 or F32)")]
    UnsupportedDType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype as written in the header.
        dtype: String,
    },
    /// A tensor's element or byte count does not fit in a machine word.
    #[error("{path}: tensor `{tensor}`: element count of shape {shape:?} overflows")]
    ShapeOverflow {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape as written.
        shape: Vec<u64>,
    },
    /// `data_offsets` has its begin after its end.
    #[error("{path}: tensor `{tensor}`: data_offsets [{begin}, {end}] are reversed")]
    ReversedOffsets {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// First byte, relative to the data section.
        begin: u64,
        /// One past the last byte, relative to the data section.
        end: u64,
    },
    /// A tensor's data extends past the end of the file (a truncated file, or offsets out of range).
    #[error(
        "{path}: tensor `{tensor}`: data_offsets end at byte {end} but the data section holds only \
         {data_len} bytes (file truncated or offsets out of range)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// One past the tensor's last byte, relative to the data section.
        end: u64,
        /// Bytes in the file's data section.
        data_len: u64,
    },
    /// The byte range does not match the shape and dtype.
    #[error(
        "{path}: tensor `{tensor}`: {dtype} shape {shape:?} needs {expected} bytes but data_offsets \
         span {found}"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Storage type.
        dtype: crate::dtype::RawDType,
        /// Shape as written.
        shape: Vec<usize>,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes the offsets span.
        found: u64,
    },
    /// Two tensors share bytes.
    #[error("{path}: tensors `{tensor}` and `{other}` overlap")]
    Overlap {
        /// The file.
        path: PathBuf,
        /// The later tensor.
        tensor: String,
        /// The tensor it overlaps.
        other: String,
    },
    /// The same tensor name appears twice, in one file or in two.
    #[error("tensor `{tensor}` appears twice: in {first} and in {path}")]
    DuplicateTensor {
        /// The file of the second occurrence.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The file of the first occurrence (equal to `path` for a duplicate within one file).
        first: PathBuf,
    },
    /// `model.safetensors.index.json` is not a JSON object with a `weight_map` of strings.
    #[error("{path}: invalid index: {message}")]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A shard named by the index is an absolute path, contains `..`, or resolves (through symlinks)
    /// outside the model directory, or is not a regular file.
    #[error("{path}: shard `{shard}` is not allowed: {reason}")]
    ShardPath {
        /// The index file.
        path: PathBuf,
        /// The shard name as written in the index.
        shard: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A shard named by the index does not exist.
    #[error("{path}: shard file does not exist (named by {index} for tensor `{tensor}`)")]
    MissingShard {
        /// The missing shard file.
        path: PathBuf,
        /// The index file.
        index: PathBuf,
        /// A tensor the index maps to it.
        tensor: String,
    },
    /// The index maps a tensor to a shard that does not hold it.
    #[error("{path}: tensor `{tensor}` is mapped to this file by {index} but is not in it")]
    NotInShard {
        /// The shard file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The index file.
        index: PathBuf,
    },
    /// A shard holds a tensor that the index maps to another file, or does not list.
    #[error("{path}: holds tensor `{tensor}` but {index} maps it to {mapped_to}")]
    NotIndexed {
        /// The shard file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The index file.
        index: PathBuf,
        /// The file the index names for it, or "nothing".
        mapped_to: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
