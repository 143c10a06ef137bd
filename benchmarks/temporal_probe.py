"""Probe: can a key be predicted from the previous token's key (predictive coding)?

    python benchmarks/temporal_probe.py [--tokens 1024] [--json OUT]

Default model, held-out text, shipped bundle. Each layer's pre-RoPE keys in its
metric-weighted basis (+qm, the coded coefficients: the dims water-filling gives bits at
2.5 bits per dim); per KV head a linear predictor of a token's coefficient vector from
the previous token's (least squares on the first half of the tokens) is tested on the
second half. At high rate a predictor saves ½·log₂(variance / residual variance) bits
per coefficient: reported per layer (mean over the coded dims, and the four widest), with
the lag-1 correlation of the four widest dims.
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_text import HeldOut, PreRopeKeyProbe, save_results

from veloxcore import load_cached_rotations
from veloxcore.caches import key_metric_basis
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


class CoefficientRecorder(PreRopeKeyProbe):
    """Records the metric-basis coefficients of arriving keys; attention stays exact."""

    def __init__(self, model, rotation, layer):
        super().__init__(model, rotation, layer, sink_tokens=0)
        self.spectrum, encoder, _ = key_metric_basis(rotation)
        self.basis = mx.array(encoder.astype(np.float32))
        self.recorded: list[np.ndarray] = []
        self.keys = self.values = None

    def update_and_fetch(self, keys, values):
        self.recorded.append(np.array(self.coefficients(keys, self.offset))[0])
        self.offset += keys.shape[2]
        self.keys = keys if self.keys is None else mx.concatenate([self.keys, keys], 2)
        self.values = values if self.values is None else mx.concatenate([self.values, values], 2)
        return self.keys, self.values


def recorded_coefficients(held, bundle: str = BUNDLE):
    """Per layer, (coefficients (H, T, D) of the held-out keys after the sinks, the
    metric-weighted spectrum (H, D)), recorded through a teacher-forced pass."""
    rotations = load_cached_rotations(bundle)
    recorders = [CoefficientRecorder(held.model, rotations[i], i)
                 for i in range(len(held.model.layers))]
    held.log_probs(recorders)
    return [(np.concatenate(r.recorded, axis=1)[:, 4:], r.spectrum) for r in recorders]


def prediction_gain(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bits saved per coefficient and lag-1 correlations; y (T, d), centred."""
    prev, cur = y[:-1], y[1:]
    half = len(cur) // 2
    predictor, *_ = np.linalg.lstsq(prev[:half], cur[:half], rcond=None)
    residual = cur[half:] - prev[half:] @ predictor
    saved = 0.5 * np.log2(np.maximum(cur[half:].var(0), 1e-12)
                          / np.maximum(residual.var(0), 1e-12))
    rho = np.array([np.corrcoef(prev[:, j], cur[:, j])[0, 1] for j in range(y.shape[1])])
    return saved, rho


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    held = HeldOut(args.tokens, 256)
    rows = []
    for layer, (y, spectrum) in enumerate(recorded_coefficients(held)):
        for h in range(y.shape[0]):
            coded = water_fill_bits(spectrum[h], 2.5, 0, 8) > 0
            yc = y[h][:, coded] - y[h][:, coded].mean(0)
            saved, rho = prediction_gain(yc)
            rows.append(dict(layer=layer, head=h, coded_dims=int(coded.sum()),
                             bits_saved_mean=float(saved.mean()),
                             bits_saved_widest=saved[:4].round(3).tolist(),
                             lag1_widest=rho[:4].round(3).tolist()))
        layer_rows = rows[-y.shape[0]:]
        print(f"layer {layer:2d}: bits saved per coded dim "
              f"{np.mean([r['bits_saved_mean'] for r in layer_rows]):+.3f}, widest four "
              f"{np.mean([r['bits_saved_widest'] for r in layer_rows], axis=0).round(2)}, "
              f"lag-1 {np.mean([r['lag1_widest'] for r in layer_rows], axis=0).round(2)}")
    mean = float(np.mean([r["bits_saved_mean"] for r in rows]))
    print(f"mean over layers and heads: {mean:+.3f} bits per coded dim")
    save_results(args.json, tokens=args.tokens, rows=rows, mean_bits_saved=mean)


if __name__ == "__main__":
    main()
