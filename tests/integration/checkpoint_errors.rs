//! Bad checkpoints: every malformed file, index or weight set is rejected with its own error
//! variant, naming the file and the tensor, and nothing panics on any input.

use crate::common::safetensors::padded;
use mixtral::checkpoint::{
    write_raw_safetensors, write_safetensors, Checkpoint, CheckpointError, OpenOptions,
    TensorSource,
};
use mixtral::dtype::{DType, WeightSlice};
use mixtral::random_model::{write_random_model, RandomModelSpec};
use mixtral::weights::{names, ModelLayout, ModelWeights, WeightsError};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// `n` distinct, non-constant f32 values as little-endian bytes.
fn data(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| ((i as f32 * 0.7).sin() + 0.1).to_le_bytes())
        .collect()
}

/// Writes `dir/model.safetensors` with header `json` and `bytes` of data; returns its path.
fn single(dir: &Path, json: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join("model.safetensors");
    write_raw_safetensors(&path, &padded(json), bytes).unwrap();
    path
}

fn open_err(dir: &Path) -> CheckpointError {
    Checkpoint::open(dir).expect_err("the checkpoint should be rejected")
}

/// The message names `path` and, when given, `tensor`.
fn assert_names(err: &CheckpointError, path: &Path, tensor: Option<&str>) {
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "{msg} does not name {path:?}"
    );
    if let Some(t) = tensor {
        assert!(msg.contains(t), "{msg} does not name {t}");
    }
}

#[test]
fn valid_raw_file_opens() {
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]}}"#;
    single(dir.path(), json, &data(6));
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.names(), vec!["a", "b"]);
    assert_eq!(c.total_bytes(), 24);
    let a = c.tensor("a").unwrap().data().to_f32_vec();
    let want: Vec<f32> = data(4)
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(a, want);
    // Both views borrow one mapping of the file: no copy.
    let (a, b) = (c.tensor("a").unwrap(), c.tensor("b").unwrap());
    let gap = b.bytes().as_ptr() as usize - a.bytes().as_ptr() as usize;
    assert_eq!(gap, b.file_offset() - a.file_offset());
    assert_eq!(gap, 16);
}

#[test]
fn empty_directory_has_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_err(dir.path());
    assert!(matches!(err, CheckpointError::NoCheckpoint { .. }), "{err}");
    assert_names(&err, dir.path(), None);
}

#[test]
fn truncated_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#;
    let path = single(dir.path(), json, &data(8));
    let full = std::fs::metadata(&path).unwrap().len();
    // Cut inside the data of `b`.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(full - 3).unwrap();
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::Truncated { ref tensor, .. } if tensor == "b"),
        "{err}"
    );
    assert_names(&err, &path, Some("b"));
    // Cut inside the header.
    file.set_len(20).unwrap();
    let err = open_err(dir.path());
    assert!(matches!(err, CheckpointError::HeaderLength { .. }), "{err}");
    assert_names(&err, &path, None);
    // Cut inside the length prefix, and empty.
    for len in [5, 0] {
        file.set_len(len).unwrap();
        let err = open_err(dir.path());
        assert!(
            matches!(err, CheckpointError::TooShort { file_len, .. } if file_len == len),
            "{err}"
        );
        assert_names(&err, &path, None);
    }
}

#[test]
fn absurd_header_lengths_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    for claimed in [u64::MAX, u64::MAX - 7, 1 << 40, 100_000_001, 64] {
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend_from_slice(&padded(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        ));
        bytes.extend_from_slice(&data(1));
        if claimed == 64 {
            // Just past the end: the file is shorter than 8 + 64 bytes.
            assert!(bytes.len() < 72);
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = open_err(dir.path());
        assert!(
            matches!(err, CheckpointError::HeaderLength { header_len, .. } if header_len == claimed),
            "{claimed}: {err}"
        );
        assert_names(&err, &path, None);
    }
}

#[test]
fn headers_that_are_not_json_objects_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // Nesting far beyond the parser's recursion limit must not overflow the stack.
    let deep = "[".repeat(100_000);
    let deep_object = r#"{"a":"#.repeat(50_000);
    for json in [
        deep.as_str(),
        deep_object.as_str(),
        "not json at all",
        "[1, 2, 3]",
        "{\"a\": ",
        "\"text\"",
        "",
        "{\"a\":1} x",
    ] {
        let path = single(dir.path(), json, &data(1));
        let err = open_err(dir.path());
        assert!(
            matches!(err, CheckpointError::HeaderJson { .. }),
            "{json:?}: {err}"
        );
        assert_names(&err, &path, None);
    }
    // Entries of the wrong form name the tensor.
    for entry in [
        r#"{"dtype":"F32","shape":[1]}"#,
        r#"{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}"#,
        r#"{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}"#,
        r#"{"dtype":7,"shape":[1],"data_offsets":[0,4]}"#,
        r#"{"dtype":"F32","shape":[1],"data_offsets":[0]}"#,
        r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}"#,
        r#"{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551616]}"#,
        r#""F32""#,
    ] {
        let path = single(dir.path(), &format!(r#"{{"weird":{entry}}}"#), &data(1));
        let err = open_err(dir.path());
        assert!(
            matches!(err, CheckpointError::HeaderEntry { ref tensor, .. } if tensor == "weird"),
            "{entry}: {err}"
        );
        assert_names(&err, &path, Some("weird"));
    }
}

/// Header `json` over `n` f32 values of data must fail with a variant `check` accepts, naming
/// `tensor`.
fn rejects(json: &str, n: usize, tensor: &str, check: fn(&CheckpointError) -> bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = single(dir.path(), json, &data(n));
    let err = open_err(dir.path());
    assert!(check(&err), "{json}: {err}");
    assert_names(&err, &path, Some(tensor));
}

#[test]
fn offsets_out_of_range_are_rejected() {
    for offsets in [
        "[0,1000]",
        "[16,20]",
        "[0,18446744073709551615]",
        "[18446744073709551611,18446744073709551615]",
    ] {
        let json = format!(r#"{{"t":{{"dtype":"F32","shape":[1],"data_offsets":{offsets}}}}}"#);
        rejects(&json, 4, "t", |e| {
            matches!(e, CheckpointError::Truncated { .. })
        });
    }
}

#[test]
fn reversed_offsets_are_rejected() {
    let json = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#;
    rejects(json, 4, "t", |e| {
        matches!(
            e,
            CheckpointError::ReversedOffsets {
                begin: 8,
                end: 4,
                ..
            }
        )
    });
}

#[test]
fn overlapping_tensors_are_rejected() {
    let json = r#"{"first":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"second":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    rejects(
        json,
        6,
        "second",
        |e| matches!(e, CheckpointError::Overlap { tensor, other, .. } if tensor == "second" && other == "first"),
    );
    // The same range twice.
    let json = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}"#;
    rejects(json, 2, "x", |e| {
        matches!(e, CheckpointError::Overlap { .. })
    });
}

#[test]
fn sizes_that_disagree_with_the_shape_are_rejected() {
    let json = r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
    rejects(json, 4, "t", |e| {
        matches!(
            e,
            CheckpointError::SizeMismatch {
                expected: 12,
                found: 16,
                ..
            }
        )
    });
    let json = r#"{"t":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#;
    rejects(json, 2, "t", |e| {
        matches!(
            e,
            CheckpointError::SizeMismatch {
                expected: 12,
                found: 8,
                ..
            }
        )
    });
}

#[test]
fn element_count_overflow_is_rejected() {
    for shape in [
        "[4294967296,4294967296,2]",
        "[18446744073709551615,2]",
        "[9223372036854775807,2]",
        "[4611686018427387904]",
    ] {
        let json = format!(r#"{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":[0,16]}}}}"#);
        rejects(&json, 4, "t", |e| {
            matches!(e, CheckpointError::ShapeOverflow { .. })
        });
    }
    // A zero dimension makes an empty tensor, not an overflow.
    let dir = tempfile::tempdir().unwrap();
    single(
        dir.path(),
        r#"{"t":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}}"#,
        &[],
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    assert!(c.tensor("t").unwrap().data().is_empty());
}

#[test]
fn unknown_dtypes_are_rejected() {
    for dtype in ["I64", "F8_E4M3", "f32", "BOOL", ""] {
        let json = format!(
            r#"{{"ok":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"t":{{"dtype":"{dtype}","shape":[1],"data_offsets":[4,8]}}}}"#
        );
        let dir = tempfile::tempdir().unwrap();
        let path = single(dir.path(), &json, &data(2));
        let err = open_err(dir.path());
        assert!(
            matches!(err, CheckpointError::UnsupportedDType { ref tensor, dtype: ref d, .. } if tensor == "t" && d == dtype),
            "{err}"
        );
        assert_names(&err, &path, Some("t"));
        assert!(err.to_string().contains(dtype));
    }
}

/// The elements of `bytes` read as little-endian f32 words, and as bf16 pairs widened to f32.
fn f32_words(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
fn bf16_pairs(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

#[test]
fn unaligned_data_is_read_exactly() {
    // The format does not require alignment: a data section starting at an odd file offset (the
    // header is not padded), F32, BF16 and F16 tensors at even offsets within it, so every one
    // at an odd file offset.
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[10,16]},"c":{"dtype":"F16","shape":[1],"data_offsets":[16,18]}}"#;
    let mut header = json.as_bytes().to_vec();
    if header.len().is_multiple_of(2) {
        header.push(b' ');
    }
    let bytes = data(5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_raw_safetensors(&path, &header, &bytes[..18]).unwrap();
    let c = Checkpoint::open(dir.path()).unwrap();
    let (a, b, f) = (
        c.tensor("a").unwrap(),
        c.tensor("b").unwrap(),
        c.tensor("c").unwrap(),
    );
    assert_eq!(a.file_offset(), 8 + header.len() + 2);
    for t in [a, b, f] {
        assert_eq!(t.file_offset() % 2, 1, "{}", t.name());
        // The mapping is page-aligned, so an odd file offset is an odd address: the typed reads
        // below go through the aligned copy.
        assert!(t.is_unaligned(), "{}", t.name());
    }
    // Raw bytes are the mapping's, unmoved; typed values equal the bytes they came from.
    assert_eq!(a.bytes(), &bytes[2..10]);
    assert_eq!(a.data().to_f32_vec(), f32_words(&bytes[2..10]));
    assert_eq!(b.bytes(), &bytes[10..16]);
    assert_eq!(b.data().to_f32_vec(), bf16_pairs(&bytes[10..16]));
    let want_c = half::f16::from_le_bytes([bytes[16], bytes[17]]).to_f32();
    assert_eq!(f.data().to_f32_vec(), vec![want_c]);
    // The copy is made once: a second read, and a clone's, read the same memory.
    let address = |t: &mixtral::checkpoint::TensorView| match t.data() {
        WeightSlice::F32(s) => s.as_ptr() as usize,
        other => panic!("expected F32, got {:?}", other.dtype()),
    };
    assert_eq!(address(a), address(a));
    assert_eq!(address(&a.clone()), address(a));
    assert_ne!(address(a), a.bytes().as_ptr() as usize);
    // Bounds, sizes and overlaps are still checked at any offset.
    rejects(
        r#"{"t":{"dtype":"BF16","shape":[2],"data_offsets":[1,5]},"u":{"dtype":"F32","shape":[1],"data_offsets":[3,7]}}"#,
        2,
        "u",
        |e| matches!(e, CheckpointError::Overlap { .. }),
    );
    rejects(
        r#"{"t":{"dtype":"BF16","shape":[2],"data_offsets":[1,6]}}"#,
        2,
        "t",
        |e| matches!(e, CheckpointError::SizeMismatch { .. }),
    );
    rejects(
        r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[3,11]}}"#,
        2,
        "t",
        |e| matches!(e, CheckpointError::Truncated { .. }),
    );
}

#[test]
fn duplicate_tensor_within_a_file_is_rejected() {
    let json = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = single(dir.path(), json, &data(2));
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::DuplicateTensor { ref path, ref first, .. } if path == first),
        "{err}"
    );
    assert_names(&err, &path, Some("t"));
}

/// Writes shard files (name -> header JSON over `n` values) and an index with `weight_map`.
fn sharded(dir: &Path, shards: &[(&str, &str, usize)], weight_map: &str) -> PathBuf {
    for (name, json, n) in shards {
        write_raw_safetensors(&dir.join(name), &padded(json), &data(*n)).unwrap();
    }
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        format!(r#"{{"metadata":{{}},"weight_map":{weight_map}}}"#),
    )
    .unwrap();
    index
}

const A: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
const B: &str = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
const AB: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;

#[test]
fn valid_shards_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    sharded(
        dir.path(),
        &[("one.safetensors", A, 2), ("sub/two.safetensors", B, 2)],
        r#"{"a":"one.safetensors","b":"sub/two.safetensors"}"#,
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.names(), vec!["a", "b"]);
    assert_eq!(
        c.tensor("b").unwrap().path(),
        dir.path().join("sub/two.safetensors")
    );
    assert_eq!(c.files().len(), 2);
}

#[test]
fn duplicate_tensor_across_shards_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    // The index maps `a` to the second file; the first file holds it too.
    sharded(
        dir.path(),
        &[("1.safetensors", A, 2), ("2.safetensors", AB, 4)],
        r#"{"a":"2.safetensors","b":"2.safetensors"}"#,
    );
    // Only "2.safetensors" is named by the index, so "1" is not read: this opens.
    assert!(Checkpoint::open(dir.path()).is_ok());
    sharded(
        dir.path(),
        &[("1.safetensors", A, 2), ("2.safetensors", AB, 4)],
        r#"{"a":"1.safetensors","b":"2.safetensors"}"#,
    );
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::DuplicateTensor { .. }),
        "{err}"
    );
    assert_names(&err, &dir.path().join("1.safetensors"), Some("`a`"));
    assert_names(&err, &dir.path().join("2.safetensors"), None);
}

#[test]
fn index_and_shards_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    // `b` is listed in the index for a file that lacks it.
    sharded(
        dir.path(),
        &[("1.safetensors", A, 2)],
        r#"{"a":"1.safetensors","b":"1.safetensors"}"#,
    );
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::NotInShard { ref tensor, .. } if tensor == "b"),
        "{err}"
    );
    assert_names(&err, &dir.path().join("1.safetensors"), Some("b"));
    // A shard holds `b` but the index maps it to another file.
    sharded(
        dir.path(),
        &[
            ("1.safetensors", AB, 4),
            (
                "2.safetensors",
                r#"{"c":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                1,
            ),
        ],
        r#"{"a":"1.safetensors","b":"2.safetensors","c":"2.safetensors"}"#,
    );
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::NotIndexed { ref tensor, .. } if tensor == "b"),
        "{err}"
    );
    assert_names(&err, &dir.path().join("1.safetensors"), Some("b"));
    // A shard holds a tensor the index does not list at all.
    sharded(
        dir.path(),
        &[("1.safetensors", AB, 4)],
        r#"{"a":"1.safetensors"}"#,
    );
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::NotIndexed { ref mapped_to, .. } if mapped_to == "nothing"),
        "{err}"
    );
}

#[test]
fn index_naming_a_missing_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let index = sharded(
        dir.path(),
        &[("1.safetensors", A, 2)],
        r#"{"a":"1.safetensors","b":"gone.safetensors"}"#,
    );
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::MissingShard { ref tensor, .. } if tensor == "b"),
        "{err}"
    );
    assert_names(&err, &dir.path().join("gone.safetensors"), Some("b"));
    assert_names(&err, &index, None);
}

#[test]
fn invalid_index_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_raw_safetensors(&dir.path().join("1.safetensors"), &padded(A), &data(2)).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    for text in [
        "",
        "[]",
        r#"{"metadata":{}}"#,
        r#"{"weight_map":[]}"#,
        r#"{"weight_map":{"a":1}}"#,
        r#"{"weight_map":{"a":"1.safetensors","a":"1.safetensors"}}"#,
    ] {
        std::fs::write(&index, text).unwrap();
        let err = open_err(dir.path());
        assert!(
            matches!(err, CheckpointError::IndexJson { .. }),
            "{text}: {err}"
        );
        assert_names(&err, &index, None);
    }
}

#[test]
fn shard_paths_must_stay_inside_the_directory() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    // A valid shard right outside the model directory.
    let outside = outer.path().join("outside.safetensors");
    write_raw_safetensors(&outside, &padded(A), &data(2)).unwrap();
    let absolute = outside.display().to_string().replace('\\', "\\\\");
    for shard in [
        "../outside.safetensors",
        "sub/../../outside.safetensors",
        absolute.as_str(),
        "",
    ] {
        let index = sharded(&dir, &[], &format!(r#"{{"a":"{shard}"}}"#));
        let err = open_err(&dir);
        assert!(
            matches!(err, CheckpointError::ShardPath { .. }),
            "{shard}: {err}"
        );
        assert_names(&err, &index, None);
    }
    #[cfg(unix)]
    {
        // A symlink inside the directory that resolves outside it.
        std::os::unix::fs::symlink(&outside, dir.join("link.safetensors")).unwrap();
        let index = sharded(&dir, &[], r#"{"a":"link.safetensors"}"#);
        let err = open_err(&dir);
        assert!(
            matches!(err, CheckpointError::ShardPath { ref shard, .. } if shard == "link.safetensors"),
            "{err}"
        );
        assert_names(&err, &index, None);
        // Allowed on request (the layout of the Hugging Face hub cache).
        let options = OpenOptions {
            allow_symlinks_outside: true,
        };
        let c = Checkpoint::open_with(&dir, options).unwrap();
        assert_eq!(c.names(), vec!["a"]);
        // A symlink that stays inside is fine.
        write_raw_safetensors(&dir.join("real.safetensors"), &padded(A), &data(2)).unwrap();
        std::fs::remove_file(dir.join("link.safetensors")).unwrap();
        std::os::unix::fs::symlink(dir.join("real.safetensors"), dir.join("link.safetensors"))
            .unwrap();
        assert!(Checkpoint::open(&dir).is_ok());
        // A directory is not a shard.
        std::fs::create_dir(dir.join("d.safetensors")).unwrap();
        sharded(&dir, &[], r#"{"a":"d.safetensors"}"#);
        assert!(matches!(open_err(&dir), CheckpointError::ShardPath { .. }));
    }
}

#[cfg(unix)]
#[test]
fn hub_cache_snapshot_links_into_its_own_blobs_only() {
    // The layout of the Hugging Face hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>.
    let repo = tempfile::tempdir().unwrap();
    let blobs = repo.path().join("blobs");
    let dir = repo.path().join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    write_raw_safetensors(&blobs.join("9f86d081"), &padded(A), &data(2)).unwrap();
    std::os::unix::fs::symlink("../../blobs/9f86d081", dir.join("link.safetensors")).unwrap();
    sharded(&dir, &[], r#"{"a":"link.safetensors"}"#);
    assert_eq!(Checkpoint::open(&dir).unwrap().names(), vec!["a"]);

    // A link from the snapshot to anywhere else is still refused.
    let elsewhere = repo.path().join("elsewhere.safetensors");
    write_raw_safetensors(&elsewhere, &padded(A), &data(2)).unwrap();
    std::fs::remove_file(dir.join("link.safetensors")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("link.safetensors")).unwrap();
    assert!(matches!(open_err(&dir), CheckpointError::ShardPath { .. }));
}

/// Writes `spec`'s tensors into `dir/model.safetensors`, letting `edit` drop a tensor (`None`)
/// or change its dtype and shape.
fn write_edited(
    dir: &Path,
    spec: &RandomModelSpec,
    edit: impl Fn(&str, DType, &[usize]) -> Option<(DType, Vec<usize>)>,
) {
    write_random_model(dir, spec).unwrap();
    let config = spec.model_config().unwrap();
    let layout = ModelLayout::new(&config);
    let sources: Vec<TensorSource> = layout
        .tensors()
        .into_iter()
        .filter_map(|t| {
            let (dtype, shape) = edit(&t.name, spec.dtype, &t.shape)?;
            Some(TensorSource {
                name: t.name.clone(),
                dtype,
                shape,
                fill: Box::new(move |start, out| spec.fill(t, start, out)),
            })
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &sources).unwrap();
}

fn load(dir: &Path, spec: &RandomModelSpec) -> Result<ModelWeights, WeightsError> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    ModelWeights::from_checkpoint(&checkpoint, &spec.model_config().unwrap())
}

#[test]
fn shapes_must_match_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::tiny(1);
    let target = names::expert(1, 2, 2);
    write_edited(dir.path(), &spec, |name, dtype, shape| {
        let mut shape = shape.to_vec();
        if name == target {
            shape.reverse();
        }
        Some((dtype, shape))
    });
    let err = load(dir.path(), &spec).unwrap_err();
    assert!(
        matches!(err, WeightsError::Shape { ref tensor, ref expected, ref found, .. }
            if *tensor == target && expected == &[64, 96] && found == &[96, 64]),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&target) && msg.contains("[64, 96]") && msg.contains("[96, 64]"),
        "{msg}"
    );
    assert!(msg.contains("model.safetensors"), "{msg}");

    // A checkpoint checked against another config: every size is verified.
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &spec).unwrap();
    for (key, value) in [
        ("intermediate_size", 128),
        ("hidden_size", 32),
        ("vocab_size", 300),
        ("num_key_value_heads", 4),
        ("num_local_experts", 3),
    ] {
        let other = spec.clone().with(key, value);
        let err = load(dir.path(), &other).unwrap_err();
        assert!(matches!(err, WeightsError::Shape { .. }), "{key}: {err}");
    }
    // A vector stored as a matrix is a shape error too.
    write_edited(dir.path(), &spec, |name, dtype, shape| {
        Some((
            dtype,
            if name == names::FINAL_NORM {
                vec![1, 64]
            } else {
                shape.to_vec()
            },
        ))
    });
    let err = load(dir.path(), &spec).unwrap_err();
    assert!(
        matches!(err, WeightsError::Shape { ref tensor, .. } if tensor == names::FINAL_NORM),
        "{err}"
    );
}

#[test]
fn missing_tensors_are_named() {
    let spec = RandomModelSpec::tiny(2);
    for target in [
        names::expert(0, 3, 3),
        names::router(1),
        names::attn_proj(0, 'k'),
        names::LM_HEAD.to_string(),
        names::EMBED.to_string(),
        names::FINAL_NORM.to_string(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_edited(dir.path(), &spec, |name, dtype, shape| {
            (name != target).then(|| (dtype, shape.to_vec()))
        });
        let err = load(dir.path(), &spec).unwrap_err();
        assert!(
            matches!(err, WeightsError::Missing { ref tensor } if *tensor == target),
            "{err}"
        );
        assert!(err.to_string().contains(&target));
    }
    // More layers in the config than in the checkpoint.
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &spec).unwrap();
    let err = load(dir.path(), &spec.clone().with("num_hidden_layers", 3)).unwrap_err();
    assert!(
        matches!(err, WeightsError::Missing { ref tensor } if tensor.starts_with("model.layers.2.")),
        "{err}"
    );
}

#[test]
fn dtypes_may_mix_but_must_be_float() {
    let spec = RandomModelSpec::tiny(3).with_dtype(DType::BF16);
    let dir = tempfile::tempdir().unwrap();
    write_edited(dir.path(), &spec, |name, dtype, shape| {
        let dtype = if name.contains("layernorm") {
            DType::F32
        } else if name.contains("self_attn") {
            DType::F16
        } else {
            dtype
        };
        Some((dtype, shape.to_vec()))
    });
    let weights = load(dir.path(), &spec).unwrap();
    assert_eq!(weights.layers[0].attn_norm.data().dtype(), DType::F32);
    assert_eq!(weights.layers[0].q_proj.data().dtype(), DType::F16);
    assert_eq!(weights.layers[0].experts[0].w1.data().dtype(), DType::BF16);

    // The same file with one weight's dtype rewritten to a 4-byte integer type.
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::tiny(3);
    write_random_model(dir.path(), &spec).unwrap();
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let target = names::attn_proj(1, 'v');
    let key = format!("\"{target}\":");
    let at = find(&bytes, key.as_bytes()).unwrap();
    let dtype_at = at + find(&bytes[at..], b"\"F32\"").unwrap();
    bytes[dtype_at + 1] = b'I';
    std::fs::write(&path, &bytes).unwrap();
    let err = open_err(dir.path());
    assert!(
        matches!(err, CheckpointError::UnsupportedDType { ref tensor, ref dtype, .. } if *tensor == target && dtype == "I32"),
        "{err}"
    );
    assert_names(&err, &path, Some(&target));
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A small valid file to mutate.
fn valid_file() -> Vec<u8> {
    let mut bytes = Vec::new();
    let header = padded(AB);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&data(4));
    bytes
}

/// Opens `bytes` as a checkpoint; when it opens, reads every element of every tensor.
fn open_bytes(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    if let Ok(c) = Checkpoint::open(dir) {
        for name in c.names() {
            let t = c.tensor(name).unwrap();
            let values = t.data().to_f32_vec();
            assert_eq!(values.len(), t.shape().iter().product::<usize>());
            assert_eq!(t.bytes().len(), values.len() * t.dtype().size());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn mutated_files_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_file();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        open_bytes(dir.path(), &bytes);
    }

    #[test]
    fn random_headers_never_panic(
        dtype in prop::sample::select(vec!["F32", "BF16", "F16", "I8", "F64"]),
        shape in proptest::collection::vec(prop_oneof![0u64..5, any::<u64>()], 0..4),
        begin in prop_oneof![0u64..40, any::<u64>()],
        end in prop_oneof![0u64..40, any::<u64>()],
        data_len in 0usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let json = format!(
            r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{begin},{end}]}}}}"#
        );
        let mut bytes = Vec::new();
        let header = padded(&json);
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend((0..data_len).map(|i| i as u8 ^ 0x5a));
        open_bytes(dir.path(), &bytes);
    }
}

#[test]
fn oversized_index_is_rejected_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let file = std::fs::File::create(&index).unwrap();
    file.set_len(200_000_000).unwrap(); // sparse: nothing is written
    let err = open_err(dir.path());
    assert!(matches!(err, CheckpointError::IndexJson { .. }), "{err}");
    assert_names(&err, &index, None);
}

#[test]
fn unused_tensors_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let spec = &RandomModelSpec::tiny(4);
    let config = spec.model_config().unwrap();
    let layout = ModelLayout::new(&config);
    let mut sources: Vec<TensorSource> = layout
        .tensors()
        .into_iter()
        .map(|t| TensorSource {
            name: t.name.clone(),
            dtype: DType::F32,
            shape: t.shape.clone(),
            fill: Box::new(move |start, out| spec.fill(t, start, out)),
        })
        .collect();
    let inv_freq = |start: usize, out: &mut [f32]| {
        for (i, o) in out.iter_mut().enumerate() {
            *o = 1.0 / (1.0 + (start + i) as f32);
        }
    };
    sources.push(TensorSource {
        name: "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        dtype: DType::F32,
        shape: vec![8],
        fill: Box::new(inv_freq),
    });
    write_random_model(dir.path(), spec).unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), &sources).unwrap();
    let weights = load(dir.path(), spec).unwrap();
    assert_eq!(weights.layers.len(), 2);
}
