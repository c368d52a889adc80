"""Times Hugging Face transformers' MixtralForCausalLM on this machine's CPU, on the same mid-size random
shape the crate's criterion bench uses (hidden 1024, 8 layers, 8 experts top-2, intermediate 3584,
16 query / 4 KV heads, vocab 32000), so the two can be compared side by side.

Usage: python scripts/bench-transformers-cpu.py [bf16|f32] [context] [decode|prefill] [steps]
- decode (the default): the median ms/token of single-token decode steps at a fixed context (the KV
  cache is cropped back to the context before each step, as the criterion bench rewinds its sequence);
  40 steps, the first 5 not counted.
- prefill: the median ms of prefilling `context` tokens into an empty cache, logits for the last one
  only (as the engine's prefill computes them); `steps` runs (default 5), the first not counted."""
import statistics, sys, time
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.cache_utils import DynamicCache

name = sys.argv[1] if len(sys.argv) > 1 else "bf16"
dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[name]
context = int(sys.argv[2]) if len(sys.argv) > 2 else 16
mode = sys.argv[3] if len(sys.argv) > 3 else "decode"
torch.manual_seed(7)
config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=None)
model = MixtralForCausalLM(config).to(dtype).eval()
ids = torch.randint(3, 32000, (1, context + 1))
label = f"transformers {torch.__version__} {name}"
with torch.inference_mode():
    if mode == "prefill":
        steps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
        times = []
        for i in range(steps):
            cache = DynamicCache(config=config)
            start = time.perf_counter()
            model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        print(f"{label} prefill {context} tokens: median {median * 1e3:.1f} ms "
              f"({context / median:.0f} tokens/s) over {len(times) - 1} runs, {torch.get_num_threads()} threads")
        sys.exit(0)
    cache = DynamicCache(config=config)
    model(ids[:, :context], past_key_values=cache, use_cache=True)
    times = []
    for i in range(40):
        start = time.perf_counter()
        model(ids[:, context:], past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache.crop(-1)
print(f"{label} context {context}: median {statistics.median(times[5:]) * 1e3:.2f} ms/token over "
      f"{len(times) - 5} steps, {torch.get_num_threads()} threads")
