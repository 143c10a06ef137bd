"""Python cost of the fused attend's pieces, kernel calls stubbed (runs on a CPU).

    python benchmarks/attend_python_cost.py

Default-model shape, 1,024 cached tokens, decode.py's spectral-vh cache built as for CUDA
with ``step_host_split``'s stub kernel (its own call is the "stub call" line): µs per call,
medians of 5 rounds of 20,000 (after 50), from the attention hook down to the prepared launch. This
CPU's host is noisy: compare trees in alternation.
"""

from __future__ import annotations

import numpy as np
from decode import fill, spectral_cache
from kernel_call_cost import build_us
from step_host_split import stub_kernel

from veloxcore import attention, kernels

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models import base, llama  # noqa: E402

H, D, HQ = 3, 64, 9


def main() -> None:
    kernels._kernel = stub_kernel
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = spectral_cache(np.random.default_rng(0), H, D, rope, "cuda", rotate_values=True)
    fill(cache, H, D, 1024)
    mx.eval(cache.state)
    q = mx.random.normal((1, HQ, 1, D)).astype(mx.float16)
    mx.eval(q)
    scale = D**-0.5
    sdpa = attention._dispatching(base.scaled_dot_product_attention)
    cache.attend(q, scale)
    fused = cache.kernels
    exact = cache.exact_buffers()
    _, kernel, inputs, call = fused._warp_launch

    def through_kernels():
        return fused.attend(q, scale, cache.parts, cache.coded, cache.num_sinks, exact)

    pieces = {
        "the hook (mlx-lm's call) to the launch":
            lambda: sdpa(q, None, None, cache=cache, scale=scale, mask=None),
        "cache.attend": lambda: cache.attend(q, scale),
        "SpectralKernels.attend": through_kernels,
        "stub call": lambda: kernel(inputs=inputs, **call),
        "exact_buffers": cache.exact_buffers,
        "queries.shape": lambda: q.shape,
    }
    for name, fn in pieces.items():
        print(f"{name}: {build_us(fn, calls=20000):.2f} µs")


if __name__ == "__main__":
    main()
