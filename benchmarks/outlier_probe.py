"""Probe: dense-and-sparse key coding (a few exact outlier coefficients per token).

    python benchmarks/outlier_probe.py [--tokens 1024] [--json OUT]

The spectral key coder inflates its codebook scale 2x over the calibrated standard
deviation because held-out coefficients sometimes reach 20-30x the calibrated
variance, and clipping them costs more than coarser steps. This probe asks
whether keeping the worst-coded ``n`` coefficients of each (token, head) exact
(fp16 value + 6-bit index = 22 bits each) lets the codebook shrink back to 1x and
win at equal real bits. Keys only (values exact), shipped pre-RoPE bundle,
query-aware water-filled bits, teacher-forced in 64-token chunks. Fake-quant: the
outliers' bits are added to the reported key bits, not stored.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from probe_text import HeldOut, PreRopeKeyProbe

from veloxcore import load_cached_rotations
from veloxcore.quantizers import DimCoder
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

CHUNK = 64
BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"
OUTLIER_BITS = 16 + 6


class SparseOutlierKeys(PreRopeKeyProbe):
    """Keys in the centred pre-RoPE basis, ``alpha``x calibrated std codebooks, the
    ``outliers`` worst-coded coefficients per (token, head) kept exact; values exact."""

    def __init__(self, model, rotation, layer: int, key_bits: float, alpha: float,
                 outliers: int):
        super().__init__(model, rotation, layer)
        lam = rotation.key_eigenvalues
        omega = rotation.key_importance
        bits = np.stack([water_fill_bits(v, key_bits, 0, 8) for v in lam * omega])
        self.mean_bits = float(bits.mean())
        self.coder = DimCoder(bits, alpha * np.sqrt(np.maximum(lam, 1e-12)))
        self.weight = mx.array(omega[None, :, None, :].astype(np.float32))
        self.std = mx.array(np.sqrt(np.maximum(lam, 1e-12))[None, :, None, :]
                            .astype(np.float32))
        self.outliers = outliers
        self.tail = []

    def encode(self, keys, values, position):
        y = self.coefficients(keys, position)
        z = mx.abs(y) / self.std
        self.tail.append(mx.stack([(z > t).astype(mx.float32).mean() for t in (2, 3, 4, 6)]))
        coded = self.coder.dequantize(self.coder.quantize(y))
        if self.outliers:
            score = mx.square(y - coded) * self.weight
            index = mx.argpartition(-score, kth=self.outliers - 1, axis=-1)[..., : self.outliers]
            exact = mx.take_along_axis(y, index, axis=-1).astype(mx.float16).astype(mx.float32)
            coded = mx.put_along_axis(coded, index, exact, axis=-1)
        return coded, values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args()
    held_out = HeldOut(args.tokens, CHUNK)
    model = held_out.model
    rotations = load_cached_rotations(BUNDLE, model=model)
    rows = []
    for key_bits, alpha, outliers in [(3, 2.0, 0), (3, 1.5, 0), (3, 1.0, 1), (3, 1.25, 1),
                                      (3, 1.5, 1), (3, 1.0, 2), (3, 1.25, 2), (2.5, 1.25, 1),
                                      (3.5, 2.0, 0), (2.5, 2.0, 0)]:
        caches = [SparseOutlierKeys(model, rotations[i], i, key_bits, alpha, outliers)
                  for i in range(len(model.layers))]
        kl = held_out.kl(caches).mean().item()
        head_dim = rotations[0].head_dim
        bits = np.mean([c.mean_bits for c in caches]) + outliers * OUTLIER_BITS / head_dim
        tail = mx.stack([mx.stack(c.tail).mean(0) for c in caches]).mean(0).tolist()
        row = {"key_bits": key_bits, "alpha": alpha, "outliers": outliers,
               "key_bits_real": round(float(bits), 3), "kl": kl,
               "fraction_beyond_2_3_4_6_std": tail}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
