"""A decode step's attention alone, every layer: building (host) and evaluating apart.

    python benchmarks/layer_chain.py --shape smollm2 --tokens 16384 \
        --methods fp16,fp16+nop,fp16+bignop,spectral-vh

Per step, for each of the shape's layers: the cache's ``update_and_fetch`` of one token
and attention through veloxcore's hook (fp16: mlx-lm's KVCache and SDPA; spectral-vh:
decode.py's cache, the fused kernel), the output feeding the next layer's query — the
model's other work left out. ``fp16+nop`` adds a trivial custom CUDA kernel after each
layer's SDPA, ``fp16+bignop`` the same kernel with a 20 kB header (what any custom kernel
costs, and what its text's size costs). Methods take turns in blocks of 64 steps (8
blocks after one warm-up), so a slow spell of a shared host falls on each. Reported per
method: median build, evaluation and total µs of ordinary steps, and of the steps that
code a batch of waiting tokens. On CUDA only (the kernels are).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from decode import SHAPES, fill, spectral_cache

from veloxcore import attention, kernels

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from kernel_call_cost import PAD  # noqa: E402
from mlx_lm.models import base, llama  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

NOP = "unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; y[i] = x[i];"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--methods", default="fp16,fp16+nop,fp16+bignop,spectral-vh")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if kernels.kernel_backend() != "cuda":
        raise SystemExit("needs MLX's CUDA backend")
    shape = SHAPES[args.shape]
    H, D, Hq = shape["num_key_value_heads"], shape["head_dim"], shape["num_attention_heads"]
    layers = shape["num_hidden_layers"]
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    sdpa = attention._dispatching(base.scaled_dot_product_attention)
    nops = {"fp16+nop": "", "fp16+bignop": PAD}
    nops = {m: mx.fast.cuda_kernel(name=f"chain_{m[5:]}", input_names=["x"],
                                   output_names=["y"], source=NOP, header=h)
            for m, h in nops.items()}
    methods = args.methods.split(",")

    def caches(method):
        out = []
        for _ in range(layers):
            if method.startswith("fp16"):
                cache = KVCache()
                kv = mx.random.normal((1, H, args.tokens, D)).astype(mx.float16)
                cache.update_and_fetch(kv, kv)
            else:
                cache = spectral_cache(np.random.default_rng(0), H, D, rope, "cuda",
                                       rotate_values=True)
                fill(cache, H, D, args.tokens)
            mx.eval(cache.state)
            out.append(cache)
        return out

    def step(method, layer_caches, x):
        for cache in layer_caches:
            kv = x[:, :H]
            k, v = cache.update_and_fetch(kv, kv)
            x = sdpa(x, k, v, cache=cache, scale=D**-0.5, mask=None)
            if method in nops:
                x = nops[method](inputs=[x], grid=(Hq * D, 1, 1), threadgroup=(D, 1, 1),
                                 output_shapes=[x.shape], output_dtypes=[x.dtype])[0]
        return x

    sets = {m: caches(m) for m in methods}
    x0 = (mx.random.normal((1, Hq, 1, D)) * 0.1).astype(mx.float16)
    mx.eval(x0)
    times = {m: [] for m in methods}  # (build µs, eval µs, coded)
    for phase in ["warm-up"] + ["timed"] * 8:
        for method in methods:
            first = sets[method][0]
            for _ in range(64):
                writes = getattr(first, "code_writes", 0)
                t0 = time.perf_counter()
                out = step(method, sets[method], x0)
                t1 = time.perf_counter()
                mx.eval(out)
                t2 = time.perf_counter()
                if phase == "timed":
                    times[method].append(((t1 - t0) * 1e6, (t2 - t1) * 1e6,
                                          getattr(first, "code_writes", 0) != writes))
    rows = {}
    print("| method | build µs | eval µs | step µs | per layer µs | coding step µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method in methods:
        build, ev, coded = (np.array(c) for c in zip(*times[method], strict=True))
        plain = ~coded.astype(bool)
        total = build + ev
        rows[method] = dict(build_us=float(np.median(build[plain])),
                            eval_us=float(np.median(ev[plain])),
                            step_us=float(np.median(total[plain])),
                            coding_step_us=float(np.median(total[~plain]))
                            if (~plain).any() else None)
        r = rows[method]
        coding = f"{r['coding_step_us']:.0f}" if r["coding_step_us"] else ""
        print(f"| {method} | {r['build_us']:.0f} | {r['eval_us']:.0f} | {r['step_us']:.0f} | "
              f"{r['step_us'] / layers:.1f} | {coding} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, tokens=args.tokens, layers=layers, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
