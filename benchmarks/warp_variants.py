"""Launch-shape and register variants of the warp-tiled decode kernel, by timestamps.

    python benchmarks/warp_variants.py --shapes smollm2,1b --contexts 4096,16384,65536 \
        --variants base,no-basis-registers,warps8,splits256,tiles1 --rounds 2 --out DIR

Each variant sets module constants of ``veloxcore.kernels`` before a cache is built and
measures the kernel's span and its median block's tiles with warp_phases.py's
timestamped build (CUDA only; medians of ``--reps`` launches, every round kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from decode import device_name
from warp_phases import measure

from veloxcore import kernels
from veloxcore.kernels import kernel_backend

mx = __import__("mlx.core").core

VARIANTS = {
    "base": {},
    "no-basis-registers": {"WARP_BASIS_REGISTERS": 0},
    "basis-registers-always": {"WARP_BASIS_REGISTER_BLOCKS": 1 << 30},
    "warps8": {"WARPS": 8},
    # (WARP_MAX_SPLITS is also the merge's capacity, a template constant.)
    "splits256": {"WARP_MAX_SPLITS": 256, "WARP_WAVE_BLOCKS": 1 << 30},
    # The split choice before kernels.warp_splits aimed at one wave (1,024 blocks).
    "blocks1024": {"WARP_TARGET_BLOCKS": 1024, "WARP_WAVE_BLOCKS": 0},
    "tiles1": {"WARP_MIN_TILES": 1},
    # More blocks where the KV heads are many (one wave at three blocks per SM is 396).
    "blocks384": {"WARP_TARGET_BLOCKS": 384},
    # 256 blocks at head_dim 64 too (the choice before WARP_WAVE_DIM).
    "blocks256": {"WARP_WAVE_DIM": 0},
    "blocks512": {"WARP_TARGET_BLOCKS": 512},
    # Four blocks per SM: registers capped at 128 (spills where the kernel needs more).
    "mb4-blocks512": {"WARP_TARGET_BLOCKS": 512, "WARP_MIN_BLOCKS": 4},
    # Registers for two or three blocks an SM (__launch_bounds__): nvcc's default caps
    # this kernel at 168, where it would take 224 (ptxas_warp.py).
    "mb2": {"WARP_MIN_BLOCKS": 2},
    "mb3": {"WARP_MIN_BLOCKS": 3},
    # At head_dim 128 the 8B shape's 264 blocks run two an SM, so 255 registers cost no
    # occupancy: the 8-dim slices' loop unrolled further (more independent mma chains).
    "unroll8-mb2": {"WARP_UNROLL": 8, "WARP_MIN_BLOCKS": 2},
    "unroll16-mb2": {"WARP_UNROLL": 16, "WARP_MIN_BLOCKS": 2},
    # Float4 loads in flight in the last block's merge of the splits (default 16).
    "merge-loads8": {"WARP_MERGE_LOADS": 8},
    "merge-loads16": {"WARP_MERGE_LOADS": 16},
    "merge-loads32": {"WARP_MERGE_LOADS": 32},
    # Scores as FMAs in registers (the choice before scores on tensor cores).
    "fma-scores": {"WARP_QMMA": False},
    # The values' loop 4-fold unrolled (the choice before; head_dim 128's accumulators
    # then live in local memory).
    "values-unroll4": {"WARP_VALUE_UNROLL": 4},
    # Key column pairs decoded from a table (4,096 entries by default since 2026-11-29;
    # 2,048 before: KPALL for 16 of the bundled default model's 30 layers, not 24).
    "key-pairs2048": {"WARP_KEY_PAIRS": 2048},
    "no-key-pairs": {"WARP_KEY_PAIRS": 0},
    # The per-pair test and column-by-column path kept where every pair fits the table.
    "no-kpall": {"WARP_KEY_PAIRS_ALL": False},
    "key-pairs512": {"WARP_KEY_PAIRS": 512},
    # The pair table only up to head_dim 64 (the default before 2026-11-29: the 8B shape's
    # keys column by column).
    "key-pairs64": {"WARP_KEY_PAIRS_DIM": 64},
    # A lane's key pairs packed in registers once per split (off by default).
    "key-pair-registers": {"WARP_KEY_PAIR_REGISTERS": True},
    "key-pair-registers64": {"WARP_KEY_PAIR_REGISTERS": True, "WARP_KEY_PAIRS_DIM": 64},
    # ... without launch bounds (three blocks an SM by default: 168 registers, spilling;
    # 199 without at head_dim 64).
    "key-pair-registers-mb0": {"WARP_KEY_PAIR_REGISTERS": True, "WARP_MIN_BLOCKS": 0},
    # A tile's values dequantised before its softmax (off by default).
    "values-early": {"WARP_VALUES_EARLY": True},
    # The next tile's keys decoded after a tile's scores (off by default), and both.
    "keys-early": {"WARP_KEYS_EARLY": True},
    "both-early": {"WARP_VALUES_EARLY": True, "WARP_KEYS_EARLY": True},
    # The tile softmax with per-lane sums and lazily moved maxima (the default since
    # 2026-11-29; exact-max is the choice before).
    "lazy-max": {"WARP_LAZY_MAX": True},
    "exact-max": {"WARP_LAZY_MAX": False},
    # Staged value words and the turned query's rows unpadded (their loads' bank
    # conflicts back), each alone and both; and the build without launch bounds (the
    # default before 2026-11-29: head_dim 64 then takes 172 registers padded).
    "no-value-pad": {"WARP_VALUE_PAD": False},
    "no-query-pad": {"WARP_QUERY_PAD": False},
    "no-pads": {"WARP_VALUE_PAD": False, "WARP_QUERY_PAD": False},
    "no-launch-bounds": {"WARP_MIN_BLOCKS": 0, "WARP_TILE_PAIR_MIN_BLOCKS": 0},
    # (mb2, mb3, unroll8-mb2 and key-pair-registers-mb0 set the one-tile builds' bounds
    # only: since 2026-11-30 head_dim 128 builds tile pairs, WARP_TILE_PAIR_MIN_BLOCKS.)
    # Tile pairs: a warp takes two tiles an iteration, one basis fragment load for both
    # tiles' mma (at head_dim 128 by default since 2026-11-30, with registers for two
    # blocks an SM there): off, at every head_dim too, and at three blocks an SM.
    # (Before 2026-11-30 "tile-pairs" ran with three blocks an SM, "tile-pairs-mb2" and
    # "tile-pairs128-mb2" with two everywhere; results-warp-variants-tile-pairs-h200.json.)
    "no-tile-pairs": {"WARP_TILE_PAIRS": 0},
    "tile-pairs": {"WARP_TILE_PAIRS": 64},
    "tile-pairs-mb3": {"WARP_TILE_PAIR_MIN_BLOCKS": 3},
    "tile-pairs-unroll8": {"WARP_UNROLL": 8},
    "lazy-both-early": {"WARP_LAZY_MAX": True, "WARP_VALUES_EARLY": True,
                        "WARP_KEYS_EARLY": True},
    # Combinations of the first session these ran on the GPU (2026-11-29): the key pair
    # table with each of the tile-loop changes that helped alone.
    "key-pairs-keys-early": {"WARP_KEY_PAIRS": 2048, "WARP_KEYS_EARLY": True},
    "key-pairs-values-early": {"WARP_KEY_PAIRS": 2048, "WARP_VALUES_EARLY": True},
    "key-pairs-lazy-max": {"WARP_KEY_PAIRS": 2048, "WARP_LAZY_MAX": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,1b")
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--variants", default="base,no-basis-registers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if kernel_backend() != "cuda":
        raise SystemExit("warp_variants.py needs MLX's CUDA backend (the kernel is CUDA-only)")
    defaults = {name: getattr(kernels, name) for v in VARIANTS.values() for name in v}
    rows = []
    for shape in args.shapes.split(","):
        for tokens in (int(n) for n in args.contexts.split(",")):
            for _ in range(args.rounds):
                for variant in args.variants.split(","):
                    for name, value in {**defaults, **VARIANTS[variant]}.items():
                        setattr(kernels, name, value)
                    kernels._kernel.cache_clear()  # WARP_MIN_BLOCKS is in the kernel's text
                    try:
                        r = measure(shape, tokens, 10, args.reps)
                        row = dict(shape=shape, tokens=tokens, variant=variant,
                                   blocks=r["blocks"], span_us=r["span_us"],
                                   block_tiles_us=r["block_tiles_us"])
                    except IndexError:  # the variant does not run the warp-tiled kernel
                        row = dict(shape=shape, tokens=tokens, variant=variant,
                                   error="not the warp-tiled kernel (shared memory)")
                    finally:
                        for name, value in defaults.items():
                            setattr(kernels, name, value)
                        kernels._kernel.cache_clear()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    mx.clear_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warp_variants.json").write_text(json.dumps(
        dict(device=device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             rows=rows), indent=1))
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    """A Markdown table: per shape and context, each variant's spans (µs, every round)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cases = list(dict.fromkeys((r["shape"], r["tokens"]) for r in rows))
    lines = ["| shape | tokens | " + " | ".join(variants) + " |",
             "| --- | ---: |" + " ---: |" * len(variants)]
    for shape, tokens in cases:
        cells = []
        for v in variants:
            spans = [f"{r['span_us']:.1f}" for r in rows if (r["shape"], r["tokens"],
                                                             r["variant"]) == (shape, tokens, v)
                     and "span_us" in r]
            cells.append(" / ".join(spans) or "n/a")
        lines.append(f"| {shape} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
