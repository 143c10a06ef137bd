"""How long building the default spectral cache takes (a chat builds one per reply).

    python benchmarks/cache_build_time.py

Three fresh loads of the shipped bundle; per load, the first build (which computes the
metric-weighted key basis, then kept on the rotations) and the median of five more.
"""

import statistics
import time

from veloxcore import load, load_cached_rotations
from veloxcore.caches import KVCacheBuilder, KVCacheConfig

model, _, _ = load("default")
for _ in range(3):
    rotations = load_cached_rotations("assets/bundles/smollm2-135m-instruct-pre", model)
    config = KVCacheConfig.recommended(rotations)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        KVCacheBuilder.build(model, config)
        times.append(time.perf_counter() - start)
    print(f"first build {times[0] * 1000:.0f} ms, later builds median "
          f"{statistics.median(times[1:]) * 1000:.0f} ms", flush=True)
