"""Probe: key water-filling with at least 1 bit per dim (min_bits=1), 1k tokens, CPU.

    python benchmarks/min_bits_probe.py
"""

from __future__ import annotations

from pathlib import Path

import veloxcore
from veloxcore import load_cached_rotations
from veloxcore.caches import parse_method
from veloxcore.evaluate import evaluate_methods, load_eval_text, results_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    model, tokenizer, _ = veloxcore.load("default")
    rotations = load_cached_rotations(ROOT / "assets/bundles/smollm2-135m-instruct-pre")
    configs = {"fp16": parse_method("fp16")}
    for spec in ("spectral:wf3/a4g64+tf0.7+qa", "spectral:wf2.5/a4g64+tf0.7+qa"):
        configs[spec] = parse_method(spec, rotations)
        at_least_one = parse_method(spec, rotations)
        at_least_one.min_bits = 1
        configs[spec + " min1"] = at_least_one
    _, text, _ = load_eval_text()
    print(results_table(evaluate_methods(model, tokenizer, configs, text, 1024)))


if __name__ == "__main__":
    main()
