"""Decode attention kernels alone, fp16 SDPA against the fused spectral kernel (GPU).

    python benchmarks/ncu_attention.py --shapes smollm2,1b,8b --contexts 4096,16384,65536 \
        [--json OUT] [--env VAR=VALUE ...]

Runs ``benchmarks/profile_decode.py`` under Nsight Compute (``gpu__time_duration`` of every
attention kernel: cuDNN's and MLX's fp16 SDPA kernels, ``velox_decode_warp``) and reports,
per shape and context, each side's GPU time per call — the sum of its kernels' median
durations — with no host work, launch or synchronisation in it. That is the comparison
issue #6's attention targets are about once host costs are set aside
(``benchmarks/decode.py --parts attention`` measures per call with them).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

FP16_KERNELS = ("sdpa", "cudnn", "flash", "fmha", "attention")
SPECTRAL_KERNELS = ("velox_decode_warp", "velox_decode", "velox_combine")
REPS = 5


def ncu_binary() -> str:
    found = shutil.which("ncu")
    if found:
        return found
    for root in sorted(Path("/usr/local").glob("cuda*/bin/ncu")):
        return str(root)
    raise SystemExit("ncu (Nsight Compute) is not on this machine")


def kernel_times(shape: str, tokens: int, env: dict) -> dict[str, list[float]]:
    """Durations in µs of every attention kernel launched by one profile_decode run."""
    here = Path(__file__).resolve().parent
    regex = "|".join(FP16_KERNELS + SPECTRAL_KERNELS)
    cmd = [ncu_binary(), "--clock-control", "none", "--kernel-name", f"regex:{regex}",
           "--metrics", "gpu__time_duration.sum", "--csv", "--page", "raw",
           "--print-units", "base", sys.executable, str(here / "profile_decode.py"),
           "--shape", shape, "--tokens", str(tokens), "--reps", str(REPS)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    text = run.stdout
    start = text.find('"ID"')
    if run.returncode or start < 0:
        raise SystemExit(f"ncu failed for {shape} {tokens}:\n{run.stdout[-3000:]}"
                         f"\n{run.stderr[-3000:]}")
    if env.get("NCU_RAW_DIR"):
        (Path(env["NCU_RAW_DIR"]) / f"ncu-{shape}-{tokens}.csv").write_text(text)
    times = defaultdict(list)
    for row in csv.DictReader(io.StringIO(text[start:])):
        value = row.get("gpu__time_duration.sum", "").replace(",", "")
        try:
            value = float(value)
        except ValueError:
            continue  # the units row
        times[row["Kernel Name"].split("(")[0].strip()].append(value / 1e3)
    return times


def per_call(times: dict[str, list[float]], names: tuple[str, ...]) -> tuple[float, dict]:
    """GPU µs per call of the kernels whose names contain one of ``names``: each kernel's
    median duration times its launches per call (the most-launched kernel sets the calls)."""
    chosen = {k: v for k, v in times.items() if any(n in k for n in names)}
    if not chosen:
        return float("nan"), {}
    calls = max(len(v) for v in chosen.values())
    parts = {k: statistics.median(v) * len(v) / calls for k, v in chosen.items()}
    return sum(parts.values()), parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="smollm2,1b,8b")
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--env", nargs="*", default=[], help="VAR=VALUE for the runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    rows = []
    print("| shape | tokens | fp16 SDPA µs | spectral µs | spectral vs fp16 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape in args.shapes.split(","):
        for tokens in (int(t) for t in args.contexts.split(",")):
            times = kernel_times(shape, tokens, env)
            # MLX names a custom kernel mlx::custom_kernel_<name><template arguments>.
            velox = {k: v for k, v in times.items() if "custom_kernel_velox" in k}
            other = {k: v for k, v in times.items() if k not in velox}
            fp16, fp16_parts = per_call(other, FP16_KERNELS)
            spectral, spectral_parts = per_call(velox, SPECTRAL_KERNELS)
            rows.append(dict(shape=shape, tokens=tokens, fp16_us=fp16, spectral_us=spectral,
                             fp16_kernels=fp16_parts, spectral_kernels=spectral_parts,
                             launches={k: len(v) for k, v in times.items()}, env=env))
            print(f"| {shape} | {tokens:,} | {fp16:.1f} | {spectral:.1f} | "
                  f"{fp16 / spectral:.2f}× |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
