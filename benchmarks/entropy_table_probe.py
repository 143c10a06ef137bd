"""Probe: which index model should the entropy coder's tables follow? (CPU, 1k tokens)

    python benchmarks/entropy_table_probe.py [--tokens 1024] [--bits 2.5] [--shapes ...]
        [--json OUT]

Default model, held-out text, shipped bundle: each layer's pre-RoPE keys in the
metric-weighted basis (+qm), centred, each coefficient's deviation σ_d measured on the
text (as +ad would estimate it). Per table shape, the keys' squared error summed over
every layer, head and dim, relative to an ideal coder at the same payload bits (one
uniform step per head whose indices' empirical entropy, each dim's own histogram, equals
the payload):

- ``block``: veloxcore.entropy.EntropyKeyCoder as the cache runs it (rate control per
  32-token block; the bytes are the budget);
- ``constant``: one step per head (the finest whose modelled cost over all blocks fits
  the same total), i.e. the tables' mismatch alone.
"""

from __future__ import annotations

import argparse

import numpy as np
from entropy_probe import index_entropy
from probe_text import HeldOut, save_results
from temporal_probe import recorded_coefficients

from veloxcore.entropy import ENTROPY_BLOCK, STEP_CODES, EntropyKeyCoder

SHAPES = ["gaussian", "laplace", "mix:0.03:2", "mix:0.1:1.5", "mix:0.01:4", "mix:0.1:5",
          "mix:0:1:0.9"]


def ideal_step(y: np.ndarray, bits: float) -> float:
    lo, hi = 1e-4 * y.std(), 50 * y.std()
    for _ in range(40):
        step = np.sqrt(lo * hi)
        lo, hi = (step, hi) if index_entropy(y, step).mean() > bits else (lo, step)
    return float(np.sqrt(lo * hi))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    held = HeldOut(args.tokens, 256)
    T = ENTROPY_BLOCK
    error = {"ideal": 0.0}
    for y, _ in recorded_coefficients(held):
        H, N, D = y.shape
        for h in range(H):
            rows = y[h][: N // T * T]
            rows = rows - rows.mean(0)
            blocks = rows.reshape(-1, T, D).astype(np.float32)
            head = np.zeros(len(blocks), dtype=np.int64)
            for shape in shapes:
                coder = EntropyKeyCoder(rows.std(0)[None], args.bits, T, shape=shape)
                decoded = coder.decode_blocks(coder.encode_blocks(blocks, head), head)
                error[f"{shape} block"] = (error.get(f"{shape} block", 0.0)
                                           + float(((decoded - blocks) ** 2).sum()))
                codes = np.arange(STEP_CODES - 1)
                budget = (16 * coder.max_words - 16) * len(blocks)
                cost = np.array([coder._cost(blocks, head, np.full(len(blocks), g)).sum()
                                 for g in codes])
                step = coder.steps(head[:1], codes[np.argmax(cost <= budget)][None])[0]
                error[f"{shape} constant"] = (error.get(f"{shape} constant", 0.0) + float(
                    ((np.rint(blocks / step) * step - blocks) ** 2).sum()))
            payload = 16 * coder.max_words / (T * D)
            step = ideal_step(rows, payload)
            error["ideal"] += float(((np.rint(rows / step) * step - rows) ** 2).sum())
    relative = {k: v / error["ideal"] for k, v in error.items()}
    for k, v in relative.items():
        print(f"{k:24s} {v:.3f}× the ideal coder's squared error")
    save_results(args.json, tokens=args.tokens, bits=args.bits, relative_error=relative)


if __name__ == "__main__":
    main()
