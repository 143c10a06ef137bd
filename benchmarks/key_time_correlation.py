"""How much adjacent tokens' pre-RoPE key coefficients predict each other.

    python benchmarks/key_time_correlation.py

Runs the default model over 1,024 tokens of the held-out text, undoes RoPE on the
cached keys of a few layers, projects them on the shipped bundle's eigenbasis and
prints, per layer (head 0), the lag-1 correlation of the leading coefficients and the
rate a linear predictor from the previous token would save (−½·log2(1 − ρ²) bits per
dim, averaged over the 16 leading dims). Decides whether predictive (delta) coding of
keys along the sequence is worth building.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import veloxcore
from veloxcore import load_cached_rotations
from veloxcore.calibration import RopeInverter, find_rope

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models.cache import KVCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    model, tokenizer, _ = veloxcore.load("default")
    rotations = load_cached_rotations(ROOT / "assets/bundles/smollm2-135m-instruct-pre")
    ids = tokenizer.encode((ROOT / "assets/eval/kjv-genesis.txt").read_text())[:1024]
    caches = [KVCache() for _ in model.layers]
    model(mx.array(ids)[None], cache=caches)
    for layer in (2, 10, 20, 28):
        keys = caches[layer].keys[..., : len(ids), :].astype(mx.float32)
        pre = np.array(RopeInverter(find_rope(model.layers[layer]), keys.shape[-1])(keys, 0))[0]
        rot = rotations[layer]
        y = ((pre[0] - rot.key_mean[0]) @ rot.key_eigenvectors[0])[4:]  # skip the sinks
        a, b = y[1:], y[:-1]
        rho = ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / (a.std(0) * b.std(0) + 1e-12)
        share = y.var(0) / y.var(0).sum()
        saved = -0.5 * np.log2(np.maximum(1 - rho**2, 1e-6))
        print(f"layer {layer}: lag-1 rho of the 8 leading dims {np.round(rho[:8], 2)}, "
              f"energy-weighted rho {np.sum(share * rho):.2f}, "
              f"bits saved per dim (16 leading) {saved[:16].mean():.2f}")


if __name__ == "__main__":
    main()
