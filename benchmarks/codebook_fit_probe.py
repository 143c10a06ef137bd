"""Probe: are held-out key coefficients Gaussian in the calibrated basis? (CPU)

    python benchmarks/codebook_fit_probe.py 3

Collects normalised key coefficients z = y/σ on 4 × 1,024 calibration-corpus tokens,
fits a Lloyd codebook per width to them, compares MSEs with the Gaussian Lloyd-Max
codebook at 1×/1.5×/2× scale, then codes the held-out text's keys (values exact,
1,024 tokens, 64-token chunks) with the fitted codebooks vs Gaussian at 2×.
"""

import sys

import numpy as np
import outlier_probe as op

from veloxcore import load, load_cached_rotations
from veloxcore.caches import CodedKVCache
from veloxcore.calibration import RopeInverter, find_rope
from veloxcore.corpus import load_corpus, sample_windows
from veloxcore.evaluate import _log_probs, load_eval_text
from veloxcore.quantizers import lloyd_max_gaussian
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)
KVCache = __import__("mlx_lm.models.cache").models.cache.KVCache

model, tok, _ = load("default")
_, text, _ = load_eval_text()
inputs = mx.array(tok.encode(text)[:1024])[None]


def run(caches, x=inputs):
    n = x.shape[1]
    return mx.concatenate(
        [_log_probs(model(x[:, s : s + 64], cache=caches)[0]) for s in range(0, n, 64)]
    )


ref = run([KVCache() for _ in model.layers])
rot = load_cached_rotations(op.BUNDLE, model=model)
KB = float(sys.argv[1]) if len(sys.argv) > 1 else 3


class Recorder(CodedKVCache):
    def __init__(self, r, layer):
        super().__init__(sink_tokens=4)
        self.rope = find_rope(model.layers[layer])
        self.inv = RopeInverter(self.rope, r.head_dim)
        self.basis = mx.array(r.key_eigenvectors)
        self.mean = mx.array(r.key_mean[None, :, None, :])
        self.std = mx.array(
            np.sqrt(np.maximum(r.key_eigenvalues, 1e-12))[None, :, None, :].astype(np.float32)
        )
        self.z = []

    def encode(self, k, v, pos):
        y = (self.inv(k, pos) - self.mean) @ self.basis
        self.z.append(np.array(y / self.std))
        return y, v

    def decode(self, parts, pos):
        return self.rope(parts[0] @ self.basis.swapaxes(-1, -2) + self.mean, offset=pos), parts[1]


ids = tok.encode(load_corpus().text)
wins = sample_windows(ids, 4, 1024, seed=7)
recs = [Recorder(rot[i], i) for i in range(len(model.layers))]
for w in wins:
    for c in recs:
        c.trim(c.size()) if c.size() else None
    recs2 = [Recorder(rot[i], i) for i in range(len(model.layers))]
    run(recs2, mx.array(w)[None])
    for a, b in zip(recs, recs2, strict=True):
        a.z += b.z
plans = [
    np.stack([water_fill_bits(v, KB, 0, 8) for v in rot[i].key_eigenvalues * rot[i].key_importance])
    for i in range(len(model.layers))
]
by_width = {}
for i, c in enumerate(recs):
    z = np.concatenate(c.z, axis=2)[0]  # H, L, D
    z = z[:, 4:, :]  # drop sink tokens of each window roughly (first window only); fine
    for h in range(z.shape[0]):
        for d in range(z.shape[2]):
            b = int(plans[i][h, d])
            if b:
                by_width.setdefault(b, []).append(z[h, :, d])


def lloyd(x, n, iters=60):
    lv = np.quantile(x, (np.arange(n) + 0.5) / n)
    for _ in range(iters):
        t = (lv[1:] + lv[:-1]) / 2
        idx = np.searchsorted(t, x)
        s = np.bincount(idx, weights=x, minlength=n)
        c = np.bincount(idx, minlength=n)
        lv = np.where(c > 0, s / np.maximum(c, 1), lv)
    return lv


fitted = {}
rng = np.random.default_rng(0)
for b, xs in sorted(by_width.items()):
    x = np.concatenate(xs)
    x = rng.choice(x, size=min(x.size, 2_000_000), replace=False)
    lv = lloyd(x, 1 << b)
    g = lloyd_max_gaussian(b)[0]

    def mse(levels, x=x):
        t = (levels[1:] + levels[:-1]) / 2
        return float(np.mean((x - levels[np.searchsorted(t, x)]) ** 2))

    fitted[b] = lv
    kurtosis = np.mean(x**4) / np.mean(x**2) ** 2
    print(
        f"width {b}: n={x.size} std {x.std():.3f} kurt {kurtosis:.1f}  mse gauss1x "
        f"{mse(g):.4f} gauss1.5x {mse(1.5 * g):.4f} gauss2x {mse(2 * g):.4f} "
        f"fitted {mse(lv):.4f}  levels {np.round(lv, 2).tolist() if b <= 3 else ''}",
        flush=True,
    )


class FittedKeys(op.SparseOutlierKeys):
    def __init__(self, *a, codebooks=None, **k):
        super().__init__(*a, **k)
        if codebooks:
            c = self.coder
            H, D = c.bits.shape
            levels = np.array(c.levels).reshape(H, D, -1)
            thr = np.array(c.thresholds).reshape(H, D, -1)
            for h in range(H):
                for d in range(D):
                    b = int(c.bits[h, d])
                    if not b:
                        continue
                    s = c.scales[h, d]
                    lv = codebooks[b] * s
                    levels[h, d, : lv.size] = lv
                    thr[h, d, : lv.size - 1] = (lv[1:] + lv[:-1]) / 2
            c.levels = mx.array(levels.reshape(-1))
            c.thresholds = mx.array(thr.reshape(-1))


for name, alpha, cb in [("gauss2x", 2.0, None), ("fitted", 1.0, fitted)]:
    caches = [
        FittedKeys(model, rot[i], i, KB, alpha, 0, codebooks=cb) for i in range(len(model.layers))
    ]
    lp = run(caches)
    kl = (mx.exp(ref) * (ref - lp)).sum(-1).mean().item()
    print(name, KB, round(kl, 4), flush=True)
