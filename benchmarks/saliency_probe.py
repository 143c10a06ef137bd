"""Probe: do the most-attended tokens deserve exact keys/values? (CPU)

    python benchmarks/saliency_probe.py [--tokens 1024] [--method SPEC] [--json OUT]

A full-precision pass records, for every layer and KV head, how much attention each
token receives (summed over the group's query heads): from all later queries
(an oracle), its largest single weight (oracle), or only from the ``W`` queries right
after it (what a cache could see while the token sits in an exact recent window).
Then the method's caches run with the top ``f`` of coded tokens per (layer, head)
replaced by their exact keys (and, optionally, values) at decode time — fake-quant;
the bits such tokens would cost at fp16 are added to the reported bits. A random
choice of the same tokens is the control.
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_text import HeldOut, save_results

from veloxcore import load_cached_rotations
from veloxcore.attention import model_modules
from veloxcore.caches import KVCacheBuilder, cache_memory, parse_method

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"


def record_attention(held_out: HeldOut, window: int) -> dict[str, np.ndarray]:
    """Per layer (H, T) attention received: 'sum', 'max', 'window' (next ``window``
    queries); from a full-precision pass in the probe's chunks."""
    model, T = held_out.model, held_out.tokens
    layers = len(model.layers)
    out = {k: None for k in ("sum", "max", "window")}
    modules = model_modules(model)
    originals = [m.scaled_dot_product_attention for m in modules]
    calls = [0]

    def spy(queries, keys, values, cache, scale, mask, **kwargs):
        layer = calls[0] % layers
        calls[0] += 1
        B, Hq, L, D = queries.shape
        H, S = keys.shape[1], keys.shape[2]
        q = queries.astype(mx.float32).reshape(B, H, Hq // H, L, D)
        s = (q * scale) @ keys.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
        t = mx.arange(S - L, S)[:, None]
        i = mx.arange(S)[None]
        s = mx.where(i <= t, s, -mx.inf)
        p = mx.softmax(s, axis=-1).sum(2)[0]  # (H, L, S)
        near = ((t - i) < window) & (i <= t)
        acc = recorded[layer]
        acc["sum"][:, :S] += np.array(p.sum(1))
        acc["max"][:, :S] = np.maximum(acc["max"][:, :S], np.array(p.max(1)))
        acc["window"][:, :S] += np.array(mx.where(near, p, 0).sum(1))
        return originals[0](queries, keys, values, cache=cache, scale=scale, mask=mask,
                            **kwargs)

    H = model.layers[0].self_attn.n_kv_heads
    recorded = [{k: np.zeros((H, T)) for k in out} for _ in range(layers)]
    for m in modules:
        m.scaled_dot_product_attention = spy
    try:
        held_out.log_probs([__import__("mlx_lm.models.cache").models.cache.KVCache()
                            for _ in model.layers])
    finally:
        for m, o in zip(modules, originals, strict=True):
            m.scaled_dot_product_attention = o
    return {k: np.stack([a[k] for a in recorded]) for k in out}


def with_exact_tokens(cache, chosen: np.ndarray, keys_too: bool, values_too: bool):
    """Wrap a coded cache so the chosen token positions (H, T) bool decode exactly."""
    seen_k, seen_v = [], []
    update, decode = cache.update_and_fetch, cache.decode
    mask = mx.array(chosen)[None, :, :, None]

    def update_and_fetch(keys, values):
        seen_k.append(keys)
        seen_v.append(values)
        return update(keys, values)

    def decode_exact(parts, position):
        k, v = decode(parts, position)
        n = k.shape[2]
        ek = mx.concatenate(seen_k, axis=2)[..., position: position + n, :]
        ev = mx.concatenate(seen_v, axis=2)[..., position: position + n, :]
        m = mask[..., position: position + n, :]
        if keys_too:
            k = mx.where(m, ek.astype(k.dtype), k)
        if values_too:
            v = mx.where(m, ev.astype(v.dtype), v)
        return k, v

    cache.update_and_fetch = update_and_fetch
    cache.decode = decode_exact
    return cache


def top_fraction(score: np.ndarray, fraction: float, first: int) -> np.ndarray:
    """(L, H, T) bool: the top ``fraction`` of tokens from ``first`` on, per (layer, head)."""
    L, H, T = score.shape
    n = int(round(fraction * (T - first)))
    chosen = np.zeros(score.shape, bool)
    if n == 0:
        return chosen
    idx = np.argsort(-score[..., first:], axis=-1)[..., :n] + first
    np.put_along_axis(chosen, idx, True, axis=-1)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--method", default="spectral:wf2.5/a4g64+qa+ad+x1.5+vh+la")
    ap.add_argument("--fractions", default="0.01,0.03,0.1")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()

    held_out = HeldOut(args.tokens, args.chunk)
    model = held_out.model
    rotations = load_cached_rotations(BUNDLE, model, layer_sensitivity=True)
    attention = record_attention(held_out, args.window)
    rng = np.random.default_rng(0)
    attention["random"] = rng.random(attention["sum"].shape)
    sinks = 4

    def run(chosen, keys_too, values_too):
        caches = KVCacheBuilder.build(model, parse_method(args.method, rotations))
        if chosen is not None:
            for layer, cache in enumerate(caches):
                with_exact_tokens(cache, chosen[layer], keys_too, values_too)
        kl = held_out.kl(caches)
        bits = cache_memory(caches, model).bits_per_element
        return float(kl.mean().item()), bits

    base_kl, base_bits = run(None, False, False)
    rows = [dict(select="none", fraction=0.0, what="-", kl=base_kl, bits=base_bits)]
    print(f"{args.method}: bits {base_bits:.3f} KL {base_kl:.4f}", flush=True)
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for select in ("sum", "max", "window", "random"):
            chosen = top_fraction(attention[select], fraction, sinks)
            for what, kt, vt in (("K", True, False), ("KV", True, True)):
                if select == "random" and what == "KV":
                    continue
                kl, _ = run(chosen, kt, vt)
                # fp16 instead of ~base bits for the chosen tokens' K (and V) elements
                extra = fraction * (16 - base_bits) * (1.0 if what == "KV" else 0.5)
                rows.append(dict(select=select, fraction=fraction, what=what, kl=kl,
                                 bits=base_bits + extra))
                print(f"  top {fraction:5.1%} by {select:6s} exact {what:2s}: "
                      f"bits ~{base_bits + extra:.3f} KL {kl:.4f}", flush=True)
    save_results(args.json, method=args.method, tokens=args.tokens, window=args.window,
                 rows=rows)


if __name__ == "__main__":
    main()
