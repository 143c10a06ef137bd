"""Per-layer sensitivity of the model's output to compressed keys and values, and the
allocation of one bit budget over layers that it makes possible (``+la``).

``measure_layer_sensitivity`` codes one layer at a time (every other layer keeps an
exact fp16 cache) and measures the mean KL(fp16 ‖ that) over a text (``velox
sensitivity`` uses text the model writes itself by default: its costs track other text
better than a reference manual's do, BENCHMARKS.md), for
keys at two water-filled widths (values near exact) and values at two affine widths
(keys near exact). The costs of layers add up (measured: the sum over single layers
is within 8% of all layers coded together), and each extra bit divides a layer's
cost by a factor of its own, so a cost model per layer is

    K_l(b) = K_l(b_hi) · (K_l(b_lo) / K_l(b_hi)) ** ((b_hi − b) / (b_hi − b_lo))

(the same for values), and ``allocate_layer_bits`` picks each layer's key and value
width to minimise Σ K_l + V_l at the same total bits as a uniform configuration
(an exact multiple-choice knapsack in half-bit steps).

The file ``layer_sensitivity.json`` sits in the bundle next to the rotations.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VeloxError

SENSITIVITY_FILE = "layer_sensitivity.json"
FORMAT = "velox.layer-sensitivity"
# Probe widths: keys water-filled at these average bits (values 8-bit affine, near
# exact); values affine at these bits (keys at 5 water-filled bits, near exact).
KEY_PROBE_BITS = (2.0, 3.0)
VALUE_PROBE_BITS = (3, 4)
AFFINE_VALUE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize (and the fused kernels) take
KEY_BASES = ("qm", "qa", "eigen", "")


class SensitivityError(VeloxError):
    """A layer-sensitivity file is missing or malformed, or an allocation is impossible."""


@dataclass
class LayerSensitivity:
    """Mean KL per token when only layer l is coded: keys[b][l], values[b][l]."""

    keys: dict[float, np.ndarray]
    values: dict[float, np.ndarray]
    tokens: int
    corpus_sha256: str = ""
    # The key basis the probes coded in: "qm" (metric-weighted), "qa" (eigenbasis,
    # query-aware bits), "eigen", or "" (not recorded: files from before it was).
    key_basis: str = ""

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.keys.values())))

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, "tokens": self.tokens,
                "corpus_sha256": self.corpus_sha256, "key_basis": self.key_basis,
                "keys": {str(b): v.tolist() for b, v in self.keys.items()},
                "values": {str(b): v.tolist() for b, v in self.values.items()}}

    @classmethod
    def from_json(cls, data: dict, where: str) -> LayerSensitivity:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SensitivityError(f"{where}: not a layer-sensitivity file (format must be "
                                   f"{FORMAT!r})")
        parts = {}
        for part in ("keys", "values"):
            table = data.get(part)
            if not isinstance(table, dict) or len(table) < 2:
                raise SensitivityError(f"{where}: {part!r} needs costs at two or more widths")
            try:
                parts[part] = {float(b): np.asarray(v, dtype=np.float64)
                               for b, v in table.items()}
            except (TypeError, ValueError) as e:
                raise SensitivityError(f"{where}: {part!r} is not a table of numbers ({e})") \
                    from None
        for part, table in parts.items():
            widths = list(table)
            if len(widths) < 2 or not all(np.isfinite(widths)) or any(b <= 0 for b in widths):
                raise SensitivityError(f"{where}: {part!r} needs costs at two or more "
                                       f"distinct, positive widths (got {widths})")
        lengths = {v.shape for table in parts.values() for v in table.values()}
        if len(lengths) != 1 or len(next(iter(lengths))) != 1:
            raise SensitivityError(f"{where}: every width needs one cost per layer "
                                   f"(got shapes {sorted(lengths)})")
        for table in parts.values():
            for v in table.values():
                if not np.all(np.isfinite(v)) or np.any(v < 0):
                    raise SensitivityError(f"{where}: costs must be finite and >= 0")
        try:
            tokens = int(data.get("tokens", 0))
        except (TypeError, ValueError):
            raise SensitivityError(f"{where}: 'tokens' must be a whole number") from None
        key_basis = data.get("key_basis", "")
        if key_basis not in KEY_BASES:
            raise SensitivityError(f"{where}: 'key_basis' must be one of "
                                   f"{', '.join(repr(b) for b in KEY_BASES if b)}, not "
                                   f"{key_basis!r}")
        return cls(parts["keys"], parts["values"], tokens, str(data.get("corpus_sha256", "")),
                   key_basis)


def save_sensitivity(sensitivity: LayerSensitivity, directory: str | Path) -> Path:
    """Write ``layer_sensitivity.json`` into a bundle directory, atomically."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise SensitivityError(f"{root}: no such bundle directory")
    target = root / SENSITIVITY_FILE
    fd, tmp = tempfile.mkstemp(prefix=".sensitivity-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(sensitivity.to_json(), f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; bundles are for sharing
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_sensitivity(directory: str | Path) -> LayerSensitivity | None:
    """The bundle's layer sensitivity, or None when it has none."""
    path = Path(directory).expanduser() / SENSITIVITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SensitivityError(f"{path}: unreadable JSON ({e})") from None
    return LayerSensitivity.from_json(data, str(path))


# ------------------------------------------------------------------ measuring
def probe_specs(query_aware: bool, head_dim: int,
                query_metric: bool = False) -> dict[str, dict[float, str]]:
    """Method specs of the probes (the default configuration's modifiers: the
    metric-weighted key basis where calibrated, else query-aware bits where calibrated;
    value groups of 64 where head_dim allows, else 32)."""
    keys = "+qm" if query_metric else "+qa" if query_aware else ""
    common = keys + "+ad+x1.5+vh"
    g = 64 if head_dim % 64 == 0 else 32
    return {"keys": {b: f"spectral:wf{b:g}/a8g{g}{common}" for b in KEY_PROBE_BITS},
            "values": {b: f"spectral:wf5/a{b}g{g}{common}" for b in VALUE_PROBE_BITS}}


def sensitivity_tokens(model, tokenizer, corpus: str = "generated", tokens: int = 1024,
                       seed: int = 0, cancel=None):
    """(Corpus, token ids) to measure on: ``tokens`` tokens of text the model writes from
    the seed prompts ("generated": 25% more than needed, one window kept), of the bundled
    corpus ("bundled") or of a file."""
    from .corpus import generate_corpus, load_corpus, sample_windows

    if corpus == "generated":
        text = generate_corpus(model, tokenizer, seed=seed, cancel=cancel,
                               tokens_per_prompt=max(64, -(-tokens * 5 // 32)))
    else:
        text = load_corpus(corpus)
    ids = tokenizer.encode(text.text)
    return text, sample_windows(ids, 1, min(tokens, len(ids)), seed=seed)[0]


def measure_layer_sensitivity(model, rotations, token_ids, chunk: int = 512,
                              corpus_sha256: str = "") -> Iterator[tuple[str, int, int]]:
    """Measure every layer's cost (a generator: yields (stage, done, total) as it goes and
    returns the LayerSensitivity; use ``run_sensitivity`` for the value alone).
    ``token_ids``: the calibration tokens to score (1k–2k is enough to rank layers)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from .caches import KVCacheBuilder, parse_method
    from .evaluate import _log_probs

    inputs = mx.array(np.asarray(token_ids, dtype=np.int32))[None]
    n = inputs.shape[1]
    if n < 2 * chunk:
        raise SensitivityError(f"need at least {2 * chunk} calibration tokens, got {n}")
    layers = len(model.layers)

    def log_probs(caches):
        return mx.concatenate([_log_probs(model(inputs[:, s: s + chunk], cache=caches)[0])
                               for s in range(0, n, chunk)])

    reference = log_probs([KVCache() for _ in range(layers)])
    weights = mx.exp(reference)
    mx.eval(reference, weights)
    specs = probe_specs(rotations.has_key_importance, rotations[0].head_dim,
                        rotations.has_key_metric)
    total = layers * sum(len(v) for v in specs.values())
    done = 0
    costs = {"keys": {}, "values": {}}
    for part, table in specs.items():
        for bits, spec in table.items():
            built = KVCacheBuilder.build(model, parse_method(spec, rotations))
            per_layer = np.zeros(layers)
            for layer in range(layers):
                caches = [KVCache() for _ in range(layers)]
                caches[layer] = built[layer]
                kl = (weights * (reference - log_probs(caches))).sum(-1).mean()
                per_layer[layer] = max(float(kl.item()), 0.0)
                done += 1
                yield f"{part} at {bits:g} bits, layer {layer}", done, total
            costs[part][bits] = per_layer
    basis = ("qm" if rotations.has_key_metric else "qa" if rotations.has_key_importance
             else "eigen")
    return LayerSensitivity(costs["keys"], costs["values"], int(n), corpus_sha256, basis)


def run_sensitivity(model, rotations, token_ids, progress: Callable | None = None,
                    **kwargs) -> LayerSensitivity:
    """``measure_layer_sensitivity`` to completion, reporting through ``progress``."""
    steps = measure_layer_sensitivity(model, rotations, token_ids, **kwargs)
    while True:
        try:
            stage, done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(stage, done, total)


# ----------------------------------------------------------------- allocating
def layer_cost(table: dict[float, np.ndarray], bits: float) -> np.ndarray:
    """Each layer's cost at ``bits``, log-linear between (and beyond) the two probe
    widths nearest to it."""
    widths = sorted(table)
    lo, hi = (widths[0], widths[1]) if bits <= widths[0] else (widths[-2], widths[-1])
    for a, b in zip(widths, widths[1:], strict=False):
        if a <= bits <= b:
            lo, hi = a, b
    floor = 1e-12
    c_lo, c_hi = np.maximum(table[lo], floor), np.maximum(table[hi], floor)
    # Each bit must lower the cost (a ratio below 1 would be noise): at least 1.5x.
    ratio = np.maximum(c_lo / c_hi, 1.5 ** (hi - lo))
    return c_hi * ratio ** ((hi - bits) / (hi - lo))


def allocate_layer_bits(sensitivity: LayerSensitivity, key_bits: float, value_bits: int,
                        key_spread: float = 1.5, value_spread: int = 1) -> dict:
    """Per-layer key widths (water-filling targets on the half-bit grid within
    ``key_spread`` of ``key_bits``) and affine value widths (within ``value_spread`` of
    ``value_bits``) minimising the modelled total KL, with Σ (key + value bits) no more
    than the uniform configuration's. Key codes pad to whole 32-bit words per token and
    head — half bits at head_dim 64 — so a width between half bits would cost the next
    one: a target between them (2.75) is met on average by whole half bits per layer.
    Returns {"keys": [...], "values": [...], "predicted_kl", "uniform_kl"}."""
    L = sensitivity.num_layers
    low, high = max(1.0, key_bits - key_spread), min(8.0, key_bits + key_spread)
    key_options = [k / 2 for k in range(math.ceil(2 * low - 1e-9),
                                        math.floor(2 * high + 1e-9) + 1)]
    value_options = [b for b in AFFINE_VALUE_BITS if abs(b - value_bits) <= value_spread]
    if value_bits not in AFFINE_VALUE_BITS:
        raise SensitivityError(f"affine values take {AFFINE_VALUE_BITS} bits, not {value_bits}")
    if not key_options:
        raise SensitivityError(f"no key width between 1 and 8 bits near {key_bits}")
    key_cost = np.stack([layer_cost(sensitivity.keys, b) for b in key_options], axis=1)
    value_cost = np.stack([layer_cost(sensitivity.values, b) for b in value_options], axis=1)
    # Options per layer: (half-bit units of key + value bits, cost, key bits, value bits);
    # the budget is the uniform configuration's bits, in whole half bits.
    options = [[(int(round(2 * kb)) + 2 * vb, key_cost[l, i] + value_cost[l, j], kb, vb)
                for i, kb in enumerate(key_options) for j, vb in enumerate(value_options)]
               for l in range(L)]
    budget = math.floor(2 * L * (key_bits + value_bits) + 1e-6)
    fewest = min(u for u, *_ in options[0])
    # Dynamic programme over layers: units spent -> (cost, units before, choice).
    stages: list[dict[int, tuple[float, int, tuple[float, int]]]] = []
    frontier = {0: 0.0}
    for layer, layer_options in enumerate(options):
        rest = L - layer - 1  # later layers need at least ``fewest`` units each
        stage: dict[int, tuple[float, int, tuple[float, int]]] = {}
        for spent, cost in frontier.items():
            for units, c, kb, vb in layer_options:
                u = spent + units
                if u + rest * fewest <= budget and (u not in stage or cost + c < stage[u][0]):
                    stage[u] = (cost + c, spent, (kb, vb))
        stages.append(stage)
        frontier = {u: entry[0] for u, entry in stage.items()}
    frontier = {u: c for u, c in frontier.items() if u <= budget}
    if not frontier:
        raise SensitivityError("no allocation fits the budget")
    units = min(frontier, key=frontier.get)
    cost = frontier[units]
    picks = []
    for stage in reversed(stages):
        _, units, choice = stage[units]
        picks.append(choice)
    picks.reverse()
    uniform = float((layer_cost(sensitivity.keys, key_bits)
                     + layer_cost(sensitivity.values, value_bits)).sum())
    return {"keys": [float(k) for k, _ in picks], "values": [int(v) for _, v in picks],
            "predicted_kl": float(cost), "uniform_kl": uniform}
