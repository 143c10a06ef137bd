"""Shared set-up of the CPU quality probes: the default model, the first ``tokens``
held-out tokens, teacher-forced log-probabilities through given caches in ``chunk``-token
steps, and per-token KL against mlx-lm's fp16 cache."""

from __future__ import annotations

from veloxcore import load
from veloxcore.evaluate import _log_probs, load_eval_text

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)
KVCache = __import__("mlx_lm.models.cache").models.cache.KVCache


class HeldOut:
    def __init__(self, tokens: int, chunk: int):
        self.model, self.tokenizer, _ = load("default")
        _, self.text, _ = load_eval_text()
        self.inputs = mx.array(self.tokenizer.encode(self.text)[:tokens])[None]
        self.tokens, self.chunk = tokens, chunk
        self.reference = self.log_probs([KVCache() for _ in self.model.layers])

    def log_probs(self, caches) -> mx.array:
        return mx.concatenate([
            _log_probs(self.model(self.inputs[:, s: s + self.chunk], cache=caches)[0])
            for s in range(0, self.tokens, self.chunk)])

    def kl(self, caches) -> mx.array:
        """KL(fp16 ‖ caches) per token."""
        ref = self.reference
        return (mx.exp(ref) * (ref - self.log_probs(caches))).sum(-1)
