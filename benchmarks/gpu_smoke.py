"""A GPU lease's first check, in seconds: do the fused kernels build and agree with the
pure-MLX reference?

    python benchmarks/gpu_smoke.py [--steps 70]

Runs ``caches.kernel_self_test`` (what a cache build runs before it uses the kernels),
then decodes ``--steps`` steps on decode.py's spectral-vh cache of the default model's
shape over 1,000 tokens — steps that reuse the prepared warp-tiled launch and steps that
code a batch of waiting tokens — comparing each step's fused attention with the
reference path on the same cache. Exits non-zero on a failed self-test or a difference
above 2e-2 (the self-test's tolerance). On CPU, where there are no fused kernels, the
cache attends through the reference path and the comparison is trivial.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from decode import fill, spectral_cache

from veloxcore import kernels
from veloxcore.caches import kernel_self_test

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models import llama  # noqa: E402

H, D, HQ = 3, 64, 9
TOLERANCE = 2e-2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=70)
    args = parser.parse_args()
    backend = kernels.kernel_backend()
    fused = backend != "reference"
    failure = kernel_self_test(backend) if fused else None
    print(f"backend {backend}; self-test: "
          f"{(failure or 'passed') if fused else 'not run (no fused kernels here)'}")
    if backend == "cuda":  # (tile pairs need >= 160 KiB a block: kernels.block_shared_limit)
        info = mx.device_info(mx.gpu)
        print(f"{info.get('device_name')}: compute capability "
              f"{info.get('compute_capability_major')}.{info.get('compute_capability_minor')}"
              f", {kernels.block_shared_limit()} bytes of shared memory a block; tile pairs "
              f"at head_dim 128: {kernels._warp_tiles(128) == 2}")
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = spectral_cache(np.random.default_rng(0), H, D, rope,
                           backend if backend != "reference" else "off", rotate_values=True)
    fill(cache, H, D, 1000)
    worst = 0.0
    for _ in range(args.steps):
        kv = mx.random.normal((1, H, 1, D)).astype(mx.float16)
        cache.update_and_fetch(kv, kv)
        q = mx.random.normal((1, HQ, 1, D)).astype(mx.float16)
        got = cache.attend(q, D**-0.5)
        used, cache.kernels = cache.kernels, None
        reference = cache.attend(q, D**-0.5)
        cache.kernels = used
        worst = max(worst, mx.abs(got.astype(mx.float32)
                                  - reference.astype(mx.float32)).max().item())
    print(f"{args.steps} decode steps ({cache.code_writes} coding writes): largest "
          f"|fused - reference| {worst:.3g}")
    if backend == "cuda" and kernels.KERNEL_FILES:
        print(f"kernel texts included from {kernels.kernel_file_dir()}")
    return 1 if failure or not worst <= TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
