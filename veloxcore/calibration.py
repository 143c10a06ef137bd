"""Calibrate SpectralQuant rotations: per-layer, per-KV-head PCA of keys and values.

The model runs over calibration windows with a ``CovarianceCapture`` cache in
every layer. mlx-lm hands a cache its keys *after* RoPE; in "pre" mode the
capture cache undoes RoPE itself (it knows each key's position and the layer's
RoPE module), so no attention code is patched and any mlx-lm architecture with a
RoPE module works. Only second moments are kept: memory is
O(layers · heads · head_dim²) whatever the number of samples.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .corpus import Corpus, load_corpus, sample_windows
from .errors import VeloxError
from .key_metric import position_averaged_metric, rope_pairs

ROPE_MODES = ("pre", "post")


class CalibrationError(VeloxError):
    """Calibration cannot run on this model or input."""


class CalibrationCancelled(CalibrationError):
    """The caller set the cancel event; nothing was produced."""


@dataclass
class SpectralRotation:
    """One layer's rotations: the PCA of keys and values per KV head.

    Eigenvectors are columns and eigenvalues descend; they diagonalise the
    covariance about ``*_mean`` (the mean key/value of the head), so a vector x
    has coordinates (x − mean) @ eigenvectors.
    """

    layer: int
    head_dim: int
    rope_mode: str
    token_count: int
    key_eigenvalues: np.ndarray  # (kv_heads, head_dim)
    key_eigenvectors: np.ndarray  # (kv_heads, head_dim, head_dim)
    value_eigenvalues: np.ndarray
    value_eigenvectors: np.ndarray
    key_mean: np.ndarray | None = None  # (kv_heads, head_dim); None = zero
    value_mean: np.ndarray | None = None
    # How much query energy each key eigen-direction meets (mean 1 per head), or None.
    key_importance: np.ndarray | None = None
    # The score-error metric of pre-RoPE key errors (kv_heads, head_dim, head_dim): the
    # head's queries' second moment averaged over relative positions
    # (veloxcore.key_metric), or None.
    key_metric: np.ndarray | None = None

    def __post_init__(self) -> None:
        zeros = np.zeros(self.key_eigenvalues.shape, dtype=np.float32)
        if self.key_mean is None:
            self.key_mean = zeros
        if self.value_mean is None:
            self.value_mean = zeros.copy()

    @property
    def num_kv_heads(self) -> int:
        return self.key_eigenvalues.shape[0]


@dataclass
class SpectralRotations:
    """All layers' rotations plus what they were calibrated on."""

    layers: list[SpectralRotation]
    rope_mode: str
    num_samples: int
    sequence_length: int
    corpus_name: str
    corpus_sha256: str
    seed: int
    sink_tokens: int
    model_fingerprint: dict = field(default_factory=dict)
    # Measured per-layer costs of coded keys/values (veloxcore.sensitivity), or None.
    layer_sensitivity: object | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> SpectralRotation:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def token_count(self) -> int:
        return self.layers[0].token_count if self.layers else 0

    @property
    def has_key_metric(self) -> bool:
        """Whether every layer carries the query metric (+qm; pre-RoPE keys only)."""
        return (bool(self.layers) and self.rope_mode == "pre"
                and all(r.key_metric is not None for r in self.layers))

    @property
    def has_key_importance(self) -> bool:
        """Whether query statistics were recorded (needed for query-aware key bits)."""
        return bool(self.layers) and all(r.key_importance is not None for r in self.layers)


@dataclass
class CalibrationProgress:
    samples_done: int
    num_samples: int
    tokens_done: int
    tokens_per_s: float
    eta_s: float
    layer: int
    key_eigenvalues: np.ndarray  # (kv_heads, head_dim), current estimate, descending
    value_eigenvalues: np.ndarray


def find_rope(layer: nn.Module) -> nn.Module | None:
    """The RoPE module inside a transformer layer (any mlx-lm architecture)."""
    for _, module in layer.named_modules():
        if isinstance(module, nn.RoPE) or "rope" in type(module).__name__.lower():
            return module
    return None


class RopeInverter:
    """Undo a RoPE module: R(p)⁻¹ x = C·R(p)·C·x / s², where C flips the sign of the
    second element of every rotated pair (interleaved or half-split) and s is the
    module's per-dimension scale, measured at position 0 where R is the identity."""

    def __init__(self, rope: nn.Module, head_dim: int):
        self.rope = rope
        dims = int(getattr(rope, "dims", getattr(rope, "dim", head_dim)))
        traditional = bool(getattr(rope, "traditional", False))
        sign = np.ones(head_dim, dtype=np.float32)
        if traditional:
            sign[1:dims:2] = -1.0
        else:
            sign[dims // 2: dims] = -1.0
        self.sign = mx.array(sign)
        ones = mx.ones((1, 1, 1, head_dim), dtype=mx.float32)
        scale = rope(ones, offset=0).reshape(head_dim)
        self.inv_scale2 = 1.0 / (scale * scale)

    def __call__(self, keys: mx.array, offset: int) -> mx.array:
        x = keys.astype(mx.float32) * self.sign
        return self.rope(x, offset=offset) * self.sign * self.inv_scale2


class CovarianceCapture:
    """A cache that records second moments of keys and values as they arrive.

    It plays the role of an empty mlx-lm KVCache for a single prefill: it returns
    the chunk it is given (attention within the window is exact) and keeps no
    activations. Positions before ``sink_tokens`` are left out of the statistics,
    because compressed caches keep those tokens exact.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, rope_inverter: RopeInverter | None,
                 sink_tokens: int = 0):
        self.rope_inverter = rope_inverter
        self.sink_tokens = sink_tokens
        self.offset = 0
        self.key_moment = mx.zeros((num_kv_heads, head_dim, head_dim), dtype=mx.float32)
        self.value_moment = mx.zeros_like(self.key_moment)
        self.key_sum = mx.zeros((num_kv_heads, head_dim), dtype=mx.float32)
        self.value_sum = mx.zeros_like(self.key_sum)
        self.count = 0

    def reset_sequence(self) -> None:
        self.offset = 0

    def reset_sums(self) -> None:
        for name in ("key_moment", "value_moment", "key_sum", "value_sum"):
            setattr(self, name, mx.zeros_like(getattr(self, name)))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, H, L, D = keys.shape
        start = self.offset
        self.offset += L
        skip = max(0, self.sink_tokens - start)
        if skip < L:
            k = keys if self.rope_inverter is None else self.rope_inverter(keys, start)
            k = _rows(k[..., skip:, :])
            v = _rows(values[..., skip:, :])
            self.key_moment = self.key_moment + k.swapaxes(1, 2) @ k
            self.value_moment = self.value_moment + v.swapaxes(1, 2) @ v
            self.key_sum = self.key_sum + k.sum(axis=1)
            self.value_sum = self.value_sum + v.sum(axis=1)
            self.count += B * (L - skip)
        return keys, values

    @property
    def state(self):
        return self.key_moment, self.value_moment, self.key_sum, self.value_sum


class QueryPairEnergy(nn.Module):
    """Wraps a layer's q_proj (or q_norm) during calibration and sums each query head's energy per
    RoPE pair, Σ|q_pair|² (RoPE rotates within pairs, so these energies are the same
    before and after RoPE, at every position), and each KV head's query group's second
    moment Σ q·qᵀ (pre-RoPE; veloxcore.key_metric averages it over positions)."""

    def __init__(self, inner: nn.Module, heads: int, kv_heads: int, head_dim: int,
                 traditional: bool):
        super().__init__()
        self.inner = inner
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim, self.traditional = head_dim, traditional
        self.energy = mx.zeros((heads, head_dim // 2), dtype=mx.float32)
        self.moment = mx.zeros((kv_heads, head_dim, head_dim), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        B, L = y.shape[:2]  # (B, L, H·D) from q_proj, (B, L, H, D) from q_norm
        q = y.reshape(B, L, self.heads, self.head_dim).astype(mx.float32)
        self.energy = self.energy + pair_energy(q, self.traditional).sum(axis=(0, 1))
        # mlx-lm repeats KV head h for query heads h·G … h·G + G − 1.
        grouped = q.reshape(B * L, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        self.moment = self.moment + mx.einsum("nhgd,nhge->hde", grouped, grouped)
        return y

    def reset(self) -> None:
        self.energy = mx.zeros_like(self.energy)
        self.moment = mx.zeros_like(self.moment)


def pair_energy(x: mx.array, traditional: bool) -> mx.array:
    """|x_pair|² over the last axis: pairs (2j, 2j+1) if traditional, else (j, j + D/2)."""
    D = x.shape[-1]
    if traditional:
        pairs = x.reshape(*x.shape[:-1], D // 2, 2)
        return (pairs * pairs).sum(axis=-1)
    a, b = x[..., : D // 2], x[..., D // 2:]
    return a * a + b * b


def key_importance(query_energy: np.ndarray, eigenvectors: np.ndarray,
                   traditional: bool) -> np.ndarray:
    """ω (kv_heads, D): the query energy each key eigen-direction meets, mean 1 per head.

    For a key error δ (pre-RoPE), the score error averaged over relative positions is
    ≈ ½ Σ_pairs E|q_pair|²·|δ_pair|²; with δ = V ε this is Σ_i ε_i² ω_i, where
    ω_i = ½ Σ_j w_j |V[pair j, i]|² and w_j sums the head's query group
    (BENCHMARKS.md: water-filling on λ·ω lowers KL 17–18% at 8k).
    """
    H, D, _ = eigenvectors.shape
    w = query_energy.reshape(H, -1, D // 2).sum(axis=1)
    v2 = eigenvectors.astype(np.float64) ** 2
    if traditional:
        per_pair = v2.reshape(H, D // 2, 2, D).sum(axis=2)
    else:
        per_pair = v2[:, : D // 2] + v2[:, D // 2:]
    omega = np.einsum("hp,hpi->hi", w, per_pair)
    mean = omega.mean(axis=1, keepdims=True)
    return (omega / np.where(mean > 0, mean, 1.0)).astype(np.float32)


def install_query_recorders(model) -> list[QueryPairEnergy] | None:
    """Wrap every layer's q_proj, or return None where the layout is not known."""
    args = model.args
    heads = args.num_attention_heads
    _, kv_heads, head_dim = model_shape(model)
    attns = [getattr(layer, "self_attn", None) for layer in model.layers]
    if not all(a is not None and isinstance(getattr(a, "q_proj", None), nn.Module)
               for a in attns):
        return None
    recorders = []
    for attn, layer in zip(attns, model.layers, strict=True):
        rope = find_rope(layer)
        traditional = bool(getattr(rope, "traditional", getattr(args, "rope_traditional", False)))
        # Queries as RoPE receives them: after a per-head q_norm where the model has one
        # (Qwen3, Gemma 3, OLMo 2…), as the keys are taken after k_norm.
        name = "q_norm" if isinstance(getattr(attn, "q_norm", None), nn.Module) else "q_proj"
        recorder = QueryPairEnergy(getattr(attn, name), heads, kv_heads, head_dim, traditional)
        recorder.attribute = name
        setattr(attn, name, recorder)
        recorders.append(recorder)
    return recorders


def remove_query_recorders(model, recorders) -> None:
    for layer, recorder in zip(model.layers, recorders or [], strict=False):
        setattr(layer.self_attn, recorder.attribute, recorder.inner)


def _rows(x: mx.array) -> mx.array:
    """(B, H, L, D) -> (H, B·L, D) in float32."""
    B, H, L, D = x.shape
    return x.astype(mx.float32).transpose(1, 0, 2, 3).reshape(H, B * L, D)


def model_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of an mlx-lm model."""
    args = model.args
    heads = args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    return len(model.layers), kv_heads, head_dim


def _check_supported(model) -> None:
    from mlx_lm.models.cache import KVCache

    if hasattr(model, "make_cache"):
        kinds = {type(c).__name__ for c in model.make_cache() if type(c) is not KVCache}
        if kinds:
            raise CalibrationError(
                f"{type(model).__module__}: layers with {', '.join(sorted(kinds))} caches "
                "(sliding-window or hybrid attention) are not supported for calibration")


def _covariance(moment_sum: np.ndarray, vector_sum: np.ndarray, count: int) -> np.ndarray:
    """(H, D, D) covariance about the mean from accumulated x xᵀ and x sums."""
    mean = vector_sum / count
    return moment_sum / count - mean[..., :, None] * mean[..., None, :]


def _eigh_descending(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decompose (H, D, D) symmetric matrices with MLX on the CPU stream."""
    sym = 0.5 * (moments + moments.swapaxes(-1, -2))
    values, vectors = mx.linalg.eigh(mx.array(sym.astype(np.float32)), stream=mx.cpu)
    mx.eval(values, vectors)
    values, vectors = np.array(values)[..., ::-1], np.array(vectors)[..., ::-1]
    return np.ascontiguousarray(values), np.ascontiguousarray(vectors)


def _all_sum_f64(x: np.ndarray, group) -> np.ndarray:
    """Sum float64 accumulators across ranks exactly enough: as a float32 pair hi + lo."""
    hi = x.astype(np.float32)
    lo = (x - hi.astype(np.float64)).astype(np.float32)
    hi_sum = mx.distributed.all_sum(mx.array(hi), group=group, stream=mx.cpu)
    lo_sum = mx.distributed.all_sum(mx.array(lo), group=group, stream=mx.cpu)
    mx.eval(hi_sum, lo_sum)
    return np.array(hi_sum).astype(np.float64) + np.array(lo_sum).astype(np.float64)


def calibrate_spectral_rotation(
    model,
    tokenizer,
    num_samples: int = 64,
    sequence_length: int = 1024,
    corpus: Corpus | str | None = None,
    rope: str = "pre",
    seed: int = 0,
    progress: Callable[[CalibrationProgress], None] | None = None,
    cancel: threading.Event | None = None,
    progress_layer: int = 0,
    sink_tokens: int = 4,
    group=None,
) -> SpectralRotations:
    """Calibrate key/value PCA rotations for every layer and KV head.

    corpus: a ``Corpus``, "bundled", or a path to .txt/.md/.jsonl text.
    rope: "pre" (keys as the model computes them, before RoPE) or "post" (as
    mlx-lm caches see them). ``progress`` gets a ``CalibrationProgress`` after
    every sample, with the current eigenvalue estimate of ``progress_layer``.
    Setting ``cancel`` stops within one sample and raises ``CalibrationCancelled``.
    ``group`` (an ``mx.distributed`` group) splits the samples over its ranks
    and sums the accumulators, so every rank returns the same rotations.
    """
    if rope not in ROPE_MODES:
        raise CalibrationError(f"rope must be one of {ROPE_MODES}, not {rope!r}")
    _check_supported(model)
    num_layers, kv_heads, head_dim = model_shape(model)
    if not 0 <= progress_layer < num_layers:
        raise CalibrationError(f"progress_layer {progress_layer} is not in [0, {num_layers})")
    if sink_tokens >= sequence_length:
        raise CalibrationError(f"sink_tokens ({sink_tokens}) must be below the sequence "
                               f"length ({sequence_length})")
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus or "bundled")
    ids = tokenizer.encode(corpus.text)
    windows = sample_windows(ids, num_samples, sequence_length, seed)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    mine = windows[rank::size]

    captures = []
    for layer in model.layers:
        inverter = None
        if rope == "pre":
            rope_module = find_rope(layer)
            if rope_module is None:
                raise CalibrationError(f"{type(layer).__name__}: no RoPE module found, so keys "
                                       "cannot be taken before RoPE (use rope='post')")
            inverter = RopeInverter(rope_module, head_dim)
        captures.append(CovarianceCapture(kv_heads, head_dim, inverter, sink_tokens))

    key_acc = np.zeros((num_layers, kv_heads, head_dim, head_dim), dtype=np.float64)
    value_acc = np.zeros_like(key_acc)
    key_sum = np.zeros((num_layers, kv_heads, head_dim), dtype=np.float64)
    value_sum = np.zeros_like(key_sum)
    tokens_per_sample = sequence_length - sink_tokens
    forward = model.model if hasattr(model, "model") else model
    recorders = install_query_recorders(model)
    query_acc = query_moment = None
    if recorders:
        query_acc = np.zeros((num_layers, *recorders[0].energy.shape), dtype=np.float64)
        query_moment = np.zeros((num_layers, *recorders[0].moment.shape), dtype=np.float64)
    try:
        _calibration_loop(forward, mine, captures, recorders, key_acc, value_acc, key_sum,
                          value_sum, (query_acc, query_moment), cancel, progress,
                          progress_layer, size, len(windows), sequence_length,
                          tokens_per_sample)
    finally:
        remove_query_recorders(model, recorders)
    if cancel is not None and cancel.is_set():
        raise CalibrationCancelled("calibration cancelled")

    count = len(mine) * tokens_per_sample
    if size > 1:
        key_acc, value_acc = _all_sum_f64(key_acc, group), _all_sum_f64(value_acc, group)
        key_sum, value_sum = _all_sum_f64(key_sum, group), _all_sum_f64(value_sum, group)
        if query_acc is not None:
            query_acc = _all_sum_f64(query_acc, group)
            query_moment = _all_sum_f64(query_moment, group)
        count = len(windows) * tokens_per_sample
    layers = []
    for layer in range(num_layers):
        key_vals, key_vecs = _eigh_descending(_covariance(key_acc[layer], key_sum[layer], count))
        value_vals, value_vecs = _eigh_descending(_covariance(value_acc[layer], value_sum[layer],
                                                              count))
        importance = metric = None
        if recorders:
            importance = key_importance(query_acc[layer], key_vecs, recorders[layer].traditional)
            if rope == "pre":
                metric = _key_metric(model.layers[layer], query_moment[layer], head_dim,
                                     len(windows) * sequence_length)
        layers.append(SpectralRotation(
            layer, head_dim, rope, count, key_vals, key_vecs, value_vals, value_vecs,
            key_mean=(key_sum[layer] / count).astype(np.float32),
            value_mean=(value_sum[layer] / count).astype(np.float32),
            key_importance=importance, key_metric=metric))
    info = getattr(model, "velox_info", None)
    return SpectralRotations(
        layers=layers, rope_mode=rope, num_samples=len(windows),
        sequence_length=sequence_length, corpus_name=corpus.name,
        corpus_sha256=corpus.sha256, seed=seed, sink_tokens=sink_tokens,
        model_fingerprint=info.fingerprint() if info is not None else
        {"num_layers": num_layers, "num_kv_heads": kv_heads, "head_dim": head_dim},
    )


def _key_metric(layer, query_moment: np.ndarray, head_dim: int, count: int):
    """The layer's score-error metric for pre-RoPE keys, or None where its RoPE is not a
    plain rotation linear in the position."""
    try:
        perm, theta, amp = rope_pairs(find_rope(layer), head_dim)
    except ValueError:
        return None
    return position_averaged_metric(query_moment / count, perm, theta, amp).astype(np.float32)


def _calibration_loop(forward, mine, captures, recorders, key_acc, value_acc, key_sum,
                      value_sum, query_accs, cancel, progress, progress_layer, size, total,
                      sequence_length, tokens_per_sample) -> None:
    query_acc, query_moment = query_accs
    start = time.perf_counter()
    for i, window in enumerate(mine):
        if cancel is not None and cancel.is_set():
            raise CalibrationCancelled("calibration cancelled")
        for capture in captures:
            capture.reset_sequence()
            capture.reset_sums()
        # Only the moments are evaluated: MLX skips work they do not depend on
        # (the last MLP and the LM head).
        forward(mx.array(window)[None], cache=captures)
        mx.eval([c.state for c in captures], [(r.energy, r.moment) for r in recorders or []])
        for layer, capture in enumerate(captures):
            key_acc[layer] += np.array(capture.key_moment)
            value_acc[layer] += np.array(capture.value_moment)
            key_sum[layer] += np.array(capture.key_sum)
            value_sum[layer] += np.array(capture.value_sum)
        for layer, recorder in enumerate(recorders or []):
            query_acc[layer] += np.array(recorder.energy)
            query_moment[layer] += np.array(recorder.moment)
            recorder.reset()
        if progress is not None:
            done = i + 1
            elapsed = time.perf_counter() - start
            count = done * tokens_per_sample
            progress(CalibrationProgress(
                samples_done=done * size if done < len(mine) else total,
                num_samples=total,
                tokens_done=done * size * sequence_length,
                tokens_per_s=done * size * sequence_length / elapsed if elapsed > 0 else 0.0,
                eta_s=elapsed / done * (len(mine) - done),
                layer=progress_layer,
                key_eigenvalues=_eigvals(_covariance(key_acc[progress_layer],
                                                     key_sum[progress_layer], count)),
                value_eigenvalues=_eigvals(_covariance(value_acc[progress_layer],
                                                       value_sum[progress_layer], count)),
            ))


def _eigvals(moments: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(0.5 * (moments + moments.swapaxes(-1, -2)))[..., ::-1].copy()
