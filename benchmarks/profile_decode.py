"""Where the spectral decode-attention time goes, stage by stage (GPU).

    python benchmarks/profile_decode.py --shape 8b --tokens 1024,65536 [--json OUT]

Times, each as the median of evaluating the stage on its own: an empty custom
kernel (the fixed cost of one launch + evaluation), fp16 SDPA, the whole ``attend``
and ``attend`` with 8 calls evaluated together (launch overhead amortised); with the
block-tiled kernel (``VELOX_WARP_DECODE=0``) also its decode kernel alone (codes ->
per-split partials) and its merge kernel alone. The warp-tiled kernel is one launch.
Under ``ncu`` the kernels' own durations can be read as well.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from decode import SHAPES, fill, spectral_cache, timed

mx = __import__("mlx.core").core
from mlx_lm.models import llama  # noqa: E402

from veloxcore.kernels import kernel_backend  # noqa: E402


def empty_kernel():
    backend = kernel_backend()
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    body = ("out[0] = inp[0];" if backend == "cuda" else "out[0] = inp[0];")
    kernel = make(name="velox_empty", input_names=["inp"], output_names=["out"], source=body)
    x = mx.zeros((1,), mx.float32)
    return lambda: kernel(inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                          output_shapes=[(1,)], output_dtypes=[mx.float32])[0]


def profile(H, D, Hq, rope, tokens, reps) -> list[dict]:
    cache = spectral_cache(np.random.default_rng(0), H, D, rope, kernel_backend())
    fill(cache, H, D, tokens)
    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    k = mx.random.normal((1, H, tokens, D)).astype(mx.float16)
    v = mx.random.normal((1, H, tokens, D)).astype(mx.float16)
    scale = D**-0.5
    kern = cache.kernels
    stages = {"fp16 sdpa": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)}
    if not kern.warp_decode(q):  # the block-tiled kernel and its separate merge
        args_decode = (q, scale, cache.parts, cache.coded, cache.num_sinks)
        partials = kern.decode_partials(*args_decode)
        mx.eval(partials)
        exact = cache.exact_buffers()
        stages["decode kernel"] = lambda: kern.decode_partials(*args_decode)
        stages["merge kernel"] = lambda: kern.combine(q, scale, partials, exact)
    stages["attend"] = lambda: cache.attend(q, scale)
    if not kern.warp_decode(q):
        # Not for the warp-tiled kernel: launches on one cache share its split counter and
        # must not run at once (MLX may overlap independent launches).
        stages["attend x8 (per call)"] = lambda: [cache.attend(q, scale) for _ in range(8)]
    rows = []
    for name, fn in stages.items():
        us = timed(fn, reps) * 1e6
        if name.endswith("(per call)"):
            us /= 8
        rows.append(dict(stage=name, tokens=tokens, us=us))
    code_bytes = sum(p[..., : cache.coded, :].nbytes for p in cache.parts)
    rows.append(dict(stage="code bytes", tokens=tokens, bytes=code_bytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--tokens", default="1024,65536")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    H, D, Hq = shape["num_key_value_heads"], shape["head_dim"], shape["num_attention_heads"]
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    rows = []
    empty = empty_kernel()
    rows.append(dict(stage="empty custom kernel", us=timed(empty, args.reps) * 1e6))
    for tokens in [int(t) for t in args.tokens.split(",")]:
        rows += profile(H, D, Hq, rope, tokens, args.reps)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
