"""Chat speed with a long prompt: prefill and decode tokens/s per KV-cache method.

    python benchmarks/chat_speed.py --prompt-tokens 2000 --methods fp16,spectral:...

The default model (dequantized) answers "Summarise the passage above in one sentence."
after the first N tokens of the held-out text, 32 tokens greedily, through each method's
cache (shipped bundle) — the studio's and CLI's chat path (mlx-lm's stream_generate) —
and the peak memory of each reply (MLX's allocator, weights included).
"""

from __future__ import annotations

import argparse

from veloxcore import load, load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method
from veloxcore.evaluate import load_eval_text
from veloxcore.generate import stream_reply

mx = __import__("mlx.core").core  # after veloxcore, which preloads OpenBLAS on Linux

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--methods", default="fp16,spectral:wf3/a4g64+qm+ad+x1.5+vh+la")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model, tokenizer, _ = load("default", dequantize=True)
    rotations = load_cached_rotations(BUNDLE, model=model)
    _, text, _ = load_eval_text()
    passage = tokenizer.decode(tokenizer.encode(text)[: args.prompt_tokens])
    messages = [{"role": "user",
                 "content": passage + "\n\nSummarise the passage above in one sentence."}]
    for method in args.methods.split(","):
        mx.clear_cache()
        mx.reset_peak_memory()
        cache = (None if method == "fp16"
                 else KVCacheBuilder.build(model, parse_method(method, rotations)))
        *_, last = stream_reply(model, tokenizer, messages, max_tokens=args.max_tokens,
                                prompt_cache=cache)
        print(f"{method}: prompt {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, "
              f"decode {last.generation_tokens} tokens at {last.generation_tps:.2f} tok/s, "
              f"peak memory {mx.get_peak_memory() / 2**20:.0f} MiB (weights included)",
              flush=True)


if __name__ == "__main__":
    main()
