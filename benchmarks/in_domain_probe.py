"""Probe: how much of the key error is domain shift? (keys only, CPU)

    python benchmarks/in_domain_probe.py 16

Codes keys (3-bit query-aware water-filling, values exact) on the first 1,024 held-out
tokens in 64-token chunks with (a) the shipped bundle (calibrated on the Python
Language Reference) and (b) rotations calibrated on the *second half of the held-out
text itself* (N windows of 1,024 tokens, disjoint from the evaluated tokens) — a
diagnostic of the calibration corpus, never a configuration to ship. Prints KL and
the fraction of coefficients beyond 2/3/4/6 calibrated standard deviations.
"""

import sys

import outlier_probe as op
from probe_text import HeldOut

from veloxcore import load_cached_rotations
from veloxcore.calibration import calibrate_spectral_rotation
from veloxcore.corpus import Corpus

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

held_out = HeldOut(1024, 64)
model, tok, text = held_out.model, held_out.tokenizer, held_out.text
rots = {"shipped": load_cached_rotations(op.BUNDLE, model=model)}
rots["genesis-2nd-half"] = calibrate_spectral_rotation(
    model,
    tok,
    num_samples=int(sys.argv[1]),
    sequence_length=1024,
    corpus=Corpus.from_text("genesis tail", text[100000:]),
)
for name, r in rots.items():
    for bits, alpha in [(3, 2.0), (3, 1.5), (3, 1.0)]:
        caches = [
            op.SparseOutlierKeys(model, r[i], i, bits, alpha, 0) for i in range(len(model.layers))
        ]
        kl = held_out.kl(caches).mean().item()
        tail = mx.stack([mx.stack(c.tail).mean(0) for c in caches]).mean(0).tolist()
        print(name, bits, alpha, round(kl, 4), [round(t, 4) for t in tail], flush=True)
