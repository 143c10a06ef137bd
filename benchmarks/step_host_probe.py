"""Host time and memory of one layer's decode steps on the fused path, by context length.

    python benchmarks/step_host_probe.py --shape 8b --contexts 4096,16384,65536

For one spectral cache (decode.py's spectral-vh) filled with N tokens, runs 96 decode
steps (append one token, attend) and reports, separately for ordinary steps and the
steps that code a batch of waiting tokens: the host time to build the step (Python and
MLX's graph building, no evaluation), the time to evaluate it, and the memory the step
took beyond what was live before it (``mx.get_peak_memory`` - active memory), next to
the size of the code buffers. A host cost or a buffer copy that grows with the context
shows up as a column that grows with N.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from decode import SHAPES, fill, make_cache

from veloxcore.kernels import kernel_backend

mx = __import__("mlx.core").core
from mlx_lm.models import llama  # noqa: E402


def probe(shape: str, tokens: int, steps: int) -> dict:
    args = SHAPES[shape]
    H, D, Hq = args["num_key_value_heads"], args["head_dim"], args["num_attention_heads"]
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = make_cache("spectral-vh", H, D, rope, kernel_backend(), np.random.default_rng(0))
    fill(cache, H, D, tokens)
    dtype = mx.float16
    k1 = mx.random.normal((1, H, 1, D)).astype(dtype)
    q = mx.random.normal((1, Hq, 1, D)).astype(dtype)
    mx.eval(k1, q)
    rows = []
    for _ in range(steps):
        coded = cache.coded
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t0 = time.perf_counter()
        cache.update_and_fetch(k1, k1)
        out = cache.attend(q, D**-0.5)
        t1 = time.perf_counter()
        mx.eval(out, *cache.parts)
        mx.synchronize()
        t2 = time.perf_counter()
        rows.append((cache.coded != coded, t1 - t0, t2 - t1,
                     (mx.get_peak_memory() - base) / 2**20))
    code_mib = sum(p.nbytes for p in cache.parts) / 2**20
    out = dict(shape=shape, tokens=tokens, code_mib=code_mib)
    for name, coding in (("plain", False), ("coding", True)):
        sel = [r for r in rows[8:] if r[0] == coding]  # after warm-up
        if sel:
            out[name] = dict(steps=len(sel),
                             build_us=float(np.median([r[1] for r in sel]) * 1e6),
                             eval_us=float(np.median([r[2] for r in sel]) * 1e6),
                             extra_mib=float(np.median([r[3] for r in sel])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--steps", type=int, default=96)
    args = parser.parse_args()
    for n in (int(x) for x in args.contexts.split(",")):
        print(json.dumps(probe(args.shape, n, args.steps)))


if __name__ == "__main__":
    main()
