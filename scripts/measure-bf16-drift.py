#!/usr/bin/env python3
"""How far a bf16 engine's logits may drift from an f32 reference on each golden fixture, measured
with an independent implementation (transformers' MixtralForCausalLM / MistralForCausalLM, on the
CPU): the model once in float32 and once in bfloat16 (weights and activations), both teacher-forced
on the fixture's prompt + greedy continuation; the relative L2 distance of the two logits rows at
each generated position. Writes tests/fixtures/bf16-drift.json, which tests/gpu_engine.rs reads to
bound the GPU engine's (bf16) logits against the CPU reference's (f32) on random-weight fixtures,
whose near-flat logits amplify rounding far more than a trained model's.

Usage: python3 scripts/measure-bf16-drift.py      (needs torch and transformers; no network)
"""
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def drift(model_dir):
    golden = json.loads((model_dir / "golden.json").read_text())
    prompt, greedy = golden["prompt_ids"], golden["greedy_ids"]
    ids = torch.tensor([prompt + greedy[:-1]])
    rows = range(len(prompt) - 1, len(prompt) + len(greedy) - 1)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
        with torch.no_grad():
            logits[dtype] = model(ids).logits[0].double()
    steps = [rel_l2(logits[torch.bfloat16][r], logits[torch.float32][r]) for r in rows]
    lower_median = sorted(steps)[(len(steps) - 1) // 2]
    return {"max_rel_l2": max(steps), "median_rel_l2": lower_median,
            "per_step": [round(s, 6) for s in steps]}


def main():
    dirs = [ROOT / "models/tiny-mixtral"]
    dirs += sorted(p for p in (ROOT / "tests/fixtures").iterdir() if (p / "golden.json").exists() and (p / "config.json").exists())
    out = {
        "what": "relative L2 distance between transformers' bf16 and f32 logits, teacher-forced on "
                "golden.json's prompt + greedy ids, at each generated position (median: the lower one)",
        "torch_version": torch.__version__,
        "models": {},
    }
    for d in dirs:
        name = str(d.relative_to(ROOT))
        out["models"][name] = drift(d)
        print(name, "max %.3e" % out["models"][name]["max_rel_l2"], flush=True)
    path = ROOT / "tests/fixtures/bf16-drift.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
