"""Probe: key codebooks fitted to the prompt's own coefficients (CPU, fake-quant).

    python benchmarks/codebook_adapt_probe.py [--tokens 2048] [--specs S1,S2] [--json OUT]

The key codebooks are Gaussian Lloyd-Max levels stretched 1.5× (``+x1.5``): held-out text
has heavier tails than the calibration corpus and clipping them costs more than the coarser
steps. ``+ad`` already re-estimates each dim's mean and variance on the prompt; this
probe also re-fits the *shape*: on the first tokens a layer codes (the prompt's first
chunk), its coefficients are normalised by their dims' scales and pooled by width over
dims and heads, and a Lloyd-Max codebook is fitted per width (20 Lloyd iterations from the
Gaussian levels). Later tokens use the fitted levels. KL is reported over the tokens after
the first chunk (out of sample) and over all tokens. ``--margin`` widens the fitted
codebook's outer levels (robustness against later, larger coefficients).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from probe_text import HeldOut, save_results

from veloxcore import caches as cache_module
from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method
from veloxcore.quantizers import LEVELS, DimCoder, lloyd_max_gaussian

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def fit_levels(samples: np.ndarray, bits: int, iterations: int = 20) -> np.ndarray:
    """Lloyd-Max levels of ``samples`` (1-D) with 2^bits levels, from the Gaussian ones."""
    levels = lloyd_max_gaussian(bits)[0].astype(np.float64)
    for _ in range(iterations):
        edges = (levels[1:] + levels[:-1]) / 2
        cell = np.searchsorted(edges, samples)
        sums = np.bincount(cell, weights=samples, minlength=levels.size)
        counts = np.bincount(cell, minlength=levels.size)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels)
        levels.sort()
    return levels


class FittedCoder(DimCoder):
    """A DimCoder that re-fits its unit codebook per width on the first vectors it codes."""

    margin = 1.0
    min_samples = 64

    def __init__(self, bits, scales):
        super().__init__(bits, scales)
        self.fitted = False

    def encode(self, y):
        if not self.fitted:
            self.fitted = True
            self._fit(np.array(y, dtype=np.float64))
        return super().encode(y)

    def _fit(self, y: np.ndarray) -> None:
        H, D = self.bits.shape
        unit = y / self.scales[None, :, None, :]
        levels = np.array(self.levels).reshape(H, D, LEVELS)
        thresholds = np.array(self.thresholds).reshape(H, D, LEVELS)
        for b in np.unique(self.bits):
            if b == 0:
                continue
            heads, dims = np.nonzero(self.bits == b)
            samples = unit[:, heads, :, dims].reshape(-1)
            if samples.size < self.min_samples * (1 << b):
                continue  # too few to fit this width: keep the Gaussian levels
            lv = fit_levels(samples, int(b))
            lv = lv * np.where(np.abs(lv) >= np.abs(lv).max() * 0.99, self.margin, 1.0)
            th = (lv[1:] + lv[:-1]) / 2
            for h, d in zip(heads, dims, strict=True):
                levels[h, d, : lv.size] = lv * self.scales[h, d]
                thresholds[h, d, : th.size] = th * self.scales[h, d]
        self.levels = mx.array(levels.reshape(-1).astype(np.float32))
        self.thresholds = mx.array(thresholds.reshape(-1).astype(np.float32))


class WidthScaledCoder(DimCoder):
    """The Gaussian codebook with its stretch set per width: ``stretch[b]`` replaces the
    configuration's inflation (1.5) for dims of width b (``lo:hi`` variants)."""

    stretch: dict[int, float] = {}

    def __init__(self, bits, scales):
        factor = np.vectorize(lambda b: self.stretch.get(int(b), 1.5) / 1.5)(bits)
        super().__init__(bits, np.asarray(scales) * factor)


def width_stretch(variant: str) -> dict[int, float]:
    """"w1.25:1.5" → widths 1–2 at 1.25×, widths ≥ 3 at 1.5×."""
    low, high = (float(x) for x in variant[1:].split(":"))
    return {b: (low if b <= 2 else high) for b in range(1, 9)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--specs", default="spectral:wf2.5/a8g64+qm+ad+x1.5+vh,"
                    "spectral:wf2.5/a4g64+qm+ad+x1.5+vh+la")
    ap.add_argument("--variants", default="gaussian,fitted",
                    help="gaussian, fitted, fitted-m1.1 (outer levels ×1.1), w1.25:1.5 "
                    "(stretch 1.25× at widths 1–2, 1.5× at 3+), ...")
    ap.add_argument("--json")
    args = ap.parse_args()
    held_out = HeldOut(args.tokens, args.chunk)
    model = held_out.model
    rotations = load_cached_rotations(BUNDLE, model)
    plain = cache_module.make_coder
    rows = []
    for spec in args.specs.split(","):
        for variant in args.variants.split(","):
            if variant.startswith("w"):
                WidthScaledCoder.stretch = width_stretch(variant)
                cache_module.make_coder = WidthScaledCoder
            if variant.startswith("fitted"):
                FittedCoder.margin = float(variant.partition("-m")[2] or 1.0)
                # Only the keys' coders are fitted (affine values do not use make_coder).
                cache_module.make_coder = FittedCoder
            try:
                caches = KVCacheBuilder.build(model, parse_method(spec, rotations))
                kl = np.array(held_out.kl(caches))
            finally:
                cache_module.make_coder = plain
            row = dict(spec=spec, variant=variant, kl_all=float(kl.mean()),
                       kl_after_first_chunk=float(kl[args.chunk:].mean()))
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_results(args.json, rows=rows)


if __name__ == "__main__":
    main()
