"""Host cost of one layer's decode attention on the GPU (where small models are host-bound).

    python benchmarks/host_cost_probe.py [--tokens 4096]

Default-model shape (3 KV heads, 9 query heads, head_dim 64), spectral cache with rotated
values (decode.py's ``spectral-vh``). Prints, per call (medians of 5 rounds): building the
graph only, building and evaluating, and the Python part alone (the kernel call replaced
by a stub returning empty outputs), for fp16 SDPA and the fused spectral attention; the
prepared warp-tiled launch's ``cuda_kernel`` call alone; evaluating a chain of 30 SDPAs or
30 launches (each launch waits for the previous one, as a cache's do); then the wall time
of 80 decode steps of this layer (append + attend + eval), where the steps that code a
batch of waiting tokens stand out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from decode import fill, spectral_cache

from veloxcore import kernels

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models import llama  # noqa: E402

H, D, HQ = 3, 64, 9


def per_call_us(fn, calls: int = 2000, evaluate: bool = False) -> float:
    for _ in range(50):
        mx.eval(fn())
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            out = fn()
            if evaluate:
                mx.eval(out)
        rounds.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
    return statistics.median(rounds)


def eval_us(build, rounds: int = 50) -> float:
    """Median µs of evaluating what ``build`` returns (built outside the timing)."""
    times = []
    for i in range(rounds + 5):
        out = build()
        t0 = time.perf_counter()
        mx.eval(out)
        if i >= 5:
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def reprepare(cache) -> None:
    """Drop the cache's prepared warp-tiled launch (the next attend prepares one)."""
    if cache.kernels is not None:
        cache.kernels._warp_launch = None


def stub_kernel(backend, which, shared_memory=0, min_blocks=None):
    def call(*, output_shapes, output_dtypes, **_):
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = spectral_cache(np.random.default_rng(0), H, D, rope, kernels.kernel_backend(),
                           rotate_values=True)
    fill(cache, H, D, args.tokens)
    q = mx.random.normal((1, HQ, 1, D)).astype(mx.float16)
    k = mx.random.normal((1, H, args.tokens, D)).astype(mx.float16)
    mx.eval(q, k)
    scale = D**-0.5

    def sdpa():
        return mx.fast.scaled_dot_product_attention(q, k, k, scale=scale)

    def spectral():
        return cache.attend(q, scale)

    print(f"graph build µs per call: fp16 SDPA {per_call_us(sdpa):.1f}, "
          f"spectral {per_call_us(spectral):.1f}")
    print(f"build + eval µs per call: fp16 SDPA {per_call_us(sdpa, evaluate=True):.1f}, "
          f"spectral {per_call_us(spectral, evaluate=True):.1f}")
    # (key, kernel, inputs, call): _attend_warp's prepared launch
    launch = getattr(cache.kernels, "_warp_launch", None)
    if launch is not None:
        _, kernel, inputs, call = launch
        print(f"the warp-tiled launch's cuda_kernel call alone µs: "
              f"{per_call_us(lambda: kernel(inputs=inputs, **call)):.1f}")

        def launches():
            # inputs[-1]: the previous launch's partials (kernels._attend_warp)
            chained, out = list(inputs), []
            for _ in range(30):
                partials, result = kernel(inputs=chained, **call)[:2]
                chained[-1] = partials
                out.append(result)
            return out

        sdpas = lambda: [sdpa() for _ in range(30)]  # noqa: E731
        print(f"evaluating 30 chained calls µs: fp16 SDPA {eval_us(sdpas):.1f}, "
              f"spectral launches {eval_us(launches):.1f}")
    real = kernels._kernel
    kernels._kernel = stub_kernel
    reprepare(cache)  # with the stub
    try:
        print(f"Python alone (stub kernel) µs per call: {per_call_us(spectral):.1f}")
    finally:
        kernels._kernel = real
        reprepare(cache)
    k1 = mx.random.normal((1, H, 1, D)).astype(mx.float16)
    steps = []
    for _ in range(80):
        t0 = time.perf_counter()
        cache.update_and_fetch(k1, k1)
        mx.eval(cache.attend(q, scale))
        steps.append((time.perf_counter() - t0) * 1e6)
    print("decode steps, µs each:", " ".join(f"{s:.0f}" for s in steps))


if __name__ == "__main__":
    main()
