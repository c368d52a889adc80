"""Times Hugging Face transformers' MixtralForCausalLM decoding on this machine's CPU, on the same
mid-size random shape the crate's criterion bench uses (hidden 1024, 8 layers, 8 experts top-2,
intermediate 3584, 16 query / 4 KV heads, vocab 32000), so the two can be compared side by side.

Usage: python scripts/bench-transformers-cpu.py [bf16|f32] [context]
Prints the median ms/token of single-token decode steps at a fixed context (the KV cache is cropped
back to the context before each step, as the criterion bench rewinds its sequence)."""
import statistics, sys, time
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.cache_utils import DynamicCache

dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
context = int(sys.argv[2]) if len(sys.argv) > 2 else 16
torch.manual_seed(7)
config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=None)
model = MixtralForCausalLM(config).to(dtype).eval()
ids = torch.randint(3, 32000, (1, context + 1))
with torch.inference_mode():
    cache = DynamicCache(config=config)
    model(ids[:, :context], past_key_values=cache, use_cache=True)
    times = []
    for i in range(40):
        start = time.perf_counter()
        model(ids[:, context:], past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache.crop(-1)
print(f"transformers {torch.__version__} {sys.argv[1] if len(sys.argv) > 1 else 'bf16'} context {context}: "
      f"median {statistics.median(times[5:]) * 1e3:.2f} ms/token over {len(times) - 5} steps, "
      f"{torch.get_num_threads()} threads")
