"""Fused decode attention: layout, the pure-MLX reference path, and (on a GPU) the
CUDA / Metal kernels against that reference.

On CPU the kernel tests are skipped; they run on an H100/H200 with MLX's CUDA
backend (docs/kernels.md, "Tests": ``python -m pytest tests/test_kernels.py -k "not
emulated"``) and on Apple silicon in .github/workflows/macos.yml.
"""

import re
import shutil
import subprocess

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from cuda_emulator import compiler, emulated_kernel, use_emulator
from mlx_lm.models.cache import KVCache
from tinymodel import tiny_model

from veloxcore import attention, kernels
from veloxcore.caches import PlanAdaptation, SpectralKVCache, random_rotation, value_rotation
from veloxcore.kernels import (
    SpectralKernels,
    kernel_backend,
    merge_partials,
    reference_partials,
    rope_pairs,
    unit_codebook,
)
from veloxcore.quantizers import lloyd_max_gaussian

BACKEND = kernel_backend()
on_gpu = pytest.mark.skipif(BACKEND == "reference", reason="needs a CUDA or Metal GPU")
# The kernels' CUDA text also runs on the CPU under an emulation of CUDA's thread
# model (tests/cuda_emulator.py), so CI checks the kernel logic without a GPU.
# "emulated" takes CUDA's path (keys on tensor cores), "emulated-scalar" Metal's.
KERNEL_BACKENDS = ["emulated", "emulated-scalar"] + ([BACKEND] if BACKEND != "reference"
                                                     else [])


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    if request.param.startswith("emulated"):
        if compiler() is None:
            pytest.skip("no C++ compiler for the kernel emulator")
        use_emulator(monkeypatch)
    return request.param


def orthogonal(rng, heads, dim):
    """A Haar-random orthogonal basis per head (the RVQ cache's rotation)."""
    return np.stack([random_rotation(dim, int(seed))
                     for seed in rng.integers(1 << 30, size=heads)])


def make_cache(rng, heads=3, dim=64, mode="pre", values="affine", token_scale=False,
               traditional=True, avg_bits=3, sink_tokens=4, token_scale_floor=1e-6,
               adapt_prior=0, metric=False):
    """A spectral cache with random bases, decaying spectra and water-filled-like bits;
    ``values``: "affine", "affine3" / "affine8" (3-/8-bit), "spectral", "affine-rotated" or
    "affine3-rotated" (Hadamard-rotated affine, +vh);
    ``adapt_prior`` > 0: the plan adapts to the first coded tokens (+ad);
    ``metric``: keys code through E = S·U and decode through G = S⁻¹·U (+qm)."""
    lam = np.exp(-np.arange(dim) / (dim / 6.0))[None].repeat(heads, 0) * rng.uniform(
        0.5, 2.0, size=(heads, 1))
    bits = np.clip(np.round(avg_bits + 0.5 * np.log2(lam / lam.mean(1, keepdims=True))),
                   0, 8).astype(np.int64)
    scales = 2.0 * np.sqrt(lam)
    value_affine = ((int(values[6]) if values[6:7].isdigit() else 4, 64)
                    if values.startswith("affine") else None)
    rotation = value_rotation(dim) if values.endswith("rotated") else None
    rope = nn.RoPE(dim, traditional=traditional, base=10000) if mode == "pre" else None
    adapt = (PlanAdaptation(lam, None, avg_bits, 0, 8, 2.0, adapt_prior) if adapt_prior
             else None)
    key_vectors, key_decoder = orthogonal(rng, heads, dim), None
    if metric:
        root = np.stack([(a @ a.T) / dim + np.eye(dim) * 0.3
                         for a in rng.normal(size=(heads, dim, dim))])
        key_decoder = np.linalg.inv(root) @ key_vectors
        key_vectors = root @ key_vectors
    return SpectralKVCache(key_vectors, scales, bits,
                           orthogonal(rng, heads, dim), scales, np.maximum(bits, 1), mode, rope,
                           value_affine, sink_tokens,
                           key_mean=rng.normal(size=(heads, dim)) * 0.3,
                           value_mean=rng.normal(size=(heads, dim)) * 0.3,
                           token_scale=token_scale, token_scale_floor=token_scale_floor,
                           value_rotation=rotation, adaptation=adapt,
                           value_adaptation=adapt if value_affine is None else None,
                           key_decoder=key_decoder)


def reference_attend(cache, q, scale):
    """The pure-MLX reference's attention, evaluated on the CPU. MLX's CUDA float32
    matmuls are not exact float32: on an H200 the reference run on the GPU differed from
    the CPU's by up to 3.9e-3 on outputs of order 2 (fp16 outputs: two ulps), as far as
    the kernels did (BENCHMARKS.md, "Tile-relative RoPE"), so kernels are checked
    against the CPU's reference."""
    cache.use_kernels("reference")
    with mx.stream(mx.cpu):
        return np.array(cache.attend(q, scale).astype(mx.float32))


def random_kv(rng, cache, tokens):
    H, D = cache.key_coder.heads, cache.key_coder.dims
    lam = np.array(cache.key_coder.scales) / 2.0
    coeff = rng.normal(size=(1, H, tokens, D)) * lam[None, :, None, :]
    keys = np.einsum("bhtm,hdm->bhtd", coeff, np.array(cache.key_decoder))
    values = rng.normal(size=(1, H, tokens, D))
    return mx.array(keys.astype(np.float16)), mx.array(values.astype(np.float16))


# ------------------------------------------------------------------ layout (CPU)
@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("dims", [64, 48])
def test_rope_pairs_reproduce_the_rope_module(traditional, dims):
    D = 64
    rope = nn.RoPE(dims, traditional=traditional, base=10000)
    perm, theta, amp = rope_pairs(rope, D)
    assert sorted(perm.tolist()) == list(range(D))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 1, 5, D)).astype(np.float32)
    for offset in (0, 7, 4000):
        expected = np.array(rope(mx.array(x), offset=offset))
        pos = offset + np.arange(5)[:, None]
        a, b = x[0, 0][:, perm[0::2]], x[0, 0][:, perm[1::2]]
        angle = pos * theta.astype(np.float64)
        got = np.empty_like(x[0, 0])
        got[:, perm[0::2]] = amp * (a * np.cos(angle) - b * np.sin(angle))
        got[:, perm[1::2]] = amp * (a * np.sin(angle) + b * np.cos(angle))
        np.testing.assert_allclose(got, expected[0, 0], atol=2e-3)


def test_unit_codebook_holds_every_width_at_its_offset():
    table = unit_codebook()
    assert table.size == 510
    for b in range(1, 9):
        np.testing.assert_allclose(table[(1 << b) - 2: (1 << b) - 2 + (1 << b)],
                                   lloyd_max_gaussian(b)[0], rtol=1e-6)


def test_merged_partials_equal_softmax_attention():
    rng = np.random.default_rng(1)
    q = mx.array(rng.normal(size=(1, 6, 1, 16)).astype(np.float32))
    k = mx.array(rng.normal(size=(1, 2, 30, 16)).astype(np.float32))
    v = mx.array(rng.normal(size=(1, 2, 30, 16)).astype(np.float32))
    whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    parts = [reference_partials(q, 0.25, k[:, :, a:b], v[:, :, a:b])
             for a, b in ((0, 4), (4, 25), (25, 30))]
    np.testing.assert_allclose(np.array(merge_partials(parts, mx.float32)), np.array(whole),
                               atol=1e-5)


# --------------------------------------------------- fused path, reference (CPU)
def greedy_logits(model, caches, prompt, steps):
    logits = model(mx.array(prompt)[None], cache=caches)[0, -1]
    out = [np.array(logits)]
    for _ in range(steps):
        token = mx.argmax(logits).reshape(1, 1)
        logits = model(token, cache=caches)[0, -1]
        out.append(np.array(logits))
    return np.stack(out)


@pytest.mark.parametrize("mode,values,token_scale",
                         [("pre", "affine", True), ("pre", "spectral", False),
                          ("post", "affine", False), ("pre", "affine-rotated", False)])
def test_fused_reference_decode_matches_decode_then_attend(mode, values, token_scale):
    """The attend path (exact + coded partials, hooked into mlx-lm's attention) gives
    the logits of the materialising path, step by step."""
    model = tiny_model(seed=3, head_dim=64)
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 200, size=40).tolist()

    def caches(kernels):
        out = []
        for layer in model.layers:
            cache = make_cache(np.random.default_rng(5), heads=2, dim=64, mode=mode,
                               values=values, token_scale=token_scale)
            cache.rope = layer.self_attn.rope
            if mode == "pre":
                from veloxcore.calibration import RopeInverter
                cache.inverter = RopeInverter(cache.rope, 64)
            if kernels:
                cache.use_kernels("reference")
                cache.fused_decode = True
            out.append(cache)
        return out

    plain = greedy_logits(model, caches(False), prompt, 6)
    assert attention.install(model)
    try:
        fused_caches = caches(True)
        fused = greedy_logits(model, fused_caches, prompt, 6)
    finally:
        attention.uninstall(model)
    # GPU matmuls may round differently (TF32-like) from the CPU's.
    np.testing.assert_allclose(fused, plain, atol=1e-3, rtol=1e-3)
    assert fused_caches[0].offset == len(prompt) + 6


def test_hook_leaves_other_caches_alone():
    model = tiny_model(seed=4)
    ids = mx.array([[5, 6, 7, 8]])
    before = np.array(model(ids, cache=[KVCache() for _ in model.layers]))
    assert attention.install(model) and attention.install(model)  # idempotent
    try:
        after = np.array(model(ids, cache=[KVCache() for _ in model.layers]))
    finally:
        attention.uninstall(model)
    np.testing.assert_array_equal(before, after)


# ------------------------------------------------------------- kernels (GPU)
SHAPES = [  # heads, query heads per KV head, head_dim, rope mode, values, token scale
    (3, 3, 64, "pre", "affine", True),
    (3, 3, 64, "pre", "spectral", False),
    (8, 4, 128, "pre", "affine", False),
    (2, 4, 128, "post", "spectral", True),
    (4, 2, 64, "post", "affine", False),
    (3, 3, 64, "pre", "affine-rotated", True),
    (3, 3, 64, "pre", "affine3-rotated", False),
    (2, 4, 128, "post", "affine3", True),
    (2, 6, 128, "pre", "affine8-rotated", True),  # warp-tiled: six query heads, 8-bit values
]


def filled(cache, rng, tokens):
    keys, values = random_kv(rng, cache, tokens)
    for s in range(0, tokens, 1000):
        cache.update_and_fetch(keys[:, :, s: s + 1000], values[:, :, s: s + 1000])
    return cache


def row_strides(x: mx.array) -> tuple:
    """Byte strides of ``x`` laid out row-major."""
    strides, step = [], x.itemsize
    for n in reversed(x.shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


@pytest.mark.parametrize("metric", [False, True])
def test_kernel_inputs_are_row_contiguous_and_exact_tokens_written_in_place(monkeypatch,
                                                                            metric):
    """mx.array keeps a numpy view's strides, and a custom kernel copies each input that
    is not row-contiguous at every launch (on an H200: a copy kernel per layer and decode
    step). Every input of the decode and encode launches is row-contiguous except the
    coded tokens handed to the encoder (a slice of the exact buffer, one copy per batch),
    and a decode step's token goes into the exact buffers' room (no concatenation)."""
    rng = np.random.default_rng(9)
    cache = make_cache(rng, 3, 64, values="affine-rotated", adapt_prior=64, metric=metric)
    cache.append_batch = 8
    keys, values = random_kv(rng, cache, 300)
    cache.update_and_fetch(keys[:, :, :200], values[:, :, :200])
    mx.eval(cache.state)
    cache.use_kernels("cuda")  # built, never evaluated: the launches are captured below
    strided = []

    def capture(backend, which, shared_memory=0, min_blocks=None):
        def call(*, inputs, output_shapes, output_dtypes, **_):
            for i, x in enumerate(inputs):
                mx.eval(x)
                if x.size > 1 and memoryview(x).strides != row_strides(x):
                    strided.append((which, i, x.shape))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
        return call

    monkeypatch.setattr(kernels, "_kernel", capture)
    q = mx.array(rng.normal(size=(1, 9, 1, 64)).astype(np.float16))
    capacities = set()
    for t in range(200, 220):
        cache.update_and_fetch(keys[:, :, t: t + 1], values[:, :, t: t + 1])
        mx.eval(cache.attend(q, 0.125), *cache.state)
        capacities.add(cache.exact_buffers()[0].shape[2])
    assert capacities == {4 + 8}  # sinks and a batch: allocated once, written in place
    assert cache.coded == 216 - 4 and cache.num_recent == 4
    assert {(which, i) for which, i, _ in strided} <= {("encode", 0)}, strided


# Inputs that carry only a length in their shape (views of one kept buffer).
SHAPE_ONLY_INPUTS = {"coded", "position"}


@pytest.mark.parametrize("mode,values,heads,warp,token_scale,sinks,adapted", [
    ("pre", "affine-rotated", 3, True, True, 4, False),
    ("pre", "affine-rotated", 2, True, False, 4, True),  # +ad +qm: kernels rebuilt on the plan
    ("pre", "affine", 1, False, False, 4, False),  # block-tiled decode and merge, one head
    ("pre", "spectral", 2, False, True, 4, False),  # spectral values: encode, basis back
    ("post", "affine", 2, False, False, 4, False),  # post-RoPE keys: query basis, no RoPE
    ("pre", "affine-rotated", 2, True, False, 0, False),  # no sinks: no exact tokens
])
def test_no_kernel_input_is_eight_bytes_or_less(monkeypatch, mode, values, heads, warp,
                                                token_scale, sinks, adapted):
    """MLX's CUDA allocator keeps arrays of at most 8 bytes in host memory (a pool of
    unified memory mapped for the GPU without migrating), and a kernel reading one waits
    for the bus: on an H200 the softmax scale and the exact tokens' count cost the
    warp-tiled kernel 25-40% of its time. Every launch's inputs, on every kernel path,
    are larger (arrays.kernel_input / padded_input)."""
    from veloxcore import kernel_source as src

    names = {"decode": src.DECODE_INPUTS, "decode_warp": src.DECODE_WARP_INPUTS,
             "combine": src.COMBINE_INPUTS, "encode": src.ENCODE_INPUTS}
    rng = np.random.default_rng(11)
    cache = make_cache(rng, heads, 64, mode, values, token_scale, sink_tokens=sinks,
                       adapt_prior=64 if adapted else 0, metric=adapted)
    cache.append_batch = 8
    keys, values_ = random_kv(rng, cache, 230)
    cache.update_and_fetch(keys[:, :, :200], values_[:, :, :200])
    mx.eval(cache.state)
    monkeypatch.setattr(kernels, "WARP_DECODE", warp)
    cache.use_kernels("cuda")  # built, never evaluated: the launches are captured below
    small, launched = [], set()

    def capture(backend, which, shared_memory=0, min_blocks=None):
        def call(*, inputs, output_shapes, output_dtypes, **_):
            launched.add(which)
            for name, x in zip(names[which], inputs, strict=True):
                if name not in SHAPE_ONLY_INPUTS and x.nbytes <= 8:
                    small.append((which, name, x.shape, x.dtype))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
        return call

    monkeypatch.setattr(kernels, "_kernel", capture)
    exact_tokens = set()
    for dtype in (mx.float16, mx.float32):
        q = mx.array(rng.normal(size=(1, 3 * heads, 1, 64))).astype(dtype)
        steps = range(200, 215) if dtype == mx.float16 else range(215, 230)
        for t in steps:
            cache.update_and_fetch(keys[:, :, t: t + 1], values_[:, :, t: t + 1])
            exact_tokens.add(cache.num_exact)
            mx.eval(cache.attend(q, 0.125), *cache.state)
    assert 0 in exact_tokens or sinks
    expected = ({"decode_warp"} if warp else {"decode", "combine"}) | {"encode"}
    assert launched == expected and not small, (launched, small)


def test_warp_launches_on_one_cache_are_chained(monkeypatch):
    """A cache's warp-tiled launches share its split counter (the last block of each KV
    head resets it), so two must never run at once. Teacher-forced decode steps built
    lazily and evaluated together do not depend on each other's attention, and MLX's CUDA
    graph ran such launches concurrently (an H200 gave NaN logits in 2 of 3 runs): each
    launch therefore takes the previous one's partials as an (unread) input, which orders
    them."""
    rng = np.random.default_rng(5)
    cache = make_cache(rng, 3, 64, values="affine-rotated", token_scale=True)
    keys, values = random_kv(rng, cache, 260)
    cache.update_and_fetch(keys[:, :, :200], values[:, :, :200])
    mx.eval(cache.state)
    cache.use_kernels("cuda")  # built, never evaluated: the launches are captured below
    cache.fused_decode = True
    launches = []

    def capture(backend, which, shared_memory=0, min_blocks=None):
        def call(*, inputs, output_shapes, output_dtypes, **_):
            outputs = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes,
                                                      strict=True)]
            # (A copy: a prepared launch's input list is reused by the next steps.)
            launches.append((which, list(inputs), outputs))
            return outputs
        return call

    monkeypatch.setattr(kernels, "_kernel", capture)
    cache.append_batch = 8  # steps that reuse a prepared launch, and steps that code
    q = mx.array(rng.normal(size=(1, 9, 1, 64)).astype(np.float16))
    for t in range(200, 260):  # steps that code a batch (a new prepared launch) included
        cache.update_and_fetch(keys[:, :, t: t + 1], values[:, :, t: t + 1])
        cache.attend(q, 0.125)
    warp = [(inputs, outputs) for which, inputs, outputs in launches if which == "decode_warp"]
    assert len(warp) == 60
    assert warp[0][0][-1] is cache.kernels.dummy_float
    for (_, previous), (inputs, _) in zip(warp, warp[1:], strict=False):
        assert inputs[-1] is previous[0]


@pytest.mark.parametrize("heads,group,dim,mode,values,token_scale", SHAPES)
@pytest.mark.parametrize("tokens,threadgroups", [(5, 512), (200, 512), (200, 3), (4099, 512),
                                                 (4099, 16)])
def test_decode_kernel_matches_reference(backend, monkeypatch, heads, group, dim, mode, values,
                                         token_scale, tokens, threadgroups):
    """Few threadgroups put several tiles in each split (online softmax across tiles);
    many give one tile per split (merge across splits)."""
    if backend.startswith("emulated") and tokens * heads > 1000:
        pytest.skip("too slow to emulate")
    monkeypatch.setattr(kernels, "TARGET_THREADGROUPS", threadgroups)
    monkeypatch.setattr(kernels, "WARP_TARGET_BLOCKS", threadgroups)
    monkeypatch.setattr(kernels, "WARP_WAVE_BLOCKS", threadgroups)
    rng = np.random.default_rng(tokens + dim)
    cache = filled(make_cache(rng, heads, dim, mode, values, token_scale), rng, tokens)
    q = mx.array(rng.normal(size=(1, heads * group, 1, dim)).astype(np.float16))
    expected = reference_attend(cache, q, dim**-0.5)
    cache.use_kernels(backend)
    got = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
    # float32 accumulation in a different order; outputs are O(1).
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("heads", [1, 2, 3, 8, 32, 200])
@pytest.mark.parametrize("coded", [1, 63, 64, 127, 129, 4099, 16384, 65536, 131071])
@pytest.mark.parametrize("dim", [64, 128])
def test_warp_splits_cover_the_codes_in_whole_steps(heads, coded, dim):
    """Splits are whole 4-warp steps of 16-token tiles that cover every coded token once,
    as the kernel recomputes them from its grid (steps of tile pairs where the warps take
    two tiles an iteration); at most WARP_MAX_SPLITS a head (the merge's capacity) and
    within the launch's target blocks."""
    splits, per_split = kernels.warp_splits(coded, heads, dim)
    step = 16 * kernels.WARPS * kernels._warp_tiles(dim)
    assert per_split % step == 0
    assert (splits - 1) * per_split < coded <= splits * per_split
    assert 1 <= splits <= kernels.WARP_MAX_SPLITS
    # The kernel's own split length (DECODE_WARP_BODY: per_split from total and grid).
    assert ((coded + splits - 1) // splits + step - 1) // step * step == per_split
    assert per_split >= min(coded, kernels.WARP_MIN_TILES * 16 * kernels.WARPS) or splits == 1
    target = max(kernels.WARP_WAVE_BLOCKS, kernels.WARP_TARGET_BLOCKS)
    assert heads * splits <= target + heads


def test_warp_splits_fill_one_wave(monkeypatch):
    """The measured choices (H200, BENCHMARKS.md "Fewer, longer splits" and "Tile-loop
    variants on the GPU"): the default model's 3 KV heads keep 128 splits each (384
    blocks, one wave at three a SM); 8 KV heads take up to 48 at head_dim 64 (<= 392 blocks, one
    wave) and 32 at 128 (264 blocks) at 16k and 64k; short contexts keep two tiles a
    warp."""
    for name, default in (("WARP_TARGET_BLOCKS", 256), ("WARP_WAVE_BLOCKS", 384),
                          ("WARP_WAVE_DIM", 64),
                          ("WARP_MIN_TILES", 2)):  # whatever the profiling variables say
        monkeypatch.setattr(kernels, name, default)
    assert kernels.warp_splits(16384, 3, 64) == (128, 128)
    assert kernels.warp_splits(65536, 3, 64) == (128, 512)
    assert kernels.warp_splits(16384, 8, 128) == (32, 512)
    assert kernels.warp_splits(65536, 8, 128) == (32, 2048)
    assert kernels.warp_splits(16384, 8, 64) == (43, 384)  # 48 whole steps round up
    assert kernels.warp_splits(65536, 8, 64) == (47, 1408)
    assert kernels.warp_splits(4096, 8, 64) == (32, 128)
    assert kernels.warp_splits(4096, 3, 64) == (32, 128)
    assert 8 * (48 + 1) <= 3 * 132  # the exact tokens' blocks too: one wave on 132 SMs
    monkeypatch.setattr(kernels, "WARP_WAVE_BLOCKS", 0)  # the choice before one wave
    monkeypatch.setattr(kernels, "WARP_TARGET_BLOCKS", 1024)
    assert kernels.warp_splits(65536, 8, 64) == (128, 512)


def test_warp_kernel_copies_the_pair_table_whatever_its_alignment(monkeypatch):
    """Every split's block copies the key pair table (ptab) to shared memory in 16-byte
    pieces when it starts on a 16-byte boundary and in 4-byte ones otherwise (a
    misaligned 16-byte cp.async faults; the emulator aborts on one, and counts the ones
    made): the aligned table's copies are the difference; both give the reference's
    attention."""
    import cuda_emulator

    cache, q, expected = emulated_warp_case(monkeypatch, 12, 150, WARP_KEY_PAIRS=2048)
    words = cache.kernels.key_pair_words
    assert words > 200
    copies = {}
    for misaligned in (False, True):
        monkeypatch.setattr(cuda_emulator, "MISALIGN_INPUTS", {"ptab"} if misaligned else False)
        monkeypatch.setattr(cuda_emulator, "COPIES_16", 0)
        got = np.array(cache.attend(q, 0.125).astype(mx.float32))
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)
        copies[misaligned] = cuda_emulator.COPIES_16
    blocks = 2 * kernels.warp_splits(cache.coded, 2, 64)[0]  # (the exact blocks copy none)
    assert copies[False] - copies[True] == blocks * (words // 4)


@pytest.mark.parametrize("tile_pairs", [False, True])
@pytest.mark.parametrize("misaligned", [False, True, {"kwords"}, {"ktok"}, {"vscales"},
                                        {"vbiases"}, {"vwords"}],
                         ids=["aligned", "all", "kwords", "ktok", "vscales", "vbiases",
                              "vwords"])
def test_warp_kernel_copies_codes_whatever_their_alignment(monkeypatch, misaligned,
                                                           tile_pairs):
    """The warp-tiled kernel copies a tile's codes in 16-byte pieces when every code
    buffer starts on a 16-byte boundary and in 4-byte pieces otherwise — all of them or
    any one misaligned (a misaligned 16-byte cp.async faults; the emulator aborts on one,
    and counts the ones made); both give the reference's attention, one tile a warp or
    tile pairs (staged as one run of each array: padded value words here)."""
    import cuda_emulator

    if compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    original = kernels._kernel
    names = []

    def emulated(b, which, shared_memory=0, min_blocks=None):
        names.append(which)
        return (emulated_kernel(which, shared_memory) if b == "emulated"
                else original(b, which, shared_memory, min_blocks))

    monkeypatch.setattr(kernels, "_kernel", emulated)
    # (the key pair table's copies have their own alignment test, below)
    monkeypatch.setattr(kernels, "WARP_KEY_PAIRS", 0)
    monkeypatch.setattr(kernels, "WARP_TILE_PAIRS", 64 if tile_pairs else 0)
    monkeypatch.setattr(cuda_emulator, "MISALIGN_INPUTS", misaligned)
    monkeypatch.setattr(cuda_emulator, "COPIES_16", 0)
    rng = np.random.default_rng(11)
    cache = filled(make_cache(rng, 2, 64, "pre", "affine-rotated", True), rng, 150)
    q = mx.array(rng.normal(size=(1, 6, 1, 64)).astype(np.float16))
    expected = reference_attend(cache, q, 0.125)
    cache.use_kernels("emulated")
    got = np.array(cache.attend(q, 0.125).astype(mx.float32))
    assert "decode_warp" in names
    # 146 coded tokens: 10 tiles (5 pairs) per KV head, each at least one 16-byte copy
    # per code buffer (key words, key scales, value words, scales, biases): 2 · 10 · 5
    # (2 · 5 · 5 in pairs).
    least = 50 if tile_pairs else 100
    assert (cuda_emulator.COPIES_16 == 0) if misaligned else (cuda_emulator.COPIES_16 >= least)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


def warp_case(rng, tokens, values="affine-rotated", dim=64):
    """A cache the warp-tiled kernel takes (2 KV heads at head_dim ``dim``, 3 query
    heads each, +vh values, per-token key scales) filled with ``tokens``, a query, and
    the reference's attention (scale dim^-1/2)."""
    cache = filled(make_cache(rng, 2, dim, "pre", values, True), rng, tokens)
    q = mx.array(rng.normal(size=(1, 6, 1, dim)).astype(np.float16))
    return cache, q, reference_attend(cache, q, dim**-0.5)


def emulated_warp_case(monkeypatch, seed, tokens, **flags):
    """warp_case on the CPU emulator (skips without a C++ compiler), with ``flags`` set on
    kernels (e.g. WARP_KEY_PAIRS=2048): the cache already on the emulated kernels."""
    if compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    use_emulator(monkeypatch)
    for name, value in flags.items():
        monkeypatch.setattr(kernels, name, value)
    cache, q, expected = warp_case(np.random.default_rng(seed), tokens)
    cache.use_kernels("emulated")
    return cache, q, expected


def test_key_pair_tables_decode_a_pair_of_columns_as_their_two_levels():
    """A pair's code (the two columns' adjacent bits, low column first) indexes an fp16
    pair of the two unit levels; pairs past the capacity (widest last) decode column by
    column (base -1)."""
    rng = np.random.default_rng(5)
    H, r = 2, 16
    bits = rng.integers(1, 9, size=(H, r))
    bits[:, -3:] = 0  # padding columns, as _compact leaves them
    shift = np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(bits, 1)[:, :-1]], 1)
    shift[bits == 0] = 0
    codes = rng.integers(0, 1 << 8, size=(H, r)) & ((1 << bits) - 1)
    words = np.zeros((H, 6), dtype=np.uint64)  # a token's bits, low first, one spare word
    for h in range(H):
        for c in range(r):
            w, o = divmod(int(shift[h, c]), 32)
            both = int(codes[h, c]) << o
            words[h, w] |= np.uint64(both & 0xFFFFFFFF)
            words[h, w + 1] |= np.uint64(both >> 32)
    kpair, table = kernels.key_pair_tables(bits, shift, capacity=4096)
    assert table.size <= 4096 and (kpair[..., 3] == -1).any() and (kpair[..., 3] >= 0).any()
    levels = kernels.unit_codebook()
    for h in range(H):
        for i in range(r // 2):
            word, offset, mask, base = kpair[h, i]
            if base < 0:
                continue
            both = (int(words[h, word]) | int(words[h, word + 1]) << 32) >> int(offset)
            pair = np.array([table[base + (both & int(mask))]], np.uint32).view(np.float16)
            for k, c in enumerate((2 * i, 2 * i + 1)):
                want = (levels[(1 << bits[h, c]) - 2 + codes[h, c]] if bits[h, c] else 0.0)
                assert pair[k] == np.float16(want)
    # The narrowest width pairs got tables; the pairs left column by column are wider.
    width = bits[:, 0::2] + bits[:, 1::2]
    assert width[kpair[..., 3] >= 0].max() <= width[kpair[..., 3] == -1].min()
    assert kernels.key_pair_tables(np.full((1, 2), 8), np.array([[0, 8]]), 1000) is None
    # Codes that are not adjacent (another layout) are never read as one.
    apart = kernels.key_pair_tables(np.array([[2, 2]]), np.array([[0, 5]]), 1000)[0]
    assert apart[0, 0, 3] == -1


@pytest.mark.parametrize("where", ["emulated"] + (["cuda"] if BACKEND == "cuda" else []))
@pytest.mark.parametrize("capacity,dim,registers", [
    (0, 64, False), (64, 64, False), (2048, 64, False), (64, 64, True), (2048, 64, True),
    (64, 128, False), (2048, 128, False), (64, 128, True), (2048, 128, True)])
def test_warp_kernel_decodes_key_pairs_from_the_table_or_column_by_column(monkeypatch,
                                                                        capacity, dim,
                                                                        registers, where):
    """The warp-tiled kernel's key pairs: none (column by column), a few narrow pairs from
    the table and the rest column by column, or all from the table (KPALL), at head_dim 64 and
    (VELOX_WARP_KEY_PAIRS_DIM=128) 128, read from shared memory every tile or packed in
    registers (KPREG); the attention is the reference's either way."""
    if where == "emulated":
        if compiler() is None:
            pytest.skip("no C++ compiler for the kernel emulator")
        use_emulator(monkeypatch)
    monkeypatch.setattr(kernels, "WARP_KEY_PAIRS", capacity)
    monkeypatch.setattr(kernels, "WARP_KEY_PAIRS_DIM", 128)
    monkeypatch.setattr(kernels, "WARP_KEY_PAIR_REGISTERS", registers)
    launches = record_launches(monkeypatch)
    cache, q, expected = warp_case(np.random.default_rng(21), 300, dim=dim)
    cache.use_kernels(where)
    assert cache.kernels.warp_decode(q)
    words, bases = cache.kernels.key_pair_words, np.array(cache.kernels.kpair)
    if capacity == 0:
        assert words == 0
    else:
        assert 0 < words <= capacity and (bases.ndim == 3) and (bases[..., 3] >= 0).any()
        assert (bases[..., 3] == -1).any() == (capacity == 64)
    got = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)
    warp = [t for which, _, t, _ in launches if which == "decode_warp"]
    assert [t["KPREG"] for t in warp] == [registers]
    # (KPALL: every pair in the table, built without the column-by-column path)
    assert [t["KPALL"] for t in warp] == [capacity == 2048]


class LaunchCaptured(Exception):
    """A stand-in kernel's signal that it has recorded its launch."""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")
@pytest.mark.parametrize("flags", [
    {}, {"WARP_VALUES_EARLY": True, "WARP_KEYS_EARLY": True, "WARP_LAZY_MAX": True,
         "WARP_KEY_PAIRS": 2048, "WARP_KEY_PAIRS_DIM": 128, "WARP_KEY_PAIR_REGISTERS": True,
         "WARP_MIN_BLOCKS": 2},
    {"WARP_STAMPS": []},
    {"WARP_KEY_PAIRS": 0, "WARP_LAZY_MAX": False, "WARP_VALUE_PAD": False,
     "WARP_QUERY_PAD": False},
    {"WARP_KEY_PAIRS": 64, "WARP_KEY_PAIRS_DIM": 128},
    {"WARP_TILE_PAIRS": 64, "WARP_MIN_BLOCKS": 2}],
    ids=["default", "every-flag", "timestamps", "no-pairs-exact-max-pads",
         "some-pairs-too-wide", "tile-pairs"])
@pytest.mark.parametrize("dim", [64, 128])
def test_warp_kernel_cuda_text_compiles_for_hopper_without_spills(monkeypatch, tmp_path,
                                                                  dim, flags):
    """A decode step's warp-tiled launch and an append's encode launch: their whole CUDA
    texts (what MLX compiles: kernels.cuda_kernel_text) build for sm_90 with nvcc where
    the toolkit is installed, with no register spills (a few bytes in the timestamps
    build) — CUDA syntax, inline PTX and register pressure the CPU emulator cannot
    see."""
    for name, value in flags.items():
        monkeypatch.setattr(kernels, name, value)
    rng = np.random.default_rng(3)
    cache, q, _ = warp_case(rng, 300, dim=dim)
    seen = {}

    def stand_in(backend, which, shared_memory=0, min_blocks=None):
        def call(**kwargs):
            seen[which] = kwargs
            raise LaunchCaptured  # nothing runs
        return call

    monkeypatch.setattr(kernels, "_kernel", stand_in)
    cache.use_kernels("cuda")  # (only its launches' arguments are built: nothing runs)
    with pytest.raises(LaunchCaptured):
        cache.attend(q, dim**-0.5)
    kv = mx.array(rng.normal(size=(1, 2, cache.append_batch, dim)).astype(np.float16))
    with pytest.raises(LaunchCaptured):
        cache.update_and_fetch(kv, kv)  # a whole batch to code
    warp = "decode_warp_stamps" if "WARP_STAMPS" in flags else "decode_warp"
    assert set(seen) == {warp, "encode"}
    if flags.get("WARP_KEY_PAIRS") == 64:  # the table and the column-by-column path both
        template = dict(seen[warp]["template"])
        assert template["KPAIR"] > 0 and not template["KPALL"]
    for which, launch in seen.items():
        source = tmp_path / f"{which}.cu"
        source.write_text(kernels.cuda_kernel_text(which, launch["inputs"],
                                                   launch["output_dtypes"], launch["template"]))
        run = subprocess.run([shutil.which("nvcc"), "-arch=sm_90", "-cubin", "-O3",
                              "-std=c++17", "-Xptxas", "-v", "-o",
                              str(tmp_path / f"{which}.cubin"), str(source)],
                             capture_output=True, text=True)
        assert run.returncode == 0, f"{which}: {run.stderr[-2000:]}"
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", run.stderr)]
        assert spills, f"{which}: no ptxas report: {run.stderr[-2000:]}"
        spilled = max(spills)
        # (The timestamps build, for profiling, carries the stamps in registers too: held
        # to three blocks an SM at head_dim 64 it spills 4 bytes.)
        assert spilled <= (8 if which == "decode_warp_stamps" else 0), (
            f"{which}: {run.stderr[-2000:]}")


@pytest.mark.parametrize("room", ["none", "half"])
def test_warp_kernel_takes_the_largest_key_pair_table_that_fits(monkeypatch, room):
    """Where the whole pair table would take the block past its shared memory, a launch
    takes the largest half, quarter... of its entries that fits (the narrowest pairs, a
    prefix of the whole table; the rest column by column), or none (KPAIR 0: every
    column on its own) — still the warp-tiled kernel, not the block-tiled one — and gives
    the reference's attention either way."""
    cache, q, expected = emulated_warp_case(monkeypatch, 4, 200, WARP_KEY_PAIRS=4096)
    layout = cache.kernels
    whole = layout.key_pair_words
    half = kernels.key_pair_tables(np.array(layout.kbits), np.array(layout.kshift), whole // 2)
    assert half is not None and 0 < half[1].size < whole, "the case needs a table that shrinks"
    np.testing.assert_array_equal(half[1], np.array(layout.ptab)[:half[1].size])  # a prefix
    assert (half[0][..., 3] == -1).sum() > (np.array(layout.kpair)[..., 3] == -1).sum()
    fitting = half[1].size if room == "half" else 0
    monkeypatch.setattr(kernels, "WARP_SHARED_LIMIT", kernels.warp_shared_bytes(
        64, 3, *layout.value_affine, layout.key_words, pair_words=fitting))
    launches = record_launches(monkeypatch)
    got = np.array(cache.attend(q, 0.125).astype(mx.float32))
    assert [t["KPAIR"] for which, _, t, _ in launches if which == "decode_warp"] == [fitting]
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("where", ["emulated"] + (["cuda"] if BACKEND == "cuda" else []))
@pytest.mark.parametrize("sharpness", [1.0, 8.0])
@pytest.mark.parametrize("lazy", [True, False])
def test_warp_kernel_lazy_softmax_matches_the_reference(monkeypatch, sharpness, lazy, where):
    """LAZY (the default): per-lane sums and maxima moved only past a margin. With the
    query 8x as sharp and the keys growing along the sequence, scores climb far past the
    margin within a split, so maxima move mid-split and earlier tiles are rescaled; either
    way, and with the exact running maximum, the attention is the reference's."""
    if where == "emulated":
        if compiler() is None:
            pytest.skip("no C++ compiler for the kernel emulator")
        use_emulator(monkeypatch)
    monkeypatch.setattr(kernels, "WARP_LAZY_MAX", lazy)
    rng = np.random.default_rng(17)
    cache = make_cache(rng, 2, 64, "pre", "affine-rotated", True)
    keys, values = random_kv(rng, cache, 600)
    ramp = 0.2 + (sharpness - 1.0) / 3.5 * np.linspace(0.0, 1.0, 600)[:, None]
    cache.update_and_fetch((keys * mx.array(ramp.astype(np.float16))).astype(mx.float16),
                           values)
    q = mx.array((sharpness * rng.normal(size=(1, 6, 1, 64))).astype(np.float16))
    expected = reference_attend(cache, q, 0.125)
    launches = record_launches(monkeypatch)
    cache.use_kernels(where)
    got = np.array(cache.attend(q, 0.125).astype(mx.float32))
    assert [t["LAZY"] for which, _, t, _ in launches if which == "decode_warp"] == [lazy]
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("where", ["emulated"] + (["cuda"] if BACKEND == "cuda" else []))
@pytest.mark.parametrize("values,dim,early", [
    (values, 64, early) for values in ("affine-rotated", "affine3-rotated")
    for early in ("values", "keys", "both")] + [("affine-rotated", 128, "keys")])
def test_warp_kernel_reordered_tile_loops_match_the_reference(monkeypatch, early, values,
                                                              dim, where):
    """VEARLY: a tile's values dequantised before its softmax (4-bit codes by fp16 pairs,
    3-bit ones value by value; head_dim 64); KEARLY: the next tile's keys decoded after
    a tile's scores (two tiles a warp and a partial last one here, so the next tile's
    codes must have landed; head_dim 128 reads its basis from shared memory). Either, or
    both, give the reference's attention."""
    if where == "emulated":
        if compiler() is None:
            pytest.skip("no C++ compiler for the kernel emulator")
        use_emulator(monkeypatch)
    monkeypatch.setattr(kernels, "WARP_VALUES_EARLY", early in ("values", "both"))
    monkeypatch.setattr(kernels, "WARP_KEYS_EARLY", early in ("keys", "both"))
    cache, q, expected = warp_case(np.random.default_rng(8), 300, values, dim)
    launches = record_launches(monkeypatch)
    cache.use_kernels(where)
    assert cache.kernels.warp_decode(q)
    dims = cache.key_coder.dims
    assert kernels.warp_splits(cache.coded, 2, dims)[1] >= 2 * 16 * kernels.WARPS
    assert cache.coded % 16
    got = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
    (template,) = [t for which, _, t, _ in launches if which == "decode_warp"]
    assert (template["VEARLY"], template["KEARLY"]) == (early != "keys", early != "values")
    assert template["SBASIS"] == (dim == 128)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_warp_kernel_result_does_not_depend_on_which_block_finishes_first(monkeypatch,
                                                                         reverse):
    """Block 0 of a KV head computes the exact tokens' partial; the last of the head's
    blocks to arrive merges. In order, the exact block arrives first and a split's block
    merges; with the emulator's blocks run last first, the exact block arrives last and
    merges itself. Either way the attention is the reference's."""
    import cuda_emulator

    monkeypatch.setattr(cuda_emulator, "REVERSE_BLOCKS", reverse)
    cache, q, expected = emulated_warp_case(monkeypatch, 13, 600)
    assert cache.kernels.warp_decode(q) and cache.num_exact > 0
    assert kernels.warp_splits(cache.coded, 2, cache.key_coder.dims)[0] > 2
    got = np.array(cache.attend(q, 0.125).astype(mx.float32))
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


def record_launches(monkeypatch) -> list:
    """Every kernel launch from here on, as (kernel, dynamic shared memory, template
    arguments, blocks)."""
    launches = []
    make = kernels._kernel

    def recorded(b, which, shared_memory=0, min_blocks=None):
        kernel = make(b, which, shared_memory, min_blocks)

        def call(**kwargs):
            blocks = kwargs["grid"][0] // kwargs["threadgroup"][0] * kwargs["grid"][1]
            launches.append((which, shared_memory, dict(kwargs["template"]), blocks))
            return kernel(**kwargs)
        return call

    monkeypatch.setattr(kernels, "_kernel", recorded)
    return launches


def test_cuda_launches_bake_their_template_arguments_into_the_kernel_text(tmp_path,
                                                                        monkeypatch):
    """On CUDA a launch's template arguments become part of the kernel's text, once per
    set (MLX's call otherwise converts and formats each one at every call). The text is
    what MLX writes for them (the emulator's copy of custom_kernel.cpp's), the kernel's
    name carries a digest of its text (MLX keeps compiled kernels by name), and the call
    passes no template. The texts themselves reach MLX as included files
    (``included_text``)."""
    import cuda_emulator

    made = []

    def cuda_kernel(**kwargs):
        made.append(kwargs)
        return lambda **call: call

    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_kernel)
    monkeypatch.setenv("VELOX_KERNEL_DIR", str(tmp_path))
    kernels._kernel.cache_clear()
    try:
        template = [("T", mx.float16), ("D", 64), ("HKV", 3), ("PRE", True), ("TS", False)]
        text = kernels.template_text(template)
        assert text == "".join(cuda_emulator._constant(k, v) for k, v in template) + "\n"
        assert kernels.template_text([]) == ""
        launch = kernels._launcher("cuda", "encode", template)
        assert launch(inputs=[1], grid=(64, 1, 1)) == {"inputs": [1], "grid": (64, 1, 1)}
        assert kernels._launcher("cuda", "encode", list(template)) is launch
        other = kernels._launcher("cuda", "encode", [("T", mx.float32), *template[1:]])
        assert other is not launch and len(made) == 2
        kernel = kernels._kernel("cuda", "encode")
        header, source = kernels.included_text(kernel.inputs, kernel.header, kernel.source)
        assert made[0]["source"] == text + source and made[0]["header"] == header
        assert "using T = float;" in made[1]["source"]
        assert made[0]["name"] != made[1]["name"]
        assert all(m["name"].startswith("velox_encode_") for m in made)
        # The included files are written again for a kernel made after they went (NVRTC
        # reads them at its first launch).
        for f in tmp_path.iterdir():
            f.unlink()
        kernels._launcher("cuda", "encode", [("T", mx.bfloat16), *template[1:]])
        assert sorted(f.read_text() for f in tmp_path.glob("*.cuh")) == sorted(
            [kernel.header, kernel.source])
        with pytest.raises(TypeError, match="X=0.5"):
            kernels.template_text([("X", 0.5)])
    finally:
        kernels._kernel.cache_clear()


def test_cuda_kernel_texts_reach_mlx_as_included_files(tmp_path, monkeypatch):
    """CUDA kernels' header and body reach MLX as #include lines of files named by their
    digest; assembled as MLX assembles a kernel, the text preprocesses to the same as the
    inline one. The input shapes the body uses stay visible to MLX (it passes a shape only
    where the source names it), a tampered file is rewritten, and where no file can be
    written the texts stay inline. The files are readable by all (a shared folder serves
    every user) and their folder is absolute; a folder an #include cannot quote keeps
    the texts inline."""
    import subprocess

    if compiler() is None:
        pytest.skip("needs a C++ compiler's preprocessor")
    monkeypatch.setenv("VELOX_KERNEL_DIR", str(tmp_path / "kernels"))
    header = "#define VX_TWICE(a) (2 * (a))\nstatic int helper(int a) { return a + 1; }\n"
    body = "  const int n = x_shape[0];\n  y[0] = VX_TWICE(helper(x[0])) + n + K;\n"
    inc_header, inc_body = kernels.included_text(["x", "z"], header, body)
    files = sorted((tmp_path / "kernels").iterdir())
    assert sorted(f.read_text() for f in files) == sorted([header, body])
    assert inc_header.startswith("#include") and inc_body.startswith("#include")
    assert "x_shape" in inc_body and "z_shape" not in inc_body

    def preprocessed(h, b):
        text = (h + "void kernel(const int* x, const int* x_shape, int* y) {\n"
                + kernels.template_text([("K", 3)]) + b + "\n}\n")
        path = tmp_path / "kernel.cpp"
        path.write_text(text)
        return subprocess.run([compiler(), "-E", "-P", "-x", "c++", str(path)], check=True,
                              capture_output=True, text=True).stdout.split()

    assert preprocessed(inc_header, inc_body) == preprocessed(header, body)
    files[0].write_text("tampered")
    kernels.included_text(["x"], header, body)
    assert sorted(f.read_text() for f in (tmp_path / "kernels").iterdir()) == sorted(
        [header, body])
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "kernels").iterdir())
    # A relative folder is made absolute (NVRTC reads the files later, maybe elsewhere);
    # without one, the files go to the user cache, next to converted models.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VELOX_KERNEL_DIR", "relative")
    assert kernels.kernel_file_dir() == tmp_path.resolve() / "relative"
    assert f'#include "{tmp_path.resolve()}/relative/' in kernels.included_text(
        ["x"], header, body)[0]
    monkeypatch.delenv("VELOX_KERNEL_DIR")
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    assert kernels.kernel_file_dir() == (tmp_path / "cache" / "kernels").resolve()
    monkeypatch.setenv("VELOX_KERNEL_DIR", str(tmp_path / 'say "cheese"'))
    assert kernels.included_text(["x"], header, body) == (header, body)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("VELOX_KERNEL_DIR", str(blocked / "kernels"))
    assert kernels.included_text(["x"], header, body) == (header, body)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group,tensor_cores", [(1, True), (2, True), (3, True), (4, True),
                                                (6, True), (8, True), (1, False),
                                                (3, False), (8, False)])
def test_warp_kernel_scores_on_tensor_cores_or_in_registers(backend, monkeypatch, dim, group,
                                                            tensor_cores):
    """QMMA (the default): the scores against the query heads as one mma per two 8-dim
    slices, each lane running the softmax of two heads; VELOX_WARP_QMMA=0: as FMAs in
    registers. Either gives the reference's attention for 1-8 query heads per KV head,
    over tiles that rescale each other (two a warp), a partial last tile, and the exact
    tokens."""
    if backend not in ("emulated", "cuda"):
        pytest.skip("the warp-tiled kernel is CUDA's")
    monkeypatch.setattr(kernels, "WARP_QMMA", tensor_cores)
    launches = record_launches(monkeypatch)
    rng = np.random.default_rng(dim + group)
    cache = filled(make_cache(rng, 2, dim, "pre", "affine-rotated", True), rng, 150)
    q = mx.array(rng.normal(size=(1, 2 * group, 1, dim)).astype(np.float16))
    expected = reference_attend(cache, q, dim**-0.5)
    cache.use_kernels(backend)
    if not cache.kernels.warp_decode(q):
        pytest.skip("this shape takes the block-tiled kernel")
    got = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
    assert [t["QMMA"] for which, _, t, _ in launches if which == "decode_warp"] == [
        tensor_cores]
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


def warp_attend_matches_reference(backend, monkeypatch, dim, values, tokens, seed,
                                  group=4, warp=None) -> list:
    """One decode step over a filled cache (2 KV heads, ``group`` query heads each,
    per-token key scales) on ``backend``'s kernels, checked against the reference's
    attention; returns the cache and its warp-tiled launches as (template arguments,
    dynamic shared memory). ``warp``: whether the shape must take the warp-tiled kernel
    (None: skip where it does not); skips where the backend has no warp-tiled kernel."""
    if backend not in ("emulated", "cuda"):
        pytest.skip("the warp-tiled kernel is CUDA's")
    launches = record_launches(monkeypatch)
    rng = np.random.default_rng(seed)
    cache = filled(make_cache(rng, 2, dim, "pre", values, True), rng, tokens)
    q = mx.array(rng.normal(size=(1, 2 * group, 1, dim)).astype(np.float16))
    expected = reference_attend(cache, q, dim**-0.5)
    cache.use_kernels(backend)
    if warp is None and not cache.kernels.warp_decode(q):
        pytest.skip("this shape takes the block-tiled kernel")
    assert warp is None or cache.kernels.warp_decode(q) == warp
    got = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)
    return cache, [(t, m) for which, m, t, _ in launches if which == "decode_warp"]


@pytest.mark.parametrize("value_pad,query_pad", [(True, True), (False, False), (True, False),
                                                (False, True)])
@pytest.mark.parametrize("dim,values", [(64, "affine-rotated"), (128, "affine-rotated"),
                                        (64, "affine8"), (128, "affine3-rotated"),
                                        (128, "affine6")])
def test_warp_kernel_padded_value_words_and_query_rows_match_the_reference(
        backend, monkeypatch, dim, values, value_pad, query_pad):
    """VPAD (the default: a staged token's value words 4 words further apart where they
    are a multiple of 8 — 4-bit values at head_dim 64 and 128, 8-bit at 64 — against the
    P·V loads' bank conflicts) and QPAD (the warp's turned query in rows D + 8 floats
    apart), each on or off, give the reference's attention: 4 query heads, tiles that
    rescale each other, a partial last tile, the exact tokens. The 3-bit values (not a
    multiple of 8 words) stay unpadded; 6-bit ones at head_dim 128 (24 words, padded to
    28) are staged chunk by chunk, not in constant steps (vx_stage_tile's STEADY: 24
    words do not divide a round's 128)."""
    monkeypatch.setattr(kernels, "WARP_VALUE_PAD", value_pad)
    monkeypatch.setattr(kernels, "WARP_QUERY_PAD", query_pad)
    _, launches = warp_attend_matches_reference(backend, monkeypatch, dim, values, 150,
                                                seed=dim + len(values), warp=True)
    assert [(t["VPAD"], t["QPAD"]) for t, _ in launches] == [(value_pad, query_pad)]


@pytest.mark.parametrize("tokens", [150, 600])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("tile_pairs", [False, True])
def test_warp_kernel_tile_pairs_match_the_reference(backend, monkeypatch, tile_pairs, dim,
                                                    tokens):
    """TP 2 (VELOX_WARP_TILE_PAIRS=N, head_dim >= N): a warp takes two adjacent 16-token
    tiles an
    iteration, each basis fragment feeding both tiles' mma and the second tile's keys
    turned 16·θ further; splits then end inside a pair (its second tile partial or past
    the split) — the same attention as one tile at a time and as the reference, 4 query
    heads a KV head, with the basis in registers or shared memory."""
    monkeypatch.setattr(kernels, "WARP_TILE_PAIRS", dim if tile_pairs else 0)
    _, launches = warp_attend_matches_reference(backend, monkeypatch, dim, "affine-rotated",
                                                tokens, seed=dim + tokens)
    assert [t["TP"] for t, _ in launches] == [2 if tile_pairs else 1]


@pytest.mark.parametrize("limit,group,table", [(99, 4, "whole"), (99, 8, "whole"),
                                               (90, 8, "part"), (80, 8, "block-tiled")])
def test_warp_kernel_fits_the_device_block_limit(backend, monkeypatch, limit, group, table):
    """On cards whose blocks may use 99 KiB of shared memory in all (sm_86, sm_89, sm_120:
    kernels.block_shared_limit) head_dim 128 keeps one tile a warp (tile pairs' doubled
    buffers would not fit), and a launch's static and dynamic shared memory stay within
    the limit: the key pair table shrinks where the whole one would not fit beside 8
    query heads (a 90 KiB limit here), and a group that would not fit even without it
    takes the block-tiled kernel (80 KiB); each gives the reference's attention (the
    limits are emulated: the tests' GPU is an H200)."""
    monkeypatch.setattr(kernels, "block_shared_limit", lambda: limit * 1024)
    cache, launches = warp_attend_matches_reference(
        backend, monkeypatch, 128, "affine-rotated", 300, seed=group, group=group,
        warp=table != "block-tiled")
    assert len(launches) == (table != "block-tiled")
    layout = cache.kernels
    for template, dynamic in launches:
        assert template["TP"] == 1 and template["SBASIS"]
        static = kernels.warp_shared_bytes(128, group, 4, 64, layout.key_words, tiles=False,
                                           pair_words=template["KPAIR"])
        assert static <= kernels.WARP_SHARED_LIMIT
        assert static + dynamic <= limit * 1024
        assert (template["KPAIR"] == layout.key_pair_words) == (table == "whole")
        assert template["KPAIR"] > 0


@pytest.mark.parametrize("info,limit", [
    ({"compute_capability_major": 9, "compute_capability_minor": 0}, 227 * 1024),
    ({"compute_capability_major": 8, "compute_capability_minor": 9}, 99 * 1024),
    ({"compute_capability_major": 8, "compute_capability_minor": 0}, 163 * 1024),
    ({"compute_capability_major": 12, "compute_capability_minor": 1}, 99 * 1024),
    ({"compute_capability_major": 10, "compute_capability_minor": 3}, 227 * 1024),
    ({"compute_capability_major": 7, "compute_capability_minor": 5}, 48 * 1024),
    ({"device_name": "NVIDIA X", "architecture": "sm_90"}, 227 * 1024),
    ({"device_name": "NVIDIA X", "architecture": "sm_120"}, 99 * 1024),
    ({"device_name": "NVIDIA X", "architecture": "sm_89"}, 99 * 1024),
    ({"device_name": "NVIDIA X"}, 99 * 1024),
    (None, 227 * 1024)])
def test_block_shared_limit_follows_the_compute_capability(monkeypatch, info, limit):
    """A block's shared memory limit from MLX's device_info on a CUDA GPU: the table's
    entry for the compute capability (or its architecture's name, "sm_90") or the last
    one before it; 99 KiB where MLX names neither; an H100's without a CUDA GPU
    (``None`` here: the emulator)."""
    monkeypatch.setattr(kernels.mx.cuda, "is_available", lambda: info is not None)
    monkeypatch.setattr(kernels.mx, "device_info", lambda *a: info)
    assert kernels.block_shared_limit.__wrapped__() == limit


@pytest.mark.parametrize("values", ["affine-rotated", "affine8"])
def test_warp_kernel_takes_eight_query_heads_at_head_dim_128(backend, monkeypatch, values):
    """8 query heads per KV head at head_dim 128 (a 70B-style group): the word buffers
    sit in dynamic shared memory beside the basis, so the warp-tiled kernel takes the
    shape (the block-tiled one did before 2026-11-30) and gives the reference's
    attention, 4- and 8-bit values, tiles that rescale each other and a partial last
    pair."""
    _, launches = warp_attend_matches_reference(backend, monkeypatch, 128, values, 300,
                                                seed=8, group=8, warp=True)
    assert [(t["G"], t["TP"], t["SBASIS"]) for t, _ in launches] == [
        (8, kernels._warp_tiles(128), True)]


@pytest.mark.parametrize("place", ["registers", "shared", "memory"])
@pytest.mark.parametrize("dim,misaligned", [(64, False), (64, True), (128, False)])
def test_warp_kernel_reads_its_basis_from_registers_shared_memory_or_memory(
        backend, monkeypatch, place, dim, misaligned):
    """The key basis's B fragments: in registers (BREG, head_dim <= 64, few blocks), in
    the block's dynamic shared memory (SBASIS: 2 · head_dim · RKMAX bytes, copied 16 bytes
    at a time when bfrag is 16-byte aligned, else 4), or read from memory at every mma
    (VELOX_WARP_BASIS_SHARED=0) — the same attention from each."""
    import cuda_emulator

    if backend not in ("emulated", "cuda"):
        pytest.skip("the warp-tiled kernel is CUDA's")
    if place == "registers" and dim > kernels.WARP_BASIS_REGISTERS:
        pytest.skip("the basis of head_dim 128 never sits in registers")
    if misaligned and not backend.startswith("emulated"):
        pytest.skip("misaligned inputs are the emulator's")
    monkeypatch.setattr(kernels, "WARP_BASIS_REGISTERS", 64 if place == "registers" else 0)
    monkeypatch.setattr(kernels, "WARP_BASIS_SHARED", place == "shared")
    monkeypatch.setattr(cuda_emulator, "MISALIGN_INPUTS", misaligned)
    launches = record_launches(monkeypatch)
    monkeypatch.setattr(cuda_emulator, "COPIES_16", 0)
    rng = np.random.default_rng(dim + misaligned)
    cache = filled(make_cache(rng, 2, dim, "pre", "affine-rotated", True), rng, 150)
    q = mx.array(rng.normal(size=(1, 6, 1, dim)).astype(np.float16))
    expected = reference_attend(cache, q, dim**-0.5)
    cache.use_kernels(backend)
    got = np.array(cache.attend(q, dim**-0.5).astype(mx.float32))
    (warp,) = [launch for launch in launches if launch[0] == "decode_warp"]
    _, shared_memory, template, blocks = warp
    assert template["BREG"] == (place == "registers")
    assert template["SBASIS"] == (place == "shared")
    # The basis and the staged key and value words (the emulator aborts past the request).
    key_words = cache.kernels.key_words
    basis = 2 * dim * cache.kernels.key_rank
    value_words = dim * 4 // 32  # a token's, padded by 4 where a multiple of 8 (VPAD)
    value_stride = value_words + 4 * (kernels.WARP_VALUE_PAD and value_words % 8 == 0)
    tokens = 16 * template["TP"]  # a word buffer's (two tiles with tile pairs)
    dynamic = basis + 4 * 4 * 2 * (tokens * key_words + 4 + tokens * value_stride + 4)
    static = kernels.warp_shared_bytes(dim, 3, 4, 64, key_words, tiles=False,
                                       pair_words=template["KPAIR"])
    if place != "shared":
        assert shared_memory == 0
    elif static + dynamic > 48 * 1024 - 256:  # MLX raises the limit past 48,000 B only
        assert shared_memory == max(dynamic, 48016)
    else:
        assert shared_memory == dynamic
    # Aligned, every block but the exact tokens' (block 0 of each of the 2 KV heads)
    # copies its head's basis 16 bytes at a time (on top of codes). (Only the emulator
    # counts copies.)
    basis_copies = (blocks - 2) * basis // 16 if place == "shared" else 0
    if backend == "emulated" and misaligned:
        assert cuda_emulator.COPIES_16 == 0
    elif backend == "emulated":
        assert cuda_emulator.COPIES_16 > basis_copies
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("values", ["affine", "affine-rotated"])
def test_decode_steps_match_reference_through_batched_appends(backend, values):
    """Step by step, as in decoding: each step appends a token (exact until 16 have
    gathered, then coded together) and attends; the kernel's prepared launch must follow
    every append and batch (and a trim)."""
    rng = np.random.default_rng(7)
    cache = filled(make_cache(rng, 3, 64, "pre", values, True), rng, 120)
    cache.append_batch = 16  # what KVCacheBuilder sets (the class codes each token)
    keys, vals = random_kv(rng, cache, 24)
    q = mx.array(rng.normal(size=(1, 9, 1, 64)).astype(np.float16))
    for step in range(24):
        if step == 20:
            cache.trim(3)  # back into the waiting tokens
        cache.update_and_fetch(keys[:, :, step: step + 1], vals[:, :, step: step + 1])
        expected = reference_attend(cache, q, 0.125)
        cache.use_kernels(backend)
        got = np.array(cache.attend(q, 0.125).astype(mx.float32))
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3, err_msg=f"step {step}")
    assert cache.coded == 120 - 4 + 16  # one batch was coded on the way

    # A state restored into a cache whose launch is prepared at the same coded length.
    other = filled(make_cache(np.random.default_rng(7), 3, 64, "pre", values, True),
                   np.random.default_rng(8), cache.coded + 4)
    other.use_kernels(backend)
    assert other.coded == cache.coded
    before = np.array(other.attend(q, 0.125).astype(mx.float32))
    other.restore(cache.state, cache.meta_state)
    np.testing.assert_allclose(np.array(other.attend(q, 0.125).astype(mx.float32)), got,
                               atol=1e-6, rtol=0)
    assert not np.allclose(before, got)


@pytest.mark.parametrize("dim,group,value_bits,warp", [
    (64, 3, 4, True), (128, 4, 4, True), (128, 5, 4, True), (128, 6, 4, True),
    (128, 8, 4, True), (128, 4, 8, True), (128, 8, 8, True), (64, 9, 4, False)])
def test_warp_kernel_only_where_its_shared_memory_fits(dim, group, value_bits, warp):
    """CUDA refuses more than 48 KiB of static shared memory; larger query groups, head
    dims or value widths take the block-tiled kernel (warp_shared_bytes, key tiles sized
    by the layout's key words — 9 per token here; before the tensor-core P·V rewrite the
    formula matched ptxas, sm_90, within 16 B). At head_dim 128 every launch reads its
    basis from dynamic shared memory (SBASIS) and the word buffers sit there too, so 8
    query heads per KV head fit; more than MAX_WARP_GROUP never do."""
    cache = make_cache(np.random.default_rng(0), 2, dim)
    cache.value_affine = (value_bits, 64)
    layout = SpectralKernels(cache, "emulated")
    q = mx.zeros((1, 2 * group, 1, dim), mx.float16)
    assert layout.warp_decode(q) == warp
    assert (kernels.warp_shared_bytes(dim, group, value_bits, 64, layout.key_words,
                                      tiles=not layout._tiles_dynamic())
            <= kernels.WARP_SHARED_LIMIT) == (warp or group > kernels.MAX_WARP_GROUP)


def test_code_buffers_grow_in_whole_steps():
    """Capacity stays a multiple of 256 tokens whatever the chunk sizes (the warp-tiled
    kernel copies whole 16-token tiles)."""
    from veloxcore.caches import STEP

    rng = np.random.default_rng(4)
    cache = make_cache(rng, 2, 64)
    keys, values = random_kv(rng, cache, 1500)
    for a, b in ((0, 300), (300, 301), (301, 1100), (1100, 1500)):
        cache.update_and_fetch(keys[:, :, a:b], values[:, :, a:b])
        assert cache.parts[0].shape[2] % STEP == 0 and cache.parts[0].shape[2] >= cache.coded
    assert cache.coded == 1500 - 4
    decoded = cache.fetch()[0]
    np.testing.assert_array_equal(np.array(decoded[:, :, :4]), np.array(keys[:, :, :4]))


@pytest.mark.parametrize("heads,group,dim,mode,values,token_scale", SHAPES)
def test_encode_kernel_matches_reference(backend, heads, group, dim, mode, values, token_scale):
    rng = np.random.default_rng(dim)
    cache = make_cache(rng, heads, dim, mode, values, token_scale, sink_tokens=0)
    keys, vals = random_kv(rng, cache, 300)
    cache.use_kernels("reference")
    expected = cache.encode(keys, vals, 17)
    cache.use_kernels(backend)
    got = cache.encode(keys, vals, 17)
    assert len(got) == len(expected)
    coder = cache.key_coder
    exp_codes = np.array(coder.unpack(expected[0]))
    got_codes = np.array(coder.unpack(got[0]))
    # Sums in another order can move a value across a decision threshold: rare, and
    # then only to the neighbouring level.
    differ = exp_codes != got_codes
    assert differ.mean() < 2e-3
    assert np.abs(exp_codes.astype(int) - got_codes.astype(int)).max() <= 1
    if token_scale:
        np.testing.assert_allclose(np.array(got[1]), np.array(expected[1]), rtol=2e-3)
    if values == "spectral":
        vcoder = cache.value_coder
        v_differ = np.array(vcoder.unpack(expected[1 + token_scale])) != np.array(
            vcoder.unpack(got[1 + token_scale]))
        assert v_differ.mean() < 2e-3


@on_gpu
def test_fused_generation_matches_reference_on_gpu():
    model = tiny_model(seed=3, head_dim=64)
    prompt = np.random.default_rng(2).integers(0, 200, size=300).tolist()

    def run(backend):
        caches = []
        for layer in model.layers:
            cache = make_cache(np.random.default_rng(5), heads=2, dim=64)
            cache.rope = layer.self_attn.rope
            from veloxcore.calibration import RopeInverter
            cache.inverter = RopeInverter(cache.rope, 64)
            cache.use_kernels(backend)
            cache.fused_decode = True
            caches.append(cache)
        return greedy_logits(model, caches, prompt, 8)

    assert attention.install(model)
    try:
        # The two encoders round a few values to the neighbouring level (sums in another
        # order) and CUDA rebuilds keys from fp16 coefficients on tensor cores, so logits
        # differ slightly (measured on an H200: mean 1.6e-3); they must agree closely.
        got, expected = run(BACKEND), run("reference")
        assert np.abs(got - expected).mean() < 4e-3
        np.testing.assert_allclose(got, expected, atol=3e-2)
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.8
    finally:
        attention.uninstall(model)


def test_kernel_layout_compacts_coded_dims():
    rng = np.random.default_rng(7)
    cache = make_cache(rng, heads=3, dim=64, avg_bits=2)
    kernels = SpectralKernels(cache, "reference")
    coded = (cache.key_coder.bits > 0).sum(axis=1)
    assert kernels.key_rank >= coded.max() and kernels.key_rank % 16 == 0
    assert kernels.key_rank < 64  # zero-width dims are skipped
    kbits = np.array(kernels.kbits)
    for h in range(3):
        assert (kbits[h] > 0).sum() == coded[h]


def test_kernel_self_test_passes_on_working_kernels_and_names_failures(monkeypatch):
    from veloxcore.caches import kernel_self_test

    if compiler() is not None:
        use_emulator(monkeypatch)
        assert kernel_self_test.__wrapped__("emulated") is None
    # A backend whose kernels cannot be built is reported, not raised.
    monkeypatch.setattr(kernels, "_kernel",
                        lambda b, which, shared_memory=0, min_blocks=None: 1 / 0)
    problem = kernel_self_test.__wrapped__("cuda")
    assert problem and "ZeroDivisionError" in problem


def test_builder_falls_back_when_the_kernels_fail_their_self_test(monkeypatch):
    import veloxcore.caches as caches_module
    from veloxcore.caches import KVCacheConfig

    model = tiny_model(seed=3, head_dim=64)
    monkeypatch.setattr(caches_module, "kernel_self_test", lambda backend: "it broke")
    config = KVCacheConfig(method="spectral", kernels="cuda")
    backend, notes = caches_module._use_kernels(model, config, [])
    # Decode-then-attend instead, with the reason in caches.kernel_notes.
    assert backend is None and "it broke" in notes[0]


def test_encode_kernel_clips_token_scales_like_the_reference(backend):
    """Per-token scales clipped from below (``+tfX``) are the same in both encoders."""
    rng = np.random.default_rng(11)
    cache = make_cache(rng, 2, 64, "pre", "affine", True, sink_tokens=0, token_scale_floor=0.9)
    keys, vals = random_kv(rng, cache, 200)
    keys = keys * mx.array(rng.uniform(0.2, 2.0, size=(1, 1, 200, 1)).astype(np.float16))
    cache.use_kernels("reference")
    expected = np.array(cache.encode(keys, vals, 5)[1])
    cache.use_kernels(backend)
    got = np.array(cache.encode(keys, vals, 5)[1])
    assert expected.min() >= np.float16(0.9) and (expected == np.float16(0.9)).mean() > 0.1
    np.testing.assert_allclose(got, expected, rtol=2e-3)


@pytest.mark.parametrize("values", ["affine", "spectral"])
def test_adapted_plan_is_what_the_kernels_code_and_attend(backend, values):
    """A cache that re-plans keys (and spectral values) on the prompt (``+ad``) rebuilds
    its kernel layout: fused encode + attend agree with the reference path under the
    adapted plan."""
    rng = np.random.default_rng(13)

    def adaptive():
        return make_cache(np.random.default_rng(3), 2, 64, "pre", values, True,
                          adapt_prior=16)

    keys, vals = random_kv(rng, adaptive(), 120)
    # Energy moved from the leading dims to trailing ones: the plan must follow it.
    basis = np.array(adaptive().key_basis)
    coeff = np.einsum("bhtd,hdm->bhtm", np.array(keys, dtype=np.float64), basis)
    coeff = coeff[..., ::-1] * 0.5
    keys = mx.array(np.einsum("bhtm,hdm->bhtd", coeff, basis).astype(np.float16))
    q = mx.array(rng.normal(size=(1, 6, 1, 64)).astype(np.float16))
    filled = {}
    for which in ("reference", backend):
        cache = adaptive()
        static_bits = cache.key_coder.bits.copy()
        static_values = None if values == "affine" else cache.value_coder.scales.copy()
        cache.use_kernels(which)
        cache.update_and_fetch(keys, vals)
        assert cache.adapted is not None and cache.adapted[1] == 120 - 4  # sinks are exact
        assert cache.kernels.backend == which
        # Trailing dims now carry the energy, so they get the bits.
        assert cache.key_coder.bits[:, -8:].sum() > static_bits[:, -8:].sum()
        if static_values is not None:
            assert not np.allclose(cache.value_coder.scales, static_values, rtol=0.05)
        filled[which] = cache
    expected, got = filled["reference"], filled[backend]
    np.testing.assert_array_equal(got.key_coder.bits, expected.key_coder.bits)
    # The fused encoder codes with the adapted plan: codes agree but for rare moves to
    # the neighbouring level (sums in another order; see the encode test).
    coders = [expected.key_coder] + ([] if values == "affine" else [expected.value_coder])
    for i, coder in zip((0, 2), coders, strict=False):
        a = np.array(coder.unpack(expected.parts[i][..., : expected.coded, :])).astype(int)
        b = np.array(coder.unpack(got.parts[i][..., : got.coded, :])).astype(int)
        assert (a != b).mean() < 2e-3 and np.abs(a - b).max() <= 1
    # The decode kernel under the adapted plan, on the same codes, matches the reference.
    got.parts = expected.parts
    np.testing.assert_allclose(np.array(got.attend(q, 0.125).astype(mx.float32)),
                               reference_attend(expected, q, 0.125), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("tokens,adapt", [(200, 0), (200, 16), (4099, 0)])
def test_metric_weighted_basis_kernels_match_reference(backend, tokens, adapt):
    """+qm keys code through one matrix and decode through its inverse transpose: the
    fused encoder and decode kernels take each from the right place (also once the plan
    has adapted to the prompt, +ad: its mean shift goes through the decoder)."""
    if backend.startswith("emulated") and tokens > 1000:
        pytest.skip("too slow to emulate")
    rng = np.random.default_rng(21)
    cache = make_cache(rng, 3, 64, "pre", "affine-rotated", True, metric=True,
                       adapt_prior=adapt)
    if adapt:
        keys, vals = random_kv(rng, cache, 120)
        cache.update_and_fetch(keys + 0.7, vals)  # a shifted prompt: the mean moves
        assert cache.adapted is not None
        # The adapted mean moved by the blended coefficient shift decoded through G:
        # coefficients about it are y − shift, with shift = Σy / (n + prior).
        exact = np.array(cache.inverter(keys[..., 4:, :] + 0.7, 4), dtype=np.float64)
        enc = np.array(cache.key_basis, dtype=np.float64)
        y = np.einsum("bhtd,hdm->bhtm", exact - np.array(cache.calibrated_plan[0]), enc)
        about_adapted = np.einsum("bhtd,hdm->bhtm", exact - np.array(cache.key_mean), enc)
        shift = y.sum(axis=2, keepdims=True) / (y.shape[2] + adapt)
        np.testing.assert_allclose(about_adapted, y - shift, atol=2e-4 * np.abs(y).max())
    assert not np.allclose(np.array(cache.key_basis), np.array(cache.key_decoder))
    keys, vals = random_kv(rng, cache, tokens)
    cache.use_kernels("reference")
    expected = cache.encode(keys, vals, 9)
    cache.use_kernels(backend)
    got = cache.encode(keys, vals, 9)
    coder = cache.key_coder
    a, b = (np.array(coder.unpack(x[0])).astype(int) for x in (expected, got))
    assert (a != b).mean() < 2e-3 and np.abs(a - b).max() <= 1
    filled(cache, rng, tokens)
    q = mx.array(rng.normal(size=(1, 9, 1, 64)).astype(np.float16))
    want = np.array(cache.attend(q, 0.125).astype(mx.float32))
    np.testing.assert_allclose(want, reference_attend(cache, q, 0.125), atol=2e-3,
                               rtol=2e-3)


def test_launch_bounds_reach_the_kernel_declaration_only(tmp_path):
    """VELOX_WARP_MIN_BLOCKS compiles the warp-tiled kernel with __launch_bounds__: MLX
    writes the signature between our header and body, so the header redefines __global__
    and the body restores it. Preprocessed as MLX assembles the source (NVRTC's
    definitions of __global__ and __location__ stand in), only the kernel carries them."""
    import subprocess

    from veloxcore import kernel_source

    if compiler() is None:
        pytest.skip("needs a C++ compiler's preprocessor")
    header, body = kernel_source.with_launch_bounds("// header\n", "  x[0] = 1;\n", 128, 3)
    text = ("#define __location__(a) __attribute__((a))\n"
            "#define __global__ __location__(global)\n"
            "#define __launch_bounds__(t, b) BOUNDS_##t##_##b\n"
            + header + "__global__ void custom_kernel_velox(int* x) {\n" + body + "\n}\n"
            + "__global__ void next_kernel(int* x) {}\n")
    path = tmp_path / "kernel.cu"
    path.write_text(text)
    out = subprocess.run([compiler(), "-E", "-P", "-x", "c++", str(path)], check=True,
                         capture_output=True, text=True).stdout
    kernel = next(line for line in out.splitlines() if "custom_kernel_velox" in line)
    after = next(line for line in out.splitlines() if "next_kernel" in line)
    assert kernel.split() == ["__attribute__((global))", "BOUNDS_128_3", "void",
                              "custom_kernel_velox(int*", "x)", "{"]
    assert "BOUNDS" not in after and after.startswith("__attribute__((global)) void")
