"""Probe: metric-weighted key bases (+qm) against query-aware bits (+qa).

    python benchmarks/query_metric_probe.py [--model PATH] [--ctx 1024]
        [--metrics u4096,u256/0.3,h8192] [--methods …] [--baselines …] [--json OUT]

Records the queries' second moment per KV head on calibration-corpus windows
(q_proj outputs, pre-RoPE), averages it over relative distances with each weighting
(veloxcore.key_metric), attaches it to the bundle's rotations and runs the
teacher-forced evaluation on the held-out text for each, plus the baselines once.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np

from veloxcore import caches, load, load_cached_rotations
from veloxcore.caches import parse_method
from veloxcore.calibration import find_rope, install_query_recorders, remove_query_recorders
from veloxcore.corpus import load_corpus, sample_windows
from veloxcore.evaluate import evaluate_methods, load_eval_text, results_table
from veloxcore.key_metric import RIDGE, metric_basis, position_averaged_metric, rope_pairs

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)
KVCache = __import__("mlx_lm.models.cache").models.cache.KVCache

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def query_moments(model, tokenizer, samples: int, length: int) -> list[np.ndarray]:
    """Per layer (kv_heads, D, D): Σ over each KV head's query group of E[q·qᵀ], recorded
    by calibration's own query recorders (after q_norm where the model has one)."""
    recorders = install_query_recorders(model)
    sums = [np.zeros(r.moment.shape) for r in recorders]
    windows = sample_windows(tokenizer.encode(load_corpus().text), samples, length)
    try:
        for window in windows:
            model(mx.array(window)[None], cache=[KVCache() for _ in model.layers])
            mx.eval([r.moment for r in recorders])
            for total, recorder in zip(sums, recorders, strict=True):
                total += np.array(recorder.moment, dtype=np.float64)
                recorder.reset()
    finally:
        remove_query_recorders(model, recorders)
    return [total / (len(windows) * length) for total in sums]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--bundle", default=BUNDLE)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--metrics", default="u4096",
                    help="comma-separated distance weightings: uN (uniform over N "
                         "tokens) or hN (∝ 1/(d+1) over N), each optionally /RIDGE")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--methods", default="spectral:wf2.5/a4g64+qm+ad+x1.5+vh")
    ap.add_argument("--baselines", default="spectral:wf2.5/a4g64+qa+ad+x1.5+vh",
                    help="methods run once, without a metric")
    ap.add_argument("--json")
    args = ap.parse_args()
    model, tokenizer, _ = load(args.model, dequantize=True)
    rotations = load_cached_rotations(args.bundle, model, layer_sensitivity=True)
    moments = query_moments(model, tokenizer, args.samples, 1024)
    _, text, _ = load_eval_text()
    rows = []
    runs = [("none", RIDGE)] if args.baselines else []
    for spec in args.metrics.split(","):
        weighting, _, ridge = spec.partition("/")
        runs.append((weighting, float(ridge) if ridge else RIDGE))
    for weighting, ridge in runs:
        methods = args.baselines if weighting == "none" else args.methods
        if weighting != "none":
            span, harmonic = int(weighting[1:]), weighting[0] == "h"
            for rot, m, layer in zip(rotations, moments, model.layers, strict=True):
                perm, theta, amp = rope_pairs(find_rope(layer), rot.head_dim)
                rot.key_metric = position_averaged_metric(m, perm, theta, amp, span, harmonic)
        caches.metric_basis = functools.partial(metric_basis, ridge=ridge)
        configs = {"fp16": parse_method("fp16")}
        configs.update({m: parse_method(m, rotations) for m in methods.split(",")})
        results = evaluate_methods(model, tokenizer, configs, text, args.ctx)
        print(f"metric {weighting}, ridge {ridge}, {args.samples} x 1024 corpus tokens")
        print(results_table(results[1:]), flush=True)
        rows += [dict(metric=weighting, ridge=ridge, **r.to_dict()) for r in results[1:]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), samples=args.samples, results=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
