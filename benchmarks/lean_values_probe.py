"""Probe: leaner values paying for more key bits at the same total (CPU, fake-quant).

    python benchmarks/lean_values_probe.py [--tokens 2048] [--chunk 256] [--json OUT]

Affine 4-bit values cost 4.5 bits per element (an fp16 scale and bias per 64). After the
Hadamard rotation (+vh) a token's 64 values are close to Gaussian, so Lloyd-Max codes
scaled by the token's RMS (one fp16 per token and head: 4.25 bits at 4-bit codes) should
do nearly as well, at each of +la's 3-5-bit value widths. The quarter bit saved buys keys
a quarter bit; key codes pad to whole 32-bit words per token and head (half-bit steps at
head_dim 64), so the keys' extra bits go to whole layers: per-layer widths in half-bit
steps (1.5-4 bits) chosen by the bundle's layer costs under an average of 2.75 bits
(``allocate_layer_bits``, as +la, with 4-bit values everywhere). Methods (default
model, held-out text, shipped bundle; bits from real bytes):

- base: spectral:wf2.5/a4g64+qm+ad+x1.5+vh+la (3.51 bits at 8k)
- keys 2.75: the same with the keys' 2.75-bit per-layer plan (+0.125 bits)
- lean values: base with Lloyd-Max values at each layer's width (-0.125 bits)
- both: keys 2.75 with lean values (the base's bits)
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_text import HeldOut, save_results

from veloxcore import caches as cache_module
from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, cache_memory, parse_method
from veloxcore.quantizers import lloyd_max_gaussian
from veloxcore.sensitivity import allocate_layer_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"
BASE = "spectral:wf2.5/a4g64+qm+ad+x1.5+vh+la"


def lean_values(cache) -> None:
    """Code the cache's values as Hadamard-rotated Lloyd-Max codes times each token's
    RMS (fp16), at the layer's value width (+la picks 3-5 bits), bit-packed into 32-bit
    words; keys as before."""
    bits = cache.value_affine[0]
    levels, thresholds, _ = lloyd_max_gaussian(bits)
    table = mx.array(levels.astype(np.float32))
    thresholds = mx.array(thresholds.astype(np.float32))
    code_bits = mx.arange(bits, dtype=mx.uint32)
    word_bits = mx.arange(32, dtype=mx.uint32)
    encode_original = cache.encode

    def encode(keys, values, position):
        key_parts = encode_original(keys, values, position)[:-3]  # drop affine values
        B, H, L, D = values.shape
        v = mx.hadamard_transform(values.astype(mx.float32), scale=D**-0.5)
        rms = mx.sqrt(mx.mean(v * v, axis=-1, keepdims=True)).astype(mx.float16)
        y = v / mx.maximum(rms.astype(mx.float32), 1e-6)
        codes = (y[..., None] > thresholds).sum(-1).astype(mx.uint32)
        stream = (codes[..., None] >> code_bits) & 1  # (B, H, L, D, bits), little-endian
        words = (stream.reshape(B, H, L, D * bits // 32, 32) << word_bits).sum(-1)
        return (*key_parts, words.astype(mx.uint32), rms)

    def decode(parts, position):
        words, rms = parts[-2], parts[-1]
        B, H, T, W = words.shape
        D = W * 32 // bits
        n = 2 if cache.token_scale else 1
        y = cache._decode_part(cache.key_coder, parts[:n])
        keys = y @ cache.key_decoder.swapaxes(-1, -2) + cache.key_mean
        if cache.inverter is not None:
            keys = cache._rope_keys(keys, position)
        stream = ((words[..., None] >> word_bits) & 1).reshape(B, H, T, D, bits)
        codes = (stream << code_bits).sum(-1)
        v = table[codes] * rms.astype(mx.float32)
        return keys, mx.hadamard_transform(v, scale=D**-0.5)

    cache.encode, cache.decode = encode, decode


def run(held, rotations, key_plan, lean: bool) -> dict:
    allocate = cache_module.allocate_layer_bits
    if key_plan is not None:
        cache_module.allocate_layer_bits = lambda sensitivity, key_bits, value_bits: dict(
            keys=key_plan, values=[value_bits] * sensitivity.num_layers)
    try:
        caches = KVCacheBuilder.build(held.model, parse_method(BASE, rotations))
    finally:
        cache_module.allocate_layer_bits = allocate
    if lean:
        for cache in caches:
            lean_values(cache)
    log_probs = held.log_probs(caches)
    kl = (mx.exp(held.reference) * (held.reference - log_probs)).sum(-1)
    memory = cache_memory(caches, held.model)
    return dict(kl=float(kl.mean()), bits=float(memory.bits_per_element),
                delta_ppl_pct=100 * (float(np.exp(nll(held, log_probs) - nll(held, held.reference)))
                                     - 1))


def nll(held, log_probs) -> float:
    """Mean negative log-likelihood of the text's next tokens."""
    targets = held.inputs[0, 1:]
    picked = mx.take_along_axis(log_probs[:-1], targets[:, None], axis=-1)
    return float(-picked.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--methods", default="base,keys 2.75,lean values,both")
    ap.add_argument("--json")
    args = ap.parse_args()
    held = HeldOut(args.tokens, args.chunk)
    rotations = load_cached_rotations(BUNDLE, model=held.model)
    # Keys on the half-bit grid averaging 2.75 bits, values 4 bits in every layer.
    plan = allocate_layer_bits(rotations.layer_sensitivity, 2.75, 4,
                               value_spread=0)["keys"]
    print("keys 2.75 plan:", plan, "mean", np.mean(plan))
    rows = []
    for name, key_plan, lean in (("base", None, False), ("keys 2.75", plan, False),
                                 ("lean values", None, True), ("both", plan, True)):
        if name not in args.methods.split(","):
            continue
        row = dict(method=name, **run(held, rotations, key_plan, lean))
        rows.append(row)
        print(f"{name:12s} bits {row['bits']:.3f}  KL {row['kl']:.4f}  "
              f"ΔPPL {row['delta_ppl_pct']:+.2f}%", flush=True)
    save_results(args.json, tokens=args.tokens, chunk=args.chunk, key_plan=plan, rows=rows)


if __name__ == "__main__":
    main()
