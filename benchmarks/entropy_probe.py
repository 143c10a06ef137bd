"""Probe: how many bits would entropy coding save on the keys' coefficients? (CPU)

    python benchmarks/entropy_probe.py [--tokens 1024] [--bits 2.5] [--json OUT]
    python benchmarks/entropy_probe.py --kl --tokens 2048 --bits 2.5 [--json OUT]

Fixed-rate Lloyd-Max codes sit ~0.7 bits per coefficient above the Gaussian
rate-distortion bound at high rate; a uniform quantiser whose indices are entropy coded
sits ~0.25 bits above it. Default model, held-out text, shipped bundle: each layer's
pre-RoPE keys in the metric-weighted basis (+qm), bits water-filled at ``--bits`` per dim,
codebooks at 1.5× each coefficient's calibrated std (the shipped coder, without +ad).
Per coded dim: the Lloyd-Max code's error on the real coefficients, the step of a
uniform quantiser (no clipping) with the same mean squared error, and the empirical
entropy of its indices — the bits an ideal entropy coder would spend for the same MSE.
Equal MSE is not equal KL (KL follows rare large errors); this bounds the lever's size.

``--kl``: the KL itself (fake-quant). Keys of spectral:wf2.5/a4g64+qm+ad+x1.5+vh are
replaced by a uniform quantiser's values, one step per KV head for every coefficient (in
the metric-weighted basis coefficient errors add up to score errors, so equal steps are
the right allocation), the step set on the first coded chunk so that the indices'
entropy is ``--bits`` per coefficient; bits count the indices' empirical entropy per
chunk (an ideal adaptive coder: optimistic) in place of the key codes' bytes, and
also (``bits_fixed_table``) the cost under a fixed code: each dim's index frequencies from
the first coded chunk, used for every later chunk (counts + 0.01; an escape costs 24
bits).
"""

from __future__ import annotations

import argparse

import numpy as np
from lean_values_probe import nll
from probe_text import HeldOut, save_results
from sparse_outliers_probe import Repair
from temporal_probe import recorded_coefficients

from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, cache_memory, parse_method
from veloxcore.corpus import CORPUS_FILE, assets_dir, load_corpus
from veloxcore.quantizers import lloyd_max_gaussian
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)
TABLE_SPAN = 64  # indices a fixed code table holds (±)
ESCAPE_BITS = 24  # an index outside it: an escape and its value
SMOOTHING = 0.01  # added to every index count of a fixed table

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


def index_entropy(y: np.ndarray, step: float) -> np.ndarray:
    """Empirical entropy (bits) of each column's uniform-quantiser indices; y (N, D)."""
    indices = np.round(y / step).astype(np.int64)
    out = np.zeros(y.shape[1])
    for d in range(y.shape[1]):
        _, counts = np.unique(indices[:, d], return_counts=True)
        p = counts / counts.sum()
        out[d] = -(p * np.log2(p)).sum()
    return out


def index_counts(indices: np.ndarray) -> np.ndarray:
    """(D, 2·TABLE_SPAN + 1) counts of each column's indices (clipped to the span)."""
    clipped = np.clip(indices, -TABLE_SPAN, TABLE_SPAN) + TABLE_SPAN
    return np.stack([np.bincount(clipped[:, d], minlength=2 * TABLE_SPAN + 1)
                     for d in range(indices.shape[1])]).astype(np.float64)


def code_table(counts: np.ndarray) -> np.ndarray:
    smoothed = counts + SMOOTHING
    return smoothed / smoothed.sum(1, keepdims=True)


class EntropyKeys(Repair):
    """A layer's keys as uniform-quantiser values (one step per KV head), their cost the
    indices' entropy, and their cost under fixed code tables: ``tables`` given (e.g. from
    a calibration run's ``counts``), else each head's first coded chunk's."""

    def __init__(self, cache, bits: float, steps=None, tables=None):
        super().__init__(cache, 0.0)
        self.bits, self.steps, self.tables = bits, steps, tables
        self.entropy_bits = 0.0  # each chunk's own index entropy (an ideal coder)
        self.table_bits = 0.0  # under the fixed tables
        self.counts: list[np.ndarray] = []  # per head, every index seen

    def correction(self, y: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        B, H, L, D = y.shape
        if self.steps is None:  # the step whose indices' mean entropy is self.bits
            self.steps = []
            for h in range(H):
                rows = y[:, h].reshape(-1, D)
                lo, hi = 1e-4 * rows.std(), 50 * rows.std()
                for _ in range(40):
                    step = np.sqrt(lo * hi)
                    lo, hi = (step, hi) if index_entropy(rows, step).mean() > self.bits else (
                        lo, step)
                self.steps.append(np.sqrt(lo * hi))
        if self.tables is None:
            self.tables = []
        quantised = np.empty_like(y)
        for h in range(H):
            rows = y[:, h].reshape(-1, D)
            indices = np.round(rows / self.steps[h]).astype(np.int64)
            counts = index_counts(indices)
            if len(self.counts) <= h:
                self.counts.append(counts)
            else:
                self.counts[h] += counts
            if len(self.tables) <= h:
                self.tables.append(code_table(counts))
            self.entropy_bits += index_entropy(rows, self.steps[h]).sum() * rows.shape[0]
            inside = np.abs(indices) <= TABLE_SPAN
            p = self.tables[h][np.arange(D)[None, :],
                               np.clip(indices, -TABLE_SPAN, TABLE_SPAN) + TABLE_SPAN]
            self.table_bits += float(-np.log2(p).sum() + ESCAPE_BITS * (~inside).sum())
            quantised[:, h] = self.steps[h] * indices.reshape(B, L, D)
        return quantised - decoded


def calibrated_coders(held, rotations, spec: str, bits: float, tokens: int) -> list:
    """Steps and code tables from ``tokens`` tokens of the bundled calibration corpus
    (half from the end of the Python reference, half from the start of the model-written
    prose, as the corpus joins them)."""
    python_ref = load_corpus(assets_dir() / CORPUS_FILE).text
    ids = held.tokenizer.encode(load_corpus().text)
    junction = len(held.tokenizer.encode(python_ref))
    window = mx.array(ids[max(0, junction - tokens // 2): junction + tokens // 2])[None]
    caches = KVCacheBuilder.build(held.model, parse_method(spec, rotations))
    coders = [EntropyKeys(c, bits) for c in caches]
    for start in range(0, window.shape[1], held.chunk):
        mx.eval(held.model(window[:, start: start + held.chunk], cache=caches))
    return coders


def kl_rows(held, rotations, bits: float, base: bool = True,
            calibrate_tokens: int = 0) -> list[dict]:
    rows = []
    spec = f"spectral:wf{bits:g}/a4g64+qm+ad+x1.5+vh"
    calibration = (calibrated_coders(held, rotations, spec, bits, calibrate_tokens)
                   if calibrate_tokens else None)
    for entropy_coded in (False, True)[0 if base else 1:]:
        caches = KVCacheBuilder.build(held.model, parse_method(spec, rotations))
        coders = []
        if entropy_coded:
            coders = [EntropyKeys(c, bits) if calibration is None else
                      EntropyKeys(c, bits, cal.steps, [code_table(n) for n in cal.counts])
                      for c, cal in zip(caches, calibration or caches, strict=True)]
        log_probs = held.log_probs(caches)
        kl = (mx.exp(held.reference) * (held.reference - log_probs)).sum(-1)
        memory = cache_memory(caches, held.model)
        total = memory.nbytes * 8
        row = dict(method=spec + (" keys entropy-coded" if entropy_coded else ""),
                   kl=float(kl.mean()),
                   delta_ppl_pct=100 * (np.exp(nll(held, log_probs) - nll(held, held.reference))
                                        - 1))
        elements = memory.fp16_nbytes / 2
        if entropy_coded:  # the key codes and the dense stand-in out, the indices' cost in
            for c in caches:
                H, D = c.key_coder.heads, c.key_coder.dims
                total -= 8 * c.coded * H * (4 * c.key_coder.words + 4 * D)
            row["bits_fixed_table"] = (total + sum(e.table_bits for e in coders)) / elements
            total += sum(e.entropy_bits for e in coders)
        row["bits"] = total / elements
        rows.append(row)
        print(f"{row['method']:56s} bits {row['bits']:.3f} (with a fixed table: "
              f"{row.get('bits_fixed_table', row['bits']):.3f})  KL {row['kl']:.4f}  "
              f"ΔPPL {row['delta_ppl_pct']:+.2f}%", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--kl", action="store_true")
    ap.add_argument("--calibrate-tokens", type=int, default=0,
                    help="--kl: steps and code tables from this many tokens of the bundled "
                         "calibration corpus (default: from the first coded chunk)")
    ap.add_argument("--no-base", action="store_true",
                    help="--kl: only the entropy-coded keys (not the scalar-coded base)")
    ap.add_argument("--json")
    args = ap.parse_args()
    held = HeldOut(args.tokens, 256)
    if args.kl:
        rows = kl_rows(held, load_cached_rotations(BUNDLE, model=held.model), args.bits,
                       base=not args.no_base, calibrate_tokens=args.calibrate_tokens)
        save_results(args.json, tokens=args.tokens, bits=args.bits, rows=rows)
        return
    rows = []
    for layer, (y, spectra) in enumerate(recorded_coefficients(held, BUNDLE)):
        fixed = entropy = 0.0
        dims = 0
        for h in range(y.shape[0]):
            spectrum = spectra[h]
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
    per_dim = saved * np.mean([r["coded_dims"] for r in rows]) / (y.shape[0] * y.shape[2])
    print(f"mean saving: {saved:.3f} bits per coded dim, {per_dim:.3f} per key dim")
    save_results(args.json, tokens=args.tokens, bits=args.bits, rows=rows,
                 saved_per_coded_dim=float(saved), saved_per_key_dim=float(per_dim))


if __name__ == "__main__":
    main()
