"""Experiment: static vs per-block key scales for the spectral key coder (keys only).

    python benchmarks/key_scale_experiment.py

Keys coded in the shipped pre-RoPE bundle's basis with water-filled bits (min 1),
values exact, teacher-forced on 1,024 held-out tokens in 64-token chunks (each
chunk's keys are coded before it attends). Scales per spectral dimension:
"static" = alpha x calibrated std; "rms" = alpha x the block's RMS; "max" = the
block's max |y| mapped to level 2.0 of the unit Lloyd-Max codebook. Block scales
would cost 16 bits per dim per 64-token block (0.25 bits/elem at head_dim 64),
which this fake-quant probe does not count. A research probe, not a feature.
"""

from __future__ import annotations

import numpy as np
from probe_text import HeldOut, PreRopeKeyProbe

from veloxcore import load_cached_rotations
from veloxcore.quantizers import DimCoder
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

TOKENS, CHUNK = 1024, 64
BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


class BlockScaledKeys(PreRopeKeyProbe):
    """Keys in the centred pre-RoPE basis with per-block or static scales; values exact."""

    def __init__(self, model, rotation, layer: int, key_bits: float, alpha: float, mode: str):
        super().__init__(model, rotation, layer)
        lam = rotation.key_eigenvalues
        bits = np.stack([water_fill_bits(v, key_bits, 1, 8) for v in lam])
        self.static = mx.array(np.sqrt(np.maximum(lam, 1e-12))[None, :, None, :]
                               .astype(np.float32))
        self.coder = DimCoder(bits, np.ones_like(lam))
        self.alpha, self.mode = alpha, mode

    def encode(self, keys, values, position):
        y = self.coefficients(keys, position)
        if self.mode == "static":
            scale = self.static * self.alpha
        elif self.mode == "rms":
            scale = mx.sqrt(mx.mean(y * y, axis=2, keepdims=True)) * self.alpha
        else:
            scale = mx.max(mx.abs(y), axis=2, keepdims=True) / 2.0
        scale = mx.maximum(scale, 1e-6).astype(mx.float16).astype(mx.float32)
        return self.coder.decode(self.coder.encode(y / scale)) * scale, values


def main() -> None:
    held_out = HeldOut(TOKENS, CHUNK)
    model = held_out.model
    rotations = load_cached_rotations(BUNDLE, model=model)
    for key_bits in (3, 2):
        for mode, alpha in (("static", 2.0), ("rms", 1.5), ("rms", 2.0), ("rms", 2.5),
                            ("max", 0.0)):
            caches = [BlockScaledKeys(model, rotations[i], i, key_bits, alpha, mode)
                      for i in range(len(model.layers))]
            kl = held_out.kl(caches).mean().item()
            print(f"keys {key_bits} bits  {mode:<6} alpha {alpha:<4}  KL {kl:.4f}", flush=True)


if __name__ == "__main__":
    main()
