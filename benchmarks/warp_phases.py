"""Where the warp-tiled decode kernel's time goes: per-phase timestamps (CUDA only).

    python benchmarks/warp_phases.py --shapes smollm2,8b --contexts 4096,16384 --out DIR

Runs the kernel's timestamping build (``kernels.WARP_STAMPS``; kernel_source.CUDA_STAMPS)
on a spectral cache of the given model shape (random bases with the default model's
spectra, affine 4-bit Hadamard-rotated values, as decode.py's ``spectral-vh``), filled
with N random tokens plus ``--tail`` decoded tokens waiting in the exact buffer. Each
block's thread 0 stamps %globaltimer (ns) after a barrier at each phase:

  0 entry · 1 set-up done (codebook, query, key columns) · 2 the block's tiles done ·
  3 its partial written (block 0 of each KV head: the exact tokens' partial) · (the last
  block of each KV head only:) 4 it knows it is last · 5 (empty: the exact tokens'
  scores were here before block 0 took them) · 6 per-head max and weights · 7 the splits'
  outputs merged · 8 values rotated back, result written.

Reports, over ``--reps`` launches (medians): the kernel's span (first entry to last
end), when blocks start and finish their tiles relative to the first entry, and the
last blocks' merge phases. Writes DIR/warp_phases.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from decode import SHAPES, device_name, fill, spectral_cache

from veloxcore import kernels
from veloxcore.kernels import kernel_backend

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models import llama  # noqa: E402

PHASES = ["set-up", "tiles", "partial", "last?", "fence", "head sums", "coded merge",
          "result"]


def launch_phases(stamps: np.ndarray, heads: int) -> dict:
    """Phase times (µs) of one launch from its (blocks, 32) stamps, ``heads`` (batch x
    KV) rows of blocks, each led by its exact tokens' block."""
    t = stamps[:, :16].astype(np.int64)
    t0 = t[:, 0].min()
    rel = ((t - t0) % (1 << 32)) / 1e3  # globaltimer low words, relative, µs
    last = stamps[:, 8] != 0
    exact = np.arange(len(stamps)) % (len(stamps) // heads) == 0
    coded_rel = rel[~exact]
    row = dict(blocks=int(len(stamps)), span_us=float(rel[last, 8].max()),
               start_last_us=float(rel[:, 0].max()),
               tiles_done_median_us=float(np.median(coded_rel[:, 2])),
               tiles_done_last_us=float(coded_rel[:, 2].max()),
               partials_done_us=float(coded_rel[:, 3].max()),
               block_tiles_us=float(np.median(coded_rel[:, 2] - coded_rel[:, 1])),
               block_setup_us=float(np.median(coded_rel[:, 1] - coded_rel[:, 0])),
               sms=int(len(np.unique(stamps[:, 31]))))
    for k in range(4, 9):
        row[f"last_{PHASES[k - 1].replace(' ', '_').replace('?', '')}_us"] = float(
            np.median(rel[last, k] - rel[last, k - 1]))
    row["merge_us"] = float(np.median(rel[last, 8] - rel[last, 3]))
    # The exact tokens' partial (off the critical path if done before the coded partials).
    row["exact_partial_done_us"] = float(rel[exact, 3].max())
    return row


def measure(shape: str, tokens: int, tail: int, reps: int) -> dict:
    args = SHAPES[shape]
    H, D, Hq = args["num_key_value_heads"], args["head_dim"], args["num_attention_heads"]
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = spectral_cache(np.random.default_rng(0), H, D, rope, "cuda", rotate_values=True)
    fill(cache, H, D, tokens)
    for _ in range(tail):  # decoded tokens waiting to be coded (exact, like the sinks)
        k1 = mx.random.normal((1, H, 1, D)).astype(mx.float16)
        cache.update_and_fetch(k1, k1)
    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    kernels.WARP_STAMPS = []
    try:
        for _ in range(reps + 3):
            mx.eval(cache.attend(q, D**-0.5))
        launches = [launch_phases(np.array(s), H) for s in kernels.WARP_STAMPS[3:]]
    finally:
        kernels.WARP_STAMPS = None
    row = {k: statistics.median(r[k] for r in launches) for k in launches[0]}
    return dict(shape=shape, tokens=tokens, exact=4 + tail, **row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2")
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--tail", type=int, default=10)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if kernel_backend() != "cuda":
        raise SystemExit("warp_phases.py needs MLX's CUDA backend (the kernel is CUDA-only)")
    rows = [measure(s, int(n), args.tail, args.reps) for s in args.shapes.split(",")
            for n in args.contexts.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warp_phases.json").write_text(json.dumps(
        dict(device=device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             rows=rows), indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k])
                                for k in keys) + " |")


if __name__ == "__main__":
    main()
