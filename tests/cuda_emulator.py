"""Run the fused kernels' CUDA source on the CPU, for CI machines without a GPU.

The kernel body from ``veloxcore.kernel_source`` (the same text the CUDA and
Metal kernels are built from) is compiled by the host C++ compiler with a small
emulation of CUDA's execution model: one std::thread per CUDA thread of a block,
``__syncthreads`` as a std::barrier over the block, warp shuffles through a
per-warp exchange buffer with a barrier over the warp's 32 lanes, ``__shared__``
as storage shared by the block's threads. Blocks run one after another.

``emulated_kernel(which)`` returns a callable with ``mx.fast.cuda_kernel``'s call
signature, so ``SpectralKernels`` runs unchanged on it. It checks the kernel's
logic (indexing, tiling, bit extraction, online softmax, split merge), not GPU
timing or memory-model subtleties beyond what barriers express.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from veloxcore import kernel_source as src

PRELUDE = r"""
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <cstdint>
#include <algorithm>
using std::min; using std::max; using std::sqrt;
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return __half(f); }
struct Dim3 { int x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
static std::barrier<>* block_barrier;
static std::vector<std::barrier<>*> warp_barriers;
static float exchange[1024];
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  const int t = threadIdx.x, w = t / 32;
  exchange[t] = v;
  warp_barriers[w]->arrive_and_wait();
  const float r = exchange[t ^ m];
  warp_barriers[w]->arrive_and_wait();
  return r;
}
#define __device__
"""

CTYPES = {mx.float32: "float", mx.float16: "__half", mx.uint32: "uint32_t", mx.int32: "int32_t"}
NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32,
         mx.int32: np.int32}
BODIES = {"decode": (src.DECODE_BODY, src.DECODE_INPUTS, src.DECODE_OUTPUTS),
          "combine": (src.COMBINE_BODY, src.COMBINE_INPUTS, src.COMBINE_OUTPUTS),
          "encode": (src.ENCODE_BODY, src.ENCODE_INPUTS, src.ENCODE_OUTPUTS)}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


_BUILT: dict[str, ctypes.CDLL] = {}


def _build(code: str) -> ctypes.CDLL:
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    if key not in _BUILT:
        folder = Path(tempfile.gettempdir()) / "velox-kernel-emulator"
        folder.mkdir(exist_ok=True)
        lib = folder / f"k{key}.so"
        if not lib.exists():
            source = folder / f"k{key}.cpp"
            source.write_text(code)
            tmp = folder / f"k{key}.{np.random.randint(1 << 30)}.so"
            subprocess.run([compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                            str(source), "-o", str(tmp)], check=True, capture_output=True)
            tmp.replace(lib)
        _BUILT[key] = ctypes.CDLL(str(lib))
    return _BUILT[key]


def _source(which, dtypes, out_dtypes, template) -> str:
    body, inputs, outputs = BODIES[which]
    header = src.CUDA_HEADER.replace("#define VX_SHARED __shared__", "#define VX_SHARED static")
    args = [f"const {CTYPES[d]}* {n}" for n, d in zip(inputs, dtypes, strict=True)]
    args += [f"{CTYPES[d]}* {n}" for n, d in zip(outputs, out_dtypes, strict=True)]
    consts = "".join(_constant(k, v) for k, v in template)
    casts = [f"({a.rsplit(' ', 1)[0]})p[{i}]" for i, a in enumerate(args)]
    return (PRELUDE + header + "static void kernel(" + ", ".join(args) + ") {\n" + consts
            + src.CUDA_PREAMBLE + body + "\n}\n"
            + 'extern "C" void launch(void** p, int gx, int gy, int nt) {\n'
            + "  std::barrier<> block(nt); block_barrier = &block;\n"
            + "  std::vector<std::barrier<>*> warps;\n"
            + "  for (int w = 0; w < (nt + 31) / 32; w++)"
            + " warps.push_back(new std::barrier<>(std::min(32, nt - 32 * w)));\n"
            + "  warp_barriers = warps;\n"
            + "  std::vector<std::thread> threads;\n"
            + "  for (int t = 0; t < nt; t++) threads.emplace_back([=, &block] {\n"
            + "    threadIdx.x = t;\n"
            + "    for (int by = 0; by < gy; by++) for (int bx = 0; bx < gx; bx++) {\n"
            + "      blockIdx.x = bx; blockIdx.y = by;\n"
            + "      kernel(" + ", ".join(casts) + ");\n"
            + "      block.arrive_and_wait();\n"
            + "    }\n  });\n"
            + "  for (auto& th : threads) th.join();\n"
            + "  for (auto* w : warps) delete w;\n}\n")


def _constant(name, value) -> str:
    if isinstance(value, mx.Dtype):
        return f"  using {name} = {CTYPES[value]};\n"
    if isinstance(value, bool):
        return f"  constexpr bool {name} = {str(value).lower()};\n"
    return f"  constexpr int {name} = {value};\n"


def emulated_kernel(which: str):
    """A stand-in for ``mx.fast.cuda_kernel(...)`` of the decode or encode kernel."""

    def call(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        arrays = [np.ascontiguousarray(np.array(x)) for x in inputs]
        dtypes = [x.dtype for x in inputs]
        lib = _build(_source(which, dtypes, output_dtypes, template))
        outs = [np.zeros(s, dtype=NUMPY[d]) for s, d in zip(output_shapes, output_dtypes,
                                                             strict=True)]
        pointers = (ctypes.c_void_p * (len(arrays) + len(outs)))(
            *[a.ctypes.data for a in arrays + outs])
        nt = threadgroup[0]
        lib.launch(pointers, grid[0] // nt, grid[1], nt)
        return [mx.array(o) for o in outs]

    return call
