#!/usr/bin/env python3
"""Writes the fuzz seeds with tensor data at odd file offsets (a header without padding, as
GPTQModel 5.x writes it) and in the transformers 5 era MoE names, from the committed
`corpus/weights/tiny-bf16.safetensors` seed. Standard library only; run from `fuzz/`.

- corpus/weights/tiny-bf16-odd-header.safetensors: the same tensors, the header padded so that the
  data section starts at an odd offset (every BF16 tensor unaligned).
- corpus/weights/tiny-bf16-mlp-proj.safetensors: `mlp.gate`, `mlp.experts.E.gate_proj/up_proj/
  down_proj`, odd data section.
- corpus/weights/tiny-bf16-fused.safetensors: `mlp.gate`, 3-D `mlp.experts.gate_up_proj`
  [E, 2I, H] (each expert's w1 rows then its w3 rows) and `mlp.experts.down_proj` [E, H, I], odd
  data section.
- corpus/safetensors_header/odd-offsets.safetensors: F32, BF16, F16 and F32 tensors at offsets
  0, 8, 14 and 19 of a data section that starts at an odd offset (the last even but not a
  multiple of 4 in the file).
"""
import json
import struct


def read(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = (entry["dtype"], entry["shape"], body[begin:end])
    return tensors


def write_odd(path, tensors, gaps=None):
    """`tensors`: list of (name, dtype, shape, bytes) laid out in order (each after `gaps[name]`
    filler bytes); the header is space-padded so that the data section starts at an odd offset."""
    gaps = gaps or {}
    header = {"__metadata__": {"format": "pt"}}
    body = b""
    for name, dtype, shape, data in tensors:
        body += b"\x00" * gaps.get(name, 0)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    text = json.dumps(header, separators=(",", ":")).encode()
    if (8 + len(text)) % 2 == 0:
        text += b" "
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)


def main():
    src = read("corpus/weights/tiny-bf16.safetensors")
    items = [(n, d, s, b) for n, (d, s, b) in sorted(src.items())]
    write_odd("corpus/weights/tiny-bf16-odd-header.safetensors", items)

    proj = {".w1.": ".gate_proj.", ".w2.": ".down_proj.", ".w3.": ".up_proj."}
    renamed = []
    for n, d, s, b in items:
        n = n.replace(".block_sparse_moe.", ".mlp.")
        for old, new in proj.items():
            n = n.replace(old, new)
        renamed.append((n, d, s, b))
    write_odd("corpus/weights/tiny-bf16-mlp-proj.safetensors", renamed)

    moe = "model.layers.0.block_sparse_moe"
    experts = 2
    fused = [(n, d, s, b) for n, d, s, b in items if ".block_sparse_moe." not in n]
    d, s, b = src[f"{moe}.gate.weight"]
    fused.append(("model.layers.0.mlp.gate.weight", d, s, b))
    w = lambda e, k: src[f"{moe}.experts.{e}.w{k}.weight"]
    inter, hidden = w(0, 1)[1]
    gate_up = b"".join(w(e, 1)[2] + w(e, 3)[2] for e in range(experts))
    down = b"".join(w(e, 2)[2] for e in range(experts))
    fused.append(("model.layers.0.mlp.experts.gate_up_proj", "BF16", [experts, 2 * inter, hidden], gate_up))
    fused.append(("model.layers.0.mlp.experts.down_proj", "BF16", [experts, hidden, inter], down))
    write_odd("corpus/weights/tiny-bf16-fused.safetensors", fused)

    values = lambda fmt, xs: b"".join(struct.pack(fmt, x) for x in xs)
    odd = [
        ("a", "F32", [2], values("<f", [1.5, -2.25])),
        ("b", "BF16", [3], values("<H", [0x3F80, 0xC000, 0x3E80])),
        ("c", "F16", [1], values("<H", [0x3C00])),
        ("d", "F32", [1], values("<f", [0.125])),
    ]
    write_odd("corpus/safetensors_header/odd-offsets.safetensors", odd, {"d": 3})


if __name__ == "__main__":
    main()
