"""Host time of one layer's decode step, fp16 against the fused spectral path, split into
ordinary steps and the steps that code a batch of waiting tokens.

    python benchmarks/step_host_split.py [--shape smollm2] [--tokens 4096] [--stub]

For fp16: mlx-lm's ``KVCache.update_and_fetch`` and SDPA. For spectral (decode.py's
``spectral-vh``, fused path): ``update_and_fetch`` and ``attend`` through veloxcore's
attention hook. Steps are built, not evaluated (every 64 steps the caches and the last
output are evaluated, outside the timing), so this is the host's share of a step: Python
and MLX's graph building. ``--stub`` replaces the fused kernels' calls by a function
returning kept arrays, so the fused path's Python can be measured where there is no GPU
(on the CPU the cache is built as for CUDA); what MLX's own custom-kernel calls cost (the
attend's, and the encoder's in a coding step) is then left out. Each round starts from
fresh caches of ``--tokens`` tokens; coding steps are those in which the cache wrote codes.
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


def stub_kernel(backend, which, shared_memory=0, min_blocks=None):
    """A kernel call that returns arrays made once per output signature."""
    def call(*, output_shapes, output_dtypes, **_):
        key = (which, tuple(map(tuple, output_shapes)), tuple(output_dtypes))
        if key not in KEPT:
            KEPT[key] = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes,
                                                        strict=True)]
        return KEPT[key]
    return call


def step_times(step, cache, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Host µs of each step, and whether the step coded a batch (spectral caches)."""
    times, coding = [], []
    out = None
    for i in range(steps):
        writes = getattr(cache, "code_writes", 0)
        t0 = time.perf_counter_ns()
        out = step()
        times.append(time.perf_counter_ns() - t0)
        coding.append(getattr(cache, "code_writes", 0) != writes)
        if i % 64 == 63:
            # Fused launches chain on the previous one's output: evaluate it too, or the
            # unevaluated steps would pile up.
            mx.eval(cache.state, out)
    mx.eval(cache.state, out)
    return np.array(times) / 1e3, np.array(coding)


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
    elif backend not in ("cuda", "metal"):
        raise SystemExit(f"no fused kernels here (backend {backend!r}): the spectral row "
                         f"would time the reference path; use --stub")
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)

    def fresh(name):
        if name == "fp16":
            cache = KVCache()
            zeros = mx.zeros((1, H, args.tokens, D), mx.float16)
            cache.update_and_fetch(zeros, zeros)
        else:
            cache = spectral_cache(np.random.default_rng(0), H, D, rope, backend,
                                   rotate_values=True)
            fill(cache, H, D, args.tokens)
        mx.eval(cache.state)
        return cache

    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    k1 = mx.random.normal((1, H, 1, D)).astype(mx.float16)
    mx.eval(q, k1)
    sdpa = attention._dispatching(base.scaled_dot_product_attention)
    scale = D**-0.5

    def step(c):
        def run():
            k, v = c.update_and_fetch(k1, k1)
            return sdpa(q, k, v, cache=c, scale=scale, mask=None)
        return run

    rows = {}
    for _ in range(2):  # two rounds, alternated; the second is reported
        for name in ("fp16", "spectral"):
            cache = fresh(name)
            t, coding = step_times(step(cache), cache, args.steps)
            rows[name] = dict(median_us=float(np.median(t[~coding])), mean_us=float(t.mean()),
                              coding_steps=int(coding.sum()))
            if coding.any():
                rows[name]["coding_step_median_us"] = float(np.median(t[coding]))
    print(json.dumps(dict(shape=args.shape, tokens=args.tokens, steps=args.steps,
                          stub=args.stub, backend=backend, device=str(mx.default_device()),
                          rows=rows), indent=1))


if __name__ == "__main__":
    main()
