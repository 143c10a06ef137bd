"""Shared set-up of the CPU quality probes: the default model, the first ``tokens``
held-out tokens, teacher-forced log-probabilities through given caches in ``chunk``-token
steps, per-token KL against mlx-lm's fp16 cache, and the base of the probes' key coders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from veloxcore import load
from veloxcore.caches import CodedKVCache
from veloxcore.calibration import RopeInverter, find_rope
from veloxcore.evaluate import _log_probs, load_eval_text

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS first)
KVCache = __import__("mlx_lm.models.cache").models.cache.KVCache


def save_results(path: str | None, **fields) -> None:
    """Write a probe's results as JSON with the command that made them (nothing when
    ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(dict(command=" ".join(sys.argv), **fields), indent=1))


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


class PreRopeKeyProbe(CodedKVCache):
    """A probe cache coding keys in a layer's calibrated, centred pre-RoPE basis, values
    exact. Subclasses code ``coefficients(keys, position)`` in ``encode`` and return
    (decoded coefficients, values); ``decode`` rebuilds keys and re-applies RoPE."""

    def __init__(self, model, rotation, layer: int, sink_tokens: int = 4):
        super().__init__(sink_tokens=sink_tokens)
        self.rope = find_rope(model.layers[layer])
        self.inverter = RopeInverter(self.rope, rotation.head_dim)
        self.basis = mx.array(rotation.key_eigenvectors)
        self.decoder = self.basis  # decodes coefficients; another matrix for a skewed basis
        self.mean = mx.array(rotation.key_mean[None, :, None, :])

    def coefficients(self, keys, position):
        return (self.inverter(keys, position) - self.mean) @ self.basis

    def decode(self, parts, position):
        keys = parts[0] @ self.decoder.swapaxes(-1, -2) + self.mean
        return self.rope(keys, offset=position), parts[1]
