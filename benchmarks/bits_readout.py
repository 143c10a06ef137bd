"""How long a full bit plan takes to recompute (the Bits view's readout; target < 50 ms).

    python benchmarks/bits_readout.py

Water-fills keys and values of every layer and KV head of the shipped bundle and
computes the predicted distortion — the numpy work behind one slider move in the
Bits view before its plan cache is warm. Reports the median of 30 runs per target.
"""

from __future__ import annotations

import platform
import statistics
import time

from veloxcore import allocate_bit_plan, load_cached_rotations

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def main() -> None:
    rotations = load_cached_rotations(BUNDLE)
    print(f"{platform.machine()} {platform.system()}, {time.strftime('%Y-%m-%d')}, "
          f"{len(rotations)} layers x {rotations[0].num_kv_heads} heads x "
          f"{rotations[0].head_dim} dims, keys + values")
    for target in (2.0, 3.0, 4.0, 6.0):
        times = []
        for _ in range(30):
            start = time.perf_counter()
            allocate_bit_plan(rotations, target, 1, 8)
            times.append(time.perf_counter() - start)
        print(f"target {target:.1f} bits: median {1000 * statistics.median(times):.1f} ms, "
              f"max {1000 * max(times):.1f} ms")


if __name__ == "__main__":
    main()
