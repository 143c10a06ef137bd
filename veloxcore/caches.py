"""Compressed KV caches for mlx-lm: spectral (SpectralQuant), RVQ and affine baselines.

Every cache follows mlx-lm's duck-typed protocol (``update_and_fetch``,
``offset``, ``make_mask``, ``trim``, ``state``, ``nbytes``) and works as
``prompt_cache=`` with ``mlx_lm.generate`` / ``stream_generate``. Storage is
bit-packed, so ``nbytes`` is the real footprint; ``update_and_fetch`` returns
decoded keys/values for mlx-lm's attention. The first ``sink_tokens`` tokens are
kept exact.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, create_attention_mask

from . import attention
from .arrays import as_mx
from .calibration import RopeInverter, SpectralRotations, find_rope, model_shape
from .entropy import ENTROPY_BLOCK, EntropyCodeError, EntropyKeyCoder, decode_together
from .errors import VeloxError
from .kernels import (
    MAX_EXACT,
    EntropyKernels,
    SpectralKernels,
    entropy_self_test,
    kernel_backend,
    merge_partials,
    reference_partials,
)
from .key_metric import metric_basis, rope_pairs
from .quantizers import DimCoder, make_coder
from .sensitivity import allocate_layer_bits
from .spectral import compute_spectral_gap, water_fill_bits

METHODS = ("spectral", "rvq", "affine", "fp16")
STEP = 256
# Tokens coded, and decoded to attend, at a time outside the fused kernels (rounded down
# to whole blocks): the float32 temporaries of a binary search per dim, of unpacking and
# of the basis product then stay bounded instead of growing with the prompt or the cache
# (CPU, default-model shape, one layer at 16k tokens: peak 104 -> 27 MiB, fp16's 34, and
# attention 1.6x faster; smaller decode pieces cost speed. BENCHMARKS.md, "Coding and
# decoding in pieces").
ENCODE_CHUNK = 256
DECODE_CHUNK = 1024
# Up to this many coded tokens decode in one piece: their temporaries are small, and on
# CPU each piece's dozen ops cost per-op overhead at every layer and step (chat at 4k
# tokens: 2.35 -> 2.17 tok/s in 1,024-token pieces).
DECODE_WHOLE = 4096
# Pieces of entropy-coded keys decoded on a GPU: each launch of its decoder takes about a
# millisecond whatever its length (a block's symbols decode one after another; H200,
# BENCHMARKS "Entropy-coded keys on the GPU"), so fewer, longer pieces.
ENTROPY_GPU_DECODE_CHUNK = 8192
# A block's largest |coefficient| lands on this level of the unit Lloyd-Max codebook
# (benchmarks/key_scale_experiment.py: "block max").
BLOCK_LEVEL = 2.0
# Weight, in tokens, of the calibrated key statistics when a cache adapts its key
# plan to the prompt (``+ad``).
ADAPT_PRIOR_TOKENS = 64


class _Pace(threading.local):
    """The array the last ``pace`` call submitted, per thread (MLX's work is per thread)."""

    submitted: mx.array | None = None


_pace = _Pace()


def submit(*arrays) -> bool:
    """``mx.async_eval(*arrays)``; False (nothing submitted) inside a function
    transformation (``mx.compile``, ``mx.vjp`` …), where MLX evaluates nothing."""
    try:
        mx.async_eval(*arrays)
    except ValueError as e:
        if "transformation" not in str(e):
            raise
        return False
    return True


def pace(marker: mx.array) -> None:
    """Submit ``marker`` (and everything it depends on) to the device now, then wait for
    the marker submitted by the previous call. MLX keeps every array a submitted kernel
    reads until that work completes (on CUDA, per graph of up to 100 kernels, and up to 10
    graphs in flight), so a host that builds a decode step far faster than the GPU runs it
    keeps the temporaries of every layer alive at once: with entropy-coded keys, whose
    decoding takes ~1 ms a layer on an H200, a step's peak was 905 MiB above the model
    at 8k on the default model's shape, paced 173 (BENCHMARKS "Entropy-coded keys on the
    GPU, paced and decoded in groups of layers"). Paced, the host stays one call ahead:
    the GPU has the newest work queued, and only two calls' temporaries are in flight.
    The marker is kept until the next call: pass a small array. Inside a function
    transformation nothing is submitted or waited for."""
    if not submit(marker):
        return
    previous, _pace.submitted = _pace.submitted, marker
    if previous is not None:
        mx.eval(previous)


# Layers whose entropy-coded keys one DecodeAhead group decodes at once, as a share of
# the model's layers (float32 coefficients: one layer's take the bytes of its fp16 keys
# and values, so a quarter of the layers' add a quarter of an fp16 cache).
DECODE_AHEAD_SHARE = 4


class DecodeAhead:
    """Entropy-coded keys' coefficients decoded for a group of layers at once.

    A GPU decoder launch takes ~1.1 ms nearly whatever the context (a block's symbols
    decode one after another; a few hundred threads busy at 8k tokens), and launches
    submitted together, not depending on each other, run side by side (H200, default
    model's shape: 7 layers in 1.46 ms against 1.06 for one at 8k; paced whole steps at
    64k 9.7 tok/s against 3.8 with each layer alone: BENCHMARKS "Entropy-coded keys on
    the GPU, paced and decoded in groups of layers"). On the host, numpy's decoding loop
    costs about as much per step for many streams as for few (``decode_together``).
    Decoding doesn't depend on the step's hidden states, so the first layer of a group
    decodes its own coded keys and the next layers' at once; each takes its own when it
    attends.

    Layers code in step (the same tokens reach each), so a layer that coded since its
    last fetch (a prompt chunk, or a decode step that codes a batch) means the layers
    after it will code too before they attend: it decodes alone. An entry is used only
    if its cache's codes are unchanged (``code_writes``, coded count, sinks, key coder)
    and the span is one it decoded; anything else (trim's cut block, a copied cache)
    decodes alone. Caches are held weakly: the group does not keep them alive."""

    def __init__(self, caches: list, group: int):
        self._caches = [weakref.ref(c) for c in caches]
        self.group = group
        # cache -> (its state when decoded, {position: coefficients}, its key coder);
        # cache -> its code_writes at its last fetch.
        self._ready: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._writes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def _state(cache) -> tuple:
        return cache.code_writes, cache.coded, cache.num_sinks, id(cache.key_coder)

    def coefficients(self, cache, codes: mx.array, position: int) -> mx.array:
        """The decoded coefficients of ``codes`` (a span of ``cache``'s key codes from
        absolute ``position``)."""
        spans = cache.decode_spans()
        L, s = codes.shape[2], cache.num_sinks
        if spans and (position - s, position - s + L) == spans[0]:  # a fetch begins
            unchanged = self._writes.get(cache) == cache.code_writes
            self._writes[cache] = cache.code_writes
            if cache not in self._ready and unchanged:
                self._decode_group(cache)
        entry = self._ready.get(cache)
        if entry is not None:
            y, current = entry[1].pop(position, None), entry[0] == self._state(cache)
            if not entry[1] or not current:
                del self._ready[cache]
            if y is not None and current and y.shape[2] == L:
                return y
        return cache.decode_coefficients(codes, position)

    def _decode_group(self, cache) -> None:
        caches = [ref() for ref in self._caches]
        start = next((i for i, c in enumerate(caches) if c is cache), None)
        if start is None:  # a copy of a linked cache: on its own
            return
        group = [c for c in caches[start: start + self.group] if c is not None and c.coded]
        gpu, host = {}, {}
        for c in group:
            decoder = c._entropy_kernel()
            s = c.num_sinks
            if decoder is not None:
                gpu[c] = {s + a: decoder.decode(c.parts[0][..., a:b, :], s + a)
                          for a, b in c.decode_spans()}
            else:
                host[c] = [(s + a, c.parts[0][..., a:b, :]) for a, b in c.decode_spans()]
        if not submit([y for pieces in gpu.values() for y in pieces.values()]):
            gpu = {}
        decoded = iter(decode_together([(c.key_coder, codes, position)
                                        for c, spans in host.items()
                                        for position, codes in spans]))
        for c, spans in host.items():
            host[c] = {position: next(decoded) for position, _ in spans}
        # (Each key coder is kept with its id, so that the id is not reused.)
        self._ready.update({c: (self._state(c), pieces, c.key_coder)
                            for c, pieces in (gpu | host).items()})


def link_decode_ahead(caches: list, group: int | None = None) -> DecodeAhead | None:
    """Let the entropy-coded caches (of one model, in layer order) decode their keys in
    groups (``DecodeAhead``): ``group`` layers at a time, by default a
    DECODE_AHEAD_SHARE-th of the layers. None (and the caches unlinked) where fewer than
    two such caches or groups of one."""
    coded = [c for c in caches if getattr(c, "entropy_bits", 0)]
    group = group or max(1, len(caches) // DECODE_AHEAD_SHARE)
    ahead = DecodeAhead(coded, group) if len(coded) >= 2 and group >= 2 else None
    for c in caches:
        if hasattr(c, "decode_ahead"):
            c.decode_ahead = ahead
    return ahead


class CacheConfigError(VeloxError):
    """A cache configuration does not fit the model or is inconsistent."""


@dataclass
class KVCacheConfig:
    """How to compress the KV cache.

    method: "spectral" (calibrated rotations + Lloyd-Max codes), "rvq"
    (calibration-free random rotation + Lloyd-Max + per-vector norm), "affine"
    (mlx-lm's group-wise affine quantisation) or "fp16" (mlx-lm's KVCache).
    Spectral keys use ``signal_bits`` on the dims above each head's spectral gap
    and ``noise_bits`` on the rest, or water-filled bits at ``target_avg_bits``
    when ``use_water_filling``; values use ``value_bits`` (water-filled at that
    average when ``use_water_filling``), or affine codes when
    ``value_method == "affine"``, or (``"lean"``) Lloyd-Max codes of the Hadamard-rotated
    values times each token's RMS (``value_bits`` + 8/head_dim bits). ``key_bits`` is the
    key (and value) width of
    "affine" and "rvq". ``bit_plan`` (a bundle's bit_plan.json) overrides
    per-dim widths.
    """

    method: str = "spectral"
    rotations: SpectralRotations | None = None
    signal_bits: int = 4
    noise_bits: int = 1
    value_bits: int = 2
    key_bits: int | None = None
    use_water_filling: bool = False
    target_avg_bits: float | None = None
    value_method: str = "spectral"
    value_group_size: int = 32
    sink_tokens: int = 4
    group_size: int = 64
    min_bits: int = 0
    max_bits: int = 8
    bit_plan: dict | None = None
    seed: int = 0
    allow_model_mismatch: bool = False
    # Codebook scale = scale_inflation · sqrt(eigenvalue): text unlike the
    # calibration corpus has larger coefficients, and clipping them costs far
    # more than the coarser steps (measured: see BENCHMARKS.md).
    scale_inflation: float = 2.0
    token_scale: bool = False
    # Smallest per-token scale: 1.0 scales down only vectors larger than a calibrated
    # one ("+tc"), leaving typical tokens on the calibrated codebooks.
    token_scale_floor: float = 1e-6
    token_scale_ceiling: float = 1e30
    # Newest tokens kept exact (fp16) until they leave this window; counted in nbytes.
    recent_tokens: int = 0
    # Tokens beyond the recent window are coded this many at a time, so a decode step
    # appends its token to the exact ones (one tiny kernel) instead of coding and storing
    # it (about ten); up to append_batch − 1 extra tokens stay exact, counted in nbytes.
    # Prompts and teacher-forced chunks are coded whole (BENCHMARKS.md, "batched append").
    # 32 rather than 16: a batch's coding is host-bound (~0.4 ms per layer on an H200's
    # host), and halving how often it runs gained 9% end to end at 4k (BENCHMARKS.md).
    append_batch: int = 32
    # Keys coded in blocks of this many tokens with per-block, per-dim scales
    # (0: static scales from calibration). Up to block−1 newest tokens stay exact.
    key_block_scale: int = 0
    # Water-fill keys on eigenvalue × query importance (needs a bundle calibrated with
    # query statistics; BENCHMARKS.md: 17–18% lower KL at 8k for the same bits).
    query_aware: bool = False
    # Decode attention straight from the codes ("auto": fused CUDA/Metal kernels where
    # available, else decode-then-attend; "reference": the pure-MLX version of the
    # fused path, for checking it anywhere; "off": always decode-then-attend).
    kernels: str = "auto"
    # Water-fill the key budget across all layers and heads at once (keys' distortion
    # weighted by eigenvalue, × query importance with query_aware) instead of per head.
    # Measured worse at equal real bits (BENCHMARKS.md, "+g" probe); not a default.
    global_key_bits: bool = False
    # Prompt-adaptive key plan: the first tokens a cache codes (the prompt) re-estimate
    # each key dim's mean and variance in the calibrated basis, blended with the
    # calibration's as if it were this many tokens; key bits are water-filled and
    # codebooks scaled on the blend (0: off). Text unlike the calibration corpus moves
    # energy between dims; see BENCHMARKS.md ("+ad").
    adapt_prior_tokens: int = 0
    # Affine values coded after a Hadamard rotation ("+vh"): outlier channels are spread
    # over each group (BENCHMARKS.md: value-only KL −26% at 4 bits, 2k tokens).
    rotate_values: bool = False
    # One budget over layers ("+la"): each layer's key target and affine value width
    # chosen from the bundle's measured layer sensitivity (veloxcore.sensitivity) so the
    # modelled KL is least at the same total bits as target_avg_bits / value_bits.
    layer_allocation: bool = False
    # Metric-weighted key basis ("+qm"): keys coded in the PCA basis of M^½·k, where M is
    # the queries' second moment averaged over relative positions (the rotations'
    # key_metric), so coefficient errors add up to score error; water-filled on that
    # spectrum (it replaces +qa's per-dim weights). See veloxcore.key_metric.
    query_metric: bool = False
    # Entropy-coded keys ("+ec"): coefficients quantised with one uniform step per KV
    # head (per block, set by rate control) and their indices rANS-coded in blocks of
    # ENTROPY_BLOCK tokens at target_avg_bits per dim, headers included
    # (veloxcore.entropy). Equal steps suit the metric-weighted basis (+qm), where
    # coefficient errors add up to score error. No fused kernels yet.
    entropy_keys: bool = False

    @classmethod
    def recommended(cls, rotations: SpectralRotations) -> KVCacheConfig:
        """The default spectral configuration (CLI chat and studio,
        ``spectral:wf3/a4g64+qm+ad+x1.5+vh+la``): keys water-filled at 3 bits in the
        metric-weighted pre-RoPE basis (``+qm``: coefficient errors add up to score error),
        re-planned on the prompt's own key statistics (``+ad``) with codebooks at 1.5× the
        standard deviation; values affine 4-bit (group 64) after a Hadamard rotation; 4
        exact sink tokens; the same bits spread over layers by their measured sensitivity
        (``+la``, when the bundle has it). BENCHMARKS.md, 8k context (H200): see
        "Metric-weighted key basis"; affine 4-bit: 4.5 bits, KL 0.21, +17%.

        Rotations calibrated before the query metric get the previous default,
        ``spectral:wf3/a4g64+tf0.7+qa+ad+x1.5+vh+la``: query-aware bits (eigenvalue ×
        query importance, when calibrated with query statistics) and a per-token scale
        never below 0.7 (without it, the short prompt "What is the capital of France?"
        once got a derailed reply)."""
        metric = rotations.has_key_metric
        return cls(method="spectral", rotations=rotations, use_water_filling=True,
                   target_avg_bits=3.0, value_method="affine", value_bits=4,
                   value_group_size=64, sink_tokens=4, token_scale=not metric,
                   token_scale_floor=1e-6 if metric else 0.7, query_metric=metric,
                   query_aware=not metric and rotations.has_key_importance,
                   adapt_prior_tokens=ADAPT_PRIOR_TOKENS, scale_inflation=1.5,
                   rotate_values=True,
                   layer_allocation=rotations.layer_sensitivity is not None)

    def label(self) -> str:
        if self.method == "fp16":
            return "fp16"
        if self.method in ("affine", "rvq"):
            return f"{self.method}{self.key_bits or 4}"
        keys = (f"wf{self.target_avg_bits:g}" if self.use_water_filling
                else f"{self.signal_bits}/{self.noise_bits}")
        prefix = {"affine": "a", "lean": "l"}.get(self.value_method, "")
        values = f"{prefix}{self.value_bits}"
        return f"spectral:{keys}/{values}"


# --------------------------------------------------------------------------- base
def _cat(a: mx.array | None, b: mx.array) -> mx.array:
    return b if a is None else mx.concatenate([a, b], axis=2)


class CodedKVCache:
    """Shared storage for caches that keep per-token codes in growable buffers.

    Token layout: ``sink_tokens`` exact tokens, then coded tokens, then exact tokens
    not yet coded: the ``recent_tokens`` newest (a residual window, as in KIVI: the
    newest tokens get most of the attention) and up to ``append_batch`` − 1 more decoded
    ones. Decoded tokens are coded ``append_batch`` at a time (a multi-token update codes
    everything beyond the window) because a decode step's own work is a handful of tiny
    kernels: coding and storing one token per step costs more launches than attention
    itself, appending it to the exact tokens one. Exact tokens (sinks first, then the
    uncoded tail) are counted at fp16 in ``nbytes``. They live at the front of one
    buffer each for keys and values (``num_exact`` of its tokens are valid), and a decode
    step writes its token into the room left there, as mlx-lm's KVCache does: one copy
    kernel per buffer instead of a concatenation's two and its join node (on an H200,
    ~120 of a 30-layer step's ~660 graph nodes).

    Subclasses implement ``encode(keys, values, position) -> tuple[mx.array]``
    (each part shaped (B, H, L, X)) and ``decode(parts, position) -> (keys,
    values)`` for the coded tokens starting at absolute ``position``.
    """

    # Coding granularity: tokens are coded in whole blocks of this many (block scales).
    block = 1
    # Blocks end on multiples of ``block`` in absolute position (after the sinks the
    # first block is short), else they start where the coded tokens start.
    aligned_blocks = False
    # Decoded tokens coded at a time (KVCacheBuilder sets the config's, checked there).
    append_batch = 1

    def __init__(self, sink_tokens: int = 0, recent_tokens: int = 0):
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.offset = 0
        self.parts: list[mx.array] | None = None
        # Exact tokens: num_sinks sinks, then the uncoded tail — the first num_exact
        # tokens of the (keys, values) buffers, (B, H, capacity, D) each, or None.
        self._exact: tuple[mx.array, mx.array] | None = None
        self.num_exact = 0
        self.num_sinks = 0
        self.coded = 0  # tokens stored in parts
        self.code_writes = 0  # changes to parts (stored, trimmed, restored): DecodeAhead
        self.fused_decode = False  # set by KVCacheBuilder once attention is hooked

    @property
    def paced(self) -> bool:
        """Whether decoding this cache is slow on the GPU against the host building the
        step, so that layers and decoded pieces are submitted as they are built and the
        host waits for the previous one (``pace``)."""
        return False

    @property
    def exact_keys(self) -> mx.array | None:
        return self._exact[0][..., : self.num_exact, :] if self.num_exact else None

    @property
    def exact_values(self) -> mx.array | None:
        return self._exact[1][..., : self.num_exact, :] if self.num_exact else None

    def _set_exact(self, keys: mx.array | None, values: mx.array | None) -> None:
        """Exact tokens held in exactly-sized buffers (room is added by decode steps)."""
        self._exact = None if keys is None else (keys, values)
        self.num_exact = 0 if keys is None else keys.shape[2]

    def exact_buffers(self):
        """(keys buffer, values buffer, count): the exact tokens are the first ``count``
        of each (B, H, capacity, D) buffer — what the fused kernels read; or None."""
        return None if not self.num_exact else (*self._exact, self.num_exact)

    @property
    def num_recent(self) -> int:
        """Exact tokens after the sinks (not coded yet)."""
        return self.num_exact - self.num_sinks if self.num_exact else 0

    @property
    def sink_keys(self) -> mx.array | None:
        return self.exact_keys[..., : self.num_sinks, :] if self.num_sinks else None

    @property
    def sink_values(self) -> mx.array | None:
        return self.exact_values[..., : self.num_sinks, :] if self.num_sinks else None

    @property
    def recent_keys(self) -> mx.array | None:
        return self.exact_keys[..., self.num_sinks:, :] if self.num_recent else None

    @property
    def recent_values(self) -> mx.array | None:
        return self.exact_values[..., self.num_sinks:, :] if self.num_recent else None

    # mlx-lm protocol -----------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        n = self.num_exact
        if keys.shape[2] == 1 and 0 < n < self._exact[0].shape[2]:
            # A decode step with room left in the exact buffers: the token is written in
            # place. (This is the per-layer host work of nearly every decode step: kept to
            # the few lines mlx-lm's KVCache runs.)
            key_buffer, value_buffer = self._exact
            key_buffer[..., n: n + 1, :] = keys
            value_buffer[..., n: n + 1, :] = values
            if self.offset < self.sink_tokens:
                self.num_sinks += 1
            self.num_exact = n = n + 1
            self.offset += 1
            excess = n - self.num_sinks - self.recent_tokens
            if excess >= self.append_batch:
                self._code_exact(self._codable(excess))
        else:
            self._append(keys, values)
        if self.fused_decode and keys.shape[2] == 1:
            # Attention reads the codes (``attend``, via veloxcore.attention's hook);
            # what is returned here is not used.
            return keys, values
        if self.paced:
            # The layers before this one (their attention over decoded caches included)
            # go to the GPU now; the host waits for the previous layer's (``pace``).
            pace(keys)
        return self.fetch(keys.dtype)

    def _append(self, keys: mx.array, values: mx.array) -> None:
        """Prompt chunks (everything beyond the recent window is coded) and decode steps
        that find no room (the buffers grow to hold a whole batch of waiting tokens)."""
        B, H, L, D = keys.shape
        self.num_sinks += max(0, min(self.sink_tokens - self.offset, L))
        n = self.num_exact
        if L == 1 and n:
            room = max(0, self._decode_capacity() - n - 1)
            self._set_exact(*(mx.concatenate([b[..., :n, :], x, mx.zeros((B, H, room, D),
                                                                           x.dtype)], axis=2)
                              for b, x in zip(self._exact, (keys, values), strict=True)))
            self.num_exact = n + 1
        else:
            self._set_exact(_cat(self.exact_keys, keys), _cat(self.exact_values, values))
        excess = self.num_recent - self.recent_tokens
        # Decode steps code in batches; prompt chunks code everything.
        if excess >= (self.append_batch if L == 1 else 1):
            self._code_exact(self._codable(excess))
        self.offset += L

    def _code_exact(self, count: int) -> None:
        """Code the oldest ``count`` exact tokens after the sinks into the buffers, in
        pieces of at most ``coding_chunk`` tokens."""
        if count <= 0:
            return
        s = self.num_sinks
        # Straight from the buffers (``exact_keys`` would slice them once more: an op a
        # coding step, and a decode step's host work is what small models wait for).
        key_buffer, value_buffer = self._exact
        keys = key_buffer[..., s: s + count, :]
        values = value_buffer[..., s: s + count, :]
        self._prepare_coding(keys, values, s + self.coded)
        previous = None
        for a, b in self._pieces(count, s + self.coded, self.coding_chunk):
            piece = keys[..., a:b, :]
            if previous is not None:
                # Each piece waits for the previous one's codes: built lazily, a prompt's
                # pieces were otherwise coded together and their temporaries coexisted
                # (8B-class layer, 16k-token prompt: peak 190 -> 76 MiB,
                # benchmarks/adapt_memory_probe.py).
                piece = mx.depends(piece, previous)
            previous = list(self.encode(piece, values[..., a:b, :], s + self.coded))
            self._store(previous)
        rest = self.num_exact - s - count
        if self._exact[0].shape[2] != self._decode_capacity():
            # A prompt chunk's buffers: contiguous copies of what stays (a slice would
            # keep the whole chunk alive, and room is for decode steps).
            self._set_exact(*(_without(x, s, s + count)
                              for x in (self.exact_keys, self.exact_values)))
            return
        # Decode buffers keep their room: the sinks stay where they are, a recent window
        # moves down (without one, as by default, nothing is copied).
        if rest:
            for buffer in self._exact:
                buffer[..., s: s + rest, :] = buffer[..., s + count: s + count + rest, :]
        self.num_exact = s + rest

    def _block_boundary(self, coded: int, sinks: int) -> int:
        """The last block boundary at or before coded index ``coded`` (0 at the latest).
        Boundaries are multiples of ``block`` counted from the first coded token, or in
        absolute position with aligned blocks."""
        shift = sinks if self.aligned_blocks else 0
        return max(0, (shift + coded) // self.block * self.block - shift)

    def _codable(self, excess: int) -> int:
        """How many of ``excess`` waiting tokens to code now: whole blocks."""
        return self._block_boundary(self.coded + excess, self.num_sinks) - self.coded

    @property
    def coding_chunk(self) -> int | None:
        """Tokens coded at a time (None: all at once)."""
        return ENCODE_CHUNK

    def _prepare_coding(self, keys: mx.array, values: mx.array, position: int) -> None:
        """Called with all the tokens about to be coded, before they are coded in pieces."""

    def _pieces(self, length: int, position: int, chunk: int | None) -> list[tuple[int, int]]:
        """[a, b) spans of ``length`` tokens starting at absolute ``position``, at most
        ``chunk`` (rounded down to whole blocks) long, cut where blocks end: at absolute
        multiples of the piece length when blocks are aligned to absolute positions."""
        if chunk is None or length <= chunk:
            return [(0, length)] if length else []
        chunk = max(self.block, chunk // self.block * self.block)
        first = (-position) % chunk if self.aligned_blocks else 0
        cuts = [0, *range(first or chunk, length, chunk), length]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def _decoded(self, then=None):
        """(keys, values) of the coded tokens: in one piece up to DECODE_WHOLE tokens
        (or one piece's worth), else in pieces of at most ``decode_chunk``. With
        ``then``, yields ``then(keys, values)`` (a tuple of arrays) instead, each
        piece's decoding made to wait for the previous piece's result (``mx.depends``):
        built lazily, the pieces were otherwise decoded together and their temporaries
        coexisted (8B-class layer, 16k tokens, attending: 104.5 -> 37-43 MiB;
        benchmarks/adapt_memory_probe.py)."""
        s = self.num_sinks
        previous = None
        for a, b in self.decode_spans():
            parts = [p[..., a:b, :] for p in self.parts]
            if previous is not None:
                parts[0] = mx.depends(parts[0], list(previous))
            keys, values = self.decode(parts, s + a)
            if then is None:
                yield keys, values
            else:
                previous = then(keys, values)
                yield previous

    @property
    def decode_chunk(self) -> int:
        """Coded tokens decoded at a time past DECODE_WHOLE."""
        return DECODE_CHUNK

    def decode_spans(self) -> list[tuple[int, int]]:
        """[a, b) spans of the coded tokens that ``fetch`` and ``attend`` decode as one
        piece each."""
        chunk = self.decode_chunk
        chunk = None if self.coded <= max(DECODE_WHOLE, chunk) else chunk
        return self._pieces(self.coded, self.num_sinks, chunk)

    def _decode_capacity(self) -> int:
        """Exact tokens the buffers hold while decoding: the sinks, the recent window
        and a batch of waiting tokens (coded in whole blocks: at least one block)."""
        return self.sink_tokens + self.recent_tokens + max(self.append_batch, self.block)

    def fetch(self, dtype=mx.float32):
        if not self.coded:
            return self.exact_keys, self.exact_values
        s = self.num_sinks
        keys, values = [], []
        paced = self.paced
        for k, v in self._decoded():
            k, v = k.astype(dtype), v.astype(dtype)
            if paced and submit(k, v) and keys:
                # One piece's float32 temporaries in flight at a time (see ``pace``).
                mx.eval(keys[-1], values[-1])
            keys.append(k)
            values.append(v)
        if self.exact_keys is not None:
            keys = [self.exact_keys[..., :s, :], *keys, self.exact_keys[..., s:, :]]
            values = [self.exact_values[..., :s, :], *values, self.exact_values[..., s:, :]]
        keys = [x for x in keys if x.shape[2]]
        values = [x for x in values if x.shape[2]]
        if len(keys) == 1:
            return keys[0], values[0]
        return mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)

    def exact_tokens(self):
        """(keys, values) of the exact tokens (sinks and uncoded tail), or None."""
        return None if not self.num_exact else (self.exact_keys, self.exact_values)

    def attend(self, queries: mx.array, scale: float) -> mx.array:
        """Attention of decode-step queries (B, Hq, 1, D) over everything cached,
        computed as partials over the exact and the coded tokens and merged."""
        partials = []
        exact = self.exact_tokens()
        if exact is not None:
            partials.append(reference_partials(queries, scale, *exact))
        partials += self._decoded(lambda k, v: reference_partials(queries, scale, k, v))
        return merge_partials(partials, queries.dtype)

    def _store(self, parts: tuple[mx.array, ...]) -> None:
        L = parts[0].shape[2]
        prev = self.coded
        if self.parts is None or prev + L > self.parts[0].shape[2]:
            # Capacity stays a multiple of STEP (the warp-tiled kernel reads whole tiles).
            grow = (prev + L + STEP - 1) // STEP * STEP - prev
            fresh = [mx.zeros((*p.shape[:2], grow, p.shape[3]), dtype=p.dtype) for p in parts]
            if self.parts is None:
                self.parts = fresh
            else:
                self.parts = [mx.concatenate([old[..., :prev, :], new], axis=2)
                              for old, new in zip(self.parts, fresh, strict=True)]
        for buffer, part in zip(self.parts, parts, strict=True):
            buffer[..., prev: prev + L, :] = part
        self.coded = prev + L
        self.code_writes += 1

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` tokens (uncoded tail first, then codes, then sinks)."""
        n = min(self.offset, n)
        self.offset -= n
        keep = self.offset
        sinks = min(self.num_sinks, keep)
        coded = min(self.coded, keep - sinks)
        recent = keep - sinks - coded
        kept_keys = [self.exact_keys[..., :sinks, :]] if sinks else []
        kept_values = [self.exact_values[..., :sinks, :]] if sinks else []
        if recent:
            kept_keys.append(self.exact_keys[..., self.num_sinks: self.num_sinks + recent, :])
            kept_values.append(
                self.exact_values[..., self.num_sinks: self.num_sinks + recent, :])
        start = self._block_boundary(coded, sinks)
        partial = coded - start
        if partial:
            # Codes live in whole blocks: decode the cut block and keep its head exact.
            stop = self._block_boundary(start + self.block, sinks)
            k, v = self.decode([p[..., start: stop, :] for p in self.parts], sinks + start)
            dtype = k.dtype if self.exact_keys is None else self.exact_keys.dtype
            kept_keys.append(k[..., :partial, :].astype(dtype))
            kept_values.append(v[..., :partial, :].astype(dtype))
            coded = start
        self.coded = coded
        self.code_writes += 1
        self.num_sinks = sinks
        self._set_exact(_joined(kept_keys), _joined(kept_values))
        return n

    @property
    def nbytes(self) -> int:
        """Bytes allocated (codes grow in blocks of 256 tokens; the exact buffers hold
        room for the tokens a decode batch waits with)."""
        total = sum(p.nbytes for p in self.parts) if self.parts is not None else 0
        return total + self._exact_nbytes()

    @property
    def used_nbytes(self) -> int:
        """Bytes the tokens held occupy (codes and exact tokens, without spare room)."""
        per_token = sum(p.nbytes // p.shape[2] for p in self.parts) if self.parts else 0
        return per_token * self.coded + self._exact_nbytes(allocated=False)

    def _exact_nbytes(self, allocated: bool = True) -> int:
        # Exact tokens count at fp16, whatever the compute dtype; allocated: with the
        # buffers' room for waiting tokens.
        if self._exact is None:
            return 0
        B, H, capacity, D = self._exact[0].shape
        return 2 * 2 * B * H * D * (capacity if allocated else self.num_exact)

    @property
    def state(self):
        arrays = list(self.parts or [])
        for exact in (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values):
            if exact is not None:
                arrays.append(exact)
        return arrays

    @property
    def meta_state(self) -> str:
        return json.dumps({"offset": self.offset, "coded": self.coded,
                           "parts": len(self.parts or []), "sinks": self.num_sinks > 0,
                           "recent": self.num_recent > 0})

    def restore(self, state, meta_state: str) -> None:
        """Inverse of (state, meta_state) on a cache built with the same config."""
        meta = json.loads(meta_state)
        arrays = list(state)
        n = meta["parts"]
        self.parts, arrays = (arrays[:n] or None), arrays[n:]
        keys, values = [], []
        self.num_sinks = 0
        if meta["sinks"]:
            keys.append(arrays[0])
            values.append(arrays[1])
            self.num_sinks, arrays = arrays[0].shape[2], arrays[2:]
        if meta.get("recent"):
            keys.append(arrays[0])
            values.append(arrays[1])
        self._set_exact(_joined(keys), _joined(values))
        self.offset, self.coded = meta["offset"], meta["coded"]
        self.code_writes += 1


def _joined(arrays: list[mx.array]) -> mx.array | None:
    """The arrays joined along the token axis (contiguous), or None if there are none."""
    if not arrays:
        return None
    return mx.contiguous(arrays[0]) if len(arrays) == 1 else mx.concatenate(arrays, axis=2)


def _without(x: mx.array, start: int, stop: int) -> mx.array | None:
    """``x`` without tokens [start, stop) (contiguous), or None if nothing is left."""
    return _joined([p for p in (x[..., :start, :], x[..., stop:, :]) if p.shape[2]])


# ------------------------------------------------------------------- spectral
@dataclass
class PlanAdaptation:
    """What a spectral cache needs to re-plan its keys (or spectral values) on the prompt
    (``+ad``): calibrated eigenvalues (H, D), query importance (H, D) or None, the
    water-filling target and limits, the codebook scale inflation and the prior's weight
    in tokens."""

    eigenvalues: np.ndarray
    importance: np.ndarray | None
    target_bits: float
    min_bits: int
    max_bits: int
    inflation: float
    prior_tokens: int

    def plan(self, moments: np.ndarray, count: int):
        """(shift, variance, bits) from the prompt's first and second moments
        ``moments`` (2, H, D) of count tokens in the calibrated, centred basis."""
        n0 = self.prior_tokens
        first, second = moments
        shift = first / (count + n0)
        variance = (second + n0 * self.eigenvalues) / (count + n0) - shift * shift
        variance = np.maximum(variance, 1e-12)
        spectra = variance if self.importance is None else variance * self.importance
        bits = np.stack([water_fill_bits(s, self.target_bits, self.min_bits, self.max_bits)
                         for s in spectra])
        return shift, variance, bits


def _adapted_plan(adaptation: PlanAdaptation, moments: np.ndarray, count: int,
                  basis: mx.array, calibrated_mean: mx.array, entropy_bits: float = 0.0):
    """(mean, coder, rms) of a plan re-fitted to ``moments`` (2, H, D) of ``count``
    tokens' coefficients, centred on ``calibrated_mean``; ``basis`` (H, D, D) decodes
    coefficients (original dims × coefficients). ``entropy_bits``: an entropy coder at
    that budget, its index model scaled by the re-fitted deviations."""
    shift, variance, bits = adaptation.plan(moments, count)
    scales = adaptation.inflation * np.sqrt(variance)
    # Centre on the blended mean: x − μ − V·shift has coefficients y − shift.
    moved = np.einsum("hi,hdi->hd", shift, np.array(basis, dtype=np.float64))
    mean = calibrated_mean + as_mx(moved[None, :, None, :].astype(np.float32))
    rms = as_mx(np.sqrt(np.mean(np.square(scales), axis=-1))[None, :, None, None]
                .astype(np.float32))
    coder = (EntropyKeyCoder(np.sqrt(variance), entropy_bits, ENTROPY_BLOCK) if entropy_bits
             else make_coder(bits, scales))
    return mean, coder, rms


class SpectralKVCache(CodedKVCache):
    """Keys and values coded in their calibrated bases (eigenbases; for keys with +qm the
    metric-weighted basis, coded through ``key_vectors`` and decoded through
    ``key_decoder``).

    rope_mode "pre": arriving (post-RoPE) keys are un-rotated by the layer's RoPE
    module, coded, and RoPE is re-applied to what is decoded — no attention code
    is patched. "post": keys are coded as they arrive.
    """

    def __init__(self, key_vectors: np.ndarray, key_scales: np.ndarray, key_bits: np.ndarray,
                 value_vectors: np.ndarray, value_scales: np.ndarray,
                 value_bits: np.ndarray | None, rope_mode: str, rope=None,
                 value_affine: tuple[int, int] | None = None, sink_tokens: int = 4,
                 key_mean: np.ndarray | None = None, value_mean: np.ndarray | None = None,
                 token_scale: bool = False, recent_tokens: int = 0, key_block: int = 0,
                 token_scale_floor: float = 1e-6, token_scale_ceiling: float = 1e30,
                 adaptation: PlanAdaptation | None = None,
                 value_rotation: np.ndarray | None = None,
                 value_adaptation: PlanAdaptation | None = None,
                 key_decoder: np.ndarray | None = None, entropy_bits: float = 0.0,
                 value_token_scale: bool = False):
        super().__init__(sink_tokens, recent_tokens)
        H, D, _ = key_vectors.shape
        if key_block and token_scale:
            raise CacheConfigError("key block scales and per-token scales exclude each other")
        if entropy_bits and (key_block or token_scale):
            raise CacheConfigError("entropy-coded keys (+ec) set their own step per block: "
                                   "no block scales (+b) or per-token scales (+ts)")
        # Entropy-coded keys (veloxcore.entropy): key_scales are the coefficients'
        # standard deviations (the index model's), coded in whole blocks.
        self.entropy_bits = entropy_bits
        # GPU backend whose kernels code and decode entropy-coded blocks (use_kernels
        # sets it); None: numpy on the host.
        self.entropy_backend: str | None = None
        self._entropy_kernels: EntropyKernels | None = None
        self.decode_ahead: DecodeAhead | None = None  # set by link_decode_ahead
        if entropy_bits:
            self.block, self.aligned_blocks = ENTROPY_BLOCK, True
        self.token_scale = token_scale
        # Values may carry a per-token scale without the keys (lean values: one byte).
        self.value_token_scale = token_scale or value_token_scale
        self.value_log_scale = value_token_scale and not token_scale
        self.token_scale_floor = token_scale_floor
        self.token_scale_ceiling = token_scale_ceiling
        self.key_block = key_block
        if key_block:
            self.block = key_block
            # Codes are in units of each block's own per-dim scale (see _encode_keys).
            key_scales = np.ones_like(key_scales)
        # RMS of a calibrated vector in units of the coder's scales (for token_scale).
        self.key_rms = as_mx(np.sqrt(np.mean(np.square(key_scales), axis=-1))
                             [None, :, None, None].astype(np.float32))
        self.value_rms = as_mx(np.sqrt(np.mean(np.square(value_scales), axis=-1))
                               [None, :, None, None].astype(np.float32))
        zeros = np.zeros((H, D), dtype=np.float32)
        # Means broadcast over (B, H, L, D).
        self.key_mean = as_mx((zeros if key_mean is None else key_mean)[None, :, None, :]
                              .astype(np.float32))
        self.value_mean = as_mx((zeros if value_mean is None else value_mean)
                                [None, :, None, :].astype(np.float32))
        self.rope_mode = rope_mode
        self.rope = rope
        self._rope_table: RopeTable | None | bool = False  # False: not looked up yet
        self.inverter = RopeInverter(rope, D) if rope_mode == "pre" else None
        # Keys code as (k − mean)·key_basis and decode as coefficients·key_decoderᵀ + mean;
        # the two are the same orthonormal basis unless the basis is metric-weighted
        # (veloxcore.key_metric). Both map original dims × coefficients, (H, D, D).
        self.key_basis = as_mx(key_vectors.astype(np.float32))
        self.key_decoder = (self.key_basis if key_decoder is None
                            else as_mx(key_decoder.astype(np.float32)))
        self.key_coder = (EntropyKeyCoder(key_scales, entropy_bits, ENTROPY_BLOCK)
                          if entropy_bits else make_coder(key_bits, key_scales))
        if adaptation is not None and (key_block or not isinstance(
                self.key_coder, DimCoder | EntropyKeyCoder)):
            raise CacheConfigError("an adaptive key plan needs per-dim coded keys without "
                                   "block scales")
        self.adaptation = adaptation
        self.value_affine = value_affine
        if value_rotation is not None and value_affine is None:
            raise CacheConfigError("a value rotation applies to affine values only")
        # Affine values coded after an orthogonal rotation (D, D): spreads outlier
        # channels over each group (values are decoded, or the output rotated back).
        self.value_rotation = (None if value_rotation is None
                               else as_mx(value_rotation.astype(np.float32)))
        # A Hadamard rotation runs as mlx's fast Walsh-Hadamard transform (the same
        # Sylvester ordering; symmetric, so it also rotates back): on an H200 it plus the
        # quantisation takes 36 µs per append against 80 µs as a small fp32 matmul.
        self.value_hadamard = (value_rotation is not None and not D & (D - 1)
                               and np.allclose(value_rotation, _hadamard(D)))
        if value_affine is None:
            self.value_basis = as_mx(value_vectors.astype(np.float32))
            self.value_coder = make_coder(value_bits, value_scales)
        if value_adaptation is not None and (value_affine is not None or adaptation is None
                                             or not isinstance(self.value_coder, DimCoder)):
            raise CacheConfigError("an adaptive value plan needs coded spectral values and "
                                   "an adaptive key plan")
        self.value_adaptation = value_adaptation
        # (moments (2 or 4, H, D): keys' then values' first and second moments, token
        # count) the plan was adapted to, once it is.
        self.adapted: tuple[np.ndarray, int] | None = None
        self.calibrated_plan = (self.key_mean, self.key_coder, self.key_rms)
        if value_adaptation is not None:
            self.calibrated_plan += (self.value_mean, self.value_coder, self.value_rms)
        self.kernels: SpectralKernels | None = None

    def use_kernels(self, backend: str) -> None:
        """Code arriving tokens and attend with the fused kernels of ``backend``
        ("cuda", "metal" or "reference"). Raises ValueError where unsupported."""
        if self.entropy_bits:
            raise ValueError(self.use_entropy_kernels(backend))
        if self.value_token_scale != self.token_scale:
            raise ValueError("lean values (wfN/lB) have no fused kernels yet")
        if not isinstance(self.key_coder, DimCoder) or (
                self.value_affine is None and not isinstance(self.value_coder, DimCoder)):
            raise ValueError("16-bit (uncoded) layers are not supported by the fused kernels")
        self.kernels = SpectralKernels(self, backend)

    def use_entropy_kernels(self, backend: str) -> str:
        """Code and decode entropy-coded keys with the GPU kernels of ``backend`` where
        they pass their self-test (attention stays mlx-lm's); what was done, as a note."""
        if backend == "reference":
            return "entropy-coded keys (+ec) have no fused kernels yet"
        problem = entropy_self_test(backend)
        if problem:
            return (f"entropy-coded keys (+ec) have no fused attention kernels yet, and their "
                    f"{backend} coder failed its self-test ({problem}): they are coded and "
                    f"decoded on the host")
        self.entropy_backend = backend
        return (f"entropy-coded keys (+ec) have no fused attention kernels yet: their blocks "
                f"are coded and decode on the GPU ({backend}), then mlx-lm attends")

    def attend(self, queries, scale):
        kernels = self.kernels
        if (kernels is None or kernels.backend == "reference" or not self.coded
                or self.num_exact > MAX_EXACT):
            return super().attend(queries, scale)
        return kernels.attend(queries, scale, self.parts, self.coded, self.num_sinks,
                              self.exact_buffers())

    def _adapt(self, keys, values, position):
        """Re-plan keys (and spectral values) on their first coded tokens (see
        PlanAdaptation). Their coefficients' moments are summed ENCODE_CHUNK tokens at a
        time (a whole prompt's float32 coefficients would be the largest temporary of
        coding it: 8B shape, 64k tokens, ~0.8 GB)."""
        B, _, L, _ = keys.shape
        total = None
        for a in range(0, L, ENCODE_CHUNK):
            k = keys[..., a: a + ENCODE_CHUNK, :]
            if total is not None:
                k = mx.depends(k, total)  # one piece's temporaries at a time
            if self.inverter is not None:
                k = self.inverter(k, position + a)
            y = (k.astype(mx.float32) - self.key_mean) @ self.key_basis
            piece = [y.sum(axis=(0, 2)), (y * y).sum(axis=(0, 2))]
            if self.value_adaptation is not None:
                y = (values[..., a: a + ENCODE_CHUNK, :].astype(mx.float32)
                     - self.value_mean) @ self.value_basis
                piece += [y.sum(axis=(0, 2)), (y * y).sum(axis=(0, 2))]
            total = mx.stack(piece) if total is None else total + mx.stack(piece)
        self._apply_adaptation(np.array(total, dtype=np.float64), B * L)

    def _apply_adaptation(self, moments: np.ndarray, count: int) -> None:
        calibrated = self.calibrated_plan
        self.key_mean, self.key_coder, self.key_rms = _adapted_plan(
            self.adaptation, moments[:2], count, self.key_decoder, calibrated[0],
            self.entropy_bits)
        if self.value_adaptation is not None:
            self.value_mean, self.value_coder, self.value_rms = _adapted_plan(
                self.value_adaptation, moments[2:4], count, self.value_basis, calibrated[3])
        self.adapted = (moments.astype(np.float32), count)
        if self.kernels is not None:
            self.kernels = SpectralKernels(self, self.kernels.backend)

    @property
    def fused_encode(self) -> bool:
        """Tokens are coded by the fused encode kernel (CUDA or Metal)."""
        return self.kernels is not None and self.kernels.backend != "reference"

    @property
    def coding_chunk(self) -> int | None:
        # The fused encoder has no large temporaries: one launch per batch.
        return None if self.fused_encode else ENCODE_CHUNK

    def _prepare_coding(self, keys, values, position):
        # A prompt-adaptive plan is set from all the prompt's coded tokens, not its first
        # piece.
        if self.adaptation is not None and self.adapted is None:
            self._adapt(keys, values, position)

    def encode(self, keys, values, position):
        self._prepare_coding(keys, values, position)  # a direct call adapts here
        fused = self.fused_encode
        if fused:
            key_parts = self.kernels.encode_keys(keys, position)
        else:
            if self.inverter is not None:
                keys = self.inverter(keys, position)
            y = (keys.astype(mx.float32) - self.key_mean) @ self.key_basis
            if self.key_block:
                key_parts = self._encode_blocks(y)
            elif self.entropy_bits:
                coder = self._entropy_kernel()
                key_parts = ((coder if coder is not None and coder.encodes
                              else self.key_coder).encode(y, position),)
            else:
                key_parts = self._encode_part(self.key_coder, y, self.key_rms)
        if self.value_affine is not None:
            bits, group = self.value_affine
            if self.value_hadamard:
                values = mx.hadamard_transform(values, scale=values.shape[-1] ** -0.5)
            elif self.value_rotation is not None:
                values = values.astype(mx.float32) @ self.value_rotation
            value_parts = tuple(mx.quantize(values.astype(mx.float16), group_size=group,
                                            bits=bits))
        elif fused:
            value_parts = self.kernels.encode_values(values, self.token_scale)
        else:
            centred = values.astype(mx.float32) - self.value_mean
            value_parts = self._encode_part(self.value_coder, centred @ self.value_basis,
                                            self.value_rms, token_scale=self.value_token_scale,
                                            byte_scale=self.value_log_scale)
        return (*key_parts, *value_parts)

    def _encode_part(self, coder, y, rms, token_scale: bool | None = None,
                     byte_scale: bool = False):
        if not (self.token_scale if token_scale is None else token_scale):
            return (coder.encode(y),)
        if byte_scale:
            # Lean values: the token's RMS as a one-byte log code (1/16 octave).
            code = log_scale_code(mx.sqrt(mx.mean(y * y, axis=-1, keepdims=True)) / rms)
            return coder.encode(y / log_scale(code)), code
        # Per-token scale: the vector's RMS relative to a calibrated vector's.
        scale = mx.sqrt(mx.mean(y * y, axis=-1, keepdims=True)) / rms
        scale = mx.clip(scale, self.token_scale_floor, self.token_scale_ceiling)
        scale = scale.astype(mx.float16)
        return coder.encode(y / scale.astype(mx.float32)), scale

    def _encode_blocks(self, y):
        """Per-block, per-dim scales: each block's largest |coefficient| maps to level
        ``BLOCK_LEVEL`` of the unit codebook, so nothing inside a block is clipped.
        The block's D fp16 scales are spread over its tokens (ceil(D/block) each)."""
        B, H, L, D = y.shape
        n, blk = L // self.block, self.block
        blocks = y.reshape(B, H, n, blk, D)
        scale = mx.max(mx.abs(blocks), axis=3, keepdims=True) / BLOCK_LEVEL
        scale = mx.maximum(scale, 1e-8).astype(mx.float16)
        codes = self.key_coder.encode((blocks / scale.astype(mx.float32)).reshape(B, H, L, D))
        width = -(-D // blk)
        flat = scale.reshape(B, H, n, D)
        if width * blk > D:
            flat = mx.concatenate([flat, mx.zeros((B, H, n, width * blk - D), mx.float16)], -1)
        return codes, flat.reshape(B, H, L, width)

    def _decode_blocks(self, codes, scales):
        B, H, T, _ = codes.shape
        n, blk, D = T // self.block, self.block, self.key_coder.dims
        scale = scales.reshape(B, H, n, -1)[..., :D].reshape(B, H, n, 1, D)
        y = self.key_coder.decode(codes).reshape(B, H, n, blk, D) * scale.astype(mx.float32)
        return y.reshape(B, H, T, D)

    def _decode_part(self, coder, parts, token_scale: bool | None = None):
        y = coder.decode(parts[0])
        scaled = self.token_scale if token_scale is None else token_scale
        if scaled and parts[1].dtype == mx.uint8:
            return y * log_scale(parts[1])
        return y * parts[1].astype(mx.float32) if scaled else y

    @property
    def nbytes(self) -> int:
        # The adapted plan belongs to this sequence: its moments count.
        return super().nbytes + self._plan_nbytes()

    @property
    def used_nbytes(self) -> int:
        return super().used_nbytes + self._plan_nbytes()

    def _plan_nbytes(self) -> int:
        return 0 if self.adapted is None else self.adapted[0].nbytes

    @property
    def state(self):
        arrays = super().state
        if self.adapted is not None:
            arrays.append(as_mx(self.adapted[0]))
        return arrays

    @property
    def meta_state(self) -> str:
        meta = json.loads(super().meta_state)
        meta["adapted_tokens"] = None if self.adapted is None else self.adapted[1]
        return json.dumps(meta)

    _PLAN = ("key_mean", "key_coder", "key_rms", "value_mean", "value_coder", "value_rms",
             "adapted", "kernels")

    def restore(self, state, meta_state: str) -> None:
        count = json.loads(meta_state).get("adapted_tokens")
        if count is not None and self.adaptation is None:
            raise CacheConfigError("this state has an adapted key plan (+ad): restore it "
                                   "into a cache built with the same adaptive config")
        plan = {name: getattr(self, name) for name in self._PLAN if hasattr(self, name)}
        try:
            self._restore(list(state), meta_state, count)
        except EntropyCodeError:
            # A damaged state changes nothing: back to the plan the cache had.
            for name, value in plan.items():
                setattr(self, name, value)
            raise

    def _restore(self, arrays: list, meta_state: str, count: int | None) -> None:
        if count is not None:
            # _apply_adaptation starts from the calibrated plan and rebuilds the kernels.
            self._apply_adaptation(np.array(arrays.pop(), dtype=np.float64), count)
        elif self.adapted is not None:
            # Back to the calibrated plan (only a cache that had adapted has left it).
            self.key_mean, self.key_coder, self.key_rms = self.calibrated_plan[:3]
            if self.value_adaptation is not None:
                self.value_mean, self.value_coder, self.value_rms = self.calibrated_plan[3:]
            self.adapted = None
            if self.kernels is not None:
                self.kernels = SpectralKernels(self, self.kernels.backend)
        if self.entropy_bits and self._entropy_kernel() is not None:
            meta = json.loads(meta_state)
            if meta["parts"] and meta["coded"]:
                self._check_entropy_codes(arrays[0], meta["coded"],
                                          arrays[meta["parts"]].shape[2] if meta["sinks"]
                                          else 0)
        super().restore(arrays, meta_state)

    @property
    def decode_chunk(self) -> int:
        return ENTROPY_GPU_DECODE_CHUNK if self.entropy_backend else DECODE_CHUNK

    @property
    def paced(self) -> bool:
        return self.entropy_backend is not None

    def _entropy_kernel(self) -> EntropyKernels | None:
        """The GPU coder of entropy-coded keys, for the current key plan (a
        prompt-adaptive plan replaces the coder), or None (numpy on the host)."""
        if self.entropy_backend is None:
            return None
        if self._entropy_kernels is None or self._entropy_kernels.coder is not self.key_coder:
            self._entropy_kernels = EntropyKernels(self.key_coder, self.entropy_backend)
        return self._entropy_kernels

    def decode_coefficients(self, codes: mx.array, position: int) -> mx.array:
        """Entropy-coded key ``codes`` from absolute ``position`` decoded on their own: by
        the GPU coder where there is one, else on the host."""
        decoder = self._entropy_kernel()
        return (decoder.decode(codes, position) if decoder is not None
                else self.key_coder.decode(codes, position))

    def _check_entropy_codes(self, codes: mx.array, coded: int, sinks: int) -> None:
        """Raise EntropyCodeError if the first ``coded`` tokens of entropy-coded key
        ``codes`` (after ``sinks`` sink tokens) do not decode: the GPU decoder does not
        check them at every step, so a state is checked before it is restored."""
        decoder = self._entropy_kernel()
        bad = 0
        for a, b in self._pieces(coded, sinks, self.decode_chunk):
            _, status = decoder.decode_with_status(codes[..., a:b, :], sinks + a)
            bad += int(mx.sum(status).item())
        if bad:
            raise EntropyCodeError(f"entropy-coded keys do not decode ({bad} corrupt "
                                   f"blocks): the state is damaged or from another plan")

    def _rope_keys(self, keys: mx.array, position: int) -> mx.array:
        """RoPE of decoded keys from ``position``: on CPU from a RopeTable where the
        module allows one, else (and on GPUs, where MLX's fused RoPE is fast) the module."""
        if mx.default_device() == mx.cpu:
            if self._rope_table is False:
                self._rope_table = RopeTable.of(self.rope, keys.shape[-1]) or None
            if self._rope_table is not None:
                return self._rope_table.apply(keys, position)
        return self.rope(keys, offset=position)

    def decode(self, parts, position):
        n = 2 if (self.token_scale or self.key_block) else 1
        if self.key_block:
            y = self._decode_blocks(*parts[:2])
        elif self.entropy_bits:
            y = (self.decode_ahead.coefficients(self, parts[0], position)
                 if self.decode_ahead is not None
                 else self.decode_coefficients(parts[0], position))
        else:
            y = self._decode_part(self.key_coder, parts[:n])
        keys = y @ self.key_decoder.swapaxes(-1, -2) + self.key_mean
        if self.inverter is not None:
            keys = self._rope_keys(keys, position)
        if self.value_affine is None:
            values = (self._decode_part(self.value_coder, parts[n:], self.value_token_scale)
                      @ self.value_basis.swapaxes(-1, -2) + self.value_mean)
        else:
            bits, group = self.value_affine
            # float32 scales and biases: the same values, dequantised in float32, which
            # on CPU is 5x faster than MLX's fp16 arithmetic (2k tokens, one layer:
            # 2.9 -> 0.6 ms; the Hadamard on float32 input 1.4 -> 0.8 ms).
            words, scales, biases = parts[n:]
            values = mx.dequantize(words, scales.astype(mx.float32),
                                   biases.astype(mx.float32), group_size=group, bits=bits)
            if self.value_hadamard:
                values = mx.hadamard_transform(values, scale=values.shape[-1] ** -0.5)
            elif self.value_rotation is not None:
                values = values @ self.value_rotation.T
        return keys, values


LOG_SCALE_STEPS = 16  # codes per octave of a lean value's per-token scale
LOG_SCALE_ZERO = 128  # the code of scale 1 (codes span 2^-8 … 2^7.94)


def log_scale_code(scale: mx.array) -> mx.array:
    """One-byte code of a positive scale: round(16·log2(scale)) + 128, clipped. Its
    step is 4.4%, so a token's scale is off by at most 2.2% — against 4-bit Lloyd-Max
    codes' 9.7% RMS error, about 0.5% more error for a quarter of fp16's bytes."""
    code = mx.round(LOG_SCALE_STEPS * mx.log2(mx.maximum(scale, 1e-30))) + LOG_SCALE_ZERO
    return mx.clip(code, 0, 255).astype(mx.uint8)


def log_scale(code: mx.array) -> mx.array:
    return mx.power(2.0, (code.astype(mx.float32) - LOG_SCALE_ZERO) / LOG_SCALE_STEPS)


class RopeTable:
    """A RoPE module's cos/sin per position and pair (amplitude included), taken from the
    module itself (it turns unit pairs) and grown as positions are asked for, so keys
    turned with them match the module's rounding. On CPU this is 4x faster than MLX's
    fused RoPE (2k tokens, one layer: 0.45 vs 1.9 ms, a fifth of a CPU decode step).
    Layers with the same RoPE share one (``of``)."""

    _shared: dict[tuple, RopeTable] = {}

    def __init__(self, rope, traditional: bool):
        self.rope, self.traditional = rope, traditional
        self.cos = self.sin = None

    @classmethod
    def of(cls, rope, dims: int) -> RopeTable | None:
        """The table of a RoPE module turning all ``dims`` dims by angles linear in the
        position (``rope_pairs`` checks), or None."""
        if int(getattr(rope, "dims", dims)) != dims:
            return None
        try:
            _, theta, amp = rope_pairs(rope, dims)
        except ValueError:  # angles not linear in the position
            return None
        traditional = bool(getattr(rope, "traditional", False))
        key = (traditional, dims, theta.tobytes(), amp.tobytes())
        if key not in cls._shared:
            cls._shared[key] = cls(rope, traditional)
        return cls._shared[key]

    def apply(self, keys: mx.array, position: int) -> mx.array:
        B, H, L, D = keys.shape
        if self.cos is None or self.cos.shape[0] < position + L:
            n = max(position + L, 2 * (0 if self.cos is None else self.cos.shape[0]), 4096)
            # Unit pairs (1, 0) at every position come out as (cos, sin) · amplitude.
            first = (np.arange(D) % 2 == 0) if self.traditional else (np.arange(D) < D // 2)
            unit = mx.broadcast_to(as_mx(first.astype(np.float32)), (1, 1, n, D))
            out = self.rope(unit, offset=0)[0, 0]
            self.cos, self.sin = ((out[:, 0::2], out[:, 1::2]) if self.traditional
                                  else (out[:, : D // 2], out[:, D // 2:]))
            mx.eval(self.cos, self.sin)
        cos, sin = self.cos[position: position + L], self.sin[position: position + L]
        if self.traditional:  # pairs (2i, 2i + 1)
            pairs = keys.reshape(B, H, L, D // 2, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            turned = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
            return turned.reshape(B, H, L, D)
        a, b = keys[..., : D // 2], keys[..., D // 2:]  # pairs (i, i + D/2)
        return mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


# ------------------------------------------------------------------------ RVQ
def random_rotation(dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def value_rotation(dim: int) -> np.ndarray:
    """The orthonormal Hadamard matrix where ``dim`` is a power of two (±1/√dim, exact
    in fp16 products), else a fixed random rotation."""
    return random_rotation(dim, seed=0) if dim & (dim - 1) else _hadamard(dim)


def _hadamard(dim: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix (the ordering of ``mx.hadamard_transform``)."""
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(dim)


class RVQKVCache(CodedKVCache):
    """Calibration-free baseline in the spirit of TurboQuant: a random orthogonal
    rotation makes every coordinate of a unit vector ≈ N(0, 1/D); each is coded
    with the Gaussian Lloyd-Max codebook; the vector's norm is kept in fp16."""

    def __init__(self, heads: int, dim: int, bits: int, seed: int = 0, sink_tokens: int = 4,
                 recent_tokens: int = 0):
        super().__init__(sink_tokens, recent_tokens)
        self.rotation = as_mx(random_rotation(dim, seed).astype(np.float32))
        scale = np.full((heads, dim), 1.0 / np.sqrt(dim))
        self.coder = DimCoder(np.full((heads, dim), bits), scale)

    def _encode_one(self, x):
        x = x.astype(mx.float32)
        norm = mx.linalg.norm(x, axis=-1, keepdims=True)
        unit = x / mx.maximum(norm, 1e-12)
        return self.coder.encode(unit @ self.rotation), norm.astype(mx.float16)

    def _decode_one(self, words, norm):
        unit = self.coder.decode(words) @ self.rotation.T
        return unit * norm.astype(mx.float32)

    def encode(self, keys, values, position):
        return (*self._encode_one(keys), *self._encode_one(values))

    def decode(self, parts, position):
        return self._decode_one(*parts[:2]), self._decode_one(*parts[2:])


# --------------------------------------------------------------------- affine
class AffineKVCache(CodedKVCache):
    """mlx-lm's group-wise affine quantisation (``mx.quantize``: the same codes,
    scales and biases as ``QuantizedKVCache``), decoded for standard attention so
    it runs on every backend (mlx-lm's quantized SDPA has no CUDA kernel for
    head_dim 64)."""

    def __init__(self, bits: int = 4, group_size: int = 64, sink_tokens: int = 0,
                 recent_tokens: int = 0):
        super().__init__(sink_tokens, recent_tokens)
        # Not named `bits`: mlx-lm would route a cache with `bits` to its quantized SDPA.
        self.width, self.group = bits, group_size

    def encode(self, keys, values, position):
        q = lambda x: mx.quantize(x.astype(mx.float16), group_size=self.group,  # noqa: E731
                                  bits=self.width)
        return (*q(keys), *q(values))

    def decode(self, parts, position):
        dq = lambda p: mx.dequantize(*p, group_size=self.group, bits=self.width)  # noqa: E731
        return dq(parts[:3]), dq(parts[3:])


# -------------------------------------------------------------------- builder
class CacheList(list):
    """The per-layer caches plus what the builder decided."""

    config: KVCacheConfig
    uncompressed_layers: list[int]
    layer_bits: list[dict]
    kernel_backend: str | None = None  # fused decode backend, None when not used
    kernel_notes: list[str] = []
    # Everything the builder wants the user told (the CLI prints these, the studio logs
    # them): kernel notes and notes on the layer budget.
    notes: list[str] = []

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self if hasattr(c, "nbytes") and not c.empty())


def _fp_cache_types(model) -> list:
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache() for _ in model.layers]


class KVCacheBuilder:
    @staticmethod
    def build(model, config: KVCacheConfig) -> CacheList:
        """One cache per layer. Layers whose mlx-lm cache is not a plain KVCache
        (sliding-window, hybrid/SSM) keep their own cache, listed in
        ``uncompressed_layers``."""
        if config.method not in METHODS:
            raise CacheConfigError(f"unknown method {config.method!r} (one of {METHODS})")
        if config.append_batch < 1:
            raise CacheConfigError(f"append_batch must be at least 1, not "
                                   f"{config.append_batch}")
        defaults = _fp_cache_types(model)
        num_layers, heads, dim = model_shape(model)
        caches = CacheList()
        caches.config = config
        caches.uncompressed_layers = []
        caches.layer_bits = []
        if config.method == "spectral":
            _check_rotations(model, config)
        keys_global = (global_key_bits(config) if config.method == "spectral"
                       and config.global_key_bits and config.use_water_filling else None)
        layer_configs = (_layer_allocation(config, num_layers)
                         if config.method == "spectral" and config.layer_allocation else None)
        caches.layer_allocation = layer_configs and [
            {"keys": c.target_avg_bits, "values": c.value_bits} for c in layer_configs]
        groups = {}
        if config.method == "affine":
            groups["affine"] = config.group_size
        if config.method == "spectral" and config.value_method == "affine":
            groups["affine values"] = config.value_group_size
        for what, group in groups.items():
            if group not in (32, 64, 128) or dim % group:
                raise CacheConfigError(f"{what}: group size {group} does not divide head_dim "
                                       f"{dim} (MLX supports groups of 32, 64, 128)")
        for layer, default in enumerate(defaults):
            if config.method == "fp16" or type(default) is not KVCache:
                if config.method != "fp16":
                    caches.uncompressed_layers.append(layer)
                caches.append(default)
                continue
            if config.method == "affine":
                caches.append(AffineKVCache(config.key_bits or 4, config.group_size,
                                            config.sink_tokens, config.recent_tokens))
            elif config.method == "rvq":
                caches.append(RVQKVCache(heads, dim, config.key_bits or 4,
                                         seed=config.seed + layer,
                                         sink_tokens=config.sink_tokens,
                                         recent_tokens=config.recent_tokens))
            else:
                cache, bits = _spectral_cache(
                    model, layer_configs[layer] if layer_configs else config, layer,
                    keys_global)
                caches.layer_bits.append(bits)
                caches.append(cache)
        for cache in caches:
            if isinstance(cache, CodedKVCache):
                cache.append_batch = config.append_batch
        caches.kernel_backend, caches.kernel_notes = _use_kernels(model, config, caches)
        link_decode_ahead(caches)
        caches.notes = [*(_allocation_notes(config) if layer_configs else []),
                        *caches.kernel_notes]
        return caches


def key_basis_label(config: KVCacheConfig) -> str:
    """The basis a spectral config codes keys in, as layer_sensitivity.json names it."""
    return "qm" if config.query_metric else "qa" if config.query_aware else "eigen"


def _allocation_notes(config: KVCacheConfig) -> list[str]:
    """A note when ``+la``'s layer costs were measured in another key basis than the one
    this configuration codes in (the costs still rank layers, less exactly)."""
    measured = config.rotations.layer_sensitivity.key_basis
    used = key_basis_label(config)
    if not measured or measured == used:
        return []
    return [f"+la: the bundle's layer costs were measured with keys in the {measured!r} "
            f"basis, this configuration codes them in {used!r}, so its layer budget is "
            "approximate"]


def _layer_allocation(config: KVCacheConfig, num_layers: int) -> list[KVCacheConfig]:
    """One config per layer with its own key target and value width (``+la``)."""
    sensitivity = config.rotations.layer_sensitivity
    if sensitivity is None:
        raise CacheConfigError("+la needs the bundle's measured layer sensitivity: run "
                               "`velox sensitivity --bundle DIR` first")
    if not config.use_water_filling or config.value_method not in ("affine", "lean") or (
            config.bit_plan is not None or config.global_key_bits):
        raise CacheConfigError("+la allocates water-filled key targets and affine (or lean) "
                               "value widths per layer: it needs spectral:wfN/aB... or "
                               "wfN/lB without a fixed bit plan or +g")
    if sensitivity.num_layers != num_layers:
        raise CacheConfigError(f"layer sensitivity has {sensitivity.num_layers} layers, the "
                               f"model {num_layers}")
    target = config.target_avg_bits if config.target_avg_bits is not None else 3.0
    plan = allocate_layer_bits(sensitivity, target, config.value_bits)
    return [replace(config, target_avg_bits=k, value_bits=v, layer_allocation=False)
            for k, v in zip(plan["keys"], plan["values"], strict=True)]


def _use_kernels(model, config: KVCacheConfig, caches) -> tuple[str | None, list[str]]:
    """Switch spectral layers to fused decode; (backend or None, notes on layers left out)."""
    if config.method != "spectral" or config.kernels == "off":
        return None, []
    if config.kernels not in ("auto", "reference", "cuda", "metal"):
        raise CacheConfigError(f"kernels must be auto, reference, cuda, metal or off, "
                               f"not {config.kernels!r}")
    backend = kernel_backend() if config.kernels == "auto" else config.kernels
    if config.kernels == "auto" and backend == "reference":
        return None, []  # CPU: decode-then-attend is the same computation, fewer ops
    unfused = None
    if backend != "reference":
        problem = kernel_self_test(backend)
        if problem:
            unfused = (f"the fused {backend} kernels failed their self-test ({problem}); "
                       "decoding then attending")
    if unfused is None and not attention.install(model):
        unfused = "the model's attention has no hook point; decoding then attending"
    if unfused is not None:
        # Entropy-coded keys' own kernels do not depend on the attention kernels.
        notes = [unfused]
        for layer, cache in enumerate(caches):
            if isinstance(cache, SpectralKVCache) and cache.entropy_bits:
                notes.append(f"layer {layer}: {cache.use_entropy_kernels(backend)}")
        return None, notes
    notes = []
    for layer, cache in enumerate(caches):
        if not isinstance(cache, SpectralKVCache):
            continue
        try:
            cache.use_kernels(backend)
            cache.fused_decode = True
        except ValueError as e:
            notes.append(f"layer {layer}: {e}")
    return backend, notes


@functools.cache
def kernel_self_test(backend: str) -> str | None:
    """Run the fused kernels once on a small random cache against the pure-MLX
    reference: None when they agree, else what went wrong. Guards against a GPU
    or compiler on which they fail to build or compute (once per process). On CUDA a
    second shape, head_dim 128, runs the warp-tiled kernel with its key basis in dynamic
    shared memory (a request past 48 KiB); at 64 the basis sits in registers."""
    rng = np.random.default_rng(0)
    # Not on Metal: its (block-tiled) kernels have run nowhere yet, and a head_dim-128
    # case they might not fit would switch them off for head_dim-64 models too.
    shapes = [(2, 64, 2)] + ([(2, 128, 4)] if backend != "metal" else [])
    for H, D, G in shapes:
        lam = np.exp(-np.arange(D) / (D / 6.4))[None].repeat(H, 0)
        bits = np.clip(np.round(3 + 0.5 * np.log2(lam / lam.mean(1, keepdims=True))), 0, 8)
        basis = np.stack([random_rotation(D, seed) for seed in range(H)])
        try:
            cache = SpectralKVCache(basis, 2 * np.sqrt(lam), bits.astype(np.int64), basis,
                                    2 * np.sqrt(lam), None, "pre",
                                    nn.RoPE(D, traditional=True), value_affine=(4, 64),
                                    sink_tokens=4, token_scale=True)
            keys = mx.array(rng.normal(size=(1, H, 300, D)).astype(np.float16))
            values = mx.array(rng.normal(size=(1, H, 300, D)).astype(np.float16))
            query = mx.array(rng.normal(size=(1, H * G, 1, D)).astype(np.float16))
            cache.use_kernels(backend)
            cache.update_and_fetch(keys, values)
            fused = cache.attend(query, D**-0.5)
            cache.kernels = None
            reference = cache.attend(query, D**-0.5)
            error = mx.max(mx.abs(fused.astype(mx.float32)
                                  - reference.astype(mx.float32))).item()
        except Exception as e:  # noqa: BLE001 — any failure means: do not use them
            message = str(e).splitlines()[0][:200] if str(e) else ""
            return f"head_dim {D}: {type(e).__name__}: {message}"
        # Tolerance: the encoders may round a few values to the neighbouring level, and
        # CUDA rebuilds keys from fp16 coefficients.
        if not error < 2e-2:
            return f"head_dim {D}: output differs from the reference by {error:.3g}"
    return None


def _check_rotations(model, config: KVCacheConfig) -> None:
    from .bundle import check_model

    if config.rotations is None:
        raise CacheConfigError("the spectral method needs calibrated rotations "
                               "(calibrate, or load a bundle)")
    check_model(config.rotations, model, "rotations",
                allow_model_mismatch=config.allow_model_mismatch)
    if config.value_method not in ("spectral", "affine", "lean"):
        raise CacheConfigError(f"value_method must be 'spectral', 'affine' or 'lean', "
                               f"not {config.value_method!r}")
    if config.query_metric and config.query_aware:
        raise CacheConfigError("+qm and +qa exclude each other: the metric-weighted basis "
                               "already weighs each direction by the queries (use one)")
    if config.query_metric and config.bit_plan is not None:
        raise CacheConfigError("a bit plan gives widths per eigen-direction; the "
                               "metric-weighted basis (+qm) has directions of its own")


def _key_spectra(rotation, config: KVCacheConfig) -> np.ndarray:
    """What key bits are water-filled on: eigenvalues, × query importance with +qa, the
    metric-weighted spectrum with +qm."""
    if config.query_metric:
        return key_metric_basis(rotation)[0]
    if not config.query_aware:
        return rotation.key_eigenvalues
    if rotation.key_importance is None:
        raise CacheConfigError("query-aware bits need rotations calibrated with query "
                               "statistics (recalibrate with this version)")
    return rotation.key_eigenvalues * rotation.key_importance


def spectral_layer_bits(rotation, config: KVCacheConfig, layer_plan: dict | None = None):
    """(key_bits, value_bits) arrays of shape (heads, head_dim) for one layer."""
    if layer_plan is not None:
        return (np.asarray(layer_plan["keys"], dtype=np.int64),
                np.asarray(layer_plan["values"], dtype=np.int64))
    key_spectra = _key_spectra(rotation, config)
    key_bits, value_bits = [], []
    for lam_k, lam_v in zip(key_spectra, rotation.value_eigenvalues, strict=True):
        if config.use_water_filling:
            target = config.target_avg_bits if config.target_avg_bits is not None else 3.0
            key_bits.append(water_fill_bits(lam_k, target, config.min_bits, config.max_bits))
            value_bits.append(water_fill_bits(lam_v, config.value_bits, config.min_bits,
                                              config.max_bits))
        else:
            k = compute_spectral_gap(lam_k)
            bits = np.full(lam_k.size, config.noise_bits, dtype=np.int64)
            bits[:k] = config.signal_bits
            key_bits.append(bits)
            value_bits.append(np.full(lam_v.size, config.value_bits, dtype=np.int64))
    return np.stack(key_bits), np.stack(value_bits)


def global_key_bits(config: KVCacheConfig) -> list[np.ndarray]:
    """Key bits (heads, head_dim) per layer from one water-filling over every layer,
    head and dim: the same total budget goes where distortion costs most."""
    spectra = [np.asarray(_key_spectra(rot, config), dtype=np.float64)
               for rot in config.rotations]
    target = config.target_avg_bits if config.target_avg_bits is not None else 3.0
    flat = water_fill_bits(np.concatenate([s.reshape(-1) for s in spectra]), target,
                           config.min_bits, config.max_bits)
    out, start = [], 0
    for s in spectra:
        out.append(flat[start: start + s.size].reshape(s.shape))
        start += s.size
    return out


def _value_rotation(rotation, config: KVCacheConfig) -> np.ndarray | None:
    if not config.rotate_values:
        return None
    if config.value_method != "affine":
        raise CacheConfigError("+vh rotates affine values (spectral:wfN/aB...); spectral "
                               "values are already coded in their own basis")
    return value_rotation(rotation.head_dim)


def key_metric_basis(rotation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spectrum, encoder, decoder) of the layer's metric-weighted key basis (+qm)."""
    if rotation.key_metric is None:
        raise CacheConfigError("a metric-weighted key basis (+qm) needs rotations "
                               "calibrated with the query metric (recalibrate with this "
                               "version)")
    if rotation.rope_mode != "pre":
        raise CacheConfigError("a metric-weighted key basis (+qm) needs pre-RoPE rotations")
    # Kept on the rotation (a chat builds a cache per reply; the eigendecompositions cost
    # ~10 ms a layer), valid while it still holds the same arrays.
    sources = (rotation.key_eigenvalues, rotation.key_eigenvectors, rotation.key_metric)
    cached = getattr(rotation, "_metric_basis", None)
    if cached is None or any(a is not b for a, b in zip(cached[0], sources, strict=True)):
        cached = (sources, metric_basis(*sources))
        rotation._metric_basis = cached
    return cached[1]


def _key_adaptation(rotation, config: KVCacheConfig) -> PlanAdaptation | None:
    if not config.adapt_prior_tokens:
        return None
    if not config.use_water_filling or config.bit_plan is not None or config.global_key_bits:
        raise CacheConfigError("an adaptive key plan (+ad) re-water-fills each head's keys: "
                               "it needs water-filled keys (spectral:wfN/...) and no fixed "
                               "bit plan or +g")
    if config.adapt_prior_tokens < 0:
        raise CacheConfigError(f"adapt_prior_tokens must be positive, not "
                               f"{config.adapt_prior_tokens}")
    # The plan re-fits variances in the cache's key basis; query-aware weights apply on top
    # (+qa), the metric-weighted basis already carries them (+qm).
    if config.query_metric:
        variances, importance = key_metric_basis(rotation)[0], None
    else:
        variances = rotation.key_eigenvalues
        importance = rotation.key_importance if config.query_aware else None
    return PlanAdaptation(variances.astype(np.float64), importance,
                         config.target_avg_bits if config.target_avg_bits is not None else 3.0,
                         config.min_bits, config.max_bits, config.scale_inflation,
                         config.adapt_prior_tokens)


def _value_adaptation(rotation, config: KVCacheConfig) -> PlanAdaptation | None:
    """Spectral values water-filled at value_bits re-plan with the keys under +ad."""
    if not config.adapt_prior_tokens or config.value_method != "spectral":
        return None
    return PlanAdaptation(rotation.value_eigenvalues.astype(np.float64), None,
                          float(config.value_bits), config.min_bits, config.max_bits,
                          config.scale_inflation, config.adapt_prior_tokens)


def _spectral_cache(model, config: KVCacheConfig, layer: int, keys_global=None):
    rot = config.rotations[layer]
    plan = None
    if config.bit_plan is not None:
        plan = next((p for p in config.bit_plan.get("layers", []) if p["layer"] == layer), None)
    key_bits, value_bits = spectral_layer_bits(rot, config, plan)
    if keys_global is not None and plan is None:
        key_bits = keys_global[layer]
    rope = find_rope(model.layers[layer]) if rot.rope_mode == "pre" else None
    if rot.rope_mode == "pre" and rope is None:
        raise CacheConfigError(f"layer {layer}: pre-RoPE rotations need a RoPE module")
    scales = lambda lam: config.scale_inflation * np.sqrt(np.maximum(lam, 1e-12))  # noqa: E731
    key_scales = scales
    if config.entropy_keys:
        if not config.use_water_filling:
            raise CacheConfigError("entropy-coded keys (+ec) take their budget from the "
                                   "water-filling target (spectral:wfN/...)")
        key_scales = lambda lam: np.sqrt(np.maximum(lam, 1e-12))  # noqa: E731
    value_affine = ((config.value_bits, config.value_group_size)
                    if config.value_method == "affine" else None)
    value_vectors, value_scales, value_mean = (rot.value_eigenvectors,
                                               scales(rot.value_eigenvalues), rot.value_mean)
    if config.value_method == "lean":
        # Lloyd-Max codes of the Hadamard-rotated values (close to Gaussian) in units of
        # each token's RMS: no mean, every dim at value_bits.
        H, D = rot.value_eigenvalues.shape
        value_vectors = np.broadcast_to(value_rotation(D), (H, D, D))
        # The coder's scale is the head's calibrated RMS, so a token's own RMS codes as a
        # ratio near 1 (the log-scale byte spans 2^±8 around it).
        rms = np.sqrt(np.maximum(rot.value_eigenvalues.mean(axis=1, keepdims=True), 1e-12))
        value_scales, value_mean = np.broadcast_to(rms, (H, D)), None
        value_bits = np.full((H, D), config.value_bits)
    key_vectors, key_spectrum, key_decoder = rot.key_eigenvectors, rot.key_eigenvalues, None
    if config.query_metric:
        key_spectrum, key_vectors, key_decoder = key_metric_basis(rot)
    cache = SpectralKVCache(key_vectors, key_scales(key_spectrum), key_bits,
                            value_vectors, value_scales, value_bits,
                            rot.rope_mode, rope, value_affine, config.sink_tokens,
                            key_mean=rot.key_mean, value_mean=value_mean,
                            token_scale=config.token_scale,
                            token_scale_floor=config.token_scale_floor,
                            token_scale_ceiling=config.token_scale_ceiling,
                            recent_tokens=config.recent_tokens,
                            key_block=config.key_block_scale,
                            adaptation=_key_adaptation(rot, config),
                            value_rotation=_value_rotation(rot, config),
                            value_adaptation=_value_adaptation(rot, config),
                            key_decoder=key_decoder,
                            entropy_bits=(config.target_avg_bits if config.entropy_keys
                                          else 0.0),
                            value_token_scale=config.value_method == "lean")
    return cache, {"layer": layer, "keys": key_bits.tolist(), "values": value_bits.tolist()}


def parse_method(spec: str, rotations=None, sink_tokens: int = 4) -> KVCacheConfig:
    """Method specs as the CLI takes them.

    fp16 · affine4 · affine4g32 · rvq3 · spectral:4/1/2 (signal/noise/value bits) ·
    spectral:wf3/3 (keys water-filled at 3 bits, values 3) · spectral:wf3/a4g64
    (affine 4-bit values, group 64; group 32 when omitted) · spectral:wf2.75/l4 (lean
    values: 4-bit Lloyd-Max codes of Hadamard-rotated values and a scale byte per token).
    Modifiers after "+":
    ``+r64`` keeps the newest 64 tokens exact, ``+s4`` sets the exact sink tokens,
    ``+x2.5`` the codebook scale inflation, ``+ts`` adds a per-token scale (``+tc``: one
    that only scales vectors down, ``+tu``: only up, ``+tf0.7``: never below 0.7), ``+b64``
    codes keys in 64-token blocks with per-block scales, ``+qa`` water-fills keys on
    eigenvalue × query importance, ``+g`` water-fills the key budget across all layers
    and heads at once, ``+ad`` adapts the key plan to the prompt (``+ad256``: with a
    prior of 256 calibration tokens instead of 64), ``+vh`` rotates affine values by a
    Hadamard matrix before coding them, ``+la`` spreads the same bits over layers by
    their measured sensitivity (needs ``velox sensitivity`` on the bundle), ``+ab1``
    codes each decoded token at once instead of 32 at a time (``+ab16``: 16;
    ``append_batch``), ``+ec`` entropy-codes the keys (uniform steps, rANS in blocks of
    32 tokens) at the water-filling target's bits per dim.
    """
    body, *modifiers = spec.strip().split("+")
    try:
        config = _parse_body(body, rotations, sink_tokens)
        for mod in modifiers:
            if mod == "qm":
                config.query_metric = True
            elif mod == "ts":
                config.token_scale = True
            elif mod == "tc":
                config.token_scale, config.token_scale_floor = True, 1.0
            elif mod == "tu":
                config.token_scale, config.token_scale_ceiling = True, 1.0
            elif mod[:2] == "tf":
                config.token_scale, config.token_scale_floor = True, float(mod[2:])
            elif mod[:1] == "r":
                config.recent_tokens = int(mod[1:])
            elif mod[:1] == "s":
                config.sink_tokens = int(mod[1:])
            elif mod[:1] == "x":
                config.scale_inflation = float(mod[1:])
            elif mod[:1] == "b":
                config.key_block_scale = int(mod[1:])
            elif mod == "qa":
                config.query_aware = True
            elif mod == "g":
                config.global_key_bits = True
            elif mod == "vh":
                config.rotate_values = True
            elif mod == "la":
                config.layer_allocation = True
            elif mod == "ec":
                config.entropy_keys = True
            elif mod[:2] == "ab":
                config.append_batch = int(mod[2:])
            elif mod[:2] == "ad":
                config.adapt_prior_tokens = int(mod[2:] or ADAPT_PRIOR_TOKENS)
            else:
                raise ValueError(mod)
        return config
    except (ValueError, IndexError):
        raise CacheConfigError(
            f"cannot parse method {spec!r} (examples: fp16, affine4, affine4g32, rvq3, "
            "spectral:4/1/2, spectral:wf3/3, spectral:wf3/a4g64, spectral:wf3/a4g64+r64)"
        ) from None


def _parse_body(body: str, rotations, sink_tokens: int) -> KVCacheConfig:
    if body == "fp16":
        return KVCacheConfig(method="fp16")
    for method in ("affine", "rvq"):
        if body.startswith(method):
            bits, _, group = body[len(method):].partition("g")
            # mlx-lm's QuantizedKVCache keeps no exact sinks; neither does "affine".
            return KVCacheConfig(method=method, key_bits=int(bits),
                                 group_size=int(group) if group else 64,
                                 sink_tokens=0 if method == "affine" else sink_tokens)
    if not body.startswith("spectral"):
        raise ValueError(body)
    _, _, rest = body.partition(":")
    rest, _, inflation = rest.partition("x")  # legacy inline "x2.5"
    fields = rest.split("/") if rest else ["4", "1", "2"]
    config = KVCacheConfig(method="spectral", rotations=rotations, sink_tokens=sink_tokens)
    if inflation:
        config.scale_inflation = float(inflation)
    values = fields[-1]
    if values.startswith("a"):
        config.value_method = "affine"
        values, _, group = values[1:].partition("g")
        config.value_group_size = int(group) if group else 32
    elif values.startswith("l"):
        config.value_method, values = "lean", values[1:]
    config.value_bits = int(values)
    if fields[0].startswith("wf") and len(fields) == 2:
        config.use_water_filling = True
        config.target_avg_bits = float(fields[0][2:])
    elif len(fields) == 3:
        config.signal_bits, config.noise_bits = int(fields[0]), int(fields[1])
    else:
        raise ValueError(body)
    return config


@dataclass
class CacheMemory:
    """What a cache list holds, in real bytes and bits per element."""

    tokens: int
    nbytes: int
    fp16_nbytes: int
    bits_per_element: float
    # Tokens after the sinks still held exact (the recent window and decoded tokens
    # waiting for a batched append), in the layer holding the most.
    uncoded_tokens: int = 0


def cache_memory(caches, model) -> CacheMemory:
    num_layers, heads, dim = model_shape(model)
    tokens = max((c.offset for c in caches if hasattr(c, "offset")), default=0)
    nbytes = 0
    for c in caches:
        if isinstance(c, KVCache):  # count the fp16 equivalent of what it holds
            nbytes += 2 * 2 * c.offset * heads * dim if c.keys is not None else 0
        else:
            nbytes += getattr(c, "used_nbytes", c.nbytes)
    elements = 2 * num_layers * heads * dim * tokens
    fp16 = 2 * elements
    uncoded = max((c.num_recent for c in caches if isinstance(c, CodedKVCache)), default=0)
    return CacheMemory(tokens, nbytes, fp16, 8 * nbytes / elements if elements else 0.0,
                       uncoded)
