"""GPU work per decode step: the kernels MLX's CUDA backend launches (CUDA only).

    python benchmarks/graph_nodes.py --shape smollm2 --methods fp16,spectral-vh

MLX's CUDA backend records a step's kernels into CUDA graphs (at most 100 nodes each on
an H100/H200) and launches those; each node costs host time to record and update. With
``MLX_SAVE_CUDA_GRAPHS_DOT_FILE`` set it writes every graph it launches as a dot file:
this script decodes the whole model (random weights, decode.py's shapes and methods)
over 1,024 cached tokens, then counts, per decode step, the graphs, their nodes, and the
kernels by name — for a normal step and the extra ones of a step that codes a batch of
waiting tokens. Each method runs in its own process (the variable is read once).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

NODE = re.compile(r'shape="\w+" label="\d+\n([^\n"]*)')


def step_nodes(files: list[str]) -> collections.Counter:
    """Graph nodes by name (kernels by their function, child graphs as "graph")."""
    names = collections.Counter()
    for f in files:
        for label in NODE.findall(Path(f).read_text()):
            name = re.sub(r"^_ZN3mlx4core2cu\d+", "", label)
            names["graph" if name.startswith("graph_") else name[:48]] += 1
    return names


def count(method: str, shape: str, steps: int) -> dict:
    import numpy as np
    from decode import SHAPES, fill, make_cache, random_model

    from veloxcore.kernels import kernel_backend

    mx = __import__("mlx.core").core

    folder = Path(os.environ["MLX_SAVE_CUDA_GRAPHS_DOT_FILE"]).parent
    model = random_model(shape)
    H, D = SHAPES[shape]["num_key_value_heads"], SHAPES[shape]["head_dim"]
    rng = np.random.default_rng(0)
    caches = [make_cache(method, H, D, layer.self_attn.rope, kernel_backend(), rng)
              for layer in model.layers]
    for c in caches:
        fill(c, H, D, 1024)
    token = mx.array([[1]])
    per_step = []
    for step in range(40 + steps):  # the first 40 warm up (kernels compile)
        before = set(glob.glob(str(folder / "*")))
        token = mx.argmax(model(token, cache=caches)[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
        if step >= 40:
            new = sorted(set(glob.glob(str(folder / "*"))) - before)
            per_step.append((len(new), step_nodes(new)))
    totals = [sum(n.values()) for _, n in per_step]
    normal = per_step[int(np.argmin(totals))][1]
    busiest = per_step[int(np.argmax(totals))][1]
    return dict(method=method, shape=shape, graphs_per_step=[g for g, _ in per_step],
                nodes_per_step=totals, normal_step=dict(normal.most_common()),
                coding_step_extra=dict((busiest - normal).most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--methods", default="fp16,spectral-vh")
    parser.add_argument("--steps", type=int, default=33)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one method
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(count(args.one, args.shape, args.steps)))
        return
    rows = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as folder:
            env = dict(os.environ, MLX_SAVE_CUDA_GRAPHS_DOT_FILE=f"{folder}/graph")
            out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--one",
                                  method, "--steps", str(args.steps)], env=env, check=True,
                                 capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{method}: nodes per step {sorted(set(row['nodes_per_step']))}, graphs "
              f"{sorted(set(row['graphs_per_step']))}\n  normal step: {row['normal_step']}\n"
              f"  a coding step adds: {row['coding_step_extra']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_nodes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
