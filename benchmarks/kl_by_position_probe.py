"""Probe: where along an 8k context the coded cache's KL comes from (CPU).

    python benchmarks/kl_by_position_probe.py [--tokens 8192] [--methods S1,S2] [--json OUT]

Errors grow with context (8k KL is several times 1k KL at the same bits). Teacher-forced
in 512-token chunks on the held-out text (as ``velox eval``), this reports mean KL(fp16 ‖
method) per 1,024-token bucket of positions: flat buckets mean longer contexts simply add
more coded tokens for each query to trip over; rising ones that later text drifts away
from the prompt-adapted plan (``+ad`` fits the first chunk).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from probe_text import HeldOut, save_results

from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--bucket", type=int, default=1024)
    ap.add_argument("--methods", default="spectral:wf3/a4g64+qm+ad+x1.5+vh+la")
    ap.add_argument("--json")
    args = ap.parse_args()
    held_out = HeldOut(args.tokens, 512)
    rotations = load_cached_rotations(BUNDLE, held_out.model)
    rows = []
    for method in args.methods.split(","):
        caches = KVCacheBuilder.build(held_out.model, parse_method(method, rotations))
        kl = np.array(held_out.kl(caches))
        buckets = [float(kl[s: s + args.bucket].mean()) for s in range(0, kl.size, args.bucket)]
        rows.append(dict(method=method, mean=float(kl.mean()), buckets=buckets))
        print(json.dumps(rows[-1]), flush=True)
    save_results(args.json, bucket=args.bucket, rows=rows)


if __name__ == "__main__":
    main()
