"""Probe: which text to measure layer sensitivity on (CPU).

    python benchmarks/sensitivity_text_probe.py OUT_BUNDLE_DIR

Measures the layer sensitivity on 1,024 tokens the model writes itself (eight seed
prompts, sampled at temperature 0.8, seed 0; what ``velox sensitivity`` now does by
default) into a copy of the shipped bundle, so that ``velox eval --bundle OUT_BUNDLE_DIR
--methods ...+la`` can compare it with a measurement on the calibration corpus (``velox
sensitivity --corpus bundled``) on the held-out text, which neither measurement sees.
"""

import shutil
import sys
from pathlib import Path

from veloxcore import load, load_cached_rotations
from veloxcore.sensitivity import run_sensitivity, save_sensitivity, sensitivity_tokens

ROOT = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1])
shutil.copytree(ROOT / "assets" / "bundles" / "smollm2-135m-instruct-pre", out,
                dirs_exist_ok=True)
model, tokenizer, _ = load("default")
rotations = load_cached_rotations(out, model=model, layer_sensitivity=False)
corpus, ids = sensitivity_tokens(model, tokenizer, "generated", 1024)
print(f"{len(ids)} tokens of {corpus.name}", flush=True)
sensitivity = run_sensitivity(model, rotations, ids, corpus_sha256=corpus.sha256,
                              progress=lambda s, d, t: d % 12 == 0 and print(s, flush=True))
print("wrote", save_sensitivity(sensitivity, out))
