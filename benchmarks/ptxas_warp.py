"""Registers and spills of the warp-tiled decode kernel per variant, compiled here with
nvcc for sm_90 (no GPU needed).

    python benchmarks/ptxas_warp.py --shapes smollm2,1b,8b --variants base,lazy-max,...

For each model shape (decode.py's spectral-vh cache: random bases with the default
model's spectra, +vh 4-bit values) and each warp_variants.py variant, runs the cache's
attention far enough to capture the warp-tiled launch (template arguments and input
types, through a stand-in for the kernel), writes the CUDA text MLX would compile —
kernel_source's header and body under MLX's signature for ``mx.fast.cuda_kernel`` — and
reports what ``ptxas -v`` says: registers a thread, stack frame, spill stores and loads,
static shared memory. nvcc here is not MLX's NVRTC, so the numbers are for comparing
variants (the H200's ncu reported 168 registers where this reports the same build's);
the kernel's speed is measured on the GPU (warp_variants.py). Needs nvcc on the path.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from decode import SHAPES, fill, spectral_cache
from warp_variants import VARIANTS

from veloxcore import kernels

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models import llama  # noqa: E402


class _Captured(Exception):
    pass


def capture(shape: str, tokens: int) -> dict:
    """The warp-tiled launch a decode step of ``shape`` over ``tokens`` makes: its
    template arguments and its inputs' and outputs' dtypes."""
    args = SHAPES[shape]
    H, D, Hq = args["num_key_value_heads"], args["head_dim"], args["num_attention_heads"]
    rope = llama.initialize_rope(D, 500000.0, False, None, 131072)
    cache = spectral_cache(np.random.default_rng(0), H, D, rope, "off", rotate_values=True)
    fill(cache, H, D, tokens)
    seen = {}

    def stand_in(backend, which, shared_memory=0, min_blocks=None):
        def call(**kwargs):
            if which == "decode_warp":
                seen.update(kwargs, shared_memory=shared_memory)
                raise _Captured
            raise RuntimeError(f"{which}: only the warp-tiled launch is captured")
        return call

    original = kernels._kernel
    kernels._kernel = stand_in
    try:
        cache.use_kernels("cuda")  # (only the launch's arguments are built: nothing runs)
        q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
        try:
            cache.attend(q, D**-0.5)
        except _Captured:
            pass
    finally:
        kernels._kernel = original
    if not seen:
        raise SystemExit(f"{shape}: the step did not take the warp-tiled kernel")
    return seen


def ptxas(text: str, nvcc: str, nvdisasm: str | None = None) -> dict:
    """ptxas's report on ``text`` for sm_90: registers, stack, spills, shared bytes; with
    ``nvdisasm``, also the SASS's static instruction counts by opcode (``sass``)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.cu"
        source.write_text(text)
        cubin = Path(folder) / "kernel.cubin"
        run = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-O3", "-std=c++17",
                              "-Xptxas", "-v", "-o", str(cubin), str(source)],
                             capture_output=True, text=True)
        sass = sass_counts(cubin, nvdisasm) if nvdisasm and not run.returncode else {}
    if run.returncode:
        raise SystemExit(f"nvcc failed:\n{run.stderr[-3000:]}")
    report = run.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"),
                stack=number(r"(\d+) bytes stack frame"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                shared=number(r"(\d+) bytes smem"), sass=sass)


def sass_counts(cubin: Path, nvdisasm: str) -> dict:
    """Static SASS instruction counts of a cubin by opcode (its first word, without
    predicates and modifiers: LDS.64 counts as LDS), and their total."""
    run = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True,
                         check=True)
    counts: dict = {}
    for line in run.stdout.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,1b,8b")
    parser.add_argument("--variants", default="base,values-early,keys-early,lazy-max")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--nvdisasm", default=shutil.which("nvdisasm"),
                        help="nvdisasm (e.g. from pip's nvidia-cuda-nvdisasm): also static "
                             "SASS counts (all, LDS, HMMA, LDG)")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("ptxas_warp.py needs nvcc (the CUDA toolkit) on the path")
    defaults = {name: getattr(kernels, name) for v in VARIANTS.values() for name in v}
    opcodes = ["total", "LDS", "HMMA", "LDG"] if args.nvdisasm else []
    print("| shape | variant | registers | stack B | spill stores B | spill loads B "
          "| static shared B |" + "".join(f" SASS {op} |" for op in opcodes))
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(opcodes))
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            for name, value in {**defaults, **VARIANTS[variant]}.items():
                setattr(kernels, name, value)
            try:
                launch = capture(shape, args.tokens)
                r = ptxas(kernels.cuda_kernel_text("decode_warp", launch["inputs"],
                                                   launch["output_dtypes"],
                                                   launch["template"]), nvcc, args.nvdisasm)
            finally:
                for name, value in defaults.items():
                    setattr(kernels, name, value)
            print(f"| {shape} | {variant} | {r['registers']} | {r['stack']} | "
                  f"{r['spill_stores']} | {r['spill_loads']} | {r['shared']} |"
                  + "".join(f" {r['sass'].get(op, 0)} |" for op in opcodes), flush=True)


if __name__ == "__main__":
    main()
