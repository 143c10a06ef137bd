"""Probe: finer key codebooks with the worst-coded coefficients stored exactly (CPU).

    python benchmarks/sparse_outliers_probe.py [--tokens 2048] [--chunk 256] [--json OUT]

The default key codebooks are Lloyd-Max levels stretched 1.5× (`+x1.5`): at 1.0× the
levels are finer but the tails clip, and clipped coefficients cost more KL than the finer
levels save. Dense-and-sparse coding (as KVQuant does for outlier channels) would keep
the finer codebook and store the few coefficients it codes worst exactly, as (dim index,
fp16 value) pairs. Fake-quant: the real cache codes keys; for each coded chunk the
fraction ``f`` of key coefficients with the largest coding error (in the metric-weighted
basis, where coefficient errors add up to score errors) is repaired exactly. Their cost
is counted at 24 bits each (6-bit dim, fp16 value, 2 bits of per-token count) on top of
the cache's real bytes. Default model, held-out text, shipped bundle,
spectral:wfK/a4g64+qm+ad+xS+vh+la.
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_text import HeldOut, save_results

from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, cache_memory, parse_method

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"
BITS_PER_OUTLIER = 24


class Repair:
    """Wraps one layer's cache: its key codes get a sparse exact repair."""

    def __init__(self, cache, fraction: float):
        self.cache, self.fraction = cache, fraction
        self.count = 0  # coefficients repaired
        self.encode_original, self.decode_original = cache.encode, cache.decode
        cache.encode, cache.decode = self.encode, self.decode

    def encode(self, keys, values, position):
        cache = self.cache
        parts = self.encode_original(keys, values, position)
        k = cache.inverter(keys, position) if cache.inverter is not None else keys
        y = (k.astype(mx.float32) - cache.key_mean) @ cache.key_basis
        n = 2 if cache.token_scale else 1
        decoded = cache._decode_part(cache.key_coder, parts[:n])
        return (*parts, mx.array(self.correction(np.array(y), np.array(decoded))
                                 .astype(np.float32)))

    def correction(self, y: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """What is added to the decoded coefficients: the exact error of the worst-coded
        fraction."""
        error = y - decoded
        size = np.abs(error)
        keep = int(round(self.fraction * size.size))
        if not keep:
            return np.zeros_like(size)
        cut = np.partition(size.reshape(-1), size.size - keep)[size.size - keep]
        mask = size >= cut
        self.count += int(mask.sum())
        return np.where(mask, error, 0.0)

    def decode(self, parts, position):
        keys, values = self.decode_original(parts[:-1], position)
        delta = parts[-1] @ self.cache.key_decoder.swapaxes(-1, -2)
        if self.cache.inverter is not None:
            delta = self.cache._rope_keys(delta, position)
        return keys + delta, values


def run(held, rotations, spec: str, fraction: float) -> dict:
    caches = KVCacheBuilder.build(held.model, parse_method(spec, rotations))
    repairs = [Repair(c, fraction) for c in caches] if fraction else []
    log_probs = held.log_probs(caches)
    kl = (mx.exp(held.reference) * (held.reference - log_probs)).sum(-1)
    memory = cache_memory(caches, held.model)
    elements = memory.fp16_nbytes / 2
    # The dense stand-in for the repair (float32 per coefficient) is not what a cache
    # would hold: take it out, count the sparse pairs instead.
    dense = sum(4 * c.coded * c.key_coder.heads * c.key_coder.dims for c in caches) if (
        repairs) else 0
    sparse_bits = BITS_PER_OUTLIER * sum(r.count for r in repairs)
    bits = ((memory.nbytes - dense) * 8 + sparse_bits) / elements
    return dict(method=spec, outlier_fraction=fraction, kl=float(kl.mean()), bits=bits,
                outliers=sum(r.count for r in repairs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--runs", default="2.5:1.5:0,3:1.5:0,2.5:1.0:0,2.5:1.0:0.01,2.5:1.2:0.005,"
                                      "2.5:1.0:0.02",
                    help="key bits : codebook stretch : repaired fraction, comma-separated")
    ap.add_argument("--json")
    args = ap.parse_args()
    held = HeldOut(args.tokens, args.chunk)
    rotations = load_cached_rotations(BUNDLE, model=held.model)
    rows = []
    for run_spec in args.runs.split(","):
        bits, stretch, fraction = run_spec.split(":")
        spec = f"spectral:wf{bits}/a4g64+qm+ad+x{stretch}+vh+la"
        row = run(held, rotations, spec, float(fraction))
        rows.append(row)
        print(f"{spec:44s} repaired {float(fraction):.4f}: bits {row['bits']:.3f}  "
              f"KL {row['kl']:.4f}", flush=True)
    save_results(args.json, tokens=args.tokens, chunk=args.chunk, rows=rows)


if __name__ == "__main__":
    main()
