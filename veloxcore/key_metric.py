"""Key bases that minimise the error queries see, not the error of the keys.

A key enters attention only through scores q·k. For a pre-RoPE key error e, the score
error against a query d tokens later is qᵀ·R(−dθ)·e, so the error that matters is
eᵀ·M·e with M = E_d E_q[R(dθ)·q·qᵀ·R(−dθ)]: the queries' second moment averaged over
relative positions (weighted ∝ 1/(d + 1): near tokens carry most attention). Pairs that
RoPE turns fast average out to their pair energy (what ``key_importance`` assumes), but
slow pairs barely turn even over thousands of tokens, so cross terms between them survive
— and keys keep most of their energy there.

Coding the whitened key M^½·(k − μ) in its own PCA basis gives independent coefficient
errors whose squares add up to exactly that score error, and by Hadamard's inequality
the product of its spectrum is the least any orthogonal key basis with per-dim weights
can reach. The basis is no longer orthogonal: keys are coded with E = M^½·U and decoded
with G = M^-½·U (k = μ + c·Gᵀ).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Relative distances the metric averages over: 0 … span−1, weighted ∝ 1/(d + 1)
# (BENCHMARKS.md, "Metric-weighted key basis": at 8k this beat uniform weightings over
# 256 or 4,096 tokens and matched a harmonic one over 65,536).
DEFAULT_SPAN = 8192
DEFAULT_HARMONIC = True
# Ridge on the metric, relative to its mean eigenvalue: directions no query looks at get
# few bits rather than an unbounded decoder (0.001–0.3 measured alike at 8k).
RIDGE = 0.1


def rope_pairs(rope, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(perm, theta, amp) of a RoPE module: ``perm`` lists dims so that each rotated
    pair is adjacent (pair i = perm[2i], perm[2i+1]); pair i turns by pos·theta[i]
    and is scaled by amp[i]. Unrotated dims pair up with theta 0, amp 1.

    Checked against the module itself at two positions; a module whose angles are
    not linear in the position is refused (callers fall back to the reference).
    """
    dims = int(getattr(rope, "dims", getattr(rope, "dim", head_dim)))
    traditional = bool(getattr(rope, "traditional", False))
    if traditional:
        first, second = np.arange(0, dims, 2), np.arange(1, dims, 2)
    else:
        first, second = np.arange(dims // 2), np.arange(dims // 2, dims)
    rest = np.arange(dims, head_dim)
    first = np.concatenate([first, rest[0::2]])
    second = np.concatenate([second, rest[1::2]])
    perm = np.stack([first, second], axis=1).reshape(-1)
    # Angle and amplitude from the module at position 1 (e_a -> amp·(cos θ, sin θ)).
    eye = mx.eye(head_dim, dtype=mx.float32).reshape(1, head_dim, 1, head_dim)
    at1 = np.array(rope(eye, offset=1).reshape(head_dim, head_dim))
    cos1 = at1[first, first]
    sin1 = at1[first, second]
    amp = np.sqrt(cos1**2 + sin1**2)
    theta = np.arctan2(sin1, cos1).astype(np.float64)
    base = getattr(rope, "base", None)
    if isinstance(rope, nn.RoPE) and base:
        # nn.RoPE: theta_i = scale · base^(−2i/dims), exact rather than measured.
        exact = float(getattr(rope, "scale", 1.0)) * float(base) ** (
            -np.arange(dims // 2, dtype=np.float64) * 2 / dims)
        theta[: dims // 2] = exact
    theta[dims // 2:] = 0.0
    # Verify at a far position.
    far = 3001
    at_far = np.array(rope(eye, offset=far).reshape(head_dim, head_dim))
    expect_cos = amp * np.cos(far * theta)
    expect_sin = amp * np.sin(far * theta)
    err = max(np.abs(at_far[first, first] - expect_cos).max(),
              np.abs(at_far[first, second] - expect_sin).max())
    if not err < 2e-3:
        raise ValueError(f"RoPE angles are not linear in the position (error {err:.2g})")
    return perm.astype(np.int32), theta.astype(np.float32), amp.astype(np.float32)


def distance_weights(span: int, harmonic: bool) -> np.ndarray:
    """Weights of relative distances 0 … span−1: uniform, or ∝ 1/(d + 1) (attention
    falls off with distance, so near tokens meet most queries' weight)."""
    w = 1.0 / np.arange(1, span + 1) if harmonic else np.ones(span)
    return w / w.sum()


@functools.lru_cache(maxsize=8)
def _mean_rotations(theta: tuple[float, ...], span: int, harmonic: bool):
    """(cos, sin) weighted means over d of (θⱼ − θₗ)·d and (−θⱼ − θₗ)·d, each (P, P):
    the same for every layer of a model, so computed once; summed in chunks of
    distances to keep memory at P²·CHUNK."""
    t = np.asarray(theta, dtype=np.float64)
    weights = distance_weights(span, harmonic)
    out = []
    for phi in (t[:, None] - t[None, :], -t[:, None] - t[None, :]):
        cos, sin = np.zeros_like(phi), np.zeros_like(phi)
        for start in range(0, span, 1024):
            d = np.arange(start, min(start + 1024, span), dtype=np.float64)
            angles = phi[..., None] * d
            cos += np.cos(angles) @ weights[start: start + d.size]
            sin += np.sin(angles) @ weights[start: start + d.size]
        out += [cos, sin]
    return tuple(out)


def position_averaged_metric(moments: np.ndarray, perm: np.ndarray, theta: np.ndarray,
                             amp: np.ndarray, span: int = DEFAULT_SPAN,
                             harmonic: bool = DEFAULT_HARMONIC) -> np.ndarray:
    """E_d[R(dθ)·M·R(−dθ)] for second moments ``moments`` (..., D, D) in the model's dim
    order; RoPE pair i is dims perm[2i], perm[2i+1], turning by θᵢ per position and
    scaled by amp_i (on queries and keys alike).

    Each 2×2 block X of pairs (j, l) splits into a rotation-like part C (commutes with
    rotations) and a reflection-like part S (R(a)·S = S·R(−a)), so the average is
    C·R̄(θⱼ − θₗ) + S·R̄(−θⱼ − θₗ), with R̄(φ) the mean rotation by φ·d.
    """
    D = moments.shape[-1]
    P = D // 2
    m = moments[..., perm[:, None], perm[None, :]].astype(np.float64)
    x = m.reshape(*m.shape[:-2], P, 2, P, 2).swapaxes(-3, -2)  # (..., j, l, 2, 2)
    a, b, c, d = x[..., 0, 0], x[..., 0, 1], x[..., 1, 0], x[..., 1, 1]
    cp, cq = (a + d) / 2, (c - b) / 2  # C = cp·I + cq·[[0,-1],[1,0]]
    sr, ss = (a - d) / 2, (b + c) / 2  # S = sr·diag(1,-1) + ss·[[0,1],[1,0]]
    key = tuple(float(t) for t in np.asarray(theta, dtype=np.float64))
    cos_m, sin_m, cos_p, sin_p = _mean_rotations(key, span, harmonic)
    # C·R̄(φ) with R̄ = [[c,-s],[s,c]]: rotation-like again, angle adds.
    c0, c1 = cp * cos_m - cq * sin_m, cp * sin_m + cq * cos_m
    # S·R̄(φ): reflection-like again.
    s0, s1 = sr * cos_p + ss * sin_p, ss * cos_p - sr * sin_p
    out = np.empty_like(x)
    out[..., 0, 0], out[..., 1, 1] = c0 + s0, c0 - s0
    out[..., 0, 1], out[..., 1, 0] = -c1 + s1, c1 + s1
    # RoPE scales the query and the key alike: pair j's score term carries amp_j².
    amp2 = np.asarray(amp, dtype=np.float64) ** 2
    out *= (amp2[:, None] * amp2[None, :])[..., None, None]
    pair_order = out.swapaxes(-3, -2).reshape(*m.shape)
    result = np.empty_like(pair_order)
    result[..., perm[:, None], perm[None, :]] = pair_order
    return result


def metric_basis(eigenvalues: np.ndarray, eigenvectors: np.ndarray, metric: np.ndarray,
                 ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spectrum (H, D) descending, encoder E (H, D, D), decoder G (H, D, D)) of keys with
    covariance V·diag(λ)·Vᵀ under ``metric`` (H, D, D): coefficients c = (k − μ)·E have
    variances ``spectrum`` and k = μ + c·Gᵀ; E and G map original dims × coefficients."""
    H, D = eigenvalues.shape
    spectra, encoders, decoders = [], [], []
    for lam, V, M in zip(eigenvalues.astype(np.float64), eigenvectors.astype(np.float64),
                         metric.astype(np.float64), strict=True):
        w, Q = np.linalg.eigh((M + M.T) / 2)
        # Unit mean eigenvalue: coefficients keep the keys' own scale (fp16 kernels).
        w = np.maximum(w, 0) / max(w.mean(), 1e-30) + ridge
        root, inv_root = Q @ np.diag(np.sqrt(w)) @ Q.T, Q @ np.diag(w ** -0.5) @ Q.T
        cov = (V * np.maximum(lam, 0)) @ V.T
        s, U = np.linalg.eigh(root @ cov @ root)
        order = np.argsort(-s, kind="stable")
        s, U = np.maximum(s[order], 0), U[:, order]
        spectra.append(s)
        encoders.append(root @ U)
        decoders.append(inv_root @ U)
    return np.stack(spectra), np.stack(encoders), np.stack(decoders)
