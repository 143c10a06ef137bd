"""Spectral analysis of key/value covariances: participation ratio, spectral gap,
water-filled bit allocation and its predicted distortion. Pure numpy."""

from __future__ import annotations

import numpy as np

from .errors import VeloxError

# Eigenvalues below this fraction of the largest are treated as this fraction, so
# that a numerically-zero tail neither divides by zero nor creates fake gaps.
EIGENVALUE_FLOOR = 1e-10


def _spectrum(eigenvalues) -> np.ndarray:
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise VeloxError(f"expected a non-empty 1-D spectrum, got shape {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise VeloxError("the spectrum contains NaN or infinite values")
    return lam


def compute_participation_ratio(eigenvalues) -> float:
    """(Σλ)² / Σλ²: the effective number of dimensions (1 ≤ PR ≤ d).

    Negative eigenvalues (round-off of a PSD matrix) are clipped to zero; an
    all-zero spectrum has participation ratio 0.
    """
    lam = np.clip(_spectrum(eigenvalues), 0.0, None)
    sq = float(np.sum(lam**2))
    return float(np.sum(lam) ** 2 / sq) if sq > 0 else 0.0


def compute_spectral_gap(eigenvalues, energy: float = 0.99) -> int:
    """The signal/noise split: the number k ∈ [1, d−1] of leading "signal" dimensions.

    Rule: sort the spectrum in descending order, floor it at
    ``EIGENVALUE_FLOOR · λ₁``, and pick the k that maximises log(λ_k / λ_{k+1}),
    the largest relative drop between consecutive eigenvalues, among
    k ≤ k_E, where k_E is the smallest k whose leading eigenvalues hold
    ``energy`` (default 99%) of the trace — so a drop deep in the noise tail is
    never taken for the signal boundary. Ties go to the smallest k; a flat
    spectrum gives k = 1.
    """
    lam = np.sort(np.clip(_spectrum(eigenvalues), 0.0, None))[::-1]
    d = lam.size
    if d < 2:
        raise VeloxError("a spectral gap needs at least two eigenvalues")
    top = lam[0]
    if top <= 0:
        return 1
    floored = np.maximum(lam, top * EIGENVALUE_FLOOR)
    drops = np.log(floored[:-1]) - np.log(floored[1:])
    cumulative = np.cumsum(lam) / np.sum(lam)
    k_energy = int(np.searchsorted(cumulative, energy * (1 - 1e-12))) + 1
    return int(np.argmax(drops[: min(max(k_energy, 1), d - 1)])) + 1


def water_fill_bits(eigenvalues, target_avg_bits: float, min_bits: int = 1,
                    max_bits: int = 8) -> np.ndarray:
    """Integer bits per dimension spending exactly round(target · d) bits.

    Minimises Σ λᵢ·4^(−bᵢ) (the high-rate distortion of a scalar quantiser with
    variance λᵢ) subject to min_bits ≤ bᵢ ≤ max_bits. Each extra bit on
    dimension i lowers the objective by ¾·λᵢ·4^(−bᵢ), a gain that shrinks with
    bᵢ, so handing out bits one at a time to the largest gain is optimal. Ties
    go to the lower index, so a dimension never gets more bits than one with a
    strictly larger eigenvalue.
    """
    lam = np.clip(_spectrum(eigenvalues), 0.0, None)
    d = lam.size
    if min_bits < 0 or max_bits < min_bits:
        raise VeloxError(f"invalid bit range [{min_bits}, {max_bits}]")
    budget = int(round(target_avg_bits * d))
    if not d * min_bits <= budget <= d * max_bits:
        raise VeloxError(
            f"target {target_avg_bits} bits/dim ({budget} bits over {d} dims) is infeasible "
            f"with bits in [{min_bits}, {max_bits}]: need between {min_bits} and {max_bits} "
            "bits per dimension on average"
        )
    bits = np.full(d, min_bits, dtype=np.int64)
    extra = budget - d * min_bits
    if extra == 0:
        return bits
    # Every possible increment: dimension i from b to b+1 gains ¾·λᵢ·4^(−b). Gains
    # shrink with b, so the greedy's picks are exactly the `extra` largest gains;
    # ties: larger eigenvalue, then lower index, then lower b (a dimension's own
    # increments are taken in order).
    steps = np.arange(min_bits, max_bits)
    gain = (lam[:, None] * 4.0 ** (-steps[None, :])).ravel()
    dim = np.repeat(np.arange(d), steps.size)
    level = np.tile(steps, d)
    order = np.lexsort((level, dim, -lam[dim], -gain))
    np.add.at(bits, dim[order[:extra]], 1)
    return bits


def predicted_distortion(eigenvalues, bits) -> float:
    """Σ λᵢ·4^(−bᵢ) / Σ λᵢ: relative MSE predicted by the high-rate model."""
    lam = np.clip(_spectrum(eigenvalues), 0.0, None)
    b = np.asarray(bits, dtype=np.float64)
    total = float(lam.sum())
    return float(np.sum(lam * 4.0 ** (-b)) / total) if total > 0 else 0.0


def allocate_bit_plan(rotations, avg_bits: float, min_bits: int = 1, max_bits: int = 8,
                      value_avg_bits: float | None = None) -> dict:
    """Water-filled bits per layer, KV head and dimension, for keys and values.

    Returns a JSON-ready plan with the predicted relative distortion of each head.
    """
    value_avg_bits = avg_bits if value_avg_bits is None else value_avg_bits
    layers = []
    for rot in rotations:
        entry = {"layer": rot.layer}
        for part, spectra, target in (("keys", rot.key_eigenvalues, avg_bits),
                                      ("values", rot.value_eigenvalues, value_avg_bits)):
            bits = [water_fill_bits(lam, target, min_bits, max_bits) for lam in spectra]
            entry[part] = [b.tolist() for b in bits]
            entry[f"{part}_distortion"] = [predicted_distortion(lam, b)
                                           for lam, b in zip(spectra, bits, strict=True)]
        layers.append(entry)
    return {"key_avg_bits": avg_bits, "value_avg_bits": value_avg_bits,
            "min_bits": min_bits, "max_bits": max_bits, "layers": layers}
