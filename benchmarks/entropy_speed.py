"""Host speed of entropy-coded keys (``+ec``), which have no fused kernels (CPU).

    python benchmarks/entropy_speed.py [--tokens 2000] [--method spectral:wf2.75/l4+qm+ad+ec]

The default model (dequantized) takes the first N held-out tokens as one prompt through
the method's cache (shipped bundle); prints the prompt's tokens/s, one decode step's
time (every layer decodes all its rANS blocks, a group of layers at a time:
caches.DecodeAhead) and one layer's ``fetch`` on its own (decoding its coded tokens),
medians of 3.
"""

from __future__ import annotations

import argparse
import statistics
import time

from veloxcore import load, load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method
from veloxcore.evaluate import load_eval_text

mx = __import__("mlx.core").core  # after veloxcore, which preloads OpenBLAS on Linux

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def median_seconds(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--method", default="spectral:wf2.75/l4+qm+ad+ec")
    args = ap.parse_args()
    model, tokenizer, _ = load("default", dequantize=True)
    rotations = load_cached_rotations(BUNDLE, model=model)
    _, text, _ = load_eval_text()
    ids = mx.array(tokenizer.encode(text)[: args.tokens])[None]
    cache = KVCacheBuilder.build(model, parse_method(args.method, rotations))
    t0 = time.perf_counter()
    mx.eval(model(ids, cache=cache))
    prefill = args.tokens / (time.perf_counter() - t0)
    token = mx.array([[42]])
    step = median_seconds(lambda: mx.eval(model(token, cache=cache)))
    layer = cache[len(cache) // 2]
    # A linked layer's first fetch decodes its whole group (caches.DecodeAhead); one
    # layer on its own is measured unlinked.
    ahead, layer.decode_ahead = layer.decode_ahead, None
    fetch = median_seconds(lambda: mx.eval(layer.fetch()))
    layer.decode_ahead = ahead
    group = ahead.group if ahead is not None else 1
    print(f"{args.method}, {args.tokens} tokens: prefill {prefill:.1f} tok/s, decode step "
          f"{step * 1e3:.0f} ms (layers decoded in groups of {group}), one layer's fetch "
          f"{fetch * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
