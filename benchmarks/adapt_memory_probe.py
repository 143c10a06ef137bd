"""Peak memory of coding one layer's prompt with a prompt-adaptive plan (+ad), and of
attending over it on the pure-MLX reference path.

    python benchmarks/adapt_memory_probe.py [--tokens 16384]

A spectral cache with random bases, token scales, Hadamard-rotated 4-bit values and a
plan that adapts to its first coded tokens (tests/test_kernels.make_cache) takes one
prompt chunk of random keys and values; printed: the peak memory above what the inputs
hold, then the peak of one decode-step attention (three query heads per KV head) above
what the cache holds, for the default model's shape (3 KV heads, head_dim 64) and the 8B
class (8, 128).
Runs on the default device (CPU here).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

import veloxcore  # noqa: F401  (before mlx: OpenBLAS preload on Linux)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_kernels as tk  # noqa: E402

mx = __import__("mlx.core").core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for heads, dim in ((3, 64), (8, 128)):
        cache = tk.make_cache(rng, heads, dim, values="affine-rotated", token_scale=True,
                              adapt_prior=64)
        keys, values = tk.random_kv(rng, cache, args.tokens)
        mx.eval(keys, values)
        mx.reset_peak_memory()
        held = mx.get_active_memory()
        cache.update_and_fetch(keys, values)
        mx.eval(cache.state)
        peak = (mx.get_peak_memory() - held) / 2**20
        cache.use_kernels("reference")
        query = mx.array(rng.normal(size=(1, 3 * heads, 1, dim)).astype(np.float16))
        mx.eval(query)
        mx.reset_peak_memory()
        held = mx.get_active_memory()
        mx.eval(cache.attend(query, dim**-0.5))
        attend = (mx.get_peak_memory() - held) / 2**20
        print(f"{heads} heads x {dim}, {args.tokens} tokens: coding peak {peak:.1f} MiB "
              f"above the inputs, attention peak {attend:.1f} MiB ({mx.default_device()})")


if __name__ == "__main__":
    main()
