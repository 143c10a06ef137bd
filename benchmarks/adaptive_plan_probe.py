"""Probe: re-plan keys on the prompt's own statistics (what became ``+ad``; CPU).

    python benchmarks/adaptive_plan_probe.py 2048 512

Keys only (values exact), teacher-forced on TOKENS held-out tokens in CHUNK-token
chunks. On its first chunk each layer's cache blends the chunk's key mean and
covariance with the calibration's (prior n0 tokens), then either keeps the calibrated
basis and re-water-fills bits on the blended variances (basis False) or also re-runs
PCA (basis True); codebook scale alpha × the blended std.
"""

import sys

import numpy as np
import outlier_probe as op
from probe_text import HeldOut

from veloxcore import load_cached_rotations
from veloxcore.caches import CodedKVCache
from veloxcore.calibration import RopeInverter, find_rope
from veloxcore.quantizers import DimCoder
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

TOK = int(sys.argv[1])
CH = int(sys.argv[2])
KB = 3
held_out = HeldOut(TOK, CH)
model = held_out.model
rot = load_cached_rotations(op.BUNDLE, model=model)


def pair_weights(r):
    V = r.key_eigenvectors.astype(np.float64)
    H, D, _ = V.shape
    v2 = V**2
    P = v2.reshape(H, D // 2, 2, D).sum(2)  # H, pairs, dims
    w = np.stack([np.linalg.lstsq(P[h].T, r.key_importance[h], rcond=None)[0] for h in range(H)])
    return w  # H, D/2


class AdaptiveKeys(CodedKVCache):
    def __init__(self, r, layer, alpha, n0, adapt_basis):
        super().__init__(sink_tokens=4)
        self.rope = find_rope(model.layers[layer])
        self.inv = RopeInverter(self.rope, r.head_dim)
        self.r, self.alpha, self.n0, self.adapt_basis = r, alpha, n0, adapt_basis
        self.w = pair_weights(r)
        self.plan(r.key_eigenvectors, r.key_eigenvalues, r.key_mean)
        self.adapted = n0 is None

    def plan(self, V, lam, mu):
        H, D, _ = V.shape
        wd = np.repeat(self.w, 2, axis=1)  # traditional pairs (2j,2j+1)
        omega = np.einsum("hd,hdi->hi", wd, V**2)
        omega /= omega.mean(1, keepdims=True)
        bits = np.stack([water_fill_bits(l * o, KB, 0, 8) for l, o in zip(lam, omega, strict=True)])
        self.coder = DimCoder(bits, self.alpha * np.sqrt(np.maximum(lam, 1e-12)))
        self.basis = mx.array(V.astype(np.float32))
        self.mean = mx.array(mu[None, :, None, :].astype(np.float32))
        self.mean_bits = bits.mean()

    def encode(self, k, v, pos):
        x = self.inv(k, pos)
        if not self.adapted:
            self.adapted = True
            xs = np.array(x[0], dtype=np.float64)  # H, L, D
            skip = max(0, 4 - pos)
            xs = xs[:, skip:]
            n = xs.shape[1]
            r = self.r
            Ccal = np.einsum(
                "hdi,hi,hei->hde", r.key_eigenvectors, r.key_eigenvalues, r.key_eigenvectors
            )
            mu = (xs.sum(1) + self.n0 * r.key_mean) / (n + self.n0)
            d = xs - mu[:, None]
            dc = r.key_mean - mu
            C = (
                np.einsum("hld,hle->hde", d, d) + self.n0 * (Ccal + np.einsum("hd,he->hde", dc, dc))
            ) / (n + self.n0)
            if self.adapt_basis:
                lam, V = np.linalg.eigh(C)
                lam, V = lam[:, ::-1], V[:, :, ::-1]
            else:
                V = r.key_eigenvectors
                lam = np.einsum("hdi,hde,hei->hi", V, C, V)
            self.plan(np.ascontiguousarray(V), np.maximum(lam, 1e-12), mu)
        y = (x - self.mean) @ self.basis
        return self.coder.dequantize(self.coder.quantize(y)), v

    def decode(self, parts, pos):
        return self.rope(parts[0] @ self.basis.swapaxes(-1, -2) + self.mean, offset=pos), parts[1]


for alpha, n0, ab in [
    (2.0, None, False),
    (2.0, 64, False),
    (1.5, 64, False),
    (2.0, 64, True),
    (1.5, 64, True),
    (1.5, 0, True),
    (1.0, 64, True),
]:
    caches = [AdaptiveKeys(rot[i], i, alpha, n0, ab) for i in range(len(model.layers))]
    d = held_out.kl(caches)
    kl = d.mean().item()
    print(
        f"alpha {alpha} n0 {n0} basis {ab} bits "
        f"{np.mean([c.mean_bits for c in caches]):.3f} KL {kl:.4f}  "
        f"KL after first chunk {d[CH:].mean().item():.4f}",
        flush=True,
    )
