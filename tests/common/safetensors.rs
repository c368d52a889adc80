//! safetensors files written the way a test wants them, well formed or not: a header padded for
//! the data to start at a multiple of 8 bytes ([`padded`]), and a whole file from tensors given as
//! (name, dtype name, shape, raw bytes) ([`write_tensors`]), nothing checked.

use std::path::Path;

use mixtral::checkpoint::write_raw_safetensors;

/// `json` space-padded so that the data section starts at a multiple of 8.
pub fn padded(json: &str) -> Vec<u8> {
    let mut h = json.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    h
}

/// Writes `tensors` (name, safetensors dtype name, shape, raw bytes) to `path`, their bytes back to
/// back in the order given (the caller orders them so that each is aligned); the dtype names,
/// shapes and byte counts are written as given, so a test can write a malformed tensor.
pub fn write_tensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize], &'a [u8])>,
) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let json = serde_json::to_string(&header).unwrap();
    write_raw_safetensors(path, &padded(&json), &data).unwrap();
}
