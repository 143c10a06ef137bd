"""Make the shipped bundle (assets/bundles/smollm2-135m-instruct-pre): how it was made.

    python benchmarks/make_default_bundle.py --model PATH.gguf --out DIR

Pre-RoPE rotations of the default model dequantized to float32 (as benchmarks/quality.py
evaluates it), 64 x 1024 tokens of the bundled corpus (the Python Language Reference and
the model-written prose in assets/corpus/), seed 0 — with the query statistics
(+qa) and metric (+qm) — then the layer sensitivity on 1,024 tokens the model writes
itself (what ``velox sensitivity`` measures), both written into DIR. On an H200 this takes
about a minute; on this project's 2-core CPU about 25.
"""

from __future__ import annotations

import argparse
import time

from veloxcore import calibrate_spectral_rotation, load, save_rotations
from veloxcore.sensitivity import run_sensitivity, save_sensitivity, sensitivity_tokens


def make_bundle(model, tokenizer, out, corpus=None, samples: int = 64, sensitivity=None):
    """Calibrate pre-RoPE rotations on ``corpus`` (default: the bundled one), save them in
    ``out``, measure the layer sensitivity on ``sensitivity`` ((Corpus, ids); default:
    1,024 tokens the model writes) and save it there too. Returns the bundle's path."""
    start = time.perf_counter()
    rotations = calibrate_spectral_rotation(model, tokenizer, samples, 1024, corpus=corpus,
                                            rope="pre")
    print(f"calibrated: {time.perf_counter() - start:.1f} s", flush=True)
    path = save_rotations(rotations, out)
    start = time.perf_counter()
    text, ids = sensitivity or sensitivity_tokens(model, tokenizer)
    rotations.layer_sensitivity = run_sensitivity(model, rotations, ids, chunk=512,
                                                  corpus_sha256=text.sha256)
    save_sensitivity(rotations.layer_sensitivity, path)
    print(f"layer sensitivity ({len(ids)} tokens of {text.name}): "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tokenizer, _ = load(args.model, dequantize=True)
    make_bundle(model, tokenizer, args.out)


if __name__ == "__main__":
    main()
