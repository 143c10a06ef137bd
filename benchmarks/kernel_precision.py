"""The fused decode kernel against the pure-MLX reference evaluated on the GPU and on the
CPU, for metric-weighted keys with and without a prompt-adapted plan (+qm, +ad).

    python benchmarks/kernel_precision.py [--seeds 21,22,23,24]

Prints, per case, the largest absolute difference of kernel and GPU reference (and as a
fraction of the tests' 2e-3 + 2e-3·|x| tolerance), of kernel and CPU reference, and of
the two references. Needs a GPU backend (CUDA or Metal).
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_kernels as tk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="21,22,23,24")
    args = parser.parse_args()
    if tk.BACKEND == "reference":
        raise SystemExit("kernel_precision.py needs a GPU backend (CUDA or Metal)")
    for seed in (int(s) for s in args.seeds.split(",")):
        for adapt in (0, 16):
            rng = np.random.default_rng(seed)
            cache = tk.make_cache(rng, 3, 64, "pre", "affine-rotated", True, metric=True,
                                  adapt_prior=adapt)
            if adapt:
                keys, vals = tk.random_kv(rng, cache, 120)
                cache.update_and_fetch(keys + 0.7, vals)
            keys, vals = tk.random_kv(rng, cache, 200)
            cache.use_kernels(tk.BACKEND)
            cache.encode(keys, vals, 9)
            tk.filled(cache, rng, 200)
            q = mx.array(rng.normal(size=(1, 9, 1, 64)).astype(np.float16))
            got = np.array(cache.attend(q, 0.125).astype(mx.float32))
            cache.use_kernels("reference")
            ref_gpu = np.array(cache.attend(q, 0.125).astype(mx.float32))
            ref_cpu = tk.reference_attend(cache, q, 0.125)
            tol = 2e-3 + 2e-3 * np.abs(ref_gpu)
            print(f"seed {seed} adapt {adapt:2d}: kernel-ref(gpu) "
                  f"{np.abs(got - ref_gpu).max():.2e} ({(np.abs(got - ref_gpu) / tol).max():.2f}"
                  f" of tol)  kernel-ref(cpu) {np.abs(got - ref_cpu).max():.2e}  "
                  f"ref(gpu)-ref(cpu) {np.abs(ref_gpu - ref_cpu).max():.2e}", flush=True)


if __name__ == "__main__":
    main()
