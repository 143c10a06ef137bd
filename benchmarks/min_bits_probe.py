"""Probe: key water-filling with at least 1 bit per dim (min_bits=1), 1k tokens, CPU.

    python benchmarks/min_bits_probe.py
"""
import veloxcore
from veloxcore import load_cached_rotations
from veloxcore.caches import parse_method
from veloxcore.evaluate import evaluate_methods, load_eval_text, results_table

model, tok, info = veloxcore.load("default")
rot = load_cached_rotations("assets/bundles/smollm2-135m-instruct-pre")
configs = {"fp16": parse_method("fp16")}
for spec in ("spectral:wf3/a4g64+tf0.7+qa", "spectral:wf2.5/a4g64+tf0.7+qa"):
    configs[spec] = parse_method(spec, rot)
    c = parse_method(spec, rot); c.min_bits = 1
    configs[spec + " min1"] = c
name, text, _ = load_eval_text()
print(results_table(evaluate_methods(model, tok, configs, text, 1024)))
