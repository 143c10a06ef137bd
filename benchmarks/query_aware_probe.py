"""Probe: query-aware water-filling of spectral keys (not yet a feature).

    python benchmarks/query_aware_probe.py [--model PATH.gguf] [--ctx 8192] [--json OUT]

The score error of a key error δ (pre-RoPE), averaged over relative positions, is
≈ ½ Σ_pairs E|q_pair|² · |δ_pair|²: RoPE rotates each 2-D pair, and a query's pair
energies do not change under rotation. So PCA dimension i of a KV head matters in
proportion to ω_i = Σ_j w_j |V[pair j, i]|², with w_j the query energy of pair j
summed over the head's query group. The probe records w by wrapping each layer's
q_proj for 8 × 512 calibration tokens, water-fills keys on λ_i·ω_i instead of λ_i
(codebook scales unchanged) and compares KL on 1,024 held-out tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

import veloxcore.caches as caches
from veloxcore import load, load_cached_rotations, load_corpus
from veloxcore.caches import parse_method
from veloxcore.corpus import sample_windows
from veloxcore.evaluate import evaluate_methods, load_eval_text

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)
nn = __import__("mlx.nn").nn
BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


class QueryPairEnergy(nn.Module):
    """Wraps q_proj; accumulates Σ|q_pair|² per query head (interleaved RoPE pairs)."""

    def __init__(self, inner, heads: int, head_dim: int):
        super().__init__()
        self.inner, self.heads, self.head_dim, self.energy = inner, heads, head_dim, None

    def __call__(self, x):
        y = self.inner(x)
        B, L, _ = y.shape
        q = y.reshape(B, L, self.heads, self.head_dim // 2, 2).astype(mx.float32)
        e = (q * q).sum(axis=(0, 1, 4))
        self.energy = e if self.energy is None else self.energy + e
        return y


def query_importance(model, tokenizer, rotations) -> list[np.ndarray]:
    args = model.args
    hq, h, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    recorders = []
    for layer in model.layers:
        recorder = QueryPairEnergy(layer.self_attn.q_proj, hq, d)
        layer.self_attn.q_proj = recorder
        recorders.append(recorder)
    text = load_corpus("bundled").text
    for window in sample_windows(tokenizer.encode(text), 8, 512, 1):
        model(mx.array(window)[None])
        mx.eval([r.energy for r in recorders])
    importance = []
    for layer, recorder in zip(model.layers, recorders, strict=True):
        layer.self_attn.q_proj = recorder.inner
        pair_energy = np.array(recorder.energy).reshape(h, hq // h, d // 2).sum(axis=1)
        vectors = rotations[len(importance)].key_eigenvectors  # (h, d, d), columns
        weight = (vectors.reshape(h, d // 2, 2, d) ** 2).sum(axis=2)  # |V[pair, i]|²
        omega = np.einsum("hp,hpi->hi", pair_energy, weight)
        importance.append(omega / omega.mean(axis=1, keepdims=True))
    return importance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer, _ = load(args.model, dequantize=True)
    rotations = load_cached_rotations(BUNDLE, model=model)
    importance = query_importance(model, tokenizer, rotations)
    plain_bits = caches.spectral_layer_bits

    def query_aware_bits(rot, config, plan=None):
        if getattr(config, "query_aware", False):
            rot = dataclasses.replace(rot, key_eigenvalues=rot.key_eigenvalues
                                      * importance[rot.layer])
        return plain_bits(rot, config, plan)

    caches.spectral_layer_bits = query_aware_bits
    configs = {}
    for spec in ("spectral:wf3/a4g64", "spectral:wf2.5/a4g64", "spectral:wf2/a4g64"):
        configs[spec] = parse_method(spec, rotations)
        aware = parse_method(spec, rotations)
        aware.query_aware = True
        configs[spec + " qa"] = aware
    _, text, _ = load_eval_text()
    results = evaluate_methods(model, tokenizer, configs, text, args.ctx, chunk=args.chunk)
    for r in results:
        print(f"{r.method:<26} {r.bits_per_element:.2f} bits  KL {r.kld:.4f}  "
              f"ΔPPL {r.delta_ppl_pct:+.2f}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "context": args.ctx,
                       "results": [r.to_dict() for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
