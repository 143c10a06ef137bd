"""Teacher-forced quality evaluation of KV-cache methods against full precision.

The text is fed in chunks, so later tokens attend to the *compressed* cache of
earlier ones (as in real long-context use). Every method runs in lockstep with
the full-precision reference, chunk by chunk, and only running sums are kept:
perplexity, mean KL(reference ‖ method) per token, top-1 agreement. Memory is
read from the caches' real bytes after the last chunk.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from .caches import KVCacheBuilder, KVCacheConfig, cache_memory
from .corpus import assets_dir
from .errors import VeloxError

DEFAULT_TEXT = "eval/kjv-genesis.txt"


@dataclass
class MethodResult:
    method: str
    context: int
    perplexity: float
    delta_ppl_pct: float
    kld: float
    top1_agreement: float
    bits_per_element: float
    kv_bytes: int
    fp16_kv_bytes: int
    decode_tokens_per_s: float | None = None
    uncompressed_layers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_text(path: str | Path | None = None) -> tuple[str, str, str]:
    """(name, text, sha256) of the held-out text (default: the bundled one)."""
    file = Path(path).expanduser() if path else assets_dir() / DEFAULT_TEXT
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise VeloxError(f"{file}: no such file") from e
    except UnicodeDecodeError as e:
        raise VeloxError(f"{file}: not UTF-8 text") from e
    return file.name, text, hashlib.sha256(text.encode()).hexdigest()


def _log_probs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def evaluate_methods(model, tokenizer, configs: dict[str, KVCacheConfig], text: str,
                     context: int, chunk: int = 512, decode_tokens: int = 0,
                     progress: Callable[[str, int, int], None] | None = None,
                     cancel=None) -> list[MethodResult]:
    """Evaluate each config at one context length; the first result is the reference."""
    ids = tokenizer.encode(text)
    if len(ids) < context + 1:
        raise VeloxError(f"the evaluation text has {len(ids)} tokens; {context + 1} are needed "
                         f"for a context of {context}")
    inputs = mx.array(ids[:context])[None]
    targets = mx.array(ids[1: context + 1])
    reference = KVCacheBuilder.build(model, KVCacheConfig(method="fp16"))
    caches = {name: KVCacheBuilder.build(model, cfg) for name, cfg in configs.items()}
    nll = {name: 0.0 for name in caches}
    kld = {name: 0.0 for name in caches}
    agree = {name: 0 for name in caches}
    ref_nll = 0.0
    for start in range(0, context, chunk):
        if cancel is not None and cancel.is_set():
            raise VeloxError("evaluation cancelled")
        piece = inputs[:, start: start + chunk]
        target = targets[start: start + chunk]
        ref_lp = _log_probs(model(piece, cache=reference)[0])
        ref_p = mx.exp(ref_lp)
        ref_top = mx.argmax(ref_lp, axis=-1)
        ref_nll_chunk = -mx.take_along_axis(ref_lp, target[:, None], axis=-1).sum()
        mx.eval(ref_lp, ref_nll_chunk)
        ref_nll += ref_nll_chunk.item()
        for name, cache in caches.items():
            lp = _log_probs(model(piece, cache=cache)[0])
            chunk_nll = -mx.take_along_axis(lp, target[:, None], axis=-1).sum()
            chunk_kld = (ref_p * (ref_lp - lp)).sum()
            chunk_agree = (mx.argmax(lp, axis=-1) == ref_top).sum()
            mx.eval(chunk_nll, chunk_kld, chunk_agree)
            nll[name] += chunk_nll.item()
            kld[name] += chunk_kld.item()
            agree[name] += chunk_agree.item()
        if progress is not None:
            progress("evaluating", min(start + chunk, context), context)
    ref_ppl = math.exp(ref_nll / context)
    results = []
    for name, cache in caches.items():
        memory = cache_memory(cache, model)
        ppl = math.exp(nll[name] / context)
        results.append(MethodResult(
            method=name, context=context, perplexity=ppl,
            delta_ppl_pct=100.0 * (ppl / ref_ppl - 1.0), kld=kld[name] / context,
            top1_agreement=agree[name] / context, bits_per_element=memory.bits_per_element,
            kv_bytes=memory.nbytes, fp16_kv_bytes=memory.fp16_nbytes,
            decode_tokens_per_s=_decode_speed(model, cache, ids[context], decode_tokens),
            uncompressed_layers=len(getattr(cache, "uncompressed_layers", []))))
    return results


def _decode_speed(model, cache, first_token: int, tokens: int) -> float | None:
    """Greedy decode ``tokens`` steps on top of a filled cache; tokens per second."""
    if tokens <= 0:
        return None
    token = mx.array([[first_token]])
    mx.eval(model(token, cache=cache))  # warm-up step
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model(token, cache=cache)
        token = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(token)
    return tokens / (time.perf_counter() - start)


def results_table(results: list[MethodResult]) -> str:
    """A Markdown table like the seed's (Method | Memory | Perplexity delta) plus extras."""
    rows = ["| Method | Context | KV memory | vs fp16 | Bits/elem | Perplexity | ΔPPL | KL | "
            "Top-1 | Decode tok/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "—"
        rows.append(
            f"| {r.method} | {r.context} | {r.kv_bytes / 2**20:.2f} MiB | "
            f"{r.kv_bytes / r.fp16_kv_bytes:.3f}× | {r.bits_per_element:.2f} | "
            f"{r.perplexity:.3f} | {r.delta_ppl_pct:+.2f}% | {r.kld:.4f} | "
            f"{100 * r.top1_agreement:.1f}% | {tps} |")
    return "\n".join(rows)
