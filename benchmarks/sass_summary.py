"""Summarise an Nsight Compute SASS source-counter export of one kernel launch.

    python benchmarks/sass_summary.py sass-8b-65536.csv [--top 12] [--tiles N]

The CSV is what ``benchmarks/ncu_warp.sh`` writes (``ncu --section SourceCounters
--section WarpStateStats --page source --print-source sass --csv``). Prints the warp
instructions executed by opcode (with their share of the warp-stall samples), the stall
reasons over all samples, and the instructions with the most samples — how this
session found the warp-tiled kernel's set-up waiting on a host-memory input (BENCHMARKS.md,
"Kernel inputs in host memory"). ``--tiles N`` also prints instructions per tile (N: the
launch's 16-token tiles, tokens / 16 × KV heads).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import re
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def rows_of(path: Path) -> list[dict]:
    text = path.read_text()
    start = text.find('"Address"')
    if start < 0:
        raise SystemExit(f"{path}: no SASS table (expected ncu's --page source --csv output)")
    return list(csv.DictReader(io.StringIO(text[start:])))


def opcode(source: str) -> str:
    """The instruction's opcode without predicate or modifiers ("@!P0 LDS.64 ..." -> LDS)."""
    words = re.sub(r"^@!?U?P\w+\s+", "", source.strip()).split()
    return words[0].split(".")[0] if words else "?"


def count(value: str) -> int:
    return int(value.replace(",", "") or 0) if value else 0


def summary(rows: list[dict], top: int, tiles: int | None) -> str:
    executed = sum(count(r[EXECUTED]) for r in rows)
    samples = max(1, sum(count(r[SAMPLES]) for r in rows))
    by_op, stalls_by_op = collections.Counter(), collections.Counter()
    for r in rows:
        op = opcode(r["Source"])
        by_op[op] += count(r[EXECUTED])
        stalls_by_op[op] += count(r[SAMPLES])
    lines = [f"{executed:,} warp instructions, {samples:,} stall samples, "
             f"{len(rows):,} SASS lines"
             + (f", {executed / tiles:,.0f} instructions per tile" if tiles else "")]
    lines.append("\nby opcode: share of instructions, share of stall samples")
    for op, n in by_op.most_common(top):
        share = 100 * stalls_by_op[op] / samples
        lines.append(f"  {op:10s} {100 * n / executed:5.1f}%  {share:5.1f}%")
    reasons = collections.Counter()
    columns = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    for r in rows:
        for c in columns:
            reasons[c] += count(r[c])
    total = max(1, sum(reasons.values()))
    lines.append("\nstall reasons")
    for c, n in reasons.most_common(top):
        lines.append(f"  {c:28s} {100 * n / total:5.1f}%")
    lines.append("\nmost-sampled instructions: samples, executions, SASS")
    for r in sorted(rows, key=lambda r: -count(r[SAMPLES]))[:top]:
        sass = r["Source"].strip()[:70]
        lines.append(f"  {count(r[SAMPLES]):6d} {count(r[EXECUTED]):10d}  {sass}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--tiles", type=int, default=None)
    a = ap.parse_args()
    print(summary(rows_of(a.csv), a.top, a.tiles))


if __name__ == "__main__":
    main()
