"""Probe: how many bits would entropy coding save on the keys' coefficients? (CPU)

    python benchmarks/entropy_probe.py [--tokens 1024] [--bits 2.5] [--json OUT]

Fixed-rate Lloyd-Max codes sit ~0.7 bits per coefficient above the Gaussian
rate-distortion bound at high rate; a uniform quantiser whose indices are entropy coded
sits ~0.25 bits above it. Default model, held-out text, shipped bundle: each layer's
pre-RoPE keys in the metric-weighted basis (+qm), bits water-filled at ``--bits`` per dim,
codebooks at 1.5× each coefficient's calibrated std (the shipped coder, without +ad).
Per coded dim: the Lloyd-Max code's error on the real coefficients, the step of a
uniform quantiser (no clipping) with the same mean squared error, and the empirical
entropy of its indices — the bits an ideal entropy coder would spend for the same MSE.
Equal MSE is not equal KL (KL follows rare large errors); this bounds the lever's size.
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_text import HeldOut, save_results
from temporal_probe import CoefficientRecorder

from veloxcore import load_cached_rotations
from veloxcore.quantizers import lloyd_max_gaussian
from veloxcore.spectral import water_fill_bits

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"
INFLATION = 1.5


def lloyd_max_mse(y: np.ndarray, bits: int, scale: float) -> float:
    levels, thresholds, _ = lloyd_max_gaussian(bits)
    decoded = levels[np.searchsorted(thresholds, y / scale)] * scale
    return float(np.mean((y - decoded) ** 2))


def entropy_at_mse(y: np.ndarray, mse: float) -> float:
    """Entropy (bits) of uniform-quantiser indices whose MSE on y matches ``mse``
    (bisection on the step)."""
    lo, hi = 1e-6 * (np.std(y) + 1e-12), 20 * (np.std(y) + 1e-12)
    for _ in range(60):
        step = np.sqrt(lo * hi)
        err = np.mean((y - step * np.round(y / step)) ** 2)
        lo, hi = (step, hi) if err < mse else (lo, step)
    _, counts = np.unique(np.round(y / np.sqrt(lo * hi)), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--json")
    args = ap.parse_args()
    held = HeldOut(args.tokens, 256)
    rotations = load_cached_rotations(BUNDLE)
    recorders = [CoefficientRecorder(held.model, rotations[i], i)
                 for i in range(len(held.model.layers))]
    held.log_probs(recorders)
    rows = []
    for layer, recorder in enumerate(recorders):
        y = np.concatenate(recorder.recorded, axis=1)[:, 4:]  # (H, T, D), without sinks
        fixed = entropy = 0.0
        dims = 0
        for h in range(y.shape[0]):
            spectrum = recorder.spectrum[h]
            bits = water_fill_bits(spectrum, args.bits, 0, 8)
            scale = INFLATION * np.sqrt(np.maximum(spectrum, 1e-12))
            centred = y[h] - y[h].mean(0)
            for d in np.flatnonzero(bits):
                mse = lloyd_max_mse(centred[:, d], int(bits[d]), scale[d])
                fixed += bits[d]
                entropy += entropy_at_mse(centred[:, d], mse)
                dims += 1
        rows.append(dict(layer=layer, coded_dims=dims, fixed_bits=fixed / dims,
                         entropy_bits=entropy / dims))
        print(f"layer {layer:2d}: Lloyd-Max {fixed / dims:.2f} bits per coded dim, entropy-"
              f"coded uniform at the same MSE {entropy / dims:.2f}", flush=True)
    saved = np.mean([r["fixed_bits"] - r["entropy_bits"] for r in rows])
    per_dim = saved * np.mean([r["coded_dims"] for r in rows]) / (
        held.model.layers[0].self_attn.n_kv_heads * recorders[0].spectrum.shape[1])
    print(f"mean saving: {saved:.3f} bits per coded dim, {per_dim:.3f} per key dim")
    save_results(args.json, tokens=args.tokens, bits=args.bits, rows=rows,
                 saved_per_coded_dim=float(saved), saved_per_key_dim=float(per_dim))


if __name__ == "__main__":
    main()
