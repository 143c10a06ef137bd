"""Host time of one layer's decode step, fp16 against the fused spectral path, split into
ordinary steps and the steps that code a batch of waiting tokens.

    python benchmarks/step_host_split.py [--shape smollm2] [--tokens 4096] [--stub]

For fp16: mlx-lm's ``KVCache.update_and_fetch`` and SDPA. For spectral (decode.py's
``spectral-vh``, fused path): ``update_and_fetch`` and ``attend`` through veloxcore's
attention hook. Steps are built, not evaluated (the caches are evaluated every 64 steps,
outside the timing), so this is the host's share of a step: Python and MLX's graph
building. ``--stub`` replaces the fused kernels' calls by a function returning kept
arrays, so the fused path's Python can be measured where there is no GPU (on the CPU the
cache is built as for CUDA); what MLX's own custom-kernel call costs is then left out.
Prints medians (and the 97th percentile: the coding steps are 1 in ``append_batch``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from decode import SHAPES, fill, spectral_cache

from veloxcore import attention, kernels

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models import base, llama  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

KEPT: dict = {}


def stub_kernel(backend, which, shared_memory=0):
    """A kernel call that returns arrays made once per output signature."""
    def call(*, output_shapes, output_dtypes, **_):
        key = (which, tuple(map(tuple, output_shapes)), tuple(output_dtypes))
        if key not in KEPT:
            KEPT[key] = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes,
                                                        strict=True)]
        return KEPT[key]
    return call


def step_times(step, caches, steps: int) -> np.ndarray:
    times = []
    for i in range(steps):
        t0 = time.perf_counter_ns()
        step()
        times.append(time.perf_counter_ns() - t0)
        if i % 64 == 63:
            mx.eval([c.state for c in caches])
    return np.array(times) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3200)
    parser.add_argument("--stub", action="store_true")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    H, D, Hq = shape["num_key_value_heads"], shape["head_dim"], shape["num_attention_heads"]
    backend = kernels.kernel_backend()
    if args.stub:
        kernels._kernel = stub_kernel
        backend = "cuda"
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = spectral_cache(np.random.default_rng(0), H, D, rope, backend, rotate_values=True)
    fill(cache, H, D, args.tokens)
    fp16 = KVCache()
    zeros = mx.zeros((1, H, args.tokens, D), mx.float16)
    fp16.update_and_fetch(zeros, zeros)
    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    k1 = mx.random.normal((1, H, 1, D)).astype(mx.float16)
    mx.eval(q, k1, fp16.state)
    sdpa = attention._dispatching(base.scaled_dot_product_attention)
    scale = D**-0.5

    def step(c):
        def run():
            k, v = c.update_and_fetch(k1, k1)
            return sdpa(q, k, v, cache=c, scale=scale, mask=None)
        return run

    rows = {}
    for _ in range(2):  # two rounds, alternated; the second is reported
        for name, c in (("fp16", fp16), ("spectral", cache)):
            t = step_times(step(c), [c], args.steps)
            batch = getattr(c, "append_batch", None)
            rows[name] = dict(median_us=float(np.median(t)), p97_us=float(np.percentile(t, 97)),
                              mean_us=float(t.mean()), append_batch=batch)
            if batch:
                # The coding steps: the slowest 1 in append_batch.
                top = np.sort(t)[-max(1, len(t) // batch):]
                rows[name]["coding_step_median_us"] = float(np.median(top))
    print(json.dumps(dict(shape=args.shape, tokens=args.tokens, stub=args.stub,
                          device=str(mx.default_device()), rows=rows), indent=1))


if __name__ == "__main__":
    main()
