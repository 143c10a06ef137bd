"""Probe: affine value codes after a rotation (what became ``+vh``; CPU).

    python benchmarks/value_rotation_probe.py

Values only (keys exact), 2,048 held-out tokens in 512-token chunks, 4 exact sinks:
mlx affine quantisation of v, of v·H (orthonormal Hadamard) and of v·R (random
rotation), decoded and rotated back.
"""

import numpy as np
from probe_text import HeldOut

from veloxcore.caches import CodedKVCache, random_rotation, value_rotation

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

TOK, CH = 2048, 512
held_out = HeldOut(TOK, CH)
model = held_out.model


class Values(CodedKVCache):
    def __init__(self, bits, group, rot):
        super().__init__(sink_tokens=4)
        self.b, self.g = bits, group
        self.R = None if rot is None else mx.array(rot.astype(np.float32))

    def encode(self, k, v, pos):
        if self.R is not None:
            v = v.astype(mx.float32) @ self.R
        q = mx.quantize(v.astype(mx.float16), group_size=self.g, bits=self.b)
        return (k, *q)

    def decode(self, parts, pos):
        v = mx.dequantize(*parts[1:], group_size=self.g, bits=self.b).astype(mx.float32)
        if self.R is not None:
            v = v @ self.R.T
        return parts[0], v


H = value_rotation(64)  # orthonormal Hadamard
Rr = random_rotation(64, 0)
for name, b, g, R in [
    ("a4g64", 4, 64, None),
    ("a4g64 hadamard", 4, 64, H),
    ("a4g64 random", 4, 64, Rr),
    ("a4g32", 4, 32, None),
    ("a3g64", 3, 64, None),
    ("a3g64 hadamard", 3, 64, H),
    ("a3g32 hadamard", 3, 32, H),
    ("a3g32", 3, 32, None),
]:
    kl = held_out.kl([Values(b, g, R) for _ in model.layers]).mean().item()
    print(f"values {name:16s} bits {b + 32 / g:.2f}  KL {kl:.4f}", flush=True)
