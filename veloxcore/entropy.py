"""Entropy-coded keys: uniform-quantiser indices coded with rANS in fixed-size blocks.

Fixed-rate Lloyd-Max codes give each coefficient a whole number of bits and clip its
tails. A uniform quantiser whose indices are entropy coded spends a fraction of a bit
where a coefficient is small against the step, and long codes only on its rare large
values (measured on the default model: 0.46 bits per key dim less at equal MSE, and half
the KL at equal bits at 8k — BENCHMARKS "what entropy coding would save on the keys").

Block layout. The coded tokens of one KV head are cut into blocks of ``block`` tokens;
each block codes into exactly ``block · width`` bytes (``width`` bytes per token), so
blocks sit in per-token arrays like fixed-rate codes and the cache's bytes are its
footprint:

- byte 0: the block's step code g (step = base_step · 2^((g − STEP_ZERO) / STEP_OCTAVE);
  the last code, ZERO_BLOCK, decodes to zeros: the fallback that always fits)
- bytes 1 to 4·LANES: the final states of the block's LANES interleaved rANS coders
  (uint32, little-endian; one lane as shipped)
- then 16-bit renormalisation words in the order the decoder reads them, zero padding.

Rate control: the encoder picks each block's finest step whose code fits the block's
bytes, so a block of quiet tokens gets a finer step and one with outliers a coarser one.

Index model: coefficient d of a head has a standard deviation σ_d (the calibrated one,
or the prompt's under ``+ad``); its indices at step Δ follow a discretised Gaussian of
standard deviation σ_d/Δ with 3% of its mass twice as wide (TABLE_SHAPE). One table per
ratio σ/Δ on a 1/8-octave grid, shared by every layer and head. Each table's support is
±(TAIL·σ/Δ + 8) indices (at most ±SPAN); an index beyond it is clipped to it.

rANS (Duda, 2013): a 32-bit state kept in [2^16, 2^32), 16-bit words, probabilities in
units of 2^-15. Symbols code in reverse and decode forwards; one stream per block and
head, symbols in token-major order, symbol i on lane i mod LANES, the lanes' words in one
sequence in the decoder's order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .arrays import as_mx

PROB_BITS = 15
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16
RATIO_STEPS = 8  # tables per octave of σ/Δ
RATIO_MIN_LOG2 = -12  # σ/Δ below 2^-12: every index is 0 (to about 1e-300)
RATIO_MAX_LOG2 = 8
SPAN = 511  # largest |index| any table holds
TAIL = 12  # a table holds |index| ≤ TAIL·σ/Δ + 8
STEP_CODES = 256  # step codes g of a block (one byte)
STEP_ZERO = 128  # g of the base step
STEP_OCTAVE = 16  # step codes per octave (a finer step wastes less of a block)
ZERO_BLOCK = STEP_CODES - 1
# Interleaved rANS coders per block: a block decodes in 2048/LANES sequential steps. Each
# lane costs its final state. Measured (8k, CPU): 4 lanes decode 1.2–3× faster in numpy
# (768–3 streams) but took the payload's last bytes — KL 0.0297 vs 0.0285 with one lane
# (BENCHMARKS "Entropy-coded keys"); one lane until kernels decode lanes in parallel.
LANES = 1
HEADER = 1 + 4 * LANES  # bytes: step code, the lanes' final states
ENTROPY_BLOCK = 32  # tokens a cache codes per block (= the default append batch)
ALPHABET = 2 * SPAN + 1
# The index model: a Gaussian with 3% of its mass twice as wide. Measured on the default
# model's keys (1k held-out tokens, 2.5 bits): squared error 1.12× an ideal coder's (each
# dim's own histogram, one step per head), as a plain Gaussian; Laplace 1.20×, heavier
# tails up to 1.76× (benchmarks/entropy_table_probe.py; BENCHMARKS "Entropy-coded keys").
TABLE_SHAPE = "mix:0.03:2"


class EntropyCodeError(ValueError):
    """Codes that do not decode: corrupt or made with other tables."""


@dataclass(frozen=True)
class CodeTables:
    """Quantised index distributions for ratios σ/Δ = 2^(RATIO_MIN_LOG2 + i/RATIO_STEPS).

    cum (T, ALPHABET + 1): cumulative frequencies (total PROB_SCALE) over symbols
    index + SPAN; slot_symbol (T, PROB_SCALE): the symbol of each slot; slot_step (T ·
    PROB_SCALE,) uint32: what decoding a slot needs besides its symbol, the symbol's
    frequency << PROB_BITS | the slot's offset in the symbol's range (both below
    2^PROB_BITS: every table has at least 17 symbols of frequency ≥ 1); cost (T, ALPHABET):
    bits of each symbol (inf outside the table's support); support (T,): largest |index|;
    entropy (T,): the table's own entropy in bits.
    """

    cum: np.ndarray
    slot_symbol: np.ndarray
    slot_step: np.ndarray
    cost: np.ndarray
    support: np.ndarray
    entropy: np.ndarray

    def index(self, log2_ratio: np.ndarray) -> np.ndarray:
        """The table of each log2(σ/Δ)."""
        i = np.rint((log2_ratio - RATIO_MIN_LOG2) * RATIO_STEPS)
        return np.clip(i, 0, len(self.support) - 1).astype(np.int64)


def _laplace_cdf(x: np.ndarray, std: float) -> np.ndarray:
    b = std / math.sqrt(2.0)
    return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0) / b),
                    1 - 0.5 * np.exp(-np.maximum(x, 0) / b))


def _gaussian_cdf(x: np.ndarray, std: float) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / (std * math.sqrt(2.0))))


def _mixture_cdf(weight: float, ratio: float, scale: float = 1.0):
    """CDF of a two-Gaussian scale mixture of variance ``scale``²: weight ``weight`` on
    the wide part, whose deviation is ``ratio`` times the narrow part's."""
    narrow = scale / math.sqrt(1 - weight + weight * ratio * ratio)

    def cdf(x, std):
        return ((1 - weight) * _gaussian_cdf(x, std * narrow)
                + weight * _gaussian_cdf(x, std * narrow * ratio))
    return cdf


@functools.cache
def code_tables(shape: str = TABLE_SHAPE) -> CodeTables:
    """The shared tables (about 11 MB; built once, ~20 ms)."""
    if shape.startswith("mix:"):
        cdf = _mixture_cdf(*map(float, shape[4:].split(":")))
    else:
        cdf = {"laplace": _laplace_cdf, "gaussian": _gaussian_cdf}[shape]
    count = (RATIO_MAX_LOG2 - RATIO_MIN_LOG2) * RATIO_STEPS + 1
    cum = np.zeros((count, ALPHABET + 1), dtype=np.int64)
    support = np.zeros(count, dtype=np.int64)
    for i in range(count):
        ratio = 2.0 ** (RATIO_MIN_LOG2 + i / RATIO_STEPS)
        span = min(SPAN, int(math.ceil(TAIL * ratio)) + 8)
        k = np.arange(-span, span + 1, dtype=np.float64)
        p = cdf(k + 0.5, ratio) - cdf(k - 0.5, ratio)
        p = np.maximum(p, 0) / p.sum()
        # Every symbol of the support at least 1; the rounding's remainder to the mode.
        freq = np.floor(p * (PROB_SCALE - p.size)).astype(np.int64) + 1
        freq[np.argmax(p)] += PROB_SCALE - freq.sum()
        full = np.zeros(ALPHABET, dtype=np.int64)
        full[SPAN - span: SPAN + span + 1] = freq
        cum[i, 1:] = np.cumsum(full)
        support[i] = span
    freq = np.diff(cum, axis=1)
    with np.errstate(divide="ignore"):
        cost = np.where(freq > 0, PROB_BITS - np.log2(np.maximum(freq, 1)), np.inf)
    entropy = (freq / PROB_SCALE * np.where(freq > 0, cost, 0)).sum(axis=1)
    slot_symbol = np.stack([np.repeat(np.arange(ALPHABET, dtype=np.uint16), f) for f in freq])
    rows = np.arange(count)[:, None]
    start = cum[rows, slot_symbol]
    width = cum[rows, slot_symbol.astype(np.int64) + 1] - start
    assert width.max() < PROB_SCALE
    slot_step = (width << PROB_BITS | (np.arange(PROB_SCALE)[None, :] - start)).astype(np.uint32)
    return CodeTables(cum, slot_symbol, slot_step.reshape(-1), cost.astype(np.float32), support,
                      entropy)


def rans_encode(symbols: np.ndarray, tables: np.ndarray, code: CodeTables, lanes: int = 1):
    """Code S streams of N symbols; ``tables`` (S, N) names each symbol's table.

    Each stream runs ``lanes`` interleaved coders (symbol i on lane i mod lanes) whose
    words share one sequence, in the order the decoder reads them (symbol by symbol,
    lane by lane), so a decoder takes N/lanes sequential steps and needs no offsets.
    Returns (states (S, lanes) uint32, words (S, N) uint16 zero-padded, counts (S,)):
    stream s is ``counts[s]`` words and its lanes' final states.
    """
    S, N = symbols.shape
    if N % lanes:
        raise ValueError(f"{N} symbols do not split into {lanes} lanes")
    steps = N // lanes
    sym = symbols.reshape(S, steps, lanes)
    tab = tables.reshape(S, steps, lanes)
    x = np.full((S, lanes), STATE_LOW, dtype=np.int64)
    # Every symbol's range, looked up at once (the loop below is arithmetic only).
    start_all = code.cum[tab, sym]
    freq_all = code.cum[tab, sym + 1] - start_all
    limit_all = freq_all << (32 - PROB_BITS)
    # Words as the decoder will want them: the word lane l reads after decoding its
    # symbol at step j is the one it emitted before coding that symbol (the state's low
    # 16 bits, taken after the loop).
    emitted = np.zeros((S, steps, lanes), dtype=np.int64)
    spilled = np.zeros((S, steps, lanes), dtype=bool)
    for j in range(steps - 1, -1, -1):
        # x must come out of the coding step below 2^32: at most one word leaves first.
        spill = x >= limit_all[:, j]
        emitted[:, j] = x
        spilled[:, j] = spill
        x = np.where(spill, x >> 16, x)
        quotient, remainder = np.divmod(x, freq_all[:, j])
        x = (quotient << PROB_BITS) + remainder + start_all[:, j]
    emitted &= 0xFFFF
    flat_words = emitted.reshape(S, N)
    flat_spilled = spilled.reshape(S, N)
    counts = flat_spilled.sum(axis=1)
    # Keep the spilled words in (step, lane) order: a stable sort of "not spilled".
    order = np.argsort(~flat_spilled, axis=1, kind="stable")
    words = np.take_along_axis(flat_words, order, axis=1)
    words = np.where(np.arange(N)[None, :] < counts[:, None], words, 0)
    return x.astype(np.uint32), words.astype(np.uint16), counts


def rans_decode(states: np.ndarray, words: np.ndarray, tables: np.ndarray, length,
                code: CodeTables, period: int | None = None) -> np.ndarray:
    """Inverse of ``rans_encode``: (S, length) symbols from states (S, lanes).
    ``length``: symbols per stream, or an (S,) array of them (multiples of the lanes;
    the output is as long as the longest, a shorter stream's tail zero). ``tables``
    (S, length), or (S, period) for tables that repeat every ``period`` symbols (a
    multiple of the lanes). Raises EntropyCodeError when a lane does not end in the
    encoder's initial state or reads past the words.

    The streams advance together one symbol (per lane) per step, in numpy: each step's
    cost is a fixed number of array operations, so the streams of many blocks (all of a
    cache's, the short first block's included) decode in one loop; a stream drops out
    after its last symbol."""
    S, lanes = states.shape
    lengths = np.broadcast_to(np.asarray(length, dtype=np.int64), (S,))
    longest = int(lengths.max()) if S else 0
    period = period or longest
    steps = lengths // lanes
    W = words.shape[1]
    # Stream s's word i at s·(W + 1) + i. A lane whose pointer passes its words (corrupt
    # codes: the final check fails) reads the next stream's, or the zeros at the end.
    padded = np.zeros((S, W + 1), dtype=np.int64)
    padded[:, :W] = words
    flat_words = np.concatenate([padded.reshape(-1), np.zeros(longest + 1, np.int64)])
    x = states.astype(np.int64)
    pointer = np.zeros((S, 1), dtype=np.int64)
    base = tables[:, :period].astype(np.int64) * PROB_SCALE
    row_start = np.arange(S, dtype=np.int64)[:, None] * (W + 1)
    # Each step records the slot's table index; the symbols are looked up after the loop.
    slots = np.zeros((S, longest // lanes, lanes), dtype=np.int64)
    slot_step = code.slot_step
    mask = PROB_SCALE - 1
    lane = np.arange(lanes)
    j = 0
    for stop in np.unique(steps):
        active = np.flatnonzero(steps >= stop)
        xa, pa, ba, ra = x[active], pointer[active], base[active], row_start[active]
        taken = np.empty((active.size, stop - j, lanes), dtype=np.int64)
        for k in range(stop - j):
            column = (j + k) * lanes % period
            idx = (ba[:, column: column + 1] if lanes == 1
                   else ba[:, (column + lane) % period]) + (xa & mask)
            taken[:, k] = idx
            step = slot_step[idx]
            xa = (step >> PROB_BITS) * (xa >> PROB_BITS) + (step & mask)
            refill = xa < STATE_LOW
            at = pa if lanes == 1 else pa + np.cumsum(refill, axis=1) - refill
            xa = np.where(refill, (xa << 16) | flat_words[ra + at], xa)
            pa = pa + (refill if lanes == 1 else refill.sum(axis=1, keepdims=True))
        x[active], pointer[active] = xa, pa
        slots[active, j:stop] = taken
        j = stop
    out = code.slot_symbol.reshape(-1)[slots].astype(np.int64)
    out *= np.arange(longest // lanes)[None, :, None] < steps[:, None, None]
    if np.any(x != STATE_LOW) or np.any(pointer > W):
        raise EntropyCodeError("entropy-coded keys do not decode (corrupt codes)")
    return out.reshape(S, longest)


def model_entropy(log2_ratio: np.ndarray, code: CodeTables) -> np.ndarray:
    """Bits per index the tables spend at these log2(σ/Δ) (their own entropy)."""
    return code.entropy[code.index(log2_ratio)]


class EntropyKeyCoder:
    """Key coefficients (B, H, L, D) ↔ (B, H, L, width) uint8 blocks of ``block`` tokens.

    Blocks end on multiples of ``block`` in absolute position, so after a cache's exact
    sink tokens the first block is shorter (28 tokens after 4 sinks) and a context of a
    whole number of blocks leaves no token waiting.

    sigma (H, D): each coefficient's standard deviation (the index model's scale);
    bits: the budget in bits per coefficient, headers and all (width = bits·D/8 bytes
    per token, rounded). ``base_step`` (H,): the step whose indices the model expects to
    cost the budget — the middle of each block's step codes.
    """

    def __init__(self, sigma: np.ndarray, bits: float, block: int = 32,
                 shape: str = TABLE_SHAPE):
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.ndim != 2:
            raise ValueError("sigma must be (heads, dims)")
        H, D = sigma.shape
        self.heads, self.dims, self.block = H, D, block
        self.width = max(1, round(bits * D / 8))
        self.bits_per_dim = 8 * self.width / D
        self.max_words = self.words_of(block)
        if self.max_words < 1:
            raise ValueError(f"{bits} bits per dim is too few for {block}-token blocks")
        self.code = code_tables(shape)
        self.log2_sigma = np.log2(np.maximum(sigma, 1e-30))
        # Base step: the model's bits per index at it fill the payload (bisection).
        payload = 16 * self.max_words / (block * D)
        self.base_step = np.empty(H)
        for h in range(H):
            lo, hi = -40.0, 40.0  # log2 step
            for _ in range(50):
                mid = (lo + hi) / 2
                spent = model_entropy(self.log2_sigma[h] - mid, self.code).mean()
                lo, hi = (mid, hi) if spent > payload else (lo, mid)
            self.base_step[h] = 2.0 ** hi
        self._log2_base = np.log2(self.base_step)

    def steps(self, head: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Step of step code g in head ``head`` (float32, as decoding uses it; inf for
        ZERO_BLOCK, where every index is 0)."""
        step = 2.0 ** (self._log2_base[head] + (g - STEP_ZERO) / STEP_OCTAVE)
        return np.where(g == ZERO_BLOCK, np.inf, step).astype(np.float32)

    def _tables(self, head: np.ndarray, g: np.ndarray) -> np.ndarray:
        """(S, D) table of each coefficient of streams in ``head`` at step code g."""
        return self.code.index(self.log2_sigma[head] - np.log2(self.steps(head, g))[:, None])

    def _symbols(self, y: np.ndarray, head: np.ndarray, g: np.ndarray):
        """(symbols (S, T·D), tables (S, D)) of blocks y (S, T, D) at step codes g."""
        tables = self._tables(head, g)
        limit = self.code.support[tables][:, None, :]
        k = np.rint(y / self.steps(head, g)[:, None, None])
        k = np.clip(k, -limit, limit).astype(np.int64)
        return (k + SPAN).reshape(len(y), -1), tables

    def _cost(self, y, head, g) -> np.ndarray:
        symbols, tables = self._symbols(y, head, g)
        T = y.shape[1]
        return self.code.cost[np.tile(tables, (1, T)), symbols].sum(axis=1)

    def words_of(self, tokens: int) -> int:
        """16-bit words a block of ``tokens`` tokens holds after its header."""
        return (tokens * self.width - HEADER) // 2

    def encode_blocks(self, y: np.ndarray, head: np.ndarray) -> np.ndarray:
        """(S, T·width) uint8 codes of blocks y (S, T, D) of heads ``head`` (S,)."""
        S, T, D = y.shape
        max_words = self.words_of(T)
        budget = 16 * max_words - 16  # the final state carries ≤ 16 bits of codes
        lo = np.zeros(S, dtype=np.int64)
        hi = np.full(S, STEP_CODES - 1, dtype=np.int64)
        while np.any(lo < hi):  # the finest step whose modelled cost fits
            mid = (lo + hi) // 2
            fits = self._cost(y, head, mid) <= budget
            hi = np.where(fits, mid, hi)
            lo = np.where(fits, lo, mid + 1)
        g = lo
        out = np.zeros((S, T * self.width), dtype=np.uint8)
        todo = np.arange(S)
        while todo.size:
            symbols, tables = self._symbols(y[todo], head[todo], g[todo])
            states, words, counts = rans_encode(symbols, np.tile(tables, (1, T)), self.code,
                                                LANES)
            over = counts > max_words
            if np.any(over & (g[todo] == ZERO_BLOCK)):
                raise ValueError("a block of zeros does not fit the block budget")
            done, todo_next = todo[~over], todo[over]
            rows = out[done]
            rows[:, 0] = g[done]
            rows[:, 1:HEADER] = states[~over].astype("<u4").view(np.uint8).reshape(
                -1, HEADER - 1)
            payload = words[~over, :max_words].astype("<u2").view(np.uint8)
            rows[:, HEADER: HEADER + payload.shape[1]] = payload
            out[done] = rows
            g[todo_next] += 1  # the model undercounted: one step coarser
            todo = todo_next
        return out

    def decode_blocks(self, codes: np.ndarray, head: np.ndarray) -> np.ndarray:
        """(S, T, D) float32 coefficients of codes (S, T·width)."""
        return _decode_parsed([self._parse(codes, head)])[0]

    def _parse(self, codes: np.ndarray, head: np.ndarray) -> tuple:
        """(coder, T, heads, step codes, rANS states, words) of a run of blocks, codes (S,
        T·width) of heads ``head`` (S,)."""
        S = codes.shape[0]
        T = codes.shape[1] // self.width
        g = codes[:, 0].astype(np.int64)
        states = np.ascontiguousarray(codes[:, 1:HEADER]).view("<u4").reshape(S, LANES)
        words = np.ascontiguousarray(
            codes[:, HEADER: HEADER + 2 * self.words_of(T)]).view("<u2")
        return self, T, head, g, states, words

    def kernel_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """What a decode kernel looks up per block instead of computing it (the same
        float64 arithmetic as here): the table of each (head, step code, dim), (H,
        STEP_CODES, D) uint8, and each step code's step, (H, STEP_CODES) float32, 0 for
        ZERO_BLOCK."""
        H, D = self.heads, self.dims
        head = np.repeat(np.arange(H), STEP_CODES)
        g = np.tile(np.arange(STEP_CODES), H)
        tables = self._tables(head, g).reshape(H, STEP_CODES, D)
        assert tables.max() < 256
        step = self.steps(head, g)
        step = np.where(np.isfinite(step), step, 0).astype(np.float32)
        return tables.astype(np.uint8), step.reshape(H, STEP_CODES)

    def first_block(self, position: int, length: int) -> int:
        """Tokens of the short first block of tokens [position, position + length) (0:
        none); they must be whole blocks (ending on a multiple of ``block``)."""
        if (position + length) % self.block:
            raise ValueError(f"entropy-coded keys code whole blocks of {self.block} tokens "
                             f"(ending on a multiple of {self.block}), not tokens "
                             f"{position}–{position + length}")
        return min(length, -position % self.block)

    def blocks_of(self, position: int, length: int) -> list[tuple[int, int]]:
        """(start, stop) of the blocks tokens [position, position + length) fall into,
        relative to ``position``; they must be whole blocks (ending on a multiple of
        ``block``, starting on one or at ``position`` where the first block is short)."""
        first = self.first_block(position, length)
        bounds = [(0, first)] if first else []
        return bounds + [(a, a + self.block) for a in range(first, length, self.block)]

    def _spans(self, position: int, length: int):
        """The short first block (if any) and the run of whole blocks after it."""
        bounds = self.blocks_of(position, length)
        spans = []
        if bounds and bounds[0][1] - bounds[0][0] != self.block:
            spans.append(bounds.pop(0))
        if bounds:
            spans.append((bounds[0][0], bounds[-1][1]))
        return spans

    def _runs(self, shape, position: int):
        """Per run of equal blocks (the short first block, then the whole ones): its token
        range [a, b), its blocks' length T and each block's head, in (B, H, block)
        order."""
        B, H, L, _ = shape
        for a, b in self._spans(position, L):
            T = min(b - a, self.block)
            head = np.broadcast_to(np.arange(H)[None, :, None], (B, H, (b - a) // T))
            yield a, b, T, head.reshape(-1)

    def encode(self, y: mx.array, position: int = 0) -> mx.array:
        """(B, H, L, D) coefficients of tokens from absolute ``position`` -> (B, H, L,
        width) uint8."""
        B, H, L, D = y.shape
        coefficients = np.array(y.astype(mx.float32))
        out = np.empty((B, H, L, self.width), dtype=np.uint8)
        for a, b, T, head in self._runs(y.shape, position):
            blocks = coefficients[:, :, a:b].reshape(-1, T, D)
            out[:, :, a:b] = self.encode_blocks(blocks, head).reshape(B, H, b - a, self.width)
        return as_mx(out)

    def decode(self, codes: mx.array, position: int = 0) -> mx.array:
        """(B, H, L, width) uint8 of tokens from absolute ``position`` -> (B, H, L, D)
        float32 coefficients."""
        return decode_together([(self, codes, position)])[0]


def decode_together(jobs: list[tuple]) -> list[mx.array]:
    """(B, H, L, D) float32 coefficients of each job (coder, codes (B, H, L, width),
    absolute position): ``coder.decode`` for each, with the streams of all of them — the
    layers of a model, say; their coders share head_dim and tables — decoded in one rANS
    loop. The loop's cost is mostly numpy's per-call overhead, paid once for all (2k
    tokens, default model's shape: 7 layers 0.27 s together against 0.45 one by one)."""
    parsed, layouts = [], []
    for coder, codes, position in jobs:
        stored = np.array(codes)
        B, H, L, W = stored.shape
        runs = list(coder._runs(stored.shape, position))
        layouts.append((coder, (B, H, L), runs))
        parsed += [coder._parse(stored[:, :, a:b].reshape(-1, T * W), head)
                   for a, b, T, head in runs]
    decoded = iter(_decode_parsed(parsed))
    out = []
    for coder, (B, H, L), runs in layouts:
        y = np.empty((B, H, L, coder.dims), dtype=np.float32)
        for a, b, _, _ in runs:
            y[:, :, a:b] = next(decoded).reshape(B, H, b - a, coder.dims)
        out.append(as_mx(y))
    return out


def _decode_parsed(parsed: list[tuple]) -> list[np.ndarray]:
    """Coefficients (S, T, D) of each parsed run of blocks (``EntropyKeyCoder._parse``),
    of one coder or several with the same head_dim and tables, in one rANS loop."""
    if not parsed:
        return []
    D, code = parsed[0][0].dims, parsed[0][0].code
    if any(p[0].dims != D or p[0].code is not code for p in parsed):
        raise ValueError("coders decoded together need the same head_dim and tables")
    width = max(p[5].shape[1] for p in parsed)
    words = np.concatenate([np.pad(p[5], ((0, 0), (0, width - p[5].shape[1])))
                            for p in parsed])
    symbols = rans_decode(np.concatenate([p[4] for p in parsed]), words,
                          np.concatenate([c._tables(head, g) for c, _, head, g, _, _ in parsed]),
                          np.concatenate([np.full(len(p[3]), p[1] * D) for p in parsed]),
                          code, period=D)
    out, row = [], 0
    for coder, T, head, g, _, _ in parsed:
        k = (symbols[row: row + len(g), : T * D] - SPAN).astype(np.float32)
        step = coder.steps(head, g)
        step = np.where(np.isfinite(step), step, 0)[:, None, None]
        out.append(k.reshape(len(g), T, D) * step)
        row += len(g)
    return out
