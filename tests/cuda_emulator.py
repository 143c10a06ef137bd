"""Run the fused kernels' CUDA source on the CPU, for CI machines without a GPU.

The kernel body from ``veloxcore.kernel_source`` (the same text the CUDA and
Metal kernels are built from) is compiled by the host C++ compiler with a small
emulation of CUDA's execution model: one std::thread per CUDA thread of a block,
``__syncthreads`` as a std::barrier over the block, warp shuffles through a
per-warp exchange buffer with a barrier over the warp's 32 lanes, ``__shared__``
as storage shared by the block's threads. Blocks run one after another (in order
of blockIdx.x, or reversed: REVERSE_BLOCKS), the KV
heads' blocks interleaved (a block finds shared memory as another head's block left
it). ``cp.async`` copies land when the thread waits for their commit group (or at the
block's end), 16-byte ones abort when misaligned and are counted (``COPIES_16``);
dynamic shared memory beyond the launch's request aborts. Outputs start as NaN (or
0xA5 bytes), as MLX leaves them uninitialised.

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
from veloxcore.kernels import _compact_source

PRELUDE = r"""
#include <atomic>
#include <cstdlib>
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <cstdint>
#include <algorithm>
using std::min; using std::max; using std::sqrt;
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};
inline float __half2float(__half h) { return (float)h.v; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline __half __float2half(float f) { return __half(f); }
struct Dim3 { int x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
static Dim3 gridDim;
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
static int votes[1024];
inline bool __any_sync(unsigned, bool p) {
  const int t = threadIdx.x, w = t / 32;
  votes[t] = p;
  warp_barriers[w]->arrive_and_wait();
  bool any = false;
  for (int l = 0; l < 32; l++) any = any || votes[32 * w + l];
  warp_barriers[w]->arrive_and_wait();
  return any;
}
#define __device__
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline unsigned int vx_pack_half2(float lo, float hi) {
  const _Float16 a = (_Float16)lo, b = (_Float16)hi;
  unsigned short ua, ub;
  __builtin_memcpy(&ua, &a, 2);
  __builtin_memcpy(&ub, &b, 2);
  return (unsigned int)ua | ((unsigned int)ub << 16);
}
inline unsigned int vx_byte_perm(unsigned int x, unsigned int y, unsigned int sel) {
  const unsigned long long both = ((unsigned long long)y << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; i++) {
    r |= (unsigned int)((both >> (8 * ((sel >> (4 * i)) & 7))) & 255u) << (8 * i);
  }
  return r;
}
// The fp16 in the low half of a word, as a float.
inline float h2f(unsigned int bits) {
  const unsigned short u = (unsigned short)bits;
  _Float16 h;
  __builtin_memcpy(&h, &u, 2);
  return (float)h;
}
// (codes - magic) * scale + bias per fp16 half: exact difference, one fused rounding (in
// fp32 then to fp16 here: a GPU's HFMA2 rounds once, so the two may differ by an fp16 ulp).
inline unsigned int vx_dequant_pair(unsigned int codes, unsigned int magic, unsigned int scale,
                                    unsigned int bias) {
  float v[2];
  for (int i = 0; i < 2; i++) {
    const float c = h2f(codes >> (16 * i)) - h2f(magic >> (16 * i));
    v[i] = std::fma(c, h2f(scale >> (16 * i)), h2f(bias >> (16 * i)));
  }
  return vx_pack_half2(v[0], v[1]);
}
inline float __expf(float x) { return std::exp(x); }
struct uint2 { unsigned int x, y; };
struct int4 { int x, y, z, w; };
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
struct CpCopy { void* d; const void* s; int n; };
thread_local std::vector<CpCopy> cp_open;
thread_local std::vector<std::vector<CpCopy>> cp_groups;
// cp.async: a thread's copies wait in commit groups and land at the wait (or block end).
inline void cp_run(std::vector<CpCopy>& g) {
  for (auto& c : g) __builtin_memcpy(c.d, c.s, c.n);
  g.clear();
}
inline void vx_cp_async4(void* dst, const void* src) { cp_open.push_back({dst, src, 4}); }
static long dynamic_bytes = 0;  // the launch's dynamic shared-memory request
inline void vx_dynamic_check(unsigned long need) {
  if (need > (unsigned long)dynamic_bytes) std::abort();  // past the request: a GPU faults
}
static std::atomic<long> copies16{0};  // 16-byte cp.async copies made (copies_16())
inline void vx_cp_async16(void* dst, const void* src) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u) {
    std::abort();  // cp.async of 16 bytes faults on a misaligned address
  }
  cp_open.push_back({dst, src, 16});
  copies16.fetch_add(1, std::memory_order_relaxed);
}
extern "C" long copies_16() { return copies16.exchange(0); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, int shift) {
  return (unsigned int)((((unsigned long long)hi << 32) | lo) >> (shift & 31));
}
inline void vx_cp_commit() { cp_groups.push_back(std::move(cp_open)); cp_open.clear(); }
inline void vx_cp_wait_prior() {
  // cp.async.wait_group 1: every group but the newest has landed (this thread's copies).
  while (cp_groups.size() > 1) { cp_run(cp_groups.front()); cp_groups.erase(cp_groups.begin()); }
}
inline void vx_cp_wait_all() {
  // cp.async.wait_all: every group has landed (this thread's copies).
  for (auto& g : cp_groups) cp_run(g);
  cp_groups.clear();
  cp_run(cp_open);
}
inline void __syncwarp() { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
// mma.sync.m16n8k16 (.row.col, f16 x f16 -> f32) across a warp, from the fragment
// layout documented in kernel_source.CUDA_MMA.
static unsigned int mma_a[1024][4];
static unsigned int mma_b[1024][2];
inline void vx_mma_16816(float& c0, float& c1, float& c2, float& c3, unsigned int a0,
                         unsigned int a1, unsigned int a2, unsigned int a3, unsigned int b0,
                         unsigned int b1) {
  const int t = threadIdx.x, w = t / 32, lane = t % 32, base = 32 * w;
  mma_a[t][0] = a0; mma_a[t][1] = a1; mma_a[t][2] = a2; mma_a[t][3] = a3;
  mma_b[t][0] = b0; mma_b[t][1] = b1;
  warp_barriers[w]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; l++) {
    const int g = l >> 2, q = l & 3;
    const unsigned int* a = mma_a[base + l];
    const unsigned int* b = mma_b[base + l];
    A[g][2 * q] = h2f(a[0]); A[g][2 * q + 1] = h2f(a[0] >> 16);
    A[g + 8][2 * q] = h2f(a[1]); A[g + 8][2 * q + 1] = h2f(a[1] >> 16);
    A[g][2 * q + 8] = h2f(a[2]); A[g][2 * q + 9] = h2f(a[2] >> 16);
    A[g + 8][2 * q + 8] = h2f(a[3]); A[g + 8][2 * q + 9] = h2f(a[3] >> 16);
    B[2 * q][g] = h2f(b[0]); B[2 * q + 1][g] = h2f(b[0] >> 16);
    B[2 * q + 8][g] = h2f(b[1]); B[2 * q + 9][g] = h2f(b[1] >> 16);
  }
  warp_barriers[w]->arrive_and_wait();
  const int g = lane >> 2, q = lane & 3;
  for (int k = 0; k < 16; k++) {
    c0 += A[g][k] * B[k][2 * q];
    c1 += A[g][k] * B[k][2 * q + 1];
    c2 += A[g + 8][k] * B[k][2 * q];
    c3 += A[g + 8][k] * B[k][2 * q + 1];
  }
}
"""

CTYPES = {mx.float32: "float", mx.float16: "__half", mx.uint32: "uint32_t", mx.int32: "int32_t",
          mx.uint8: "uint8_t", mx.uint16: "uint16_t"}
NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32, mx.uint8: np.uint8,
         mx.int32: np.int32, mx.uint16: np.uint16}
BODIES = {"decode": (src.DECODE_BODY, src.DECODE_INPUTS, src.DECODE_OUTPUTS),
          "decode_warp": (src.DECODE_WARP_BODY, src.DECODE_WARP_INPUTS,
                          src.DECODE_WARP_OUTPUTS),
          "combine": (src.COMBINE_BODY, src.COMBINE_INPUTS, src.COMBINE_OUTPUTS),
          "encode": (src.ENCODE_BODY, src.ENCODE_INPUTS, src.ENCODE_OUTPUTS),
          "entropy_decode": (src.ENTROPY_DECODE_BODY, src.ENTROPY_DECODE_INPUTS,
                             src.ENTROPY_DECODE_OUTPUTS),
          "entropy_encode": (src.ENTROPY_ENCODE_BODY, src.ENTROPY_ENCODE_INPUTS,
                             src.ENTROPY_ENCODE_OUTPUTS)}


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
        _BUILT[key].copies_16.restype = ctypes.c_long
    return _BUILT[key]


def _source(which, dtypes, out_dtypes, template) -> str:
    body, inputs, outputs = BODIES[which]
    header = (src.CUDA_HEADER.replace("#define VX_SHARED __shared__", "#define VX_SHARED static")
              .replace("extern __shared__ __align__(16) T name[]",
                       "alignas(16) static T name[n]; vx_dynamic_check(n > 1 ? sizeof(name) : 0)")
              .replace("__align__(16)", "alignas(16)")
              + src.COMMON_HELPERS + src.CUDA_KEYS + src.CUDA_STAGE)
    args = []
    for n, d in zip(inputs, dtypes, strict=True):
        args.append(f"const {CTYPES[d]}* {n}")
        if f"{n}_shape" in body:  # as MLX does: the shape follows the array
            args.append(f"const int* {n}_shape")
    args += [f"{CTYPES[d]}* {n}" for n, d in zip(outputs, out_dtypes, strict=True)]
    # The text as the CUDA backend gets it (comments and indentation removed).
    header, body = _compact_source(header), _compact_source(body)
    consts = "".join(_constant(k, v) for k, v in template)
    casts = [f"({a.rsplit(' ', 1)[0]})p[{i}]" for i, a in enumerate(args)]
    return (PRELUDE + header + "static void kernel(" + ", ".join(args) + ") {\n" + consts
            + src.CUDA_PREAMBLE + body + "\n}\n"
            + 'extern "C" void launch(void** p, int gx, int gy, int nt, long smem) {\n'
            + "  gridDim.x = gx; gridDim.y = gy; dynamic_bytes = smem;\n"
            + "  std::barrier<> block(nt); block_barrier = &block;\n"
            + "  std::vector<std::barrier<>*> warps;\n"
            + "  for (int w = 0; w < (nt + 31) / 32; w++)"
            + " warps.push_back(new std::barrier<>(std::min(32, nt - 32 * w)));\n"
            + "  warp_barriers = warps;\n"
            + "  std::vector<std::thread> threads;\n"
            + "  for (int t = 0; t < nt; t++) threads.emplace_back([=, &block] {\n"
            + "    threadIdx.x = t;\n"
            + "    for (int i = 0; i < gx; i++) for (int by = 0; by < gy; by++) {\n"
            + f"      const int bx = {'gx - 1 - i' if REVERSE_BLOCKS else 'i'};\n"
            + "      blockIdx.x = bx; blockIdx.y = by;\n"
            + "      kernel(" + ", ".join(casts) + ");\n"
            + "      for (auto& g : cp_groups) cp_run(g); cp_groups.clear(); cp_run(cp_open);\n"
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


# Blocks run in reverse order of blockIdx.x (the last split first): a kernel must not
# depend on which of a head's blocks finishes first or last.
REVERSE_BLOCKS = False
# Inputs 4 bytes past a 16-byte boundary: the warp-tiled kernel must then take its 4-byte
# copies (a 16-byte cp.async aborts the emulator, as it faults on a GPU).
# True: every input; a set of input names: those only.
MISALIGN_INPUTS: bool | set = False
# 16-byte cp.async copies made by the launches since the last read (copies_16()).
COPIES_16 = 0


def _placed(a: np.ndarray, offset: int) -> np.ndarray:
    """A C-contiguous copy of ``a`` starting ``offset`` bytes past a 16-byte boundary."""
    raw = np.zeros(a.nbytes + 32, np.uint8)
    start = (-raw.ctypes.data) % 16 + offset
    placed = raw[start: start + a.nbytes].view(a.dtype).reshape(a.shape)
    placed[...] = a
    return placed


def _poisoned(shape, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return np.full(shape, np.nan, dtype=dtype)
    return np.full(shape, 0xA5A5A5A5 & np.iinfo(dtype).max, dtype=dtype)


def emulated_kernel(which: str, shared_memory: int = 0):
    """A stand-in for ``mx.fast.cuda_kernel(...)`` of the decode or encode kernel, with
    ``shared_memory`` bytes of dynamic shared memory."""

    def call(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
             init_value=None, **_):
        body = BODIES[which][0]
        arrays = []
        for name, x in zip(BODIES[which][1], inputs, strict=True):
            shifted = MISALIGN_INPUTS is True or (
                isinstance(MISALIGN_INPUTS, set) and name in MISALIGN_INPUTS)
            arrays.append(_placed(np.array(x), 4 if shifted else 0))
            if f"{name}_shape" in body:
                arrays.append(np.array(x.shape, dtype=np.int32))
        dtypes = [x.dtype for x in inputs]
        lib = _build(_source(which, dtypes, output_dtypes, template))
        # MLX leaves a kernel's outputs uninitialised unless init_value is given: here
        # they start as NaN (float) or 0xA5 bytes (integers), so a kernel that reads or
        # returns what it never wrote fails here rather than only on a GPU.
        outs = [_poisoned(s, NUMPY[d]) if init_value is None
                else np.full(s, init_value, dtype=NUMPY[d])
                for s, d in zip(output_shapes, output_dtypes, strict=True)]
        pointers = (ctypes.c_void_p * (len(arrays) + len(outs)))(
            *[a.ctypes.data for a in arrays + outs])
        nt = threadgroup[0]
        lib.launch(pointers, grid[0] // nt, grid[1], nt, ctypes.c_long(shared_memory))
        global COPIES_16
        COPIES_16 += lib.copies_16()
        return [mx.array(o) for o in outs]

    return call


def use_emulator(monkeypatch) -> None:
    """Route veloxcore's kernels for backends named "emulated…" to this emulator (the
    others, e.g. the machine's own GPU, as before), for one test."""
    from veloxcore import kernels

    original = kernels._kernel
    monkeypatch.setattr(kernels, "_kernel",
                        lambda b, which, shared_memory=0, min_blocks=None: emulated_kernel(
                            which, shared_memory)
                        if b.startswith("emulated")
                        else original(b, which, shared_memory, min_blocks))
