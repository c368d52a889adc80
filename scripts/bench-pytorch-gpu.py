#!/usr/bin/env python3
"""PyTorch baseline for benches/gpu_decode.rs: transformers' MixtralForCausalLM on the same shapes
(Mixtral-8x7B with --layers layers, bf16, random weights made on the device, SDPA attention), timed
the same way: decode steps at a fixed context (the cache cut back to the context before each step),
batch 1 / 8 / 32 at context 16, batch 1 at 4k / 16k / 32000, and prefill of 512 and 4096 tokens.
Each measurement: warm-up, then the median of repeats, with CUDA synchronisation around each.
Also measures the device copy bandwidth (for the floor). One JSON object per line into --out.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.cache_utils import DynamicCache


def median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth():
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 3, 10)
    return 2 * src.numel() / (ms / 1e3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(1234)
    card = torch.cuda.get_device_name(0)
    out = open(args.out, "w")

    def record(**fields):
        line = json.dumps({"card": card, **fields})
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    record(what="bandwidth", bytes_per_s=copy_bandwidth())
    config = MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    # Made directly in bf16 on the device: f32 first would need twice the memory (187 GB at 32 layers).
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MixtralForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(7)

    def ids(batch, length):
        return torch.randint(3, 31000, (batch, length), device="cuda", generator=gen)

    @torch.inference_mode()
    def decode_ms(batch, context):
        cache = DynamicCache()
        model(input_ids=ids(batch, context), past_key_values=cache, use_cache=True)
        token = ids(batch, 1)

        def one_step():
            cache.crop(context)
            model(input_ids=token, past_key_values=cache, use_cache=True)

        return median_ms(one_step, 3, args.repeats)

    @torch.inference_mode()
    def prefill_ms(tokens):
        prompt = ids(1, tokens)
        return median_ms(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1), 2, 5)

    for batch, context in [(1, 16), (8, 16), (32, 16), (1, 4096), (1, 16384), (1, 32000)]:
        try:
            record(what="decode", dtype="bf16", layers=args.layers, batch=batch, context=context,
                   pytorch_ms=decode_ms(batch, context))
        except torch.cuda.OutOfMemoryError as e:
            record(what="decode", dtype="bf16", layers=args.layers, batch=batch, context=context,
                   pytorch_ms=None, error=str(e).splitlines()[0])
            torch.cuda.empty_cache()
    for tokens in [512, 4096]:
        try:
            record(what="prefill", dtype="bf16", layers=args.layers, batch=1, context=tokens,
                   pytorch_ms=prefill_ms(tokens))
        except torch.cuda.OutOfMemoryError as e:
            record(what="prefill", dtype="bf16", layers=args.layers, batch=1, context=tokens,
                   pytorch_ms=None, error=str(e).splitlines()[0])
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
