"""Host cost of an ``mx.fast.cuda_kernel`` call (CUDA only): what a custom kernel's
inputs, outputs, template arguments and text size cost on every call, and whether its text
can be #included from a file.

    python benchmarks/kernel_call_cost.py

1. Building only (no evaluation), µs per call, medians of 5 rounds of 3,000 calls, for a
   trivial kernel with 1-20 inputs, 0-20 template arguments, 1 or 4 outputs, and a header
   of 20 kB or none; mlx's ``add`` and SDPA for scale.
2. The same 20 kB header and a trivial body passed inline or as ``#include`` lines of
   files (absolute paths, read by NVRTC): that the included kernel computes the same, its
   building cost, and the evaluation of a chain of 30 launches (MLX hashes a kernel's whole
   text at every launch).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

mx = __import__("mlx.core").core

PAD = "".join(f"__device__ int pad_fn_{i}(int a) {{ return a + {i}; }}\n" for i in range(400))


def build_us(fn, calls: int = 3000) -> float:
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(rounds)


def argument_costs() -> None:
    x = mx.zeros((1, 9, 1, 64), mx.float16)
    small = mx.zeros((16,), mx.int32)
    mx.eval(x, small)
    print("| inputs | template arguments | outputs | 20 kB header | build µs |")
    print("| ---: | ---: | ---: | --- | ---: |")
    for n_in in (1, 5, 10, 20):
        for n_t in (0, 10, 20):
            for n_out in (1, 4):
                for big in (False, True):
                    kernel = mx.fast.cuda_kernel(
                        name=f"cost_{n_in}_{n_t}_{n_out}_{big:d}",
                        input_names=[f"in{i}" for i in range(n_in)],
                        output_names=[f"out{i}" for i in range(n_out)],
                        source="unsigned int i = threadIdx.x; out0[i] = in0[i];",
                        header=PAD if big else "")
                    inputs = [x] + [small] * (n_in - 1)
                    template = [(f"T{i}", i) for i in range(n_t)]
                    cost = build_us(lambda k=kernel, i=inputs, t=template, n=n_out: k(
                        inputs=i, template=t, grid=(576, 1, 1), threadgroup=(576, 1, 1),
                        output_shapes=[x.shape] * n, output_dtypes=[x.dtype] * n))
                    print(f"| {n_in} | {n_t} | {n_out} | {'yes' if big else 'no'} | "
                          f"{cost:.2f} |", flush=True)
    print(f"mx.add: {build_us(lambda: mx.add(x, x)):.2f} µs; SDPA: "
          f"{build_us(lambda: mx.fast.scaled_dot_product_attention(x, x, x, scale=1.0)):.2f}"
          " µs")


def included_against_inline() -> None:
    folder = Path(tempfile.mkdtemp(prefix="velox-include-"))
    header = PAD + "__device__ float twice(float a) { return 2.0f * a; }\n"
    body = "unsigned int i = threadIdx.x; y[i] = twice(x[i]) + K;\n"
    (folder / "header.cuh").write_text(header)
    (folder / "body.cuh").write_text(body)
    kernels = {
        "included": mx.fast.cuda_kernel(
            name="cost_included", input_names=["x"], output_names=["y"],
            source=f'#include "{folder / "body.cuh"}"\n',
            header=f'#include "{folder / "header.cuh"}"\n'),
        "inline": mx.fast.cuda_kernel(name="cost_inline", input_names=["x"],
                                      output_names=["y"], source=body, header=header)}
    x = mx.arange(256).astype(mx.float32)
    mx.eval(x)
    for name, kernel in kernels.items():
        def call(v, k=kernel):
            return k(inputs=[v], template=[("K", 1)], grid=(256, 1, 1),
                     threadgroup=(256, 1, 1), output_shapes=[x.shape],
                     output_dtypes=[x.dtype])[0]

        same = mx.array_equal(call(x), 2 * x + 1).item()
        chains = []
        for _ in range(60):
            y = x
            for _ in range(30):
                y = call(y)
            t0 = time.perf_counter_ns()
            mx.eval(y)
            chains.append((time.perf_counter_ns() - t0) / 1e3)
        print(f"{name}: correct {same}; build {build_us(lambda c=call: c(x)):.2f} µs per call; "
              f"evaluating 30 chained launches {statistics.median(chains[10:]):.1f} µs")


def main() -> None:
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        raise SystemExit("needs MLX's CUDA backend")
    argument_costs()
    included_against_inline()


if __name__ == "__main__":
    main()
