"""Compressed KV caches: codes, packing, exactness at 16 bits, mlx-lm protocol, bytes."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate
from mlx_lm.models.cache import KVCache
from test_calibration import TEXT
from tinymodel import write_tiny_dir

import veloxcore
from veloxcore import BundleError, calibrate_spectral_rotation
from veloxcore.caches import (
    AffineKVCache,
    CacheConfigError,
    KVCacheBuilder,
    KVCacheConfig,
    cache_memory,
    log_scale,
    log_scale_code,
    parse_method,
)
from veloxcore.quantizers import DimCoder, lloyd_max_gaussian


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_dir(root / "model", head_dim=32)  # affine needs a multiple of 32
    model, tokenizer, _ = veloxcore.load(root / "model")
    rotations = {mode: calibrate_spectral_rotation(model, tokenizer, num_samples=4,
                                                   sequence_length=96, corpus=TEXT, rope=mode)
                 for mode in ("pre", "post")}
    return model, tokenizer, rotations


def test_pack_unpack_round_trips_exactly():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 9, size=(3, 64))
    coder = DimCoder(bits, np.ones((3, 64)))
    codes = (rng.integers(0, 2**31, size=(2, 3, 50, 64)) % (1 << bits[None, :, None, :]))
    codes = mx.array(codes.astype(np.uint32))
    words = coder.pack(codes)
    assert words.shape == (2, 3, 50, -(-int(bits.sum(1).max()) // 32))
    assert mx.array_equal(coder.unpack(words), codes).item()


def test_host_decode_is_mlx_decode_bit_for_bit(monkeypatch):
    """On the CPU DimCoder.decode runs numpy (faster gathers); it must give MLX's levels
    exactly: every width 0-8, codes of every width straddling two words, strided slices
    of a code buffer, and inside mx.compile (where nothing can be evaluated: MLX
    decodes)."""
    rng = np.random.default_rng(3)
    D = 48
    # Head 0: a dim of each width 2-8 starting one bit before a word boundary (fillers
    # between them); head 1 has the most bits, 256: its vector fills all 8 words, and its
    # trailing 0-bit dims start past the last one; head 2: random widths.
    head0, offset = [], 0
    for w in range(2, 9):
        gap = (offset // 32 + 1) * 32 - 1 - offset
        head0 += [8] * (gap // 8) + [gap % 8] * (gap % 8 > 0) + [w]
        offset += gap + w
    bits = np.zeros((3, D), np.int64)
    bits[0, :len(head0)] = head0
    bits[1, :32] = 8
    bits[2] = rng.integers(0, 9, size=D)
    bits[2] = np.where(np.cumsum(bits[2]) > 250, 0, bits[2])
    coder = DimCoder(bits, np.exp(rng.normal(size=(3, D))))
    start = np.cumsum(bits, 1) - bits
    straddling = set(bits[(start % 32 + bits > 32) & (bits > 0)].tolist())
    assert straddling >= set(range(2, 9)) and set(bits.ravel()) == set(range(9))
    assert coder.words == 8 and bits.sum(1).max() == bits[1].sum() == 256
    words = coder.encode(mx.array(rng.normal(size=(2, 3, 70, D)).astype(np.float32) * 3))
    piece = words[..., 5:61, :]  # as a cache decodes a span of its buffer
    host_calls = []
    host = coder._decode_host
    monkeypatch.setattr(coder, "_decode_host", lambda w: host_calls.append(w.shape) or host(w))
    with mx.stream(mx.cpu):
        expected = coder.dequantize(coder.unpack(piece))
        for decoded in (coder.decode(piece), mx.compile(coder.decode)(piece)):
            assert decoded.dtype == mx.float32
            assert mx.array_equal(decoded, expected).item()
    assert host_calls == [(2, 3, 56, 8)]  # numpy once; MLX under mx.compile


def test_quantisation_error_matches_codebook_mse_and_falls_with_bits():
    rng = np.random.default_rng(1)
    scales = np.linspace(0.5, 3.0, 16)
    x = rng.normal(size=(1, 1, 20000, 16)) * scales
    errors = []
    for b in range(1, 9):
        coder = DimCoder(np.full((1, 16), b), scales[None])
        decoded = np.array(coder.decode(coder.encode(mx.array(x.astype(np.float32)))))
        relative = np.mean((decoded - x) ** 2, axis=(0, 1, 2)) / scales**2
        mse = lloyd_max_gaussian(b)[2]
        # 20000 samples per dim: sampling error of the MSE is a few percent.
        np.testing.assert_allclose(relative.mean(), mse, rtol=0.05)
        errors.append(relative.mean())
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    # Known Lloyd-Max values for the standard normal.
    assert lloyd_max_gaussian(1)[2] == pytest.approx(0.3634, abs=1e-4)
    assert lloyd_max_gaussian(2)[2] == pytest.approx(0.1175, abs=1e-4)
    assert lloyd_max_gaussian(3)[2] == pytest.approx(0.03455, abs=1e-4)


def logits_with(model, cache, ids, chunk=40):
    out = []
    for s in range(0, len(ids), chunk):
        out.append(model(mx.array(ids[s: s + chunk])[None], cache=cache)[0])
    return np.array(mx.concatenate(out).astype(mx.float32))


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_spectral_at_16_bits_reproduces_fp16_logits(tiny, mode):
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:150]
    reference = logits_with(model, [KVCache() for _ in model.layers], ids)
    config = KVCacheConfig(method="spectral", rotations=rotations[mode], signal_bits=16,
                           noise_bits=16, value_bits=16)
    caches = KVCacheBuilder.build(model, config)
    got = logits_with(model, caches, ids)
    # Only fp16 rounding of rotated coefficients separates the two.
    np.testing.assert_allclose(got, reference, atol=2e-2 * np.abs(reference).max())
    assert np.mean(np.argmax(got, -1) == np.argmax(reference, -1)) > 0.99


@pytest.mark.parametrize("spec", ["affine4g32", "affine8g32", "rvq3", "spectral:4/1/2",
                                  "spectral:wf3/3", "spectral:wf3/a4", "spectral:wf3/a4+ad+vh"])
def test_every_method_runs_through_mlx_lm_generate(tiny, spec):
    model, tokenizer, rotations = tiny
    caches = KVCacheBuilder.build(model, parse_method(spec, rotations["pre"]))
    text = generate(model, tokenizer, "hello there", max_tokens=8, prompt_cache=caches)
    assert isinstance(text, str)
    # mlx-lm feeds every generated token back (it computes one step ahead).
    assert caches[0].offset in (11 + 7, 11 + 8)


@pytest.mark.parametrize("spec", ["spectral:wf3/3", "spectral:wf3/a4+ts+ad+vh", "rvq4",
                                  "affine4g32"])
def test_trim_and_state_round_trip(tiny, spec):
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:120]
    config = parse_method(spec, rotations["pre"])
    caches = KVCacheBuilder.build(model, config)
    logits_with(model, caches, ids[:100])
    # Trim 30 tokens, then re-feed them: identical to having fed 100 directly.
    assert caches[0].trim(30) == 30 and caches[0].offset == 70
    for c in caches[1:]:
        c.trim(30)
    again = logits_with(model, caches, ids[70:100])
    fresh = KVCacheBuilder.build(model, config)
    direct = logits_with(model, fresh, ids[:100])
    np.testing.assert_allclose(again, direct[70:100], atol=1e-4)
    # State round trip: a new cache restored from (state, meta_state) continues identically.
    restored = KVCacheBuilder.build(model, config)
    for src, dst in zip(fresh, restored, strict=True):
        dst.restore(src.state, src.meta_state)
    np.testing.assert_allclose(logits_with(model, restored, ids[100:120]),
                               logits_with(model, fresh, ids[100:120]), atol=1e-5)


@pytest.mark.parametrize("spec", ["spectral:wf3/a4+ts+ad+vh", "spectral:wf3/a4g32+ad+vh+ec",
                                  "spectral:wf3/a4g32+b16", "spectral:wf3/a4g32+b48",
                                  "spectral:wf3/l4+ts", "rvq4", "affine4g32"])
def test_coding_and_decoding_in_pieces_changes_nothing(tiny, monkeypatch, spec):
    """Outside the fused kernels, tokens are coded ENCODE_CHUNK and (past DECODE_WHOLE)
    decoded DECODE_CHUNK at a time (bounded temporaries); pieces end where blocks end
    (entropy-coded blocks on absolute multiples of 32, block scales every 16 or 48 coded
    tokens: a 32-token piece rounds to whole blocks), and a prompt-adaptive plan is still
    set from the whole prompt: the same decoded cache and logits as in one piece."""
    # On the CPU stream: what is compared is the pieces' logic. On an H200 (MLX CUDA) six
    # of the seven methods differed by more than these tolerances, those without any of
    # veloxcore's kernels too (rvq4, affine4g32): its float32 matmuls round differently
    # with the row count.
    with mx.stream(mx.cpu):
        _coding_and_decoding_in_pieces(tiny, monkeypatch, spec)


def _coding_and_decoding_in_pieces(tiny, monkeypatch, spec):
    from veloxcore import caches as cache_module

    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:150]
    config = parse_method(spec, rotations["pre"])
    whole = KVCacheBuilder.build(model, config)
    want = [logits_with(model, whole, ids[:130], chunk=130),
            logits_with(model, whole, ids[130:150], chunk=1)]
    # The reference path's decode-step attention (partials per piece, merged; a float32
    # query, so the output is not rounded to fp16).
    heads, dim = model.args.num_attention_heads, model.args.head_dim
    q = mx.array(np.random.default_rng(3).normal(size=(1, heads, 1, dim)).astype(np.float32))
    want_attention = [np.array(c.attend(q, dim**-0.5).astype(mx.float32)) for c in whole]
    monkeypatch.setattr(cache_module, "ENCODE_CHUNK", 32)
    monkeypatch.setattr(cache_module, "DECODE_CHUNK", 64)
    monkeypatch.setattr(cache_module, "DECODE_WHOLE", 64)
    pieces = KVCacheBuilder.build(model, config)
    got = [logits_with(model, pieces, ids[:130], chunk=130),
           logits_with(model, pieces, ids[130:150], chunk=1)]
    assert pieces[0].coded > 96  # several pieces each way
    # The decoded caches, not their bytes: with OpenBLAS a matmul's rows can round
    # differently with the row count, and entropy-coded blocks' rate control then picks
    # other (equally decoding) bytes.
    # The sinks and the coded tokens must match closely. The exact tail was computed by
    # the model from attention merged over other pieces (float32 sums in another order):
    # on an H200 host's CPU, with +ec, its keys/values differed by up to 6.1e-4.
    for a, b in zip(whole, pieces, strict=True):
        assert a.coded == b.coded
        end = a.num_sinks + a.coded
        for x, y in zip(a.fetch(), b.fetch(), strict=True):
            x, y = np.array(x), np.array(y)
            np.testing.assert_allclose(y[..., :end, :], x[..., :end, :], atol=1e-5, rtol=0)
            np.testing.assert_allclose(y[..., end:, :], x[..., end:, :], atol=2e-3, rtol=0)
    # The prompt's logits read identical decoded tokens in the same order. The decode
    # steps' attention merges pieces (float32 sums in another order) inside an fp16
    # model: a value that rounds the other way moves by an fp16 ulp and carries on. On
    # an H200 host's CPU, with +ec, steps from the third on differed by one ulp (1.95e-3
    # at |logit| < 2); here they match exactly.
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(got[1], want[1], atol=2e-3, rtol=2e-3)
    for cache, w in zip(pieces, want_attention, strict=True):
        g = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_pace_submits_its_marker_and_waits_for_the_previous_one(monkeypatch):
    from veloxcore import caches as cache_module

    monkeypatch.setattr(cache_module, "_pace", cache_module._Pace())
    submitted, waited = [], []
    async_eval, evaluate = mx.async_eval, mx.eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (submitted.append(a), async_eval(*a))[1])
    monkeypatch.setattr(mx, "eval", lambda *a: (waited.append(a), evaluate(*a))[1])
    a, b = mx.ones(3) * 2, mx.ones(3) * 3
    cache_module.pace(a)
    assert len(submitted) == 1 and submitted[0][0] is a and not waited
    cache_module.pace(b)
    assert submitted[1][0] is b and len(waited) == 1 and waited[0][0] is a
    # Inside a function transformation MLX evaluates nothing: pacing steps aside.
    step = mx.compile(lambda x: (cache_module.pace(x * 2), x + 1)[1])
    assert step(mx.ones(2)).tolist() == [2.0, 2.0]
    assert cache_module._pace.submitted is b and len(waited) == 1


def test_effective_bits_from_nbytes_match_the_formula(tiny):
    model, tokenizer, rotations = tiny
    layers, heads, dim = 2, 2, 32
    ids = tokenizer.encode(TEXT.text)[:256 + 4]  # 4 sinks + exactly one 256-token block
    caches = KVCacheBuilder.build(model, parse_method("spectral:wf3/3", rotations["pre"]))
    logits_with(model, caches, ids, chunk=260)
    key_words = -(-int(round(3 * dim)) // 32)  # 96 bits -> 3 words
    value_words = -(-3 * dim // 32)
    per_layer = 256 * heads * 4 * (key_words + value_words) + 4 * heads * dim * 2 * 2
    assert caches.nbytes == layers * per_layer
    memory = cache_memory(caches, model)
    assert memory.bits_per_element == pytest.approx(
        8 * layers * per_layer / (2 * layers * heads * dim * 260))
    affine = KVCacheBuilder.build(model, parse_method("affine4g32", None))
    logits_with(model, affine, ids[:256], chunk=256)
    # 4-bit codes + an fp16 scale and bias per group of 32.
    assert isinstance(affine[0], AffineKVCache)
    assert cache_memory(affine, model).bits_per_element == pytest.approx(4 + 32 / 32)
    with pytest.raises(CacheConfigError, match="group size 64"):
        KVCacheBuilder.build(model, parse_method("affine4", None))


def test_bundles_for_other_models_are_refused_at_build_time(tiny, tmp_path):
    model, tokenizer, rotations = tiny
    import dataclasses

    other = dataclasses.replace(rotations["pre"], model_fingerprint={
        **rotations["pre"].model_fingerprint, "config_sha256": "f" * 64})
    with pytest.raises(BundleError, match="another model"):
        KVCacheBuilder.build(model, KVCacheConfig(method="spectral", rotations=other))
    fewer = dataclasses.replace(rotations["pre"], layers=rotations["pre"].layers[:1])
    with pytest.raises(BundleError, match="layers"):
        KVCacheBuilder.build(model, KVCacheConfig(method="spectral", rotations=fewer))
    with pytest.raises(CacheConfigError, match="needs calibrated rotations"):
        KVCacheBuilder.build(model, KVCacheConfig(method="spectral"))
    with pytest.raises(CacheConfigError, match="cannot parse"):
        parse_method("spectral:banana")


def test_recent_window_keeps_newest_tokens_exact_and_trims(tiny):
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:130]
    config = parse_method("spectral:wf3/a4g32+r16", rotations["pre"])
    assert config.recent_tokens == 16
    caches = KVCacheBuilder.build(model, config)
    logits_with(model, caches, ids[:100], chunk=30)
    cache = caches[0]
    assert (cache.num_sinks, cache.coded, cache.num_recent) == (4, 80, 16)
    # Exact storage: fp16 for 4 sinks + 16 recent tokens, K and V.
    exact = 2 * 2 * (4 + 16) * 2 * 32
    assert cache.nbytes == sum(p.nbytes for p in cache.parts) + exact
    # Trimming into the coded region, then re-feeding, matches a direct run.
    for c in caches:
        c.trim(40)
    assert (cache.num_sinks, cache.coded, cache.num_recent) == (4, 56, 0)
    again = logits_with(model, caches, ids[60:100], chunk=40)
    direct = logits_with(model, KVCacheBuilder.build(model, config), ids[:100], chunk=30)
    # Tokens 60..84 were coded in the direct run but exact here until they age out.
    np.testing.assert_allclose(again[-1], direct[-1], atol=0.5)
    # The newest tokens' keys are returned exactly (no coding error in the window).
    k_in = mx.random.normal((1, 2, 3, 32))
    keys, _ = cache.update_and_fetch(k_in, k_in)
    assert mx.array_equal(keys[..., -3:, :], k_in).item()


def test_decoded_tokens_are_coded_in_batches_with_the_same_codes(tiny):
    """Decode steps keep their tokens exact until append_batch of them are waiting, then
    code them at once: the codes equal coding each token as it arrives (+ab1)."""
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:80]
    spec = "spectral:wf3/a4g32+qa+ad+vh"
    assert parse_method(spec, rotations["pre"]).append_batch == 32  # the default
    batched = KVCacheBuilder.build(model, parse_method(spec + "+ab16", rotations["pre"]))
    single = KVCacheBuilder.build(model, parse_method(spec + "+ab1", rotations["pre"]))
    assert batched.config.append_batch == 16 and single.config.append_batch == 1
    for caches in (batched, single):
        logits_with(model, caches, ids[:50], chunk=25)  # prompt: coded whole
    cache, one = batched[0], single[0]
    assert (cache.num_sinks, cache.coded, cache.num_recent) == (4, 46, 0)
    base, used_base = cache.nbytes, cache.used_nbytes
    for step, token in enumerate(ids[50:66], start=1):
        for caches in (batched, single):
            logits_with(model, caches, [token], chunk=1)
        assert one.num_recent == 0 and one.coded == 46 + step
        if step < 16:
            # Waiting tokens are exact, counted at fp16 (K+V, 2 heads of 32 dims); the
            # first decode step allocates room for all 16 of a batch.
            assert (cache.coded, cache.num_recent) == (46, step)
            assert cache.used_nbytes == used_base + 2 * 2 * step * 2 * 32
            assert cache.nbytes == base + 2 * 2 * 16 * 2 * 32
    assert (cache.coded, cache.num_recent) == (62, 0)
    for a, b in zip(cache.parts, one.parts, strict=True):
        assert mx.array_equal(a[..., :62, :], b[..., :62, :]).item()
    # Trim into the waiting tokens, state round trip, and a prompt chunk codes them all.
    for _ in range(5):
        logits_with(model, batched, [ids[70]], chunk=1)
    for c in batched:
        c.trim(2)
    assert (cache.offset, cache.coded, cache.num_recent) == (69, 62, 3)
    restored = KVCacheBuilder.build(model, parse_method(spec, rotations["pre"]))
    for src, dst in zip(batched, restored, strict=True):
        dst.restore(src.state, src.meta_state)
    assert (restored[0].num_sinks, restored[0].coded, restored[0].num_recent) == (4, 62, 3)
    np.testing.assert_array_equal(logits_with(model, restored, ids[70:74], chunk=4),
                                  logits_with(model, batched, ids[70:74], chunk=4))
    assert (cache.coded, cache.num_recent) == (69, 0)
    with pytest.raises(CacheConfigError, match="append_batch"):
        KVCacheBuilder.build(model, parse_method(spec + "+ab0", rotations["pre"]))


def test_method_modifiers_parse():
    config = parse_method("affine4g32+r64+s4")
    assert (config.key_bits, config.group_size, config.recent_tokens, config.sink_tokens) == (
        4, 32, 64, 4)
    config = parse_method("spectral:wf2.5/a4g64+x2.5+ts")
    assert config.scale_inflation == 2.5 and config.token_scale and config.value_group_size == 64
    with pytest.raises(CacheConfigError):
        parse_method("spectral:wf3/a4+q9")


def test_sliding_window_layers_stay_uncompressed_and_are_reported():
    from tinymodel import tiny_model

    model = tiny_model(seed=2, head_dim=32, layer_types=["full_attention", "sliding_attention"],
                       sliding_window=16)
    from mlx_lm.models.cache import RotatingKVCache

    caches = KVCacheBuilder.build(model, parse_method("affine4g32"))
    assert caches.uncompressed_layers == [1]
    assert isinstance(caches[0], AffineKVCache) and isinstance(caches[1], RotatingKVCache)
    logits = logits_with(model, caches, list(range(5, 60)), chunk=20)
    assert np.all(np.isfinite(logits))


def test_block_scaled_keys_code_whole_blocks_and_trim_across_them(tiny):
    model, tokenizer, rotations = tiny
    ids = tokenizer.encode(TEXT.text)[:160]
    config = parse_method("spectral:wf3/a4g32+b16", rotations["pre"])
    assert config.key_block_scale == 16
    caches = KVCacheBuilder.build(model, config)
    logits_with(model, caches, ids[:100], chunk=30)
    cache = caches[0]
    # 4 sinks, then whole 16-token blocks coded; the remainder (< 16) stays exact.
    assert (cache.num_sinks, cache.coded, cache.num_recent) == (4, 96, 0)
    logits_with(model, caches, ids[100:110], chunk=10)
    assert (cache.coded, cache.num_recent) == (96, 10)
    # Bytes: key codes (3 words of 32 bits for 96 bits) + one fp16 block scale per token
    # (32 dims spread over 16 tokens: 2 each) + affine values + exact tokens.
    key_words, scale_values = 3, -(-32 // 16)
    value_bytes = 32 // 2 + 2 * 2  # 4-bit codes + fp16 scale and bias for one group of 32
    per_token = 2 * (4 * key_words + 2 * scale_values + value_bytes)  # 2 heads
    exact = 2 * 2 * (4 + 10) * 2 * 32
    assert cache.used_nbytes == 96 * per_token + exact
    # Trim into the middle of a coded block: the cut block's head is kept (decoded) exact.
    for c in caches:
        c.trim(30)
    assert (cache.num_sinks, cache.coded, cache.num_recent) == (4, 64, 12)
    again = logits_with(model, caches, ids[80:110], chunk=30)
    assert np.all(np.isfinite(again)) and cache.offset == 110
    # Decode steps with blocks larger than the batch (+ab8): the exact buffers grow once
    # to hold a whole block of waiting tokens, and whole blocks are coded.
    stepped = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g32+b16+ab8",
                                                       rotations["pre"]))
    logits_with(model, stepped, ids[:36], chunk=36)
    capacities = set()
    for token in ids[36:76]:
        logits_with(model, stepped, [token], chunk=1)
        capacities.add(stepped[0].exact_buffers()[0].shape[2])
        assert stepped[0].coded % 16 == 0 and stepped[0].num_recent < 16
    assert capacities == {4 + 16} and stepped[0].coded == 64
    # Block scales adapt: no coefficient is clipped, so 8-bit blocks are nearly exact.
    exact_ref = logits_with(model, [KVCache() for _ in model.layers], ids[:100])
    config8 = parse_method("spectral:wf8/a8g32+b16", rotations["pre"])
    got = logits_with(model, KVCacheBuilder.build(model, config8), ids[:100])
    np.testing.assert_allclose(got, exact_ref, atol=5e-2 * np.abs(exact_ref).max())
    with pytest.raises(CacheConfigError, match="exclude each other"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g32+b16+ts", rotations["pre"]))


def test_query_aware_bits_reweight_the_same_budget(tiny):
    import dataclasses

    model, _, rotations = tiny
    plain = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g32", rotations["pre"]))
    aware = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g32+qa", rotations["pre"]))
    for p_bits, a_bits in zip(plain.layer_bits, aware.layer_bits, strict=True):
        p_keys, a_keys = np.array(p_bits["keys"]), np.array(a_bits["keys"])
        assert np.array_equal(p_keys.sum(axis=1), a_keys.sum(axis=1))  # same budget per head
    assert any(not np.array_equal(p["keys"], a["keys"])
               for p, a in zip(plain.layer_bits, aware.layer_bits, strict=True))
    old = dataclasses.replace(rotations["pre"], layers=[
        dataclasses.replace(rot, key_importance=None) for rot in rotations["pre"]])
    with pytest.raises(CacheConfigError, match="query statistics"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g32+qa", old))


def test_recommended_config_uses_query_statistics_only_when_calibrated(tiny):
    import dataclasses

    model, _, rotations = tiny
    rot = rotations["pre"]
    assert rot.has_key_importance and rot.has_key_metric
    recommended = KVCacheConfig.recommended(rot)
    assert recommended.query_metric and not recommended.query_aware
    assert not recommended.token_scale
    # The default is the configuration the CLI and studio name and BENCHMARKS.md measured.
    from studio.jobs import DEFAULT_SPECTRAL, FALLBACK_SPECTRAL

    # Without measured layer sensitivity the default keeps the same bits in every layer.
    assert not KVCacheConfig.recommended(rot).layer_allocation
    from veloxcore.sensitivity import LayerSensitivity

    costs = np.full(len(rot), 1e-3)
    measured = dataclasses.replace(rot, layer_sensitivity=LayerSensitivity(
        {2.0: costs * 3, 3.0: costs}, {3: costs * 3, 4: costs}, tokens=1))
    named = parse_method(DEFAULT_SPECTRAL, measured)
    named.value_group_size = 64
    assert KVCacheConfig.recommended(measured) == named
    # Rotations calibrated before the metric: the previous default, query-aware bits.
    no_metric = dataclasses.replace(measured, layers=[dataclasses.replace(r, key_metric=None)
                                                      for r in rot.layers])
    fallback = parse_method(FALLBACK_SPECTRAL, no_metric)
    fallback.value_group_size = 64
    assert KVCacheConfig.recommended(no_metric) == fallback
    assert fallback.query_aware and fallback.token_scale_floor == 0.7
    older = dataclasses.replace(rot, layers=[dataclasses.replace(r, key_importance=None,
                                                                 key_metric=None)
                                             for r in rot.layers])
    config = KVCacheConfig.recommended(older)
    assert not config.query_aware and not config.query_metric
    config.value_group_size = 32  # the tiny model's head_dim
    assert len(KVCacheBuilder.build(model, config)) == len(model.layers)


def test_global_key_bits_spend_the_whole_budget_across_layers(tiny):
    from veloxcore.caches import global_key_bits

    model, _, rotations = tiny
    config = parse_method("spectral:wf3/a4g32+qa+g", rotations["pre"])
    assert config.global_key_bits and config.query_aware
    bits = global_key_bits(config)
    total = sum(b.size for b in bits)
    assert sum(int(b.sum()) for b in bits) == round(3.0 * total)
    per_layer = [b.mean() for b in bits]
    assert max(per_layer) > min(per_layer)  # the budget moved between layers
    caches = KVCacheBuilder.build(model, config)
    for layer, b in enumerate(bits):
        np.testing.assert_array_equal(caches.layer_bits[layer]["keys"], b)


def test_adaptive_key_plan_follows_the_prompt_moments(tiny):
    """``+ad``: the first coded tokens' key moments in the calibrated basis, blended with
    the calibration's (prior of N tokens), set the key codebook scales and bits."""
    from veloxcore.calibration import RopeInverter, find_rope
    from veloxcore.spectral import water_fill_bits

    model, tokenizer, rotations = tiny
    rot = rotations["pre"][0]
    lam = np.maximum(rot.key_eigenvalues, 1e-12)
    ids = tokenizer.encode(TEXT.text)[:90]
    config = parse_method("spectral:wf3/3+ad32", rotations["pre"])
    caches = KVCacheBuilder.build(model, config)
    calibrated_scales = caches[0].key_coder.scales.copy()  # the calibrated plan
    logits_with(model, caches, ids, chunk=90)
    # numpy reference from the plain cache's post-RoPE keys of layer 0
    plain = [KVCache() for _ in model.layers]
    logits_with(model, plain, ids, chunk=90)
    inverter = RopeInverter(find_rope(model.layers[0]), rot.head_dim)
    keys = np.array(inverter(plain[0].keys[..., :90, :], 0), dtype=np.float64)[0, :, 4:]
    y = np.einsum("htd,hdi->hti", keys - rot.key_mean[:, None], rot.key_eigenvectors)
    n, n0 = y.shape[1], 32
    shift = y.sum(1) / (n + n0)
    var = ((y * y).sum(1) + n0 * lam) / (n + n0) - shift**2
    coder = caches[0].key_coder
    # Moments are float32 sums in the cache: on the GPU the smallest dims' scales differ
    # from this float64 reference by up to 0.4% (measured on the H200), 0.1% on CPU.
    np.testing.assert_allclose(coder.scales, 2.0 * np.sqrt(var), rtol=1e-2)
    bits = np.stack([water_fill_bits(v, 3.0, 0, 8) for v in var])
    assert np.mean(bits == coder.bits) > 0.95  # float32 moments may tip a boundary dim
    assert caches[0].adapted[1] == n
    # The plan moved: text differs from the calibration sample.
    assert not np.allclose(coder.scales, 2.0 * np.sqrt(lam), rtol=0.05)
    # A huge prior keeps the calibrated plan.
    stiff = KVCacheBuilder.build(model, parse_method("spectral:wf3/3+ad100000000",
                                                     rotations["pre"]))
    logits_with(model, stiff, ids, chunk=90)
    np.testing.assert_allclose(stiff[0].key_coder.scales, 2.0 * np.sqrt(lam), rtol=1e-3,
                               atol=1e-4 * np.sqrt(lam.max()))
    # The plan's moments are part of the cache's bytes and state.
    static = KVCacheBuilder.build(model, parse_method("spectral:wf3/3", rotations["pre"]))
    logits_with(model, static, ids, chunk=90)
    heads, dim = rot.key_eigenvalues.shape
    # Keys' and (spectral) values' first and second moments, float32.
    assert caches[0].nbytes == stiff[0].nbytes == static[0].nbytes + 4 * heads * dim * 4
    # Spectral values re-plan the same way (no query importance, at value_bits).
    values = np.array(plain[0].values[..., :90, :], dtype=np.float64)[0, :, 4:]
    y = np.einsum("htd,hdi->hti", values - rot.value_mean[:, None], rot.value_eigenvectors)
    lam_v = np.maximum(rot.value_eigenvalues, 1e-12)
    shift = y.sum(1) / (n + n0)
    var = ((y * y).sum(1) + n0 * lam_v) / (n + n0) - shift**2
    np.testing.assert_allclose(caches[0].value_coder.scales, 2.0 * np.sqrt(var), rtol=1e-2)
    # Restoring a state that never adapted (only sink tokens) puts the calibrated plan back.
    short = KVCacheBuilder.build(model, config)
    logits_with(model, short, ids[:3])
    assert short[0].adapted is None
    caches[0].restore(short[0].state, short[0].meta_state)
    assert caches[0].adapted is None and caches[0].offset == 3
    np.testing.assert_array_equal(caches[0].key_coder.scales, calibrated_scales)


def test_adaptive_key_plan_needs_water_filled_keys(tiny):
    model, _, rotations = tiny
    with pytest.raises(CacheConfigError, match="water-filled"):
        KVCacheBuilder.build(model, parse_method("spectral:4/1/2+ad", rotations["pre"]))


def test_rotated_values_are_coded_in_the_hadamard_basis(tiny):
    """``+vh``: values are affine-coded after an orthonormal Hadamard rotation and
    rotated back when decoded; the cache's bytes are those of plain affine values."""
    from veloxcore.caches import value_rotation

    model, tokenizer, rotations = tiny
    h = value_rotation(32)
    np.testing.assert_allclose(h @ h.T, np.eye(32), atol=1e-12)
    assert np.all(np.abs(np.abs(h) - 32**-0.5) < 1e-12)
    assert value_rotation(48).shape == (48, 48)  # not a power of two: a random rotation
    ids = tokenizer.encode(TEXT.text)[:100]
    plain, rotated = (KVCacheBuilder.build(model, parse_method(spec, rotations["pre"]))
                      for spec in ("spectral:wf3/a4", "spectral:wf3/a4+vh"))
    logits_with(model, plain, ids)
    logits_with(model, rotated, ids)
    assert rotated.nbytes == plain.nbytes
    cache = rotated[0]
    _, values = cache.fetch()
    reference = [KVCache() for _ in model.layers]
    logits_with(model, reference, ids)
    exact = np.array(reference[0].values[..., :100, :], dtype=np.float32)
    coded = np.array(exact[:, :, 4:] @ h, dtype=np.float16)
    expected = mx.dequantize(*mx.quantize(mx.array(coded), group_size=32, bits=4),
                             group_size=32, bits=4)
    got, want = np.array(values[:, :, 4:]), np.array(expected) @ h.T
    # A coefficient on a level boundary may round the other way where the rotation sums
    # in another order (on the H200, 2% of elements moved by up to 0.023): allow that.
    assert np.isclose(got, want, atol=1e-3).mean() > 0.97
    np.testing.assert_allclose(got, want, atol=0.05)
    with pytest.raises(CacheConfigError, match="affine values"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/3+vh", rotations["pre"]))


def test_studio_default_falls_back_for_older_rotations(tiny):
    """Rotations without the query metric get the previous default (logged); without
    query statistics too, that minus ``+qa``, with the modifiers after it kept."""
    import dataclasses
    from types import SimpleNamespace

    from studio.jobs import FALLBACK_SPECTRAL, _cache_config

    _, _, rotations = tiny
    no_metric = dataclasses.replace(rotations["pre"], layers=[
        dataclasses.replace(r, key_metric=None) for r in rotations["pre"].layers])
    logs = []
    job = SimpleNamespace(emit=logs.append)
    config, label, _ = _cache_config(SimpleNamespace(rotations=no_metric), job, "spectral")
    assert label == FALLBACK_SPECTRAL.replace("+la", "") and config.query_aware
    assert "no query metric" in logs[0]["log"]
    older = dataclasses.replace(rotations["pre"], layers=[
        dataclasses.replace(r, key_importance=None, key_metric=None)
        for r in rotations["pre"].layers])
    logs = []
    job = SimpleNamespace(emit=logs.append)
    config, label, _ = _cache_config(SimpleNamespace(rotations=older), job, "spectral")
    assert label == FALLBACK_SPECTRAL.replace("+qa", "").replace("+la", "")
    assert not config.query_aware and config.adapt_prior_tokens and config.rotate_values
    assert not config.layer_allocation and not config.query_metric
    assert "no query metric" in logs[0]["log"]
    assert "no query statistics" in logs[1]["log"]
    assert "no measured layer sensitivity" in logs[2]["log"]
    # A named +qm spec on such rotations becomes its +qa twin.
    config, label, _ = _cache_config(SimpleNamespace(rotations=no_metric), job,
                                     "spectral:wf2.5/a4g64+qm+ad")
    assert label == "spectral:wf2.5/a4g64+qa+ad" and config.query_aware


def test_cache_api_is_exported_at_the_top_of_veloxcore():
    """Issue #4's API: the configuration and builder next to the calibration functions."""
    import veloxcore
    from veloxcore import caches

    assert veloxcore.KVCacheConfig is caches.KVCacheConfig
    assert veloxcore.KVCacheBuilder is caches.KVCacheBuilder
    assert veloxcore.parse_method is caches.parse_method
    assert {"KVCacheConfig", "KVCacheBuilder"} <= set(veloxcore.__all__)


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}])
def test_rope_table_turns_keys_like_the_module(traditional, scaling):
    """The CPU decode's RoPE tables, taken from the module, turn keys as the module does
    on the CPU (to float32 rounding) at positions up to 9k. (Only the CPU uses them; on a
    GPU the module's fast RoPE computes its angles in lower precision.)"""
    from mlx_lm.models.rope_utils import initialize_rope

    from veloxcore.caches import RopeTable

    rope = initialize_rope(64, 10000.0, traditional, scaling, 131072)
    table = RopeTable.of(rope, 64)
    assert table is not None and table is RopeTable.of(
        initialize_rope(64, 10000.0, traditional, scaling, 131072), 64)  # shared
    keys = mx.random.normal((1, 2, 300, 64), key=mx.random.key(1))
    with mx.stream(mx.cpu):
        for position in (0, 4, 1000, 8900):
            np.testing.assert_allclose(np.array(table.apply(keys, position)),
                                       np.array(rope(keys, offset=position)), atol=2e-5,
                                       rtol=0)
    assert RopeTable.of(initialize_rope(32, 10000.0, traditional, scaling, 131072), 64) is None


def test_log_scale_code_round_trips_within_half_a_step():
    scale = mx.array(np.geomspace(2.0**-8, 2.0**7.9, 1000).astype(np.float32))
    back = np.array(log_scale(log_scale_code(scale)))
    ratio = back / np.array(scale)
    # Codes are 1/16 octave apart: at most half of that off (2.2%).
    assert np.all(np.abs(np.log2(ratio)) <= 1 / 32 + 1e-6)
    # Beyond the byte's span, clipped to its ends.
    ends = np.array(log_scale(log_scale_code(mx.array([1e-6, 1e6]))))
    np.testing.assert_allclose(ends, [2.0**-8, 2.0 ** (127 / 16)], rtol=1e-6)


def test_lean_values_are_rms_scaled_lloyd_max_codes_of_rotated_values(tiny):
    model, tokenizer, rotations = tiny
    heads, dim = 2, 32
    config = parse_method("spectral:wf3/l4+ad", rotations["pre"])
    assert config.value_method == "lean" and config.label() == "spectral:wf3/l4"
    caches = KVCacheBuilder.build(model, config)
    ids = tokenizer.encode(TEXT.text)[:84]
    logits_with(model, caches, ids, chunk=84)
    cache = caches[0]
    assert cache.coded == 80
    # Values: 4-bit codes (one 32-bit word per 8 dims) and one scale byte per token.
    value_parts = cache.parts[1:]
    assert [p.dtype for p in value_parts] == [mx.uint32, mx.uint8]
    assert value_parts[0].shape[-1] == 4 * dim // 32 and value_parts[1].shape[-1] == 1
    # Decoded values: the Lloyd-Max 4-bit error relative to each token's energy.
    rng = np.random.default_rng(7)
    values = mx.array((rng.normal(size=(1, heads, 64, dim))
                       * rng.uniform(0.1, 3.0, size=(1, heads, 64, 1))).astype(np.float32))
    keys = mx.zeros_like(values)
    _, decoded = cache.decode(cache.encode(keys, values, 4 + 80), 4 + 80)
    relative = np.array(mx.mean((decoded - values) ** 2, axis=-1) / mx.mean(values**2, axis=-1))
    np.testing.assert_allclose(relative.mean(), lloyd_max_gaussian(4)[2], rtol=0.25)
    with pytest.raises(ValueError, match="lean values"):
        cache.use_kernels("reference")


def test_every_chat_configuration_parses():
    from studio.views.chat_view import SPECTRAL_CONFIGS

    for spec, _ in SPECTRAL_CONFIGS:
        if spec != "plan":
            assert parse_method(spec).method == "spectral", spec
