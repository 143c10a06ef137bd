"""Decode speed and memory of KV-cache methods on random-weight models of real shapes.

    python benchmarks/decode.py --shapes 1b,8b --contexts 1024,4096,16384,65536 --out DIR

For each model shape and context N:
- attention: one layer's decode attention (1 query token against N cached tokens),
  median latency over repeated calls, each evaluated on its own (as in decoding);
  fp16 is ``mx.fast.scaled_dot_product_attention``; affine4/affine8 are mlx-lm's
  ``QuantizedKVCache`` attention (``quantized_scaled_dot_product_attention``);
  spectral is the fused kernel over the codes (plus the 4 exact sink tokens),
  spectral-unfused decodes the codes then calls the fp16 SDPA. For spectral the
  bandwidth column is the bytes of codes read / latency.
- end to end: the whole model (random weights, fp16) decoding ``--decode-tokens``
  tokens after its caches were filled with N random tokens and decoding warmed up;
  mean and median tokens/s, graph-build time per step, and ``mx.get_peak_memory()``
  over fill + decode. Two ways: step by step (build a step's graph, evaluate it, wait:
  host work and GPU time add up), and "streamed" through mlx-lm's ``generate_step`` (what
  ``mlx_lm.generate`` users get: the next step is built while the GPU runs this one).
  Shared hosts are noisy (fp16 alone ran 131–224 tok/s at 8k–16k on
  three H200 leases of one afternoon): ``--trials N`` decodes N times per cache and
  ``--rounds R`` measures all methods R times in turn; the fastest counts, all are kept.
  ``--interleave BLOCK --blocks N`` instead keeps every method's caches and decodes
  BLOCK steps of each in turn, N times (BLOCK a multiple of the coding batch, 32), and
  compares each method to fp16 block by block (median of paired ratios): slow spells then
  fall on all methods alike. Its rows also give the median ordinary step and the median
  step that codes a batch of waiting tokens (one in 32), where the time goes.

Spectral caches use random orthogonal bases with the default model's measured
eigenvalue spectra (shipped bundle; interpolated to head_dim 128), keys
water-filled at 3 bits pre-RoPE with a per-token scale and affine 4-bit values
(spectral-vh: Hadamard-rotated values, as the default configuration's +vh;
spectral-a3vh: 3-bit rotated values; spectral-ec: entropy-coded keys, see
entropy_cache; spectral-ec-g1 the same with each layer decoding its own keys (no
caches.DecodeAhead), spectral-ec-unpaced without caches.pace either; a "-tiles" suffix, e.g.
spectral-vh-tiles, runs the block-tiled decode kernel instead of the warp-tiled one;
an "-abN" suffix codes decoded tokens N at a time instead of
KVCacheConfig.append_batch (32), "-ab1" each as it arrives). Speed does not depend on
the basis itself.
Writes DIR/decode.json and DIR/decode.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from veloxcore import KVCacheConfig, attention, kernels, load_cached_rotations
from veloxcore.caches import (
    SpectralKVCache,
    link_decode_ahead,
    random_rotation,
    value_rotation,
)
from veloxcore.kernels import kernel_backend
from veloxcore.spectral import water_fill_bits

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.cache import KVCache, QuantizedKVCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "assets" / "bundles" / "smollm2-135m-instruct-pre"
SHAPES = {
    # The default model (SmolLM2-135M), Llama-3.2-1B and Llama-3.1-8B layouts.
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM data sheets


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{platform.machine()} CPU ({platform.processor() or 'unknown'})"


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def model_args(shape: str) -> llama.ModelArgs:
    return llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=32000,
                           rope_theta=500000.0, rope_traditional=False,
                           max_position_embeddings=131072, tie_word_embeddings=False,
                           **SHAPES[shape])


def random_model(shape: str) -> llama.Model:
    """A random-weight model of ``shape`` (seed 0) with the attention hook installed:
    fp16 weights on the GPU, float32 on CPU, where fp16 matmuls are slow."""
    mx.random.seed(0)
    model = llama.Model(model_args(shape))
    model.set_dtype(mx.float16 if mx.default_device() == mx.gpu else mx.float32)
    mx.eval(model.parameters())
    attention.install(model)
    return model


# The default model's layer whose spectra the random-weight shapes take. Layer 10's keys
# water-fill to at most 5 bits a dim, so every key pair fits the warp-tiled kernel's pair
# table; layer 0's top dims take 8 (DECODE_SPECTRUM_LAYER=0: wide pairs, as 14 of the
# model's 30 layers have some).
SPECTRUM_LAYER = int(os.environ.get("DECODE_SPECTRUM_LAYER", "10"))


def spectra(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Key and value eigenvalue spectra of the default model (layer SPECTRUM_LAYER, head
    0), resampled to ``dim`` dims."""
    rot = load_cached_rotations(BUNDLE)[SPECTRUM_LAYER]
    out = []
    for lam in (rot.key_eigenvalues[0], rot.value_eigenvalues[0]):
        x = np.linspace(0, 1, lam.size)
        out.append(np.exp(np.interp(np.linspace(0, 1, dim), x, np.log(lam))))
    return out[0], out[1]


def orthogonal(rng, heads, dim):
    """A Haar-random orthogonal basis per head (the RVQ cache's rotation)."""
    return np.stack([random_rotation(dim, int(seed))
                     for seed in rng.integers(1 << 30, size=heads)])


def spectral_cache(rng, heads: int, dim: int, rope, backend: str, value_bits: int = 4,
                   rotate_values: bool = False,
                   append_batch: int = KVCacheConfig.append_batch) -> SpectralKVCache:
    lam_k, lam_v = spectra(dim)
    bits = np.stack([water_fill_bits(lam_k, 3.0, 0, 8)] * heads)
    scale = lambda lam: np.stack([2.0 * np.sqrt(lam)] * heads)  # noqa: E731
    cache = SpectralKVCache(orthogonal(rng, heads, dim), scale(lam_k), bits,
                            orthogonal(rng, heads, dim), scale(lam_v), None, "pre", rope,
                            value_affine=(value_bits, 64), sink_tokens=4,
                            key_mean=np.zeros((heads, dim)), value_mean=np.zeros((heads, dim)),
                            token_scale=True,
                            value_rotation=value_rotation(dim) if rotate_values else None)
    cache.append_batch = append_batch
    if backend != "off":
        cache.use_kernels(backend)
        cache.fused_decode = True
    return cache


def entropy_cache(rng, heads: int, dim: int, rope, backend: str) -> SpectralKVCache:
    """spectral-ec: entropy-coded keys at 2.75 bits (+ec, with the default model's key
    spectrum as the index model's scales) and Hadamard-rotated affine 4-bit values. No
    fused attention: on a GPU the keys decode there (kernels.EntropyKernels), then the
    fp16 SDPA attends."""
    lam_k, lam_v = spectra(dim)
    cache = SpectralKVCache(orthogonal(rng, heads, dim), np.stack([np.sqrt(lam_k)] * heads),
                            np.zeros((heads, dim), dtype=np.int64),
                            orthogonal(rng, heads, dim), np.stack([2.0 * np.sqrt(lam_v)] * heads),
                            None, "pre", rope, value_affine=(4, 64), sink_tokens=4,
                            value_rotation=value_rotation(dim), entropy_bits=2.75)
    if backend not in ("off", "reference"):
        try:
            cache.use_kernels(backend)
        except ValueError:  # no fused attention: the keys decode on the GPU
            pass
    return cache


class UnpacedCache(SpectralKVCache):
    """spectral-ec-unpaced: every layer's decoding built before any runs (no caches.pace)."""

    paced = False


def fill(cache, heads: int, dim: int, tokens: int, chunk: int = 4096) -> None:
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        k = mx.random.normal((1, heads, n, dim)).astype(mx.float16)
        v = mx.random.normal((1, heads, n, dim)).astype(mx.float16)
        cache.update_and_fetch(k, v)
        mx.eval(cache.state)


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn`` evaluated on its own."""
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_cache(method: str, heads: int, dim: int, rope, backend: str, rng):
    if method == "fp16":
        return KVCache()
    if method.startswith("affine"):
        return QuantizedKVCache(group_size=64, bits=int(method[6:]))
    # spectral-vh: values Hadamard-rotated (the default configuration's +vh);
    # spectral-a3vh: 3-bit rotated values (the best measured configuration at <= 3.5 bits);
    # an "-abN" suffix codes decoded tokens N at a time (default: the configuration's,
    # 32; -ab1: each at once).
    if method.startswith("spectral-ec"):
        cache = entropy_cache(rng, heads, dim, rope, backend)
        if method == "spectral-ec-unpaced":
            cache.__class__ = UnpacedCache
        return cache
    method, _, batch = method.partition("-ab")
    return spectral_cache(rng, heads, dim, rope,
                          "off" if method == "spectral-unfused" else backend,
                          value_bits=3 if method == "spectral-a3vh" else 4,
                          rotate_values=method in ("spectral-vh", "spectral-a3vh"),
                          append_batch=int(batch or KVCacheConfig.append_batch))


def attention_row(method, shape, tokens, backend, reps, bandwidth):
    args = SHAPES[shape]
    H, D, Hq = args["num_key_value_heads"], args["head_dim"], args["num_attention_heads"]
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    rng = np.random.default_rng(0)
    mx.reset_peak_memory()
    cache = make_cache(method, H, D, rope, backend, rng)
    fill(cache, H, D, tokens)
    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    scale = D**-0.5
    if method == "fp16":
        k, v = cache.keys[..., :tokens, :], cache.values[..., :tokens, :]
        fn = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    elif method.startswith("affine"):
        k = [a[..., :tokens, :] for a in cache.keys]
        v = [a[..., :tokens, :] for a in cache.values]
        fn = lambda: quantized_scaled_dot_product_attention(  # noqa: E731
            q, k, v, scale=scale, mask=None, group_size=64, bits=cache.bits)
    elif method.startswith("spectral") and method != "spectral-unfused":
        fn = lambda: cache.attend(q, scale)  # noqa: E731
    else:  # decode the codes, then the fp16 kernel
        def fn():
            k, v = cache.fetch(mx.float16)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    seconds = timed(fn, reps)
    append_us = None
    if method != "fp16":  # a decode step's append (quantise, pack, store), averaged
        k1 = mx.random.normal((1, H, 1, D)).astype(mx.float16)
        steps = getattr(cache, "append_batch", 1)  # over one batch of waiting tokens

        def append():
            for _ in range(steps):
                cache.update_and_fetch(k1, k1)
            out = cache.state
            cache.trim(steps)
            return out
        append_us = timed(append, reps) * 1e6 / steps
    row = dict(part="attention", shape=shape, method=method, tokens=tokens,
               latency_us=seconds * 1e6, peak_memory_mib=mx.get_peak_memory() / 2**20,
               append_us=append_us)
    if method.startswith("spectral"):
        code_bytes = sum(p[..., : cache.coded, :].nbytes for p in cache.parts)
        row["code_bytes"] = code_bytes
        row["read_gbs"] = code_bytes / seconds / 1e9
        if bandwidth:
            row["bandwidth_fraction"] = code_bytes / seconds / bandwidth
    return row


def end_to_end_row(model, method, shape, tokens, decode_tokens, backend, trials=1):
    args = SHAPES[shape]
    H, D = args["num_key_value_heads"], args["head_dim"]
    rng = np.random.default_rng(0)
    mx.reset_peak_memory()
    caches = [make_cache(method, H, D, layer.self_attn.rope, backend, rng)
              for layer in model.layers]
    if method == "spectral-ec":
        link_decode_ahead(caches)  # as KVCacheBuilder does
    for c in caches:
        fill(c, H, D, tokens)
    token = mx.array([[1]])
    # Warm-up: the first steps compile kernels, and so does the first batched append
    # (its small shapes are new to MLX's JIT); time steady decoding after both.
    warmup = 2 + max(getattr(c, "append_batch", 1) for c in caches)
    runs = []  # per trial: step times, graph-build times
    streamed = []  # per trial: tokens/s through mlx-lm's generate_step
    for trial in range(trials):
        times, builds = [], []
        for step in range(decode_tokens + (warmup if trial == 0 else 0)):
            t0 = time.perf_counter()
            logits = model(token, cache=caches)
            token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
            t1 = time.perf_counter()  # the step's graph is built (host work: Python, MLX)
            mx.eval(token)
            if trial or step >= warmup:
                times.append(time.perf_counter() - t0)
                builds.append(t1 - t0)
        runs.append((times, builds))
        streamed.append(streamed_tokens_per_s(model, caches, decode_tokens, warmup))
    # Mean, not median: a batched append (one step in 32 codes the waiting tokens) must
    # count; the median is kept for comparison with earlier runs. Several trials: the
    # fastest counts (the host is shared and noisy), all are kept.
    means = [len(t) / sum(t) for t, _ in runs]
    times, builds = runs[int(np.argmax(means))]
    return dict(part="end_to_end", shape=shape, method=method, tokens=tokens,
                tokens_per_s=max(means), trial_tokens_per_s=means,
                median_tokens_per_s=1.0 / statistics.median(times),
                build_ms=1e3 * sum(builds) / len(builds),
                stream_tokens_per_s=max(streamed), trial_stream_tokens_per_s=streamed,
                peak_memory_mib=mx.get_peak_memory() / 2**20)


def interleaved_rows(model, methods, shape, tokens, block, blocks, backend) -> list[dict]:
    """End to end with the methods' caches side by side: each decodes ``block`` steps in
    turn, ``blocks`` times, step by step and then streamed, so a slow spell of a shared
    host falls on every method alike (--rounds alternates whole runs of seconds, and fp16
    alone ran 141-246 tok/s across four runs of one H200 lease). Per method: the rate over
    all its steps; against fp16 (else the first method: ``paired_with``), the median over
    blocks of the paired ratio (block i of the method against block i of the reference).
    ``block`` must be a multiple of every cache's coding batch, so that each block holds
    the same number of coding steps. No peak memory: the caches coexist."""
    args = SHAPES[shape]
    H, D = args["num_key_value_heads"], args["head_dim"]
    sets = {}
    for method in methods:
        rng = np.random.default_rng(0)
        with decode_kernel(method):
            caches = [make_cache(method.removesuffix("-tiles"), H, D, layer.self_attn.rope,
                                 backend, rng) for layer in model.layers]
        if method.removesuffix("-tiles") == "spectral-ec":
            link_decode_ahead(caches)  # as KVCacheBuilder does (not -g1, not -unpaced)
        for c in caches:
            fill(c, H, D, tokens)
        sets[method] = caches
    batch = max(getattr(c, "append_batch", 1) for cs in sets.values() for c in cs)
    if block < 2 or block % batch or blocks < 1:
        raise SystemExit(f"--interleave {block} --blocks {blocks}: blocks of at least 2 "
                         f"steps, a multiple of the coding batch ({batch}), and at least one")
    warmup = 2 + batch
    steps = {m: [] for m in methods}  # per method, per block: step times
    coding = {m: [] for m in methods}  # per method, every timed step: did it code a batch?
    streamed = {m: [] for m in methods}  # per method, per block: (tokens, seconds)
    schedule = [("warm-up", warmup)] + [("timed", block)] * blocks
    for phase, count in schedule:
        for method in methods:
            with decode_kernel(method):
                times = []
                token = mx.array([[1]])
                codes = []
                for _ in range(count):
                    writes = getattr(sets[method][0], "code_writes", 0)
                    t0 = time.perf_counter()
                    logits = model(token, cache=sets[method])
                    token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
                    mx.eval(token)
                    times.append(time.perf_counter() - t0)
                    codes.append(getattr(sets[method][0], "code_writes", 0) != writes)
            if phase == "timed":
                steps[method].append(times)
                coding[method] += codes
    generators = {m: generate_step(mx.array([1]), model,
                                   max_tokens=warmup + blocks * block,
                                   sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
                                   prompt_cache=sets[m]) for m in methods}
    for phase, count in schedule:
        for method in methods:
            with decode_kernel(method):
                # A block takes ``count`` tokens (so coding steps keep their place in
                # it); the first was queued during the previous block (generate_step
                # builds a step ahead), so the ``count - 1`` intervals after it are timed.
                stamps = [time.perf_counter()
                          for _ in itertools.islice(generators[method], count)]
            if phase == "timed":
                streamed[method].append((len(stamps) - 1, stamps[-1] - stamps[0]))
    # generate_step holds mlx-lm's generation stream as the default while suspended:
    # closed last-opened first, the default stream is the caller's again.
    for generator in reversed(list(generators.values())):
        generator.close()
    first = "fp16" if "fp16" in methods else methods[0]
    rows = []
    for method in methods:
        rates = [len(t) / sum(t) for t in steps[method]]
        ref = [len(t) / sum(t) for t in steps[first]]
        stream_rates = [n / dt for n, dt in streamed[method]]
        stream_ref = [n / dt for n, dt in streamed[first]]
        # Where the time goes: ordinary steps, and those that code a batch of waiting
        # tokens (one in append_batch), apart.
        flat = np.array([t for block_times in steps[method] for t in block_times]) * 1e3
        coded = np.array(coding[method], dtype=bool)
        split = dict(step_ms=float(np.median(flat[~coded])), coding_steps=int(coded.sum()))
        if coded.any():
            split["coding_step_ms"] = float(np.median(flat[coded]))
        rows.append(dict(
            part="end_to_end", shape=shape, method=method, tokens=tokens, **split,
            interleaved=dict(block=block, blocks=blocks), paired_with=first,
            tokens_per_s=sum(map(len, steps[method])) / sum(map(sum, steps[method])),
            block_tokens_per_s=rates,
            paired_ratio=statistics.median(a / b for a, b in zip(rates, ref, strict=True)),
            stream_tokens_per_s=(sum(n for n, _ in streamed[method])
                                 / sum(dt for _, dt in streamed[method])),
            block_stream_tokens_per_s=stream_rates,
            stream_paired_ratio=statistics.median(
                a / b for a, b in zip(stream_rates, stream_ref, strict=True))))
    return rows


def streamed_tokens_per_s(model, caches, decode_tokens: int, warmup: int) -> float:
    """Decode speed as mlx-lm generates (``generate_step``: the next step's graph is
    built and queued while the GPU runs the current one, so host work and GPU time
    overlap), over ``decode_tokens`` tokens after ``warmup``."""
    stamps = []
    steps = generate_step(mx.array([1]), model, max_tokens=warmup + decode_tokens + 1,
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
                          prompt_cache=caches)
    for _ in steps:
        stamps.append(time.perf_counter())
    timed_stamps = stamps[warmup:]
    return (len(timed_stamps) - 1) / (timed_stamps[-1] - timed_stamps[0])


@contextmanager
def decode_kernel(method: str):
    """Methods named "...-tiles" run the block-tiled decode kernel."""
    kernels.WARP_DECODE = not method.endswith("-tiles")
    try:
        yield
    finally:
        kernels.WARP_DECODE = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--contexts", default="1024,4096,16384,65536")
    parser.add_argument("--methods", default="fp16,affine4,affine8,spectral,spectral-unfused")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1,
                        help="end-to-end: measure all methods this many times in turn "
                             "(caches rebuilt each round), keep each one's fastest")
    parser.add_argument("--trials", type=int, default=1,
                        help="end-to-end: decode --decode-tokens this many times, keep the "
                             "fastest")
    parser.add_argument("--interleave", type=int, default=0, metavar="BLOCK",
                        help="end-to-end: keep all methods' caches and decode BLOCK steps "
                             "of each in turn (see interleaved_rows) instead of --rounds")
    parser.add_argument("--blocks", type=int, default=8,
                        help="with --interleave: blocks per method")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--parts", default="attention,end_to_end")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    backend = kernel_backend()
    name = device_name()
    bandwidth = peak_bandwidth(name)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "decode.json").write_text(json.dumps(
            dict(device=name, kernel_backend=backend, date=time.strftime("%Y-%m-%d"),
                 rows=rows), indent=1))

    methods = args.methods.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    for shape in args.shapes.split(","):
        if "attention" in args.parts:
            for tokens in contexts:
                for method in methods:
                    try:
                        with decode_kernel(method):
                            record(attention_row(method.removesuffix("-tiles"), shape,
                                                 tokens, backend, args.reps, bandwidth)
                                   | dict(method=method))
                    except Exception as e:  # a method that fails here is a result too
                        record(dict(part="attention", shape=shape, method=method,
                                    tokens=tokens, error=str(e).splitlines()[0][:200]))
                    mx.clear_cache()
        if "end_to_end" in args.parts:
            model = random_model(shape)
            for tokens in contexts:
                if args.interleave:
                    for row in interleaved_rows(model, methods, shape, tokens,
                                                args.interleave, args.blocks, backend):
                        record(row)
                    mx.clear_cache()
                    continue
                # Rounds alternate the methods, so a slow spell of a shared host falls on
                # all of them; each method's fastest round counts, all are kept.
                runs: dict[str, list[dict]] = {m: [] for m in methods}
                for _ in range(args.rounds):
                    for method in methods:
                        try:
                            with decode_kernel(method):
                                row = end_to_end_row(model, method.removesuffix("-tiles"),
                                                     shape, tokens, args.decode_tokens,
                                                     backend, args.trials)
                        except Exception as e:
                            row = dict(part="end_to_end", shape=shape, tokens=tokens,
                                       error=str(e).splitlines()[0][:200])
                        mx.clear_cache()
                        runs[method].append(row | dict(method=method))
                for rows_ in runs.values():
                    fastest = max(rows_, key=lambda r: r.get("tokens_per_s", -1))
                    # The streamed speed's own fastest round (the rounds' slow spells
                    # fall on the two measurements independently).
                    streamed = [r.get("stream_tokens_per_s", -1) for r in rows_]
                    record(fastest | dict(round_tokens_per_s=[r.get("tokens_per_s")
                                                              for r in rows_],
                                          round_stream_tokens_per_s=streamed,
                                          stream_tokens_per_s=max(streamed)))
            del model
            mx.clear_cache()
    (args.out / "decode.md").write_text(markdown(rows, name, backend))
    print(markdown(rows, name, backend))


def step_note(row) -> str:
    """Interleaved end-to-end rows: the median ordinary step, and the median step that
    coded a batch of waiting tokens, in ms."""
    if "step_ms" not in row:
        return ""
    note = f"step {row['step_ms']:.2f} ms"
    if row.get("coding_step_ms"):
        note += f"; {row['coding_steps']} coding steps {row['coding_step_ms']:.2f} ms"
    return note


def markdown(rows, name, backend) -> str:
    lines = [f"Device: {name}; kernels: {backend}", "",
             "| shape | part | tokens | method | latency µs | append µs | tok/s | vs fp16 "
             "| streamed tok/s | vs fp16 | code GB/s | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["shape"], r["part"], r["tokens"]): r for r in rows
            if r["method"] == "fp16" and "error" not in r}
    for r in rows:
        ref = base.get((r["shape"], r["part"], r["tokens"]))
        ratio = stream_ratio = ""
        if "error" not in r and ref:
            ratio = (f"{ref['latency_us'] / r['latency_us']:.2f}×" if r["part"] == "attention"
                     else f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×")
            if "stream_tokens_per_s" in r:
                stream_ratio = f"{r['stream_tokens_per_s'] / ref['stream_tokens_per_s']:.2f}×"
            if r.get("paired_with") == "fp16":  # interleaved: the median of paired blocks
                ratio = f"{r['paired_ratio']:.2f}× (paired)"
                stream_ratio = f"{r['stream_paired_ratio']:.2f}× (paired)"
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["shape"], r["part"], r["tokens"], r["method"],
            f"{r['latency_us']:.0f}" if "latency_us" in r else "",
            f"{r['append_us']:.0f}" if r.get("append_us") else "",
            f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "", ratio,
            f"{r['stream_tokens_per_s']:.1f}" if "stream_tokens_per_s" in r else "",
            stream_ratio,
            f"{r['read_gbs']:.0f}" if "read_gbs" in r else "",
            f"{r['peak_memory_mib']:.0f}" if "peak_memory_mib" in r else "",
            r.get("error", "") or step_note(r)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
