"""Probe: which text to measure layer sensitivity on (CPU).

    python benchmarks/sensitivity_text_probe.py OUT_BUNDLE_DIR

The shipped bundle's layer_sensitivity.json is measured on 1,024 tokens of the
calibration corpus (the Python Language Reference). This measures it instead on
1,024 tokens the model writes itself (veloxcore.corpus.generate_corpus: eight seed
prompts, sampled at temperature 0.8, seed 0) into a copy of the bundle, so that
``velox eval --bundle OUT_BUNDLE_DIR --methods ...+la`` can compare the two on the
held-out text (which neither measurement sees).
"""

import shutil
import sys
from pathlib import Path

from veloxcore import load, load_cached_rotations
from veloxcore.corpus import generate_corpus, sample_windows
from veloxcore.sensitivity import run_sensitivity, save_sensitivity

ROOT = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1])
shutil.copytree(ROOT / "assets" / "bundles" / "smollm2-135m-instruct-pre", out,
                dirs_exist_ok=True)
model, tokenizer, _ = load("default")
rotations = load_cached_rotations(out, model=model)
corpus = generate_corpus(model, tokenizer, tokens_per_prompt=160,
                         progress=lambda i, n: print(f"generated {i}/{n}", flush=True))
ids = tokenizer.encode(corpus.text)
print(f"{len(ids)} generated tokens", flush=True)
ids = sample_windows(ids, 1, min(1024, len(ids)), seed=0)[0]
sensitivity = run_sensitivity(model, rotations, ids, corpus_sha256=corpus.sha256,
                              progress=lambda s, d, t: d % 12 == 0 and print(s, flush=True))
print("wrote", save_sensitivity(sensitivity, out))
