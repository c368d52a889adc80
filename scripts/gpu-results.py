#!/usr/bin/env python3
"""Merges the GPU protocol results of our engine (benches/gpu_decode.rs --protocol) and of PyTorch
(scripts/bench-pytorch-gpu.py) into benches/results.jsonl lines, and prints a table: ms/token (or ms
for prefill), the ratio PyTorch / ours, achieved GB/s of active weights, the bandwidth floor and our
fraction of it (batch-1 decode only: the floor is the bytes of the weights one token reads once,
divided by the measured copy bandwidth)."""
import argparse
import datetime
import json

HIDDEN, INTER, VOCAB, Q, KV = 4096, 14336, 32000, 4096, 1024


# Bytes per parameter of the attention and expert projections in each storage format (the packed
# layout of src/packed/mod.rs: 8-bit codes plus an f32 scale per row of 4096 or 14336 inputs,
# taken as 4096; 4-bit codes plus an f32 (scale, zero) pair per group of 128; NF4 table codes plus
# an f32 scale per block of 64).
PROJECTION_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4 / 4096, "int8": 1.0 + 4 / 4096, "int4": 0.5 + 8 / 128,
                    "nf4": 0.5 + 4 / 64}


def active_bytes(layers, dtype="bf16"):
    """Bytes a batch-1 decode token reads: attention, 2 of 8 experts (in `dtype`), the router, the
    norms and the LM head (bf16)."""
    projections = HIDDEN * (Q + 2 * KV) + Q * HIDDEN + 2 * 3 * HIDDEN * INTER
    bf16 = 8 * HIDDEN + 2 * HIDDEN
    per_layer = PROJECTION_BYTES[dtype] * projections + 2 * bf16
    return layers * per_layer + 2 * (VOCAB * HIDDEN + HIDDEN)


def read(path):
    try:
        return [json.loads(l) for l in open(path) if l.strip()]
    except FileNotFoundError:
        return []


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", required=True)
    p.add_argument("--pytorch", required=True)
    p.add_argument("--commit", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    ours = read(a.ours)
    theirs = read(a.pytorch)
    bandwidth = next((r["bytes_per_s"] for r in theirs if r.get("what") == "bandwidth"), None)
    key = lambda r: (r["what"], r.get("dtype", "bf16"), r.get("kernel", "mma"), r["batch"], r["context"])
    torch_ms = {key(r): r.get("pytorch_ms") for r in theirs if r.get("what") in ("decode", "prefill")}
    eager = {key(r): r["ours_ms"] for r in ours if not r.get("graphs", True)}
    date = datetime.date.today().isoformat()
    lines = []
    print(f"{'what':13} {'dtype':5} {'batch':>5} {'ctx':>6} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'GB/s':>7} {'floor ms':>9} {'of floor':>8}")
    for r in ours:
        if not r.get("graphs", True):
            continue
        k = key(r)
        pt = torch_ms.get((k[0], k[1], "mma") + k[3:])
        floor = None
        gbps = None
        if r["what"] == "decode" and r["batch"] == 1:
            b = active_bytes(r["layers"], r["dtype"])
            gbps = b / (r["ours_ms"] / 1e3) / 1e9
            if bandwidth:
                floor = b / bandwidth * 1e3
        line = {
            "card": r["card"], "commit": a.commit, "date": date, "what": r["what"], "dtype": r["dtype"],
            "kernel": r.get("kernel", "mma"),
            "layers": r["layers"], "batch": r["batch"], "context": r["context"], "ours_ms": r["ours_ms"],
            "pytorch_ms": pt, "floor_ms": floor, "achieved_gbps": gbps,
            "eager_ms": eager.get(k),
        }
        if "tp" in r:  # scripts/multi-gpu-check: the tensor-parallel size (GPUs)
            line["tp"] = r["tp"]
        lines.append(line)
        fmt = lambda v, f: (f.format(v) if v is not None else "-")
        ratio = pt / r["ours_ms"] if pt else None
        frac = floor / r["ours_ms"] if floor else None
        label = r["what"] + ("/" + r["kernel"] if r.get("kernel", "mma") != "mma" else "")
        print(f"{label:13} {r['dtype']:5} {r['batch']:>5} {r['context']:>6} {r['ours_ms']:>9.3f} {fmt(pt, '{:9.3f}'):>9} "
              f"{fmt(ratio, '{:6.2f}'):>6} {fmt(gbps, '{:7.0f}'):>7} {fmt(floor, '{:9.3f}'):>9} {fmt(frac, '{:8.2f}'):>8}")
    for k, ms in eager.items():
        graphed = next((l["ours_ms"] for l in lines if key(l) == k), None)
        if graphed:
            print(f"graph vs eager, {k}: {graphed:.3f} vs {ms:.3f} ms ({ms - graphed:+.3f} ms per step without graphs)")
    with open(a.out, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
