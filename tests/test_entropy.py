"""Entropy-coded keys: rANS round trips and cost, block rate control, the cache mode."""

import mlx.core as mx
import numpy as np
import pytest
from cuda_emulator import compiler, use_emulator
from mlx_lm import generate
from test_caches import logits_with, tiny  # noqa: F401 (fixture)
from test_calibration import TEXT

from veloxcore import kernels
from veloxcore.caches import CacheConfigError, KVCacheBuilder, parse_method
from veloxcore.entropy import (
    ENTROPY_BLOCK,
    HEADER,
    LANES,
    PROB_SCALE,
    SPAN,
    STEP_CODES,
    EntropyCodeError,
    EntropyKeyCoder,
    code_tables,
    decode_together,
    rans_decode,
    rans_encode,
)
from veloxcore.kernels import EntropyKernels, kernel_backend


def sampled_streams(rng, tables):
    """Symbols drawn from each position's own table (exactly its quantised law)."""
    code = code_tables()
    slots = rng.integers(0, PROB_SCALE, size=tables.shape)
    return code.slot_symbol[tables, slots].astype(np.int64)


@pytest.mark.parametrize("lanes", [1, 4])
def test_rans_round_trips_exactly_at_the_tables_cross_entropy(lanes):
    rng = np.random.default_rng(0)
    code = code_tables()
    for lo, hi in [(0, 40), (60, 100), (100, 140), (0, len(code.support))]:
        tables = rng.integers(lo, hi, size=(24, 1500))
        symbols = sampled_streams(rng, tables)
        states, words, counts = rans_encode(symbols, tables, code, lanes)
        assert states.shape == (24, lanes)
        np.testing.assert_array_equal(rans_decode(states, words, tables, 1500, code), symbols)
        ideal = code.cost[tables, symbols].sum(axis=1)
        # The words carry −Σ log2 p less what the final states hold (0–16 bits each),
        # give or take rANS's rounding: under 0.005 bits per symbol.
        excess = 16 * counts - ideal
        assert np.all(np.abs(excess + 8 * lanes) < 8 * lanes + 0.005 * 1500)


@pytest.mark.parametrize("lanes", [1, 4])
def test_streams_of_different_lengths_decode_together(lanes):
    """A cache's short first block and its whole blocks decode in one rANS loop: every
    stream as it decodes alone, a shorter one's tail zero."""
    rng = np.random.default_rng(2)
    code = code_tables()
    lengths = np.array([256, 64, 256, 8, 128])
    tables = rng.integers(30, 130, size=(len(lengths), 256))
    symbols = sampled_streams(rng, tables)
    coded = [rans_encode(symbols[s: s + 1, :n], tables[s: s + 1, :n], code, lanes)
             for s, n in enumerate(lengths)]
    width = max(words.shape[1] for _, words, _ in coded)
    states = np.concatenate([c[0] for c in coded])
    words = np.concatenate([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for _, w, _ in coded])
    got = rans_decode(states, words, tables, lengths, code)
    assert got.shape == (len(lengths), 256)
    for s, n in enumerate(lengths):
        np.testing.assert_array_equal(got[s, :n], symbols[s, :n])
        np.testing.assert_array_equal(
            got[s, :n], rans_decode(coded[s][0], coded[s][1], tables[s: s + 1, :n], n, code)[0])
        assert not got[s, n:].any()


def test_corrupt_codes_are_refused():
    rng = np.random.default_rng(1)
    code = code_tables()
    tables = rng.integers(60, 120, size=(4, 400))
    symbols = sampled_streams(rng, tables)
    states, words, _ = rans_encode(symbols, tables, code)
    words[:, 3] ^= 0x5A5A
    with pytest.raises(EntropyCodeError, match="corrupt"):
        rans_decode(states, words, tables, 400, code)


def block_reference(coder, y, head, g):
    """numpy reference of what blocks decode to: indices at step code g, clipped to the
    tables' support, times the step."""
    tables = coder._tables(head, g)
    limit = coder.code.support[tables][:, None, :]
    step = coder.steps(head, g)[:, None, None]
    return np.clip(np.rint(y / step), -limit, limit).astype(np.float32) * step


def test_blocks_decode_to_the_quantiser_and_rate_control_takes_the_finest_step_that_fits():
    rng = np.random.default_rng(2)
    H, D, T = 3, 64, ENTROPY_BLOCK
    sigma = np.exp(rng.normal(0, 1.5, (H, D)))
    coder = EntropyKeyCoder(sigma, 2.5, T)
    assert coder.width == 20 and coder.bits_per_dim == 2.5
    head = np.arange(30) % H
    y = (rng.laplace(0, 1, (30, T, D)) * sigma[head][:, None, :] / np.sqrt(2)).astype(
        np.float32)
    y[:5] *= 8  # loud blocks: a coarser step
    y[0, 3, 5] = 40 * sigma[0, 5]  # an outlier
    codes = coder.encode_blocks(y, head)
    assert codes.shape == (30, T * coder.width) and codes.dtype == np.uint8
    g = codes[:, 0].astype(np.int64)
    decoded = coder.decode_blocks(codes, head)
    np.testing.assert_array_equal(decoded, block_reference(coder, y, head, g))
    assert g[:5].min() > g[5:].max()  # loud blocks got coarser steps
    # Each block's step is the finest whose modelled cost fits the bytes.
    budget = 16 * coder.max_words - 16
    assert np.all(coder._cost(y, head, g) <= budget)
    finer = g > 0
    assert np.all(coder._cost(y[finer], head[finer], g[finer] - 1) > budget)
    # The outlier (40σ) is inside the support and decodes to within half a step.
    step = coder.steps(head[:1], g[:1])[0]
    assert abs(decoded[0, 3, 5] - y[0, 3, 5]) <= step / 2 + 1e-6


def test_error_falls_with_bits_and_matches_a_uniform_quantiser():
    rng = np.random.default_rng(3)
    H, D = 2, 32
    sigma = np.exp(rng.normal(0, 1.0, (H, D)))
    head = np.arange(40) % H
    y = (rng.normal(size=(40, ENTROPY_BLOCK, D)) * sigma[head][:, None, :]).astype(np.float32)
    errors = []
    for bits in (1.5, 2.5, 3.5, 4.5):
        coder = EntropyKeyCoder(sigma, bits)
        codes = coder.encode_blocks(y, head)
        error = np.mean((coder.decode_blocks(codes, head) - y) ** 2)
        # Fine steps: nothing clipped, so the error is a uniform quantiser's Δ²/12.
        step = coder.steps(head, codes[:, 0].astype(np.int64))
        if bits >= 3.5:
            np.testing.assert_allclose(error, np.mean(step**2) / 12, rtol=0.1)
        errors.append(error)
    assert all(a > b * 1.5 for a, b in zip(errors, errors[1:], strict=False))


def test_any_block_fits_even_absurd_values():
    coder = EntropyKeyCoder(np.ones((1, 64)), 1.0)
    y = np.full((2, ENTROPY_BLOCK, 64), 1e6, dtype=np.float32)
    y[1] = np.random.default_rng(4).normal(size=(ENTROPY_BLOCK, 64)) * 1e4
    codes = coder.encode_blocks(y, np.zeros(2, dtype=np.int64))
    assert np.all(codes[:, 0] < STEP_CODES)
    decoded = coder.decode_blocks(codes, np.zeros(2, dtype=np.int64))
    # Far outside the index model (10⁶σ): clipped to the tables' reach or, where even
    # the coarsest step does not fit, a block of zeros — never beyond the values.
    assert np.all(np.isfinite(decoded)) and np.all(np.abs(decoded) <= np.abs(y).max())


def test_the_coder_codes_whole_blocks_of_a_cache_shape():
    rng = np.random.default_rng(5)
    coder = EntropyKeyCoder(np.ones((2, 16)), 3.0)
    y = mx.array(rng.normal(size=(1, 2, 2 * ENTROPY_BLOCK, 16)).astype(np.float32))
    codes = coder.encode(y)
    assert codes.shape == (1, 2, 2 * ENTROPY_BLOCK, 6) and codes.dtype == mx.uint8
    decoded = np.array(coder.decode(codes))
    assert np.max(np.abs(decoded - np.array(y))) < 0.5
    with pytest.raises(ValueError, match="whole blocks"):
        coder.encode(y[:, :, :40])
    # After 4 sinks the first block is 28 tokens: blocks end on multiples of 32.
    assert coder.blocks_of(4, 60) == [(0, 28), (28, 60)]
    short = coder.encode(y[:, :, :60], position=4)
    assert short.shape == (1, 2, 60, 6)
    np.testing.assert_allclose(np.array(coder.decode(short, position=4)),
                               np.array(y[:, :, :60]), atol=0.5)
    with pytest.raises(ValueError, match="whole blocks"):
        coder.encode(y[:, :, :60], position=0)


SPEC = "spectral:wf3/a4g32+ad+vh+ec"


def test_entropy_coded_keys_in_a_cache(tiny):  # noqa: F811
    model, tokenizer, rotations = tiny
    heads, dim = 2, 32
    ids = tokenizer.encode(TEXT.text)[:140]
    config = parse_method(SPEC, rotations["pre"])
    assert config.entropy_keys
    caches = KVCacheBuilder.build(model, config)
    got = logits_with(model, caches, ids[:110], chunk=55)
    cache = caches[0]
    # 4 sinks, then blocks ending on multiples of 32 (the first one 28 tokens), the rest
    # exact.
    assert (cache.num_sinks, cache.coded, cache.num_recent) == (4, 92, 14)
    # Bytes: 3 bits per key dim (12 bytes a token and head), affine values, exact tokens.
    key_bytes = 3 * dim // 8
    value_bytes = dim // 2 + 2 * 2
    exact = 2 * 2 * (4 + 14) * heads * dim
    moments = 4 * 2 * heads * dim  # the adapted plan (+ad)
    assert cache.used_nbytes == 92 * heads * (key_bytes + value_bytes) + exact + moments
    # The decoded keys are the coder's own: quality close to exact at 3 bits.
    exact_ref = logits_with(model, [KVCacheBuilder.build(model, parse_method("fp16"))[0]
                                    for _ in model.layers], ids[:110], chunk=55)
    assert np.abs(got - exact_ref).max() < 0.2 * np.abs(exact_ref).max()
    # No fused kernels: a note, and decode-then-attend.
    with pytest.raises(ValueError, match="no fused kernels"):
        cache.use_kernels("reference")


def test_entropy_coded_caches_trim_restore_and_generate(tiny):  # noqa: F811
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:150]
    config = parse_method(SPEC, rotations["pre"])
    caches = KVCacheBuilder.build(model, config)
    logits_with(model, caches, ids[:128], chunk=128)
    assert caches[0].coded == 124 and caches[0].num_recent == 0  # 4 + 124 = 4 blocks
    # Trim into a coded block: its head is kept exact.
    for c in caches:
        c.trim(38)
    assert (caches[0].coded, caches[0].num_recent) == (60, 26)
    again = logits_with(model, caches, ids[90:120], chunk=30)
    assert np.all(np.isfinite(again)) and caches[0].offset == 120
    assert (caches[0].coded, caches[0].num_recent) == (92, 24)
    fresh = KVCacheBuilder.build(model, config)
    logits_with(model, fresh, ids[:120], chunk=120)
    restored = KVCacheBuilder.build(model, config)
    for src, dst in zip(fresh, restored, strict=True):
        dst.restore(src.state, src.meta_state)
    np.testing.assert_allclose(logits_with(model, restored, ids[120:150]),
                               logits_with(model, fresh, ids[120:150]), atol=1e-5)
    generated = KVCacheBuilder.build(model, config)
    text = generate(model, tokenizer, "hello there " * 12, max_tokens=40,
                    prompt_cache=generated)
    assert isinstance(text, str) and generated[0].coded >= 32


def test_entropy_coded_keys_need_water_filling_and_exclude_scales(tiny):  # noqa: F811
    model, _, rotations = tiny
    with pytest.raises(CacheConfigError, match="water-filling target"):
        KVCacheBuilder.build(model, parse_method("spectral:4/1/2+ec", rotations["pre"]))
    with pytest.raises(CacheConfigError, match="block scales"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g32+ec+ts", rotations["pre"]))


def test_symbol_alphabet_holds_the_tables():
    code = code_tables()
    assert code.cum.shape[1] == 2 * SPAN + 2 and code.support.max() <= SPAN
    assert np.all(code.cum[:, -1] == PROB_SCALE) and HEADER == 1 + 4 * LANES


# The GPU decoder (kernels.EntropyKernels): its CUDA text under the CPU emulator always,
# and on the machine's own GPU backend where there is one.
DECODER_BACKENDS = ["emulated"] + ([kernel_backend()] if kernel_backend() != "reference"
                                   else [])


def backend_for_test(backend: str, monkeypatch) -> str:
    if backend == "emulated":
        if compiler() is None:
            pytest.skip("no C++ compiler for the kernel emulator")
        use_emulator(monkeypatch)
    return backend


@pytest.fixture(params=DECODER_BACKENDS)
def decoder_backend(request, monkeypatch):
    return backend_for_test(request.param, monkeypatch)


@pytest.fixture(params=["host", *DECODER_BACKENDS])
def ahead_backend(request, monkeypatch):
    """Where DecodeAhead's groups decode: numpy on the host, or a GPU decoder."""
    return backend_for_test(request.param, monkeypatch)


def use_decoder(caches, backend: str) -> None:
    """Entropy-coded caches decode on ``backend``'s GPU coder (as ones built there do)."""
    for cache in caches:
        if backend != "host":
            with pytest.raises(ValueError):
                cache.use_kernels(backend)
            assert cache.entropy_backend == backend


def cache_codes(coder, rng, B, L, position, loud=(), absurd=()):
    """Codes (B, H, L, width) of Laplace coefficients from absolute ``position``; blocks
    (b, h, j) in ``loud`` are 8x louder (a coarser step), those in ``absurd`` 10⁶σ (the
    all-zero step code)."""
    H, D = coder.heads, coder.dims
    sigma = 2.0 ** coder.log2_sigma
    y = rng.laplace(0, 1, (B, H, L, D)) * sigma[None, :, None, :] / np.sqrt(2)
    bounds = coder.blocks_of(position, L)
    for b, h, j in loud:
        y[b, h, slice(*bounds[j])] *= 8
    for b, h, j in absurd:
        y[b, h, slice(*bounds[j])] = 1e6 * sigma[h]
    return coder.encode(mx.array(y.astype(np.float32)), position)


def test_coders_decoded_together_decode_as_each_alone():
    """decode_together: several coders' codes (other scales, positions, lengths, short
    first blocks, loud and all-zero blocks) in one rANS loop, bit-identical to decoding
    each job on its own; coders of another head_dim are refused."""
    rng = np.random.default_rng(9)
    jobs = []
    for position, L in [(4, 60), (0, 64), (20, 12), (4, 124)]:
        coder = EntropyKeyCoder(np.exp(rng.normal(0, 1.5, (3, 32))), 2.5)
        jobs.append((coder, cache_codes(coder, rng, 2, L, position, loud=[(0, 1, 0)],
                                        absurd=[(1, 2, 0)]), position))
    together = decode_together(jobs)
    for (coder, codes, position), y in zip(jobs, together, strict=True):
        alone = decode_together([(coder, codes, position)])[0]
        np.testing.assert_array_equal(np.array(y), np.array(alone))
        assert y.shape == (*codes.shape[:3], 32)
    other = EntropyKeyCoder(np.ones((3, 16)), 2.5)
    with pytest.raises(ValueError, match="head_dim"):
        decode_together([jobs[0], (other, cache_codes(other, rng, 1, 32, 0), 0)])


@pytest.mark.parametrize("position,L,D", [(0, 64, 64), (4, 60, 64), (4, 124, 16), (20, 12, 32)])
def test_gpu_decoder_decodes_what_the_host_decodes(decoder_backend, position, L, D):
    """Bit-identical coefficients: the same tables, steps and float32 products; short
    first blocks (after sinks), loud blocks and all-zero blocks included."""
    rng = np.random.default_rng(6)
    H = 3
    coder = EntropyKeyCoder(np.exp(rng.normal(0, 1.5, (H, D))), 2.5)
    codes = cache_codes(coder, rng, 2, L, position, loud=[(0, 1, 0), (1, 2, 1)][: 1 + (L > 32)],
                        absurd=[(1, 0, 0)])
    steps = np.array(codes)[..., 0]
    assert len(np.unique(steps)) > 2 and np.any(steps == STEP_CODES - 1)
    decoder = EntropyKernels(coder, decoder_backend)
    # MLX's CUDA allocator keeps arrays of <= 8 bytes in host memory (see arrays.py).
    assert decoder._layout(position, L)[0].nbytes > 8
    y, status = decoder.decode_with_status(codes, position)
    np.testing.assert_array_equal(np.array(y), np.array(coder.decode(codes, position)))
    blocks = len(coder.blocks_of(position, L))
    assert status.shape == (2 * H * blocks,) and not np.any(np.array(status))


def test_gpu_decoder_flags_corrupt_blocks(decoder_backend):
    rng = np.random.default_rng(7)
    coder = EntropyKeyCoder(np.exp(rng.normal(0, 1.0, (2, 32))), 3.0)
    codes = np.array(cache_codes(coder, rng, 1, 96, 0))
    codes[0, 1, 40, 7] ^= 0x5A  # head 1, block 1 (tokens 32-63): a payload byte
    damaged = mx.array(codes)
    _, status = EntropyKernels(coder, decoder_backend).decode_with_status(damaged, 0)
    assert np.array(status).tolist() == [0, 0, 0, 0, 1, 0]  # (head, block) row-major
    with pytest.raises(EntropyCodeError, match="corrupt"):
        coder.decode(damaged)


def test_entropy_coded_cache_decodes_on_the_gpu_and_refuses_damaged_state(
        tiny, decoder_backend):  # noqa: F811
    """A +ec cache whose builder found a GPU decodes its keys there (attention stays
    mlx-lm's): the same logits as decoding on the host; a restored state with a damaged
    block is refused when it is restored, not at some later step."""
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:110]
    config = parse_method(SPEC, rotations["pre"])
    host = KVCacheBuilder.build(model, config)
    want = logits_with(model, host, ids, chunk=55)
    gpu = KVCacheBuilder.build(model, config)
    for cache in gpu:
        with pytest.raises(ValueError, match="decode on the GPU"):
            cache.use_kernels(decoder_backend)
        assert cache.entropy_backend == decoder_backend
    got = logits_with(model, gpu, ids, chunk=55)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    state = [np.array(a) for a in gpu[0].state]
    state[0][0, 1, 40, 9] ^= 0x33  # key codes of head 1, in the second block
    restored = KVCacheBuilder.build(model, config)
    with pytest.raises(ValueError):
        restored[0].use_kernels(decoder_backend)
    before = (restored[0].key_coder, restored[0].offset, restored[0].coded)
    with pytest.raises(EntropyCodeError, match="corrupt"):
        restored[0].restore([mx.array(a) for a in state], gpu[0].meta_state)
    # Nothing of the damaged state was kept: the plan and the (empty) cache as before.
    assert (restored[0].key_coder, restored[0].offset, restored[0].coded) == before
    assert restored[0].parts is None


def test_a_gpu_decoded_cache_paces_its_layers_and_pieces(tiny, decoder_backend, monkeypatch):  # noqa: F811
    """Decoding on the GPU is slow against the host building the step, so a +ec cache
    with a GPU coder submits each layer as it arrives and each decoded piece as it is
    built, and the host waits for the one before (caches.pace): the same logits as the
    host's decoder, in pieces of 32 coded tokens here."""
    from veloxcore import caches as cache_module

    monkeypatch.setattr(cache_module, "ENTROPY_GPU_DECODE_CHUNK", 32)
    monkeypatch.setattr(cache_module, "DECODE_WHOLE", 32)
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:110]
    config = parse_method(SPEC, rotations["pre"])
    config.kernels = "off"  # host decoding, on a GPU machine too
    host = KVCacheBuilder.build(model, config)
    want = logits_with(model, host, ids, chunk=55)
    assert not any(cache.paced for cache in host)
    gpu = KVCacheBuilder.build(model, config)
    for cache in gpu:
        with pytest.raises(ValueError):
            cache.use_kernels(decoder_backend)
        assert cache.paced
    paced, pieces, waited = [], [], []
    pace, async_eval, evaluate = cache_module.pace, mx.async_eval, mx.eval
    # Layers code alike: layer 0's coded count is every layer's at its pace.
    monkeypatch.setattr(cache_module, "pace",
                        lambda k: (paced.append((k.shape, gpu[0].coded)), pace(k)))
    monkeypatch.setattr(mx, "async_eval", lambda *a: (pieces.append(a), async_eval(*a))[1])
    monkeypatch.setattr(mx, "eval", lambda *a: (waited.append(a), evaluate(*a))[1])
    got = logits_with(model, gpu, ids, chunk=55)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Every layer of both chunks is paced (the chunk's keys mark it) ...
    layers = len(model.layers)
    assert [shape for shape, _ in paced] == [(1, 2, 55, 32)] * (2 * layers)
    # ... and decodes its coded tokens in pieces, each submitted, the one before waited.
    sinks = gpu[0].num_sinks
    counts = [len(gpu[0]._pieces(coded, sinks, 32)) for _, coded in paced]
    assert max(counts) > 1
    piece_ids = [tuple(map(id, a)) for a in pieces if len(a) == 2]
    assert len(piece_ids) == sum(counts)
    waits = [a for a in waited if tuple(map(id, a)) in set(piece_ids)]
    assert len(waits) == sum(n - 1 for n in counts)


def test_layers_decode_their_keys_in_groups(tiny, ahead_backend, monkeypatch):  # noqa: F811
    """DecodeAhead: the first layer of a group decodes the whole group's keys (launches
    that run side by side on a GPU, one numpy loop on the host), the next layers take
    theirs. Where layers code in their step (the prompt, one decode step in 32) each
    decodes alone: no span is decoded twice. The same logits as each layer decoding on
    the host on its own, prompt and decode steps."""
    from veloxcore import caches as cache_module

    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:140]
    config = parse_method(SPEC, rotations["pre"])
    config.kernels = "off"  # host decoding, on a GPU machine too
    host = KVCacheBuilder.build(model, config)
    want = [logits_with(model, host, ids[:100], chunk=100),
            logits_with(model, host, ids[100:], chunk=1)]
    gpu = KVCacheBuilder.build(model, config)
    assert all(cache.decode_ahead is None for cache in gpu)  # 2 layers: groups of 1
    use_decoder(gpu, ahead_backend)
    ahead = cache_module.link_decode_ahead(gpu, group=2)
    assert all(cache.decode_ahead is ahead for cache in gpu)
    calls = {"group": 0, "grouped": 0, "alone": 0}
    decode_group = cache_module.DecodeAhead._decode_group
    in_group = [False]

    def spy_group(self, cache):
        assert cache is gpu[0]  # groups start at the first layer here
        calls["group"] += 1
        in_group[0] = True
        decode_group(self, cache)
        in_group[0] = False

    def spy(decode, jobs=lambda *a: 1):
        def counted(*args):
            calls["grouped" if in_group[0] else "alone"] += jobs(*args)
            return decode(*args)
        return counted

    monkeypatch.setattr(cache_module.DecodeAhead, "_decode_group", spy_group)
    monkeypatch.setattr(kernels.EntropyKernels, "decode", spy(kernels.EntropyKernels.decode))
    monkeypatch.setattr(EntropyKeyCoder, "decode", spy(EntropyKeyCoder.decode))
    monkeypatch.setattr(cache_module, "decode_together",
                        spy(cache_module.decode_together, lambda jobs: len(jobs)))
    got, coding_steps = [], 0
    for a, b in [(0, 100), *((i, i + 1) for i in range(100, len(ids)))]:
        before, writes = dict(calls), gpu[0].code_writes
        got.append(model(mx.array(ids[a:b])[None], cache=gpu)[0])
        change = {k: calls[k] - before[k] for k in calls}
        if gpu[0].code_writes != writes:  # this step coded (the prompt, a batch)
            coding_steps += 1
            assert change == {"group": 0, "grouped": 0, "alone": 2}, (a, change)
        else:
            assert change == {"group": 1, "grouped": 2, "alone": 0}, (a, change)
    assert coding_steps >= 2  # the prompt and a batch
    np.testing.assert_allclose(np.array(got[0].astype(mx.float32)), want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(mx.concatenate(got[1:]).astype(mx.float32)), want[1],
                               atol=1e-5, rtol=0)


def test_decode_ahead_uses_an_entry_only_for_the_codes_it_decoded(tiny, ahead_backend):  # noqa: F811
    """A group's entry for a later layer whose codes then change without changing shape
    (another state restored) is not used; a copied cache decodes alone; the group holds
    its caches weakly."""
    import copy
    import gc
    import weakref

    from veloxcore import caches as cache_module

    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:120]
    config = parse_method(SPEC, rotations["pre"])
    config.kernels = "off"
    caches = []
    for text in (ids[:100], ids[20:120]):
        built = KVCacheBuilder.build(model, config)
        use_decoder(built, ahead_backend)
        logits_with(model, built, text, chunk=100)
        caches.append(built)
    gpu, other = caches
    assert gpu[1].coded == other[1].coded > 0
    ahead = cache_module.link_decode_ahead(gpu, group=2)
    gpu[0].fetch()
    gpu[0].fetch()  # unchanged since its last fetch: decodes layer 1's keys as well
    assert gpu[1] in ahead._ready
    # Layer 1 now holds other codes of the same shape.
    gpu[1].restore(other[1].state, other[1].meta_state)
    for got, want in zip(gpu[1].fetch(), other[1].fetch(), strict=True):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    twin = copy.copy(gpu[0])
    for got, want in zip(twin.fetch(), gpu[0].fetch(), strict=True):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    layer = weakref.ref(gpu[0])
    gc.collect()
    gc.disable()
    try:  # freed without the cycle collector
        del gpu, caches, twin
        assert layer() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("position,L,D", [(0, 64, 64), (4, 60, 64), (4, 124, 16), (20, 12, 32),
                                          (4, 28, 128)])
def test_gpu_encoder_makes_the_hosts_codes(decoder_backend, position, L, D):
    """The kernel picks each block's finest fitting step code by the same modelled cost
    (summed in another order: a block within float32 rounding of its budget could take
    the neighbouring code) and codes the same rANS stream: here every byte matches the
    host's, loud, outlier and absurd (all-zero) blocks included, and decodes."""
    rng = np.random.default_rng(8)
    H = 3
    coder = EntropyKeyCoder(np.exp(rng.normal(0, 1.5, (H, D))), 2.5)
    sigma = 2.0 ** coder.log2_sigma
    y = rng.laplace(0, 1, (2, H, L, D)) * sigma[None, :, None, :] / np.sqrt(2)
    y[0, 1] *= 8
    y[1, 2, -3, 5] = 40 * sigma[2, 5]
    y[1, 0, -1] = 1e6 * sigma[0]
    y = mx.array(y.astype(np.float32))
    kernels_ = EntropyKernels(coder, decoder_backend)
    if not kernels_.encodes:
        pytest.skip(f"no {decoder_backend} coder at head_dim {D} (shared memory)")
    codes, status = kernels_.encode_with_status(y, position)
    want = np.array(coder.encode(y, position))
    assert not np.any(np.array(status))
    got = np.array(codes)
    assert len(np.unique(want[..., 0])) > 2 and np.any(want[..., 0] == STEP_CODES - 1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.array(kernels_.decode(codes, position)),
                                  np.array(coder.decode(codes, position)))


def test_entropy_self_test_passes_and_a_failure_leaves_keys_to_the_host(
        tiny, decoder_backend, monkeypatch):  # noqa: F811
    assert kernels.entropy_self_test.__wrapped__(decoder_backend) is None
    from veloxcore import caches as cache_module

    monkeypatch.setattr(cache_module, "entropy_self_test", lambda backend: "broken")
    model, _, rotations = tiny
    cache = KVCacheBuilder.build(model, parse_method(SPEC, rotations["pre"]))[0]
    with pytest.raises(ValueError, match="failed its self-test.*on the host"):
        cache.use_kernels(decoder_backend)
    assert cache.entropy_backend is None


def test_entropy_kernels_do_not_depend_on_the_attention_kernels(
        tiny, decoder_backend, monkeypatch):  # noqa: F811
    """Fused attention kernels that fail their self-test leave +ec keys on the GPU coder."""
    from veloxcore import caches as cache_module

    monkeypatch.setattr(cache_module, "kernel_self_test", lambda backend: "broken")
    model, _, rotations = tiny
    config = parse_method(SPEC, rotations["pre"])
    config.kernels = decoder_backend if decoder_backend != "emulated" else "cuda"
    monkeypatch.setattr(cache_module, "entropy_self_test", lambda backend: None)
    caches = KVCacheBuilder.build(model, config)
    assert all(c.entropy_backend == config.kernels for c in caches)
    assert not any(c.fused_decode for c in caches)
