"""Whole-model decode, step by step and pipelined, with each step's build and wait times.

    python benchmarks/step_times_probe.py [SHAPE] [TOKENS] [METHODS]
    MLX_USE_CUDA_GRAPHS=0 python benchmarks/step_times_probe.py smollm2 8192

decode.py's shapes and methods (random weights, fp16 on a GPU, caches filled with TOKENS random
tokens). Per method and round: tokens/s evaluated step by step and pipelined (the next
step built before waiting for this one, as mlx-lm's generate_step), the median graph
build and wait per step, and the steps that stand out (over 1.5× the median: the ones
that code a batch of waiting tokens) with their share of the time. Prints JSON lines.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from decode import SHAPES, fill, make_cache, random_model

from veloxcore.kernels import kernel_backend

mx = __import__("mlx.core").core

STEPS = 128


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    methods = (sys.argv[3] if len(sys.argv) > 3 else "fp16,spectral-vh").split(",")
    model = random_model(shape)
    H, D = SHAPES[shape]["num_key_value_heads"], SHAPES[shape]["head_dim"]

    def next_token(token, caches):
        return mx.argmax(model(token, cache=caches)[:, -1], axis=-1, keepdims=True)

    for round_ in range(2):
        for method in methods:
            rng = np.random.default_rng(0)
            caches = [make_cache(method, H, D, layer.self_attn.rope, kernel_backend(), rng)
                      for layer in model.layers]
            for c in caches:
                fill(c, H, D, tokens)
            token = mx.array([[1]])
            for _ in range(40):  # warm-up: kernels compile, a first batch is coded
                token = next_token(token, caches)
                mx.eval(token)
            builds, waits = [], []
            for _ in range(STEPS):
                t0 = time.perf_counter()
                token = next_token(token, caches)
                t1 = time.perf_counter()
                mx.eval(token)
                builds.append(t1 - t0)
                waits.append(time.perf_counter() - t1)
            t0 = time.perf_counter()
            queued = next_token(token, caches)
            mx.async_eval(queued)
            for _ in range(STEPS):
                current, queued = queued, next_token(queued, caches)
                mx.async_eval(queued)
                current.item()
            queued.item()
            pipelined = (STEPS + 1) / (time.perf_counter() - t0)
            b, w = np.array(builds) * 1e3, np.array(waits) * 1e3
            total = b + w
            slow = total > 1.5 * np.median(total)
            print(json.dumps(dict(
                method=method, shape=shape, tokens=tokens, round=round_,
                step_by_step_tok_s=round(STEPS / total.sum() * 1e3, 1),
                pipelined_tok_s=round(pipelined, 1),
                build_median_ms=round(float(np.median(b)), 3),
                wait_median_ms=round(float(np.median(w)), 3), slow_steps=int(slow.sum()),
                slow_share=round(float(total[slow].sum() / total.sum()), 3))), flush=True)
            del caches
            mx.clear_cache()


if __name__ == "__main__":
    main()
