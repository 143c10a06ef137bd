"""Probe: Lloyd-Max values after a Hadamard rotation with a per-token scale (CPU).

    python benchmarks/value_coder_probe.py

Values only (keys exact), 2,048 held-out tokens in 512-token chunks, 4 exact sinks.
"affine": mlx affine codes of v·H (group 64: fp16 scale + bias, 0.5 bits/elem).
"lloyd-max": v·H divided by alpha x its per-token RMS (fp16, 0.25 bits/elem at
head_dim 64) and coded with the Gaussian Lloyd-Max codebook of B bits.
"""

from __future__ import annotations

import numpy as np
from probe_text import HeldOut

from veloxcore.caches import CodedKVCache, value_rotation
from veloxcore.quantizers import DimCoder

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

TOKENS, CHUNK = 2048, 512


class RotatedValues(CodedKVCache):
    def __init__(self, coder: str, bits: int, alpha: float, dim: int, heads: int):
        super().__init__(sink_tokens=4)
        self.kind, self.value_bits, self.alpha = coder, bits, alpha
        self.rotation = mx.array(value_rotation(dim).astype(np.float32))
        self.lloyd = DimCoder(np.full((heads, dim), bits), np.ones((heads, dim)))

    def encode(self, keys, values, position):
        y = values.astype(mx.float32) @ self.rotation
        if self.kind == "affine":
            return (keys, *mx.quantize(y.astype(mx.float16), group_size=64, bits=self.value_bits))
        scale = (self.alpha * mx.sqrt(mx.mean(y * y, axis=-1, keepdims=True)))
        scale = mx.maximum(scale, 1e-6).astype(mx.float16)
        return keys, self.lloyd.encode(y / scale.astype(mx.float32)), scale

    def decode(self, parts, position):
        if self.kind == "affine":
            y = mx.dequantize(*parts[1:], group_size=64, bits=self.value_bits)
        else:
            y = self.lloyd.decode(parts[1]) * parts[2].astype(mx.float32)
        return parts[0], y.astype(mx.float32) @ self.rotation.T


def main() -> None:
    held_out = HeldOut(TOKENS, CHUNK)
    model = held_out.model
    attn = model.layers[0].self_attn
    heads, dim = attn.n_kv_heads, attn.head_dim

    for coder, bits, alpha, cost in [("affine", 4, 0, 4.5), ("lloyd-max", 4, 1.0, 4.25),
                                     ("lloyd-max", 4, 1.25, 4.25), ("affine", 3, 0, 3.5),
                                     ("lloyd-max", 3, 1.0, 3.25), ("lloyd-max", 5, 1.0, 5.25)]:
        caches = [RotatedValues(coder, bits, alpha, dim, heads) for _ in model.layers]
        kl = held_out.kl(caches).mean().item()
        print(f"values {coder:9s} {bits} bits alpha {alpha:<4} ({cost} bits/elem)  KL {kl:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
