"""Probe: trellis-coded keys (TCQ) against scalar Lloyd-Max codes at equal bits (CPU).

    python benchmarks/trellis_probe.py [--tokens 1024] [--bits 2.5,3] [--json OUT]

Keys only (values exact), shipped bundle, metric-weighted pre-RoPE basis (+qm), bits
water-filled on its spectrum, codebooks at 1.5× each coefficient's calibrated std. Scalar:
each coefficient on the Lloyd-Max codebook of its width b. Trellis (Marcellin & Fischer's
TCQ, 8 states): a codebook of 2^(b+1) Lloyd-Max levels split into four subsets by index
mod 4; each of the trellis's branches allows one subset, so a coefficient costs 1 branch
bit plus b − 1 index bits — the same b bits — and Viterbi picks the path through a head's
coefficients (in spectral order) with the least error. Fake-quant: bits are counted, not
packed. The question: how much of the ~0.5 bit per key dim the quality bar needs can a
small trellis buy?
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_text import HeldOut, PreRopeKeyProbe, save_results

from veloxcore import caches as cache_module
from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, key_metric_basis, parse_method
from veloxcore.quantizers import DimCoder, lloyd_max_gaussian
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"
INFLATION = 1.5
# 8-state trellis: from state s, branch bit u goes to (2s + u) mod 8 and uses subset
# SUBSET[s][u]; even states use D0/D2, odd states D1/D3 (branches into a state share a
# union of two subsets, as Ungerboeck's set partitioning needs).
SUBSET = np.array([[0, 2], [1, 3], [2, 0], [3, 1], [2, 0], [3, 1], [0, 2], [1, 3]])
NEXT = np.array([[(2 * s + u) % 8 for u in (0, 1)] for s in range(8)])


def levels(bits: int) -> np.ndarray:
    return lloyd_max_gaussian(bits)[0] if bits else np.zeros(1)


def scalar_code(y: np.ndarray, bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest Lloyd-Max level per coefficient; y (N, D), bits/scale (D,)."""
    out = np.zeros_like(y)
    for d in range(y.shape[1]):
        book = levels(int(bits[d])) * scale[d]
        out[:, d] = book[np.abs(y[:, d:d + 1] - book[None]).argmin(1)]
    return out


def trellis_code(y: np.ndarray, bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Viterbi over the coded dims of each row; y (N, D). Returns the decoded values
    (8-bit dims, whose doubled codebook would need 9 bits, are coded scalar)."""
    N, D = y.shape
    dims = [d for d in range(D) if 0 < bits[d] < 8]
    cost = np.full((N, 8), np.inf)
    cost[:, 0] = 0.0  # start in state 0
    back = []  # per step: (previous state, chosen value) for each (row, state)
    for d in dims:
        book = levels(int(bits[d]) + 1) * scale[d]
        # nearest level of each subset: (N, 4)
        err = (y[:, d:d + 1] - book[None]) ** 2
        best_val = np.zeros((N, 4))
        best_err = np.zeros((N, 4))
        for k in range(4):
            e = err[:, k::4]
            i = e.argmin(1)
            best_err[:, k] = e[np.arange(N), i]
            best_val[:, k] = book[k::4][i]
        new = np.full((N, 8), np.inf)
        prev = np.zeros((N, 8), dtype=np.int64)
        val = np.zeros((N, 8))
        for s in range(8):
            for u in (0, 1):
                t, k = NEXT[s, u], SUBSET[s, u]
                c = cost[:, s] + best_err[:, k]
                better = c < new[:, t]
                new[:, t] = np.where(better, c, new[:, t])
                prev[:, t] = np.where(better, s, prev[:, t])
                val[:, t] = np.where(better, best_val[:, k], val[:, t])
        cost = new
        back.append((prev, val))
    out = scalar_code(y, np.where(bits >= 8, bits, 0), scale)
    state = cost.argmin(1)
    rows = np.arange(N)
    for d, (prev, val) in zip(reversed(dims), reversed(back), strict=True):
        out[:, d] = val[rows, state]
        state = prev[rows, state]
    return out


class TrellisCoder(DimCoder):
    """A DimCoder whose "codes" are the trellis-decoded coefficients (fake-quant): the
    cache's plan (bits, scales, adaptation) is untouched, only the quantiser differs."""

    def encode(self, y):
        B, H, L, D = y.shape
        flat = np.array(y, dtype=np.float64)
        out = np.stack([trellis_code(flat[b, h], self.bits[h], self.scales[h])
                        for b in range(B) for h in range(H)]).reshape(B, H, L, D)
        return mx.array(out.astype(np.float32))

    def decode(self, codes):
        return codes


class TrellisKeys(PreRopeKeyProbe):
    """Keys in the metric-weighted pre-RoPE basis, coded per head by ``trellis_code`` or
    ``scalar_code``; values exact."""

    def __init__(self, model, rotation, layer, key_bits, trellis):
        super().__init__(model, rotation, layer)
        spectrum, enc, dec = key_metric_basis(rotation)
        # at most 7 bits: a trellis codebook has twice the levels of its width
        self.plan_bits = np.stack([water_fill_bits(s, key_bits, 0, 7) for s in spectrum])
        self.scale = INFLATION * np.sqrt(np.maximum(spectrum, 1e-12))
        self.basis, self.decoder = (mx.array(m.astype(np.float32)) for m in (enc, dec))
        self.code = trellis_code if trellis else scalar_code

    def encode(self, keys, values, position):
        y = np.array(self.coefficients(keys, position), dtype=np.float64)
        B, H, L, D = y.shape
        out = np.stack([self.code(y[0, h], self.plan_bits[h], self.scale[h]) for h in range(H)])
        return mx.array(out[None].astype(np.float32)), values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--bits", default="2.5,3", help="bare keys-only probes (no +ad)")
    ap.add_argument("--specs", default="spectral:wf2.5/a8g64+qm+ad+x1.5+vh,"
                    "spectral:wf2.5/a4g64+qm+ad+x1.5+vh+la",
                    help="real cache configurations, run with each quantiser")
    ap.add_argument("--json")
    args = ap.parse_args()
    held_out = HeldOut(args.tokens, 512)
    model = held_out.model
    rotations = load_cached_rotations(BUNDLE, model)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(20000, 16))
    for b in (1, 2, 3):  # MSE per unit variance on Gaussian data, scale 1
        one = np.ones(16)
        bits = np.full(16, b)
        ms, mt = (float(np.mean((f(g, bits, one) - g) ** 2)) for f in (scalar_code, trellis_code))
        print(f"N(0,1), {b} bits: Lloyd-Max MSE {ms:.4f}, trellis {mt:.4f} "
              f"({10 * np.log10(ms / mt):.2f} dB)", flush=True)
    rows = []
    # The real cache (+qm, +ad, its plan) with the trellis in place of the key quantiser.
    plain = cache_module.make_coder
    for spec in [s for s in args.specs.split(",") if s]:
        for trellis in (False, True):
            cache_module.make_coder = (lambda b, s: TrellisCoder(b, s)) if trellis else plain
            try:
                built = KVCacheBuilder.build(model, parse_method(spec, rotations))
                kl = float(held_out.kl(built).mean().item())
            finally:
                cache_module.make_coder = plain
            rows.append(dict(spec=spec, trellis=trellis, kl=kl))
            print(f"{spec}, {'trellis' if trellis else 'Lloyd-Max'}: KL {kl:.4f}", flush=True)
    for key_bits in [float(b) for b in args.bits.split(",") if b]:
        for trellis in (False, True):
            caches = [TrellisKeys(model, rotations[i], i, key_bits, trellis)
                      for i in range(len(model.layers))]
            kl = float(held_out.kl(caches).mean().item())
            rows.append(dict(key_bits=key_bits, trellis=trellis, kl=kl))
            print(f"keys only, {key_bits:g} bits, {'trellis' if trellis else 'Lloyd-Max'}: "
                  f"KL {kl:.4f}", flush=True)
    save_results(args.json, tokens=args.tokens, rows=rows)


if __name__ == "__main__":
    main()
