"""Fused decode attention and quantise-and-pack for the spectral KV cache.

``SpectralKernels`` holds one layer's kernel-ready layout (compacted coded dims,
RoPE pair order, unit codebook) and runs

- ``attend(queries, scale, parts, coded, pos0, exact)``: decode attention over
  the coded tokens, reading packed codes directly (flash-decoding: the sequence is
  split over threadgroups), merged with the exact tokens — in one launch by the
  warp-tiled kernel (CUDA, pre-RoPE keys with affine values), else by a second
  kernel after the block-tiled one;
- ``encode_keys`` / ``encode_values``: quantise and pack arriving vectors in
  one kernel (undoing RoPE first in pre-RoPE mode).

Backends: ``mx.fast.cuda_kernel`` on NVIDIA, ``mx.fast.metal_kernel`` on Apple
silicon — the same source text (``kernel_source``; the warp-tiled kernel is CUDA-only,
its fragments are PTX's) — and a pure-MLX reference
elsewhere or when ``VELOX_KERNELS=reference``. The reference computes the same
quantities with MLX ops (decoding every coded token to full precision first).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cache, partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import kernel_source as src
from .arrays import as_mx, kernel_input, padded_input
from .key_metric import rope_pairs
from .quantizers import lloyd_max_gaussian

THREADS = 256
TILE_ELEMENTS = 4096  # tokens per tile × head_dim
CHUNK_ELEMENTS = 1024  # basis rows per shared chunk × head_dim
TARGET_THREADGROUPS = 1024  # a few per SM on an H100/H200 (132 SMs), more on M-series
MAX_EXACT = 256  # exact tokens (sinks + recent window) the merge kernel takes
WARPS = 4  # warps per threadgroup of the warp-tiled decode kernel (16 tokens per warp-tile)
MAX_WARP_GROUP = 8  # query heads per KV head: columns 0-7 of the warp-tiled kernel's P·V mma
# Exact tokens the warp-tiled kernel merges: sinks, a 64-token recent window and up to 31
# waiting tokens (append_batch 32) fit.
WARP_MAX_EXACT = 100
WARP_MAX_SPLITS = 128  # splits per KV head the warp-tiled kernel's last block merges
# float4 loads in flight per thread when that block merges the splits' outputs (the merge
# waits on L2 round trips: 128 splits of 3 query heads at head_dim 64 are 96 KB). H200,
# kernel span by timestamps, 8 / 16 / 32: default-model shape at 16k 18.4 / 17.7 / 19.7
# µs, at 64k 33.0 / 32.3 / 34.1; 8B shape at 16k 60.3 / 59.6 / 60.9 (BENCHMARKS.md).
# Tunable for profiling.
WARP_MERGE_LOADS = int(os.environ.get("VELOX_WARP_MERGE_LOADS", "16"))
# Entries (fp16 pairs, 4 bytes each) of the warp-tiled kernel's key pair table: each pair
# of adjacent key columns decodes with one shared-memory lookup instead of two lookups and
# a pack; the narrowest pairs' widths fit first, wider ones decode column by column. By
# timestamps on an H200, 2,048 entries with WARP_LAZY_MAX against none: 1B shape at 64k
# 72.4 -> 66.0 µs, default-model shape at 64k 31.5 -> 29.9 (BENCHMARKS.md, "Tile-loop
# variants on the GPU"). 4,096 against 2,048 (BENCHMARKS.md, "KPALL and key pairs at
# head_dim 128, timed"): no cost where every pair fit 2,048 (within ±1% on every decode.py
# shape at 16k and 64k), and on layer 0's spectrum, whose widest pairs miss both tables,
# 1B shape at 64k 70.5 -> 68.3 µs, default-model shape 31.3 -> 30.6. It also gives KPALL
# (below) to 24 of the default model's 30 layers instead of 16. 0: off.
WARP_KEY_PAIRS = int(os.environ.get("VELOX_WARP_KEY_PAIRS", "4096"))
# The warp-tiled kernel keeps a lane's key pairs (word, bit offset, width, table base)
# packed in registers for the split (KPREG) rather than loading them from shared memory
# for every tile (Nsight Compute, 1B shape at 64k: the test of a loaded pair's base was
# the most-sampled stall). ptxas at head_dim 64: 199 registers with KPALL, 172 without (two
# blocks an SM either way; 168 with 8 bytes spilled under VELOX_WARP_MIN_BLOCKS=3); 168
# at 128, 249 with the pair table there. Slower on an H200 by timestamps (1B shape at 64k
# 59.7 -> 90.8 µs; 65.1 at three blocks an SM; 8B shape at 64k 158.1 -> 161.2 with the
# pair table): off.
WARP_KEY_PAIR_REGISTERS = os.environ.get("VELOX_WARP_KEY_PAIR_REGISTERS", "0") != "0"
# Where every key pair of a layer fits the table, the warp-tiled kernel is built without
# the per-pair test and the column-by-column path (KPALL; static SASS of the 1B shape:
# 5,304 -> 4,832 instructions, same registers). By timestamps on an H200: 1B shape at 64k
# 67.0 -> 59.7 µs, at 16k 24.8 -> 22.6; default-model shape at 64k 30.0 -> 27.6. Every pair
# of decode.py's shapes fits 2,048 entries; of the bundled default model's 30 layers
# (water-filled 3-bit keys) 24 fit 4,096 (16 fit 2,048), the rest having a few of their 96
# pairs too wide. VELOX_WARP_KEY_PAIRS_ALL=0 keeps the per-pair test everywhere.
WARP_KEY_PAIRS_ALL = os.environ.get("VELOX_WARP_KEY_PAIRS_ALL", "1") != "0"
# Head dims up to which the key pair table is used. At 128 (the 8B shape) the table costs
# shared memory but no occupancy: Nsight Compute shows the 8B launch at three blocks an SM
# by both registers and shared memory. By timestamps on an H200: 8B shape at 16k 50.4 ->
# 46.3 µs, at 64k 168.9 -> 158.1 (BENCHMARKS.md, "KPALL and key pairs at head_dim 128,
# timed").
WARP_KEY_PAIRS_DIM = int(os.environ.get("VELOX_WARP_KEY_PAIRS_DIM", "128"))
# The warp-tiled kernel dequantises a tile's values before its softmax rather than after
# (more independent work while the softmax's shuffles wait), up to head_dim 64 (fully
# unrolled). ptxas (sm_90): 168 registers, as without; 174 with WARP_KEYS_EARLY too (before
# key pairs), past the 168 that three blocks an SM allow (a warp's registers come in steps
# of 256). Within ±1% alone on an H200 and erratic with key pairs (1B shape at 16k 24.7 ->
# 40.7 µs): off by default.
WARP_VALUES_EARLY = os.environ.get("VELOX_WARP_VALUES_EARLY", "0") != "0"
# The warp-tiled kernel decodes the next tile's key coefficients once a tile's scores are
# done (their shared-memory load chains then overlap the softmax and the values; ptxas:
# 168 registers, as without). Within ±1% on an H200, slower with key pairs (1B shape at
# 64k 66.0 -> 68.5 µs with lazy maxima): off by default.
WARP_KEYS_EARLY = os.environ.get("VELOX_WARP_KEYS_EARLY", "0") != "0"
# The warp-tiled kernel's tile softmax (scores on tensor cores) keeps each head's sum per
# lane, summed once after the last tile, and moves a head's maximum only when a score
# passes it by a margin (e^8): most tiles then need no shuffle, where each took six
# dependent ones. On by default (H200, timestamps: 8B shape at 64k 177.4 -> 173.3 µs;
# with key pairs, above). 0: the exact running maximum.
WARP_LAZY_MAX = os.environ.get("VELOX_WARP_LAZY_MAX", "1") != "0"
# The warp-tiled kernel's staged value words: a token's padded by 4 words where they are
# a multiple of 8 (4-bit values at head_dim 64 and 128; also 8-bit, and 2- and 6-bit at
# 128), so that the P·V loads of a warp's four token rows (tokens 2 tig + 8 o, 64 or 128
# bytes apart unpadded) fall in different banks: Nsight Compute, 8B shape at 64k, 192 of
# a tile's 971 shared-memory wavefronts were their conflicts (4 wavefronts a load
# instead of 1). 2 KiB more shared memory a block. VPAD. And the warp's turned query in
# rows D + 8 floats apart instead of D, so that the QMMA B fragment's loads of rows
# gid < G fall in different banks (4 wavefronts a load instead of 1 there, 48 of the
# 971). QPAD. With both, the 8B shape's bank conflicts fell from 9.2M to 1.4M and its
# kernel from 156.8 to 135.8 µs (Nsight Compute, 64k); by timestamps, unpadded ->
# padded (three blocks an SM, WARP_MIN_BLOCKS): 8B shape at 64k 158.4 -> 135.0 µs
# (-15%), at 16k 46.7 -> 41.9; 1B shape at 64k 60.7 -> 57.5, default-model shape at 64k
# 27.7 -> 26.6 (BENCHMARKS.md, "Padded buffers").
WARP_VALUE_PAD = os.environ.get("VELOX_WARP_VALUE_PAD", "1") != "0"
WARP_QUERY_PAD = os.environ.get("VELOX_WARP_QUERY_PAD", "1") != "0"
# Tile pairs (TP 2): a warp takes two adjacent 16-token tiles an iteration and loads each
# key basis fragment once for both tiles' mma. Every tile reads the whole basis (32 KiB at
# head_dim 128: 256 of the 8B shape's ~663 shared-memory wavefronts a tile, padded), so a
# pair halves that; the second tile's keys turn by 16·θ more (a complex product a pair),
# and its fragments take ~32 more registers a lane at head_dim 128 (two blocks an SM
# there anyway). Needs QMMA, not KEARLY / VEARLY. VELOX_WARP_TILE_PAIRS=N: pairs where
# head_dim >= N; 0, off. 128 by default: H200, timestamps, with registers for two blocks
# an SM (WARP_TILE_PAIR_MIN_BLOCKS), 8B shape 134.7 -> 116.8 µs at 64k, 41.4 -> 36.5 at
# 16k, 26.0 -> 22.8 at 8k; at head_dim 64 they lose (1B at 64k 57.2 -> 58.0 at three
# blocks an SM, where they spill 8 bytes; 86.6 at two). BENCHMARKS.md, "Tile pairs".
WARP_TILE_PAIRS = int(os.environ.get("VELOX_WARP_TILE_PAIRS", "128"))
# Static shared memory a CUDA kernel may declare (less a margin for alignment padding).
WARP_SHARED_LIMIT = 48 * 1024 - 256
# Shared memory a block may use in all (static and dynamic, opt-in) by compute capability
# (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): 227 KiB
# on sm_90 and sm_100, 163 KiB on sm_80 and sm_87, 99 KiB on sm_86, sm_89 and sm_120.
BLOCK_SHARED_BY_ARCH = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024,
                        (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
                        (12, 0): 99 * 1024}
# Tile pairs (TP 2) where a block may use at least this much: their doubled word buffers
# take a head_dim-128 block to ~90-110 KB, two blocks an SM on an H100/H200 (228 KB an
# SM); cards of 99 KiB a block (100 KB an SM) keep one tile.
TILE_PAIR_BLOCK_SHARED = 160 * 1024
# The warp-tiled decode kernel (CUDA, pre-RoPE keys, affine values); VELOX_WARP_DECODE=0
# falls back to the block-tiled one (for comparisons).
WARP_DECODE = os.environ.get("VELOX_WARP_DECODE", "1") != "0"
# Unrolling of its loop over 8-dim slices of the head (0: fully up to head_dim 64, 4-fold
# beyond: head_dim 128 fully unrolled took 229 registers, 4-fold 168, which lets three
# blocks share an SM; H200, 8B shape at 64k: 284-290 -> 264 µs with two).
WARP_UNROLL = int(os.environ.get("VELOX_WARP_UNROLL", "0"))
# Unrolling of its values' loop over 16-dim slices (0: whole). Partly unrolled, the
# (P·V)^T accumulators are indexed at run time and live in local memory: head_dim 128
# with the loop 4-fold (as WARP_UNROLL) had a 160-byte stack frame and a local load and
# store around every mma; whole, 32 bytes and the same 168 registers (ptxas, sm_90:
# benchmarks/ptxas_warp.py), and faster (H200, timestamps, 8B shape: 186.5 -> 177.3 µs at
# 64k, 55.4 -> 52.7 at 16k; BENCHMARKS.md, "Tile-loop variants on the GPU"). Tunable
# for profiling.
WARP_VALUE_UNROLL = int(os.environ.get("VELOX_WARP_VALUE_UNROLL", "0"))
# Key basis fragments in registers for a whole split, up to this head_dim (their count
# grows as head_dim², 64 words per lane at 64), in launches of at most
# WARP_BASIS_REGISTER_BLOCKS blocks: the registers cut a block's tiles by 20-45% but
# fewer blocks fit on an SM at once, which costs more where a launch has more blocks than
# fit (H200, timestamps: default-model shape, <= 384 blocks, span -18% at 4k and -14% at
# 64k; 1B shape, 1,024 blocks, +24% at 16k and +7% at 64k; BENCHMARKS.md). 0: always
# read from memory.
WARP_BASIS_REGISTERS = int(os.environ.get("VELOX_WARP_BASIS_REGISTERS", "64"))
# Otherwise the fragments are copied into the block's dynamic shared memory once
# (2 · head_dim · RKMAX bytes: 8 KiB at 64, 32 KiB at 128) rather than read from global
# memory twice per mma. VELOX_WARP_BASIS_SHARED=0 reads them from memory (comparisons).
WARP_BASIS_SHARED = os.environ.get("VELOX_WARP_BASIS_SHARED", "1") != "0"
WARP_BASIS_REGISTER_BLOCKS = 512
# Fewest 16-token tiles each warp of the warp-tiled kernel walks per split (more splits
# start more blocks; fewer, longer splits cost less to merge). Tunable for profiling.
WARP_MIN_TILES = int(os.environ.get("VELOX_WARP_MIN_TILES", "2"))
# Blocks the warp-tiled kernel's launch aims for: one wave at three blocks per SM on a
# 132-SM H100/H200 where every KV head can take all WARP_MAX_SPLITS splits within it
# (WARP_WAVE_BLOCKS), otherwise about two blocks per SM (WARP_TARGET_BLOCKS). Every block
# pays a set-up (the basis copy, tables, the query) and the last one merges every split,
# so more blocks than fit at once cost more than they gain (H200, kernel alone, 16k
# tokens, 1,024 / 512 / 384 / 256 / 128 blocks: 8 KV heads at head_dim 128 87.9 / 77.1 /
# 72.8 / 70.9 / 89.8 µs, at 64 40.3 / 40.8 / 48.6 / 35.7 / 47.8; 3 KV heads at 64, 384 /
# 258 blocks: 22.3 / 22.7; BENCHMARKS.md, "Fewer, longer splits"). Tunable for profiling
# (VELOX_WARP_BLOCKS=1024 VELOX_WARP_WAVE_BLOCKS=0: the choice before).
WARP_WAVE_BLOCKS = int(os.environ.get("VELOX_WARP_WAVE_BLOCKS", "384"))
WARP_TARGET_BLOCKS = int(os.environ.get("VELOX_WARP_BLOCKS", "256"))
# Head dims up to which a launch whose KV heads cannot all take WARP_MAX_SPLITS still aims
# for one wave at three blocks an SM (WARP_WAVE_BLOCKS) rather than WARP_TARGET_BLOCKS.
# At head_dim 64 the blocks' set-up is small (an 8 KiB basis) and more splits pay (H200,
# timestamps, 1B shape, 8 KV heads, 264 -> 392 blocks: span 26.7 -> 26.0 µs at 16k and
# 82.0 -> 73.0 at 64k); at 128 they do not (8B shape at 16k: 52.7 -> 58.1; BENCHMARKS.md,
# "Tile-loop variants on the GPU"). VELOX_WARP_WAVE_DIM=0: the choice before.
WARP_WAVE_DIM = int(os.environ.get("VELOX_WARP_WAVE_DIM", "64"))
# Blocks per SM the warp-tiled kernel is compiled to fit (``__launch_bounds__``: the
# compiler caps registers at 64K / (128 · N), 168 for 3, spilling past that); 0 leaves
# registers to the compiler. 3 by default since the padded buffers (WARP_VALUE_PAD) took
# head_dim 64 to 172 registers, two blocks an SM: H200, timestamps, padded, without and
# with the bounds: 1B shape at 64k 91.3 -> 57.5 µs, default-model shape at 16k 19.2 ->
# 13.3; 8B shape (168 registers either way) 134.3 -> 135.0 at 64k, 41.1 -> 41.9 at 16k.
WARP_MIN_BLOCKS = int(os.environ.get("VELOX_WARP_MIN_BLOCKS", "3"))
# ... and for builds with tile pairs (TP 2), which take ~250 registers at head_dim 128
# under two (no spills; 168 under three, where they gain nothing: 8B at 64k 135.6 µs).
WARP_TILE_PAIR_MIN_BLOCKS = int(os.environ.get("VELOX_WARP_TILE_PAIR_MIN_BLOCKS", "2"))
# The warp-tiled kernel's scores against the query heads on tensor cores (one mma per
# two 8-dim slices, fp16 keys and query) rather than FMAs in registers (2 · G per key
# pair and lane): fewer instructions, and faster on an H200 (kernel alone: default-model
# shape at 16k 22.2 -> 21.2 µs, 8B at 16k 70.1 -> 64.5, 1B at 64k 99.7 -> 87.2;
# BENCHMARKS.md, "Scores on tensor cores by default..."). VELOX_WARP_QMMA=0: FMAs.
WARP_QMMA = os.environ.get("VELOX_WARP_QMMA", "1") != "0"
# CUDA kernels' texts reach MLX as #include lines of files (``included_text``): MLX hashes
# the whole text at every launch. VELOX_KERNEL_FILES=0 passes them inline.
KERNEL_FILES = os.environ.get("VELOX_KERNEL_FILES", "1") != "0"
# Profiling (benchmarks/warp_phases.py): a list here makes the warp-tiled kernel a build
# that timestamps its phases (kernel_source.CUDA_STAMPS); each launch appends its stamps,
# (blocks, 32) uint32 in the order of blockIdx.y-major block ids.
WARP_STAMPS: list | None = None


def kernel_backend() -> str:
    """"cuda", "metal" or "reference" (``VELOX_KERNELS=reference`` forces the last)."""
    forced = os.environ.get("VELOX_KERNELS", "auto").lower()
    if forced not in ("auto", "reference", "cuda", "metal"):
        raise ValueError(f"VELOX_KERNELS must be auto, reference, cuda or metal, not {forced!r}")
    if forced == "reference" or mx.default_device() != mx.gpu:
        return "reference"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "reference"


@cache
def unit_codebook() -> np.ndarray:
    """Lloyd-Max levels of N(0, 1) for widths 1–8, width b at offset 2^b − 2."""
    return np.concatenate([lloyd_max_gaussian(b)[0] for b in range(1, 9)]).astype(np.float32)


def _kernel_parts(backend: str, which: str,
                  min_blocks: int | None = None) -> tuple[list, list, str, str]:
    """(input names, output names, header, source) of kernel ``which`` for ``backend``;
    ``min_blocks``: the warp-tiled kernel's launch bounds (None: WARP_MIN_BLOCKS)."""
    body, inputs, outputs = {
        "decode": (src.DECODE_BODY, src.DECODE_INPUTS, src.DECODE_OUTPUTS),
        "decode_warp": (src.DECODE_WARP_BODY, src.DECODE_WARP_INPUTS,
                        src.DECODE_WARP_OUTPUTS),
        "decode_warp_stamps": (src.DECODE_WARP_BODY, src.DECODE_WARP_INPUTS,
                               src.DECODE_WARP_OUTPUTS + ["stamps"]),
        "encode": (src.ENCODE_BODY, src.ENCODE_INPUTS, src.ENCODE_OUTPUTS),
        "combine": (src.COMBINE_BODY, src.COMBINE_INPUTS, src.COMBINE_OUTPUTS),
        "entropy_decode": (src.ENTROPY_DECODE_BODY, src.ENTROPY_DECODE_INPUTS,
                           src.ENTROPY_DECODE_OUTPUTS),
        "entropy_encode": (src.ENTROPY_ENCODE_BODY, src.ENTROPY_ENCODE_INPUTS,
                           src.ENTROPY_ENCODE_OUTPUTS),
    }[which]
    header, source = src.kernel_text(backend, body)
    if which.endswith("_stamps"):
        header = src.CUDA_STAMPS + header
    min_blocks = WARP_MIN_BLOCKS if min_blocks is None else min_blocks
    if backend == "cuda" and which.startswith("decode_warp") and min_blocks:
        header, source = src.with_launch_bounds(header, source, 32 * WARPS, min_blocks)
    return inputs, outputs, header, source


def warp_min_blocks(which: str, template) -> int | None:
    """Launch bounds of kernel ``which`` built with ``template``: the warp-tiled kernel's
    blocks an SM (0: none), None for the other kernels (which have none)."""
    if not which.startswith("decode_warp"):
        return None
    return WARP_TILE_PAIR_MIN_BLOCKS if dict(template).get("TP") == 2 else WARP_MIN_BLOCKS


@cache
def _kernel(backend: str, which: str, shared_memory: int = 0, min_blocks: int | None = None):
    inputs, outputs, header, source = _kernel_parts(backend, which, min_blocks)
    if backend == "cuda":
        return _CudaKernel(f"velox_{which}", inputs, outputs, _compact_source(source),
                           _compact_source(header), shared_memory)
    if shared_memory:
        raise ValueError("dynamic shared memory is a CUDA kernel's (the warp-tiled one)")
    return mx.fast.metal_kernel(name=f"velox_{which}", input_names=inputs,
                                output_names=outputs, source=source, header=header)


# MLX's text for a CUDA kernel's template arguments (custom_kernel.cpp, build_kernel).
CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float",
              mx.int32: "int32_t", mx.uint32: "uint32_t", mx.uint8: "uint8_t"}


def cuda_kernel_text(which: str, inputs, output_dtypes, template) -> str:
    """The whole text of a CUDA launch of kernel ``which`` with ``inputs`` (arrays),
    outputs of ``output_dtypes`` and ``template``, to compile without MLX (nvcc: the
    tests' and benchmarks/ptxas_warp.py's checks): a stand-in for MLX's prelude (the
    fp16 and bf16 headers, a struct for an input's shape), then as MLX writes it the
    header, the signature (each input, its shape where the body reads it, the outputs)
    and the template's constants ahead of the body."""
    names, outputs, header, source = _kernel_parts("cuda", which,
                                                   warp_min_blocks(which, template))
    params = []
    for name, array in zip(names, inputs, strict=True):
        params.append(f"const {CUDA_TYPES[array.dtype]}* __restrict__ {name}")
        if f"{name}_shape" in source:
            params.append(f"const __grid_constant__ VxShape {name}_shape")
    params += [f"{CUDA_TYPES[dtype]}* __restrict__ {name}"
               for name, dtype in zip(outputs, output_dtypes, strict=True)]
    prelude = ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cstdint>\n"
               "struct VxShape { int32_t v[10]; "
               "__device__ int32_t operator[](int i) const { return v[i]; } };\n")
    return (prelude + header + f'extern "C" __global__ void velox_{which}('
            + ", ".join(params) + ") {\n" + template_text(template) + source + "\n}\n")


def template_text(template) -> str:
    """The lines MLX puts at the top of a CUDA kernel's body for its template
    arguments: ``constexpr int D = 64;``, ``constexpr bool PRE = true;``,
    ``using T = __half;``."""
    lines = []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"  using {name} = {CUDA_TYPES[value]};\n")
        elif isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {str(value).lower()};\n")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};\n")
        else:
            raise TypeError(f"template argument {name}={value!r}: a dtype, bool or int")
    return "".join(lines) + "\n" if lines else ""


class _CudaKernel:
    """A CUDA kernel as ``mx.fast.cuda_kernel`` makes it (called with ``template=``),
    which can also be baked for one set of template arguments (``baked``): their
    constants are then part of its text and a call passes none. MLX's binding converts
    and formats each template argument into the whole source at every call (H200,
    building only: ~0.25 µs an argument; the warp-tiled decode launch passes 19, and its
    call took 21.7 µs against 1.0 µs for mlx's SDPA; BENCHMARKS.md, "... what a launch
    costs the host")."""

    def __init__(self, name, inputs, outputs, source, header, shared_memory):
        self.name, self.inputs, self.outputs = name, inputs, outputs
        self.shared_memory = shared_memory
        self.header, self.source = header, source
        self._templated = None
        self._baked = {}

    def _make(self, name, constants="", include=True):
        header, source = self.header, self.source
        if KERNEL_FILES and include:
            # Written (or checked) now: NVRTC reads them at the kernel's first launch,
            # right after this, and the cache folder may have been cleaned since the last
            # kernel was made.
            header, source = included_text(self.inputs, header, source)
        # MLX raises the kernel's dynamic shared-memory limit itself past 48 kB.
        return mx.fast.cuda_kernel(name=name, input_names=self.inputs,
                                   output_names=self.outputs, source=constants + source,
                                   header=header, shared_memory=self.shared_memory)

    def __call__(self, **kwargs):
        if self._templated is None:
            # Inline texts: MLX compiles this kernel anew for every new set of template
            # arguments, at any later time, when included files might be gone.
            self._templated = self._make(self.name, include=False)
        return self._templated(**kwargs)

    def baked(self, template: tuple):
        """The kernel with ``template``'s constants in its text (MLX's own text for
        them, ``template_text``). Its name carries a digest of the whole text: MLX
        keeps compiled kernels by name."""
        kernel = self._baked.get(template)
        if kernel is None:
            constants = template_text(template)
            text = self.header + constants + self.source
            digest = hashlib.blake2s(text.encode(), digest_size=8).hexdigest()
            kernel = self._baked[template] = self._make(f"{self.name}_{digest}", constants)
        return kernel


def kernel_file_dir() -> Path:
    """Where ``included_text`` writes kernel texts (one file per text, named by its
    digest): $VELOX_KERNEL_DIR, else ``kernels`` in the user cache (where converted
    models live, ``models.cache_root``) — not a shared temporary folder, where another
    user could swap a file between its check and NVRTC's read. An absolute path: NVRTC
    resolves the #include when it compiles, maybe after a change of directory."""
    env = os.environ.get("VELOX_KERNEL_DIR")
    if env:
        return Path(env).expanduser().resolve()
    from .models import cache_root

    return (cache_root() / "kernels").resolve()


def _kernel_file(text: str) -> Path:
    """A file holding ``text``, named by its digest (written once, atomically, readable
    by all: a folder shared through $VELOX_KERNEL_DIR serves every user)."""
    folder = kernel_file_dir()
    path = folder / f"{hashlib.blake2s(text.encode(), digest_size=12).hexdigest()}.cuh"
    try:
        if path.read_text() == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        f.write(text)
    try:
        os.chmod(f.name, 0o644)
        os.replace(f.name, path)
    except OSError:
        Path(f.name).unlink(missing_ok=True)
        raise
    return path


def included_text(input_names, header: str, source: str) -> tuple[str, str]:
    """(header, source) for ``mx.fast.cuda_kernel`` that ``#include`` the kernel's
    texts from files (``_kernel_file``) rather than holding them: MLX hashes a custom
    kernel's whole text at every launch and copies it at every call (H200: a chain of 30
    launches of a 20 kB kernel evaluated in 285 µs inline, 139 µs included; BENCHMARKS.md,
    "... what a launch costs the host"). NVRTC reads the files when it compiles, once per
    process and kernel. MLX passes an input's shape, strides or ndim only where its source
    names them, so the names the text uses are listed in a comment of the source it sees.
    Where no file can be written, the texts stay inline."""
    try:
        header_file, source_file = _kernel_file(header), _kernel_file(source)
    except OSError:
        return header, source
    if any(c in header_file.as_posix() for c in '"\\\n'):
        return header, source  # a path an #include line cannot quote
    used = [f"{n}{suffix}" for n in input_names for suffix in ("_shape", "_strides", "_ndim")
            if f"{n}{suffix}" in source]
    return (f'#include "{header_file.as_posix()}"\n',
            f'#include "{source_file.as_posix()}"\n' + (f"// {' '.join(used)}\n" if used else ""))


def _launcher(backend: str, which: str, template, shared_memory: int = 0):
    """A call of kernel ``which`` with its template arguments fixed: on CUDA the baked
    kernel (``_CudaKernel.baked``), elsewhere (Metal, the tests' emulator) the kernel with
    ``template=`` bound. The warp-tiled kernel's launch bounds follow its template
    (``warp_min_blocks``): one build for each."""
    kernel = _kernel(backend, which, shared_memory, warp_min_blocks(which, template))
    baked = getattr(kernel, "baked", None)
    return baked(tuple(template)) if baked is not None else partial(kernel, template=template)


def _compact_source(text: str) -> str:
    """Kernel text without comments, indentation or blank lines. MLX's CUDA backend
    rebuilds a kernel's whole source at every call and hashes it at every launch, so
    its length is host time on each decode step (measured: 23 kB -> 17 kB). The kernel
    texts have no string literal holding "//"."""
    lines = (line.split("//", 1)[0].strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def _compact(bits: np.ndarray, pad_to: int = 1):
    """Per head, the coded dims (width > 0) first: (columns (H, r), r)."""
    H, D = bits.shape
    r = max(1, int((bits > 0).sum(axis=1).max()))
    r = min(D, -(-r // pad_to) * pad_to)
    columns = np.zeros((H, r), dtype=np.int64)
    valid = np.zeros((H, r), dtype=bool)
    for h in range(H):
        coded = np.flatnonzero(bits[h] > 0)
        columns[h, : coded.size] = coded
        valid[h, : coded.size] = True
    return columns, valid, r


def _coder_arrays(coder, columns, valid):
    """kbits, kshift, kscale (H, r) for the compacted columns of a DimCoder."""
    H = columns.shape[0]
    rows = np.arange(H)[:, None]
    bits = np.where(valid, coder.bits[rows, columns], 0)
    shift = np.where(valid, _offsets(coder.bits)[rows, columns], 0)
    scale = np.where(valid, coder.scales[rows, columns], 0.0)
    return (as_mx(bits.astype(np.int32)), as_mx(shift.astype(np.int32)),
            as_mx(scale.astype(np.float32)))


def key_pair_tables(bits: np.ndarray, shift: np.ndarray, capacity: int):
    """The warp-tiled kernel's key decode by pairs of compacted columns (2i, 2i + 1), whose
    codes are adjacent in a token's bits (low bits first): per width pair (a, b), a table
    of 2^(a+b) fp16 pairs (level of the low code, level of the high one: unit codebook
    levels, 0 for a padding column), the narrowest widths first while ``capacity`` entries
    last. Returns (kpair (H, r/2, 4) int32: word, bit offset, mask, table base or -1 where
    the pair decodes column by column; table (n,) uint32), or None where no table fits."""
    lo_bits, hi_bits = bits[:, 0::2], bits[:, 1::2]
    widths = sorted({(int(a), int(b)) for a, b in zip(lo_bits.ravel(), hi_bits.ravel(),
                                                      strict=True)},
                    key=lambda ab: (ab[0] + ab[1], ab))
    levels = unit_codebook()
    base: dict[tuple[int, int], int] = {}
    tables = []
    size = 0
    for a, b in widths:
        n = 1 << (a + b)
        if size + n > capacity:
            break
        codes = np.arange(n)
        low = levels[(1 << a) - 2 + (codes & ((1 << a) - 1))] if a else np.zeros(n)
        high = levels[(1 << b) - 2 + (codes >> a)] if b else np.zeros(n)
        tables.append(np.stack([low, high], axis=-1).astype(np.float16).view(np.uint32)[:, 0])
        base[(a, b)] = size
        size += n
    if not base:
        return None
    offset = shift[:, 0::2]
    table_base = np.vectorize(lambda a, b: base.get((int(a), int(b)), -1),
                              otypes=[np.int64])(lo_bits, hi_bits)
    # (Only a pair whose high code starts where the low one ends reads as one code.)
    adjacent = (hi_bits == 0) | (shift[:, 1::2] == offset + lo_bits)
    kpair = np.stack([offset >> 5, offset & 31, (1 << (lo_bits + hi_bits)) - 1,
                      np.where(adjacent, table_base, -1)], axis=-1)
    return kpair.astype(np.int32), np.concatenate(tables)


class SpectralKernels:
    """Kernel-ready layout of one SpectralKVCache layer (see kernel_source)."""

    def __init__(self, cache, backend: str | None = None):
        self.backend = backend or kernel_backend()
        coder = cache.key_coder
        H, D = coder.heads, coder.dims
        if D & (D - 1) or not 32 <= D <= 256:
            raise ValueError(f"head_dim {D} is not supported by the fused kernels")
        if cache.key_block:
            raise ValueError("block key scales are not supported by the fused kernels")
        self.heads, self.dims = H, D
        self.pre = cache.rope_mode == "pre"
        self.key_token_scale = cache.token_scale
        # Coded columns padded to whole tensor-core steps (16) and basis chunks.
        columns, valid, self.key_rank = _compact(coder.bits, pad_to=max(16, CHUNK_ELEMENTS // D))
        self.mma = self.pre and self.backend in ("cuda", "emulated")
        self.kbits, self.kshift, self.kscale = _coder_arrays(coder, columns, valid)
        self.key_words = coder.words
        # The warp-tiled kernel's key pair table (kernel_source.DECODE_WARP_BODY, KPAIR).
        # key_pairs_all: every pair in the table (none column by column), so the kernel
        # has no per-pair branch nor the column-by-column path (KPALL).
        self.key_pair_words, self.kpair, self.ptab, self.key_pairs_all = self._pair_inputs(
            WARP_KEY_PAIRS if D <= WARP_KEY_PAIRS_DIM else 0)
        self._key_pairs_for: dict = {}  # per query heads a KV head (_key_pairs)
        basis = np.array(cache.key_basis)  # (H, D, D): original dims x coefficients
        decoder = np.array(cache.key_decoder)  # the same unless metric-weighted
        mean = np.array(cache.key_mean).reshape(H, D)
        rows = np.arange(H)[:, None]
        compact = np.where(valid[:, None, :], decoder[rows, :, columns].transpose(0, 2, 1),
                           0.0)
        if self.pre:
            self.perm, theta, amp = rope_pairs(cache.rope, D)
            self.rope = as_mx(np.concatenate([theta, amp]))
            # basis_t[h, m, j] = G[h, perm[j], column m] (G: the decoder, U unless +qm):
            # coefficients -> pair-ordered dims
            # (the scalar path's fp32 copy; the tensor-core path reads basis_mma).
            self.basis_t = (kernel_input([0], mx.float32) if self.mma else
                            as_mx(compact[:, self.perm, :].transpose(0, 2, 1)
                                  .astype(np.float32)))
            self.key_mean_pairs = as_mx(mean[:, self.perm].astype(np.float32))
            self.encode_basis = as_mx(basis[:, self.perm, :].astype(np.float32))
            self.encode_mean = self.key_mean_pairs
            self.perm_mx = as_mx(self.perm)
            # fp16 pairs along the coefficient axis, d-major: B fragments of mma.m16n8k16.
            pairs = np.ascontiguousarray(compact[:, self.perm, :].astype(np.float16))
            self.basis_mma = as_mx(pairs.view(np.uint32))
            # The warp-tiled kernel's fragments carry each column's scale, so its decode
            # puts unit codebook levels straight into the A fragments.
            scales = np.where(valid, coder.scales[rows, columns], 0.0)[:, None, :]
            scaled = np.ascontiguousarray((compact * scales)[:, self.perm, :].astype(np.float16))
            self.bfrag = as_mx(_b_fragments(scaled.view(np.uint32)))
        else:
            self.perm = np.arange(D, dtype=np.int32)
            self.rope = mx.zeros((D,), mx.float32)
            self.basis_t = kernel_input([0], mx.float32)
            self.key_mean_pairs = kernel_input([0], mx.float32)
            # Post-RoPE: q' = q · G[:, columns] (H, D, r); bias q · mean.
            self.query_basis = as_mx(compact.astype(np.float32))
            self.key_mean_orig = as_mx(mean.astype(np.float32))
            self.encode_basis = as_mx(basis.astype(np.float32))
            self.encode_mean = self.key_mean_orig
            self.perm_mx = as_mx(self.perm)
            self.basis_mma = kernel_input([0], mx.uint32)
        self.key_rms = padded_input(cache.key_rms.reshape(H))
        # Per-token scales are clipped to [floor, ceiling] (KVCacheConfig.token_scale_*).
        self.ts_clamp = kernel_input([cache.token_scale_floor,
                                      min(cache.token_scale_ceiling, 3e38)], mx.float32)
        self.key_full = (as_mx(coder.bits.astype(np.int32)),
                         as_mx(_offsets(coder.bits)), as_mx(coder.scales.astype(np.float32)))

        self.value_affine = cache.value_affine
        # Rotated values that the warp-tiled kernel turns back with a fast Walsh-Hadamard
        # transform (value_rotation's matrix for power-of-two head dims).
        self.value_hadamard = bool(getattr(cache, "value_hadamard", False))
        if self.value_affine is not None:
            bits, group = self.value_affine
            if bits not in (2, 3, 4, 5, 6, 8) or D * bits % 32:
                raise ValueError(f"affine {bits}-bit values of {D} dims are not supported by "
                                 "the fused kernels (2-6 or 8 bits, whole 32-bit words)")
            self.value_rank = D
            self.value_words = D * bits // 32
            self.vbits = self.vshift = kernel_input([0], mx.int32)
            self.vscale = kernel_input([0], mx.float32)
            self.value_back = None
            if cache.value_rotation is not None:
                # Values were coded as v·R: the merge turns the output back with Rᵀ
                # ((r, D) rows per head, no mean), as it does for spectral values.
                back = np.array(cache.value_rotation).T
                self.value_back = as_mx(np.repeat(back[None], H, axis=0))
                self.value_mean = mx.zeros((H, D), mx.float32)
        else:
            vcoder = cache.value_coder
            vcolumns, vvalid, self.value_rank = _compact(vcoder.bits)
            self.vbits, self.vshift, self.vscale = _coder_arrays(vcoder, vcolumns, vvalid)
            self.value_words = vcoder.words
            vbasis = np.array(cache.value_basis)
            # Rotate-back of the output: (H, r, D) rows = compacted coefficients.
            self.value_back = as_mx(np.where(vvalid[:, :, None],
                                             vbasis[rows, :, vcolumns], 0.0)
                                    .astype(np.float32))
            self.value_mean = cache.value_mean.reshape(H, D)
            self.value_rms = padded_input(cache.value_rms.reshape(H))
            self.value_full = (as_mx(vcoder.bits.astype(np.int32)),
                               as_mx(_offsets(vcoder.bits)),
                               as_mx(vcoder.scales.astype(np.float32)))
            self.value_basis_full = as_mx(vbasis.astype(np.float32))
        self.codebook = as_mx(unit_codebook())
        self.dummy_half = kernel_input([0], mx.float16)
        self.dummy_float = kernel_input([0], mx.float32)
        # Small constants made once: a fresh host array per launch is slow.
        self._constants: dict[tuple, mx.array] = {}
        self._counter = mx.zeros((0,), mx.uint8)
        self._length_view: mx.array | None = None
        # Splits finished per KV head in a warp-tiled launch (zero between launches).
        self._counter_bh: mx.array | None = None
        self._warp_launch: tuple | None = None  # (key, prepared launch): _attend_warp
        self._warp_fits: dict[int, bool] = {}  # query heads per KV head -> warp_decode
        # The previous warp-tiled launch's partials, an input of the next one (unread): it
        # orders the launches that share _counter_bh (see _attend_warp).
        self._warp_previous: mx.array | None = None

    # ----------------------------------------------------------------- decode
    def attend(self, queries: mx.array, scale: float, parts, coded: int, pos0: int,
               exact: tuple[mx.array, mx.array, int] | None) -> mx.array:
        """Decode attention (B, Hq, 1, D) over ``coded`` tokens in ``parts`` (codes
        from position ``pos0``) and the exact tokens, ``exact`` = (keys buffer, values
        buffer, count): the first ``count`` tokens of each (B, H, capacity, D) buffer
        (CodedKVCache.exact_buffers). One launch of
        the warp-tiled kernel where it applies (``warp_decode``), else two of the
        block-tiled one (the codes in splits, then a merge with the exact tokens)."""
        launch = self._warp_launch
        if (launch is not None and WARP_DECODE and exact is not None
                and exact[2] <= WARP_MAX_EXACT
                and launch[0] == self._warp_key(queries, scale, parts, coded, pos0)):
            # A decode step between batched appends: the launch prepared for this query
            # shape and these codes is still the one (``warp_decode`` and ``whole_tiles``
            # held when it was prepared, and depend on nothing else).
            return self._launch_warp(launch, queries, exact)
        if (self.warp_decode(queries) and self.whole_tiles(parts)
                and (exact is None or exact[2] <= WARP_MAX_EXACT)):
            return self._attend_warp(queries, scale, parts, coded, pos0, exact)
        partials = self.decode_partials(queries, scale, parts, coded, pos0)
        return self.combine(queries, scale, partials, exact)

    def warp_decode(self, queries) -> bool:
        """Whether ``attend`` runs the one-launch warp-tiled kernel (CUDA, pre-RoPE keys,
        affine values — plain or Hadamard-rotated —, head_dim <= 128, at most
        MAX_WARP_GROUP query heads per KV head, its static shared memory within CUDA's
        48 KiB and all of a block's within the device's limit (block_shared_limit: on a
        99 KiB card, 8 query heads per KV head at head_dim 128 fit with 9 key words per
        token); more than WARP_MAX_EXACT exact tokens take the block-tiled kernel)."""
        G = queries.shape[1] // self.heads
        if G not in self._warp_fits:
            self._warp_fits[G] = (
                self.mma and self.value_affine is not None and G <= MAX_WARP_GROUP
                and self.dims <= 32 * WARPS
                # (the kernel's P·V takes 16 dims, and one value group, at a time)
                and self.dims % 16 == 0 and self.value_affine[1] % 16 == 0
                and (self.value_back is None or self.value_hadamard)
                and warp_shared_bytes(self.dims, G, *self.value_affine, self.key_words,
                                      tiles=not self._tiles_dynamic())
                <= WARP_SHARED_LIMIT
                # ... and a launch with the basis and word buffers in dynamic shared
                # memory (SBASIS), without the pair table, within the device's block
                # limit (99 KiB on consumer cards)
                and self._fits_device(G, 0))
        return WARP_DECODE and self._warp_fits[G]

    def _fits_device(self, G: int, pair_words: int) -> bool:
        """Whether an SBASIS launch (the basis and the word buffers dynamic) with a pair
        table of ``pair_words`` entries fits the device's block limit, static and dynamic
        shared memory together, less WARP_SHARED_LIMIT's margin (the static part is an
        estimate)."""
        vb, vg = self.value_affine
        total = (warp_shared_bytes(self.dims, G, vb, vg, self.key_words, tiles=False,
                                   pair_words=pair_words)
                 + warp_dynamic_bytes(self.dims, G, vb, vg, self.key_rank, self.key_words,
                                      pair_words))
        return total <= block_shared_limit() - 256

    def _tiles_dynamic(self) -> bool:
        """Whether _warp_fits counts the word buffers in dynamic shared memory: where
        every launch puts them there (SBASIS: the basis never sits in registers, as past
        head_dim WARP_BASIS_REGISTERS), leaving the static 48 KiB to the rest (tile
        pairs' doubled buffers would not fit it at head_dim 128; nor would one tile's
        beside 7 or 8 query heads' rows)."""
        return self.dims > WARP_BASIS_REGISTERS and WARP_BASIS_SHARED

    def _key_pairs(self, G: int, tiles: bool) -> tuple:
        """The key pair table of a warp-tiled launch for G query heads per KV head, as
        (entries, kpair, ptab, every pair in it): the whole table where it fits in static
        shared memory beside the rest (``tiles``: the word buffers are static too, as
        they are unless SBASIS puts them in dynamic shared memory), else the largest of
        half, a quarter... of its entries that does (the narrowest pairs: the larger
        table's first entries, the others column by column), else none."""
        # (Everything warp_shared_bytes reads that a test or benchmark may change.)
        key = (G, tiles, WARP_SHARED_LIMIT, WARP_VALUE_PAD, WARP_QUERY_PAD, WARPS,
               _warp_tiles(self.dims), block_shared_limit())
        if key not in self._key_pairs_for:
            # (SBASIS launches, ``tiles`` False: the block's whole shared memory within
            # the device's limit too)
            fits = lambda words: warp_shared_bytes(  # noqa: E731
                self.dims, G, *self.value_affine, self.key_words, tiles=tiles,
                pair_words=words) <= WARP_SHARED_LIMIT and (
                tiles or self._fits_device(G, words))
            choice = (self.key_pair_words, self.kpair, self.ptab, self.key_pairs_all)
            capacity = self.key_pair_words
            while choice[0] and not fits(choice[0]):
                capacity //= 2
                choice = self._pair_inputs(capacity)
            self._key_pairs_for[key] = choice
        return self._key_pairs_for[key]

    def _pair_inputs(self, capacity: int) -> tuple:
        """(entries, kpair, ptab, every pair in it) of the key pair table of up to
        ``capacity`` entries (key_pair_tables); (0, placeholders, False) where none fits
        or ``capacity`` is 0."""
        pairs = (key_pair_tables(np.array(self.kbits), np.array(self.kshift), capacity)
                 if capacity > 0 else None)
        if pairs is None:
            return 0, kernel_input([0], mx.int32), kernel_input([0], mx.uint32), False
        kpair, table = pairs
        return table.size, as_mx(kpair), as_mx(table), bool((kpair[..., 3] >= 0).all())

    def whole_tiles(self, parts) -> bool:
        """The warp-tiled kernel copies whole 16-token tiles (pairs of them with TP 2):
        buffers must hold them."""
        return parts[0].shape[2] % (16 * _warp_tiles(self.dims)) == 0

    def decode_partials(self, queries, scale, parts, coded, pos0):
        """First launch: (out, max, sum) per split, shapes (B, H, S, G, D) / (B, H, S, G)."""
        if self.backend == "reference":
            raise RuntimeError("use the cache's reference path on this backend")
        B, Hq, L, D = queries.shape
        H = self.heads
        G = Hq // H
        dtype = queries.dtype
        tile = TILE_ELEMENTS // D
        splits = max(1, min(_cdiv(coded, tile), _cdiv(TARGET_THREADGROUPS, B * H)))
        per_split = _cdiv(_cdiv(coded, splits), tile) * tile
        splits = _cdiv(coded, per_split)
        n = 1 if self.key_token_scale else 0
        ktok = parts[1] if self.key_token_scale else self.dummy_half
        vparts = parts[1 + n:]
        if self.value_affine is not None:
            vwords, vscales, vbiases = vparts
            vtok = self.dummy_half
            vb, vg = self.value_affine
        else:
            vwords = vparts[0]
            vtok = vparts[1] if len(vparts) > 1 else self.dummy_half
            vscales = vbiases = self.dummy_half
            vb, vg = 4, 32
        params = self._constant(mx.float32, scale)
        layout = self._constant(mx.int32, self.key_rank, self.key_words, self.value_rank,
                                self.value_words, pos0)
        basis, mean = ((self.basis_t, self.key_mean_pairs) if self.pre
                       else (self.query_basis, self.key_mean_orig))
        template = [("T", dtype), ("D", D), ("G", G), ("HKV", H), ("T_TILE", tile),
                    ("NT", THREADS), ("MC", CHUNK_ELEMENTS // D),
                    ("ACC", _cdiv(G * D, THREADS)), ("PRE", self.pre), ("MMA", self.mma),
                    ("RKMAX", self.key_rank), ("CHS", self.key_rank + 8),
                    ("KTS", self.key_token_scale), ("VTS", vtok is not self.dummy_half),
                    ("VAFF", self.value_affine is not None), ("VB", vb), ("VG", vg)]
        out, out_max, out_sum = _launcher(self.backend, "decode", template)(
            inputs=[queries, self.perm_mx, params, self._length(coded), layout, self.basis_mma,
                    parts[0], ktok, self.kbits, self.kshift, self.kscale, basis, mean,
                    self.rope, vwords, vtok, vscales, vbiases, self.vbits, self.vshift,
                    self.vscale, self.codebook],
            grid=(THREADS * splits, B * H, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[(B, H, splits, G, D), (B, H, splits, G), (B, H, splits, G)],
            output_dtypes=[mx.float32] * 3)
        return out, out_max, out_sum

    def _attend_warp(self, queries, scale, parts, coded, pos0, exact):
        """The warp-tiled decode kernel (kernel_source.DECODE_WARP_BODY): codes, exact
        tokens and the merge in one launch. Everything but the query and the exact
        tokens is fixed between batched appends, so the launch is prepared once per
        coded length (``_warp_launch``): a decode step's host work is small next to the
        kernel's few microseconds."""
        key = self._warp_key(queries, scale, parts, coded, pos0)
        launch = self._warp_launch
        if launch is None or launch[0] != key:
            launch = self._warp_launch = (key, *self._prepare_warp(queries, scale, parts,
                                                                    coded, pos0, key[-1]))
        return self._launch_warp(launch, queries, exact)

    def _warp_key(self, queries, scale, parts, coded, pos0) -> tuple:
        """What a prepared warp-tiled launch holds for: the query's shape and dtype, the
        codes and their layout, the scale, and whether it is the timestamping build (last).
        The code buffers are written in place; new ones (growth, a restored state) are new
        arrays, and the prepared launch keeps the old ones alive, so ids differ."""
        return (queries.shape, queries.dtype, coded, id(parts[0]), pos0, scale,
                WARP_STAMPS is not None and self.backend == "cuda")

    def _launch_warp(self, launch, queries, exact):
        """One launch of a prepared warp-tiled kernel (``_attend_warp``)."""
        stamps = launch[0][-1]
        _, kernel, inputs, call = launch
        # A decode step changes only the query, the exact tokens and the previous launch
        # (below) in the prepared inputs: at these kernel sizes a small model's step is
        # host-bound, and the list is not rebuilt.
        inputs[0] = queries
        if exact is not None and exact[0] is inputs[-5] and exact[1] is inputs[-4]:
            # The exact buffers of the previous step (written in place, in the query's
            # dtype: they were not converted): only their count changes.
            inputs[-3] = self._constant(mx.int32, exact[2], exact[0].shape[2])
        else:
            ek, ev, count, capacity = self._exact_inputs(exact, queries.dtype)
            inputs[-5:-2] = (ek, ev, self._constant(mx.int32, count, capacity))
        # Launches on one cache share the split counter, so they must not run at once.
        # Nothing else orders them where steps do not depend on each other's output
        # (teacher-forced steps built lazily, then evaluated together: MLX's CUDA graph
        # runs independent kernels concurrently, and on an H200 the logits came out NaN),
        # so each launch takes the previous one's partials as an input it never reads. (An
        # attend built and never evaluated then runs with the next one: benchmarks that
        # build many and evaluate one should use a cache each.)
        inputs[-1] = self.dummy_float if self._warp_previous is None else self._warp_previous
        outputs = kernel(inputs=inputs, **call)
        self._warp_previous = outputs[0]
        if stamps:
            WARP_STAMPS.append(outputs[2])
        return outputs[1]

    def _prepare_warp(self, queries, scale, parts, coded, pos0, stamps):
        """(kernel, inputs, keyword arguments) of a warp-tiled launch."""
        B, Hq, L, D = queries.shape
        H = self.heads
        G = Hq // H
        dtype = queries.dtype
        ktok = parts[1] if self.key_token_scale else self.dummy_half
        vparts = parts[2 if self.key_token_scale else 1:]
        # Splits finished per KV head: the kernel's last block resets it. Two launches on
        # one cache must therefore not run at once (_attend_warp chains them).
        if self._counter_bh is None or self._counter_bh.size < B * H:
            # (At least 16 bytes: one or two KV heads' counters would sit in host memory,
            # see arrays.kernel_input, and the atomics would cross the bus.)
            self._counter_bh = kernel_input([0] * (B * H), mx.int32)
        splits, _ = warp_splits(coded, B * H, D)
        vb, vg = self.value_affine
        breg = D <= WARP_BASIS_REGISTERS and B * H * splits <= WARP_BASIS_REGISTER_BLOCKS
        sbasis = not breg and WARP_BASIS_SHARED
        layout = self._constant(mx.int32, self.key_rank, self.key_words, self.value_rank,
                                self.value_words, pos0)
        unroll_v = WARP_VALUE_UNROLL or D // 16
        pair_words, kpair, ptab, pairs_all = self._key_pairs(G, tiles=not sbasis)
        fixed = [self.perm_mx, self._constant(mx.float32, scale), self._length(coded), layout,
                 self.bfrag, parts[0], ktok, self.kbits, self.kshift,
                 self.key_mean_pairs, self.rope, *vparts, self.codebook, kpair, ptab]
        template = [("T", dtype), ("D", D), ("G", G), ("HKV", H), ("NW", WARPS),
                    ("NT", 32 * WARPS), ("RKMAX", self.key_rank), ("WKS", self.key_words),
                    ("KTS", self.key_token_scale), ("VB", vb), ("VG", vg),
                    ("MAXE", WARP_MAX_EXACT), ("MAXS", WARP_MAX_SPLITS),
                    ("ML", WARP_MERGE_LOADS), ("VHAD", self.value_back is not None),
                    ("UNROLL_NT", WARP_UNROLL or (D // 8 if D <= 64 else 4)),
                    ("UNROLL_V", unroll_v),
                    ("BREG", breg), ("SBASIS", sbasis), ("QMMA", WARP_QMMA and D % 16 == 0),
                    ("KPAIR", pair_words),
                    ("VEARLY", WARP_VALUES_EARLY and D <= 64 and unroll_v >= D // 16),
                    ("KEARLY", WARP_KEYS_EARLY),
                    ("LAZY", WARP_LAZY_MAX and WARP_QMMA and D % 16 == 0),
                    ("KPREG", WARP_KEY_PAIR_REGISTERS and 0 < pair_words <= 32768
                     and self.key_words < 64),
                    ("KPALL", WARP_KEY_PAIRS_ALL and pair_words > 0 and pairs_all),
                    ("VPAD", WARP_VALUE_PAD), ("QPAD", WARP_QUERY_PAD), ("TP", _warp_tiles(D))]
        call = dict(
            # Block 0 of each KV head takes the exact tokens, blocks 1 to splits the codes.
            grid=(32 * WARPS * (splits + 1), B * H, 1), threadgroup=(32 * WARPS, 1, 1),
            # The splits' partials and the exact tokens' in one buffer
            # (kernel_source.DECODE_WARP_BODY).
            output_shapes=[(B * H * (splits + 1) * G * (D + 2),), (B, Hq, 1, D)]
            + [(B * H * (splits + 1), 32)] * stamps,
            output_dtypes=[mx.float32, dtype] + [mx.uint32] * stamps)
        if stamps:
            call["init_value"] = 0
        kernel = _launcher(self.backend, "decode_warp_stamps" if stamps else "decode_warp",
                           template,
                           warp_dynamic_bytes(D, G, vb, vg, self.key_rank, self.key_words,
                                              pair_words)
                           if sbasis else 0)
        # The whole input list; _launch_warp fills the query (first), the exact tokens and
        # their count (fifth to third from the end) and the previous launch (last).
        inputs = [queries, *fixed, None, None, None, self._counter_bh, None]
        return kernel, inputs, call

    def combine(self, queries, scale, partials, exact):
        """Second launch: merge the splits with the exact tokens and normalise."""
        B, Hq, L, D = queries.shape
        H = self.heads
        G = Hq // H
        dtype = queries.dtype
        out, out_max, out_sum = partials
        params = self._constant(mx.float32, scale)
        ek, ev, num_exact, capacity, spectral_values, vback, vmean = self._merge_inputs(
            exact, dtype)
        cmeta = self._constant(mx.int32, num_exact, self.value_rank, capacity)
        template = [("T", dtype), ("D", D), ("G", G), ("HKV", H),
                    ("MAXS", TARGET_THREADGROUPS), ("MAXE", MAX_EXACT),
                    ("SPECV", spectral_values)]
        (result,) = _launcher(self.backend, "combine", template)(
            inputs=[queries, out, out_max, out_sum, ek, ev, vback, vmean, params, cmeta],
            grid=(D, B * H * G, 1), threadgroup=(D, 1, 1),
            output_shapes=[(B, Hq, 1, D)], output_dtypes=[dtype])
        return result

    def _exact_inputs(self, exact, dtype):
        """The exact tokens' key and value buffers in ``dtype``, their count and the
        buffers' capacity (a one-element dummy for each when there are none):
        (ek, ev, count, capacity)."""
        if exact is None:
            dummy = self.dummy_half if dtype == mx.float16 else self._constant(dtype, 0)
            return dummy, dummy, 0, 1
        ek, ev, count = exact
        if ek.dtype != dtype:
            ek, ev = ek.astype(dtype), ev.astype(dtype)
        return ek, ev, count, ek.shape[2]

    def _merge_inputs(self, exact, dtype):
        """What a merge reads besides the partials: exact key and value buffers (in
        ``dtype``), their count and capacity, and for spectral or rotated affine values
        (the output is rotated back) the rotation and mean: (ek, ev, count, capacity,
        rotated, vback, vmean)."""
        rotated = self.value_back is not None
        vback, vmean = ((self.value_back, self.value_mean) if rotated
                        else (self.dummy_float, self.dummy_float))
        return (*self._exact_inputs(exact, dtype), rotated, vback, vmean)

    def _length(self, n: int) -> mx.array:
        """An array of length ``n`` (a view of one kept buffer): kernels read n from
        its shape."""
        if self._length_view is not None and self._length_view.shape[0] == n:
            return self._length_view  # decode steps between batched appends: no new op
        if self._counter.shape[0] < n:
            self._counter = mx.zeros((max(n, 2 * self._counter.shape[0], 4096),), mx.uint8)
        self._length_view = self._counter[:n]
        return self._length_view

    def _constant(self, dtype, *values) -> mx.array:
        """A small 1-D array of ``values``, made once and reused across launches."""
        key = (dtype, values)
        if key not in self._constants:
            self._constants[key] = kernel_input(values, dtype)
        return self._constants[key]

    # ----------------------------------------------------------------- encode
    def _encode(self, x, position, pre, basis, mean, rms, full, words, token_scale):
        B, H, L, D = x.shape
        template = [("T", x.dtype), ("D", D), ("HKV", H), ("PRE", pre), ("TS", token_scale)]
        out_words, out_scale = _launcher(self.backend, "encode", template)(
            inputs=[x, self.perm_mx, self.rope, mean, basis, rms, self.ts_clamp, *full,
                    self.codebook,
                    self._length(position + 1), self._constant(mx.int32, words)],
            grid=(D * L, B * H, 1), threadgroup=(D, 1, 1),
            output_shapes=[(B, H, L, words), (B, H, L, 1)],
            output_dtypes=[mx.uint32, mx.float16])
        return (out_words, out_scale) if token_scale else (out_words,)

    def encode_keys(self, keys: mx.array, position: int):
        return self._encode(keys, position, self.pre, self.encode_basis, self.encode_mean,
                            self.key_rms, self.key_full, self.key_words, self.key_token_scale)

    def encode_values(self, values: mx.array, token_scale: bool):
        return self._encode(values, 0, False, self.value_basis_full, self.value_mean,
                            self.value_rms, self.value_full, self.value_words, token_scale)


ENTROPY_THREADS = 64  # streams (blocks of one head) per threadgroup of the entropy decoder


class EntropyKernels:
    """Entropy-coded keys (``veloxcore.entropy.EntropyKeyCoder``) coded and decoded on
    the GPU (kernel_source.ENTROPY_ENCODE_BODY / ENTROPY_DECODE_BODY), every block of
    every head at once, instead of numpy on the host (which on a GPU also waits for the
    coefficients or codes to come back). Decoding gives ``coder.decode``'s coefficients
    exactly; encoding makes the host's codes but for blocks whose modelled cost sits
    within float32 rounding of their budget (the warp sums in another order), which may
    take the neighbouring step code: valid codes either way."""

    _shared_tables: dict[int, tuple] = {}

    def __init__(self, coder, backend: str):
        from .entropy import ALPHABET, HEADER, PROB_BITS, SPAN, ZERO_BLOCK

        self.coder, self.backend = coder, backend
        tables, steps = coder.kernel_tables()
        self.tindex, self.steps = as_mx(tables), as_mx(steps)
        code = coder.code
        # The tables (~32 MB) are shared by every coder using the same CodeTables (kept
        # here with them, so that their id is not reused).
        if id(code) not in self._shared_tables:
            self._shared_tables[id(code)] = (
                code, as_mx(code.slot_step), as_mx(code.slot_symbol.reshape(-1)),
                as_mx(code.support.astype(np.int32)), as_mx(code.cost),
                as_mx(code.cum.astype(np.uint32)))
        (_, self.slot_step, self.slot_symbol, self.support, self.cost,
         self.cum) = self._shared_tables[id(code)]
        self.template = [("D", coder.dims), ("HKV", coder.heads), ("BLK", coder.block),
                         ("HEADER", HEADER), ("SPAN", SPAN), ("PBITS", PROB_BITS),
                         ("NT", ENTROPY_THREADS)]
        self.encode_template = [*self.template, ("ALPH", ALPHABET), ("ZERO", ZERO_BLOCK),
                                ("WIDTH", coder.width), ("MAXW", max(1, coder.max_words))]
        # The encoder keeps a block's coefficients, symbol ranges and words in shared
        # memory: ~36 KiB at head_dim 128, within CUDA's 48 KiB but not Metal's 32.
        self.encodes = coder.dims <= (64 if backend == "metal" else 128)
        self._first: dict[int, mx.array] = {}

    def _layout(self, position: int, length: int) -> tuple[mx.array, int]:
        """(the short first block's length as a kernel input, blocks per head)."""
        coder = self.coder
        first = coder.first_block(position, length)
        if first not in self._first:
            self._first[first] = kernel_input([first], mx.int32)
        return self._first[first], (first > 0) + (length - first) // coder.block

    def decode_with_status(self, codes: mx.array, position: int) -> tuple[mx.array, mx.array]:
        """((B, H, L, D) float32 coefficients, (streams,) int32 status) of codes (B, H,
        L, width) from absolute ``position``; a status of 1 marks a block whose codes do
        not decode (corrupt), which ``coder.decode`` would raise on."""
        B, H, L, _ = codes.shape
        first, blocks = self._layout(position, L)
        streams = max(1, B * H * blocks)
        return _launcher(self.backend, "entropy_decode", self.template)(
            inputs=[codes, self.tindex, self.steps, self.slot_step, self.slot_symbol, first],
            grid=(_cdiv(streams, ENTROPY_THREADS) * ENTROPY_THREADS, 1, 1),
            threadgroup=(ENTROPY_THREADS, 1, 1),
            output_shapes=[(B, H, L, self.coder.dims), (streams,)],
            output_dtypes=[mx.float32, mx.int32])

    def decode(self, codes: mx.array, position: int) -> mx.array:
        """Coefficients as ``decode_with_status``, unchecked: checking would wait for the
        GPU at every step. Codes come from this process's encoder or a restored state,
        which ``SpectralKVCache.restore`` checks."""
        return self.decode_with_status(codes, position)[0]

    def encode_with_status(self, y: mx.array, position: int) -> tuple[mx.array, mx.array]:
        """((B, H, L, width) uint8 codes, (streams,) int32 status) of coefficients y (B,
        H, L, D) from absolute ``position``; a status of 1 marks a block that did not fit
        even as all zeros (the host encoder raises there; it does not happen for finite
        coefficients at the widths the cache allows)."""
        B, H, L, _ = y.shape
        first, blocks = self._layout(position, L)
        streams = B * H * blocks
        return _launcher(self.backend, "entropy_encode", self.encode_template)(
            inputs=[y.astype(mx.float32), self.tindex, self.steps, self.support, self.cost,
                    self.cum, first],
            grid=(32 * streams, 1, 1), threadgroup=(32, 1, 1),
            output_shapes=[(B, H, L, self.coder.width), (streams,)],
            output_dtypes=[mx.uint8, mx.int32])

    def encode(self, y: mx.array, position: int) -> mx.array:
        return self.encode_with_status(y, position)[0]


@cache
def entropy_self_test(backend: str) -> str | None:
    """Code and decode random blocks once with ``EntropyKernels`` on ``backend``: None
    when the blocks decode on the host to close values and the GPU decodes the host's
    coefficients exactly, else what went wrong (once per process). A failure leaves
    entropy-coded keys to numpy, and the other kernels as they are."""
    from .entropy import ENTROPY_BLOCK, EntropyKeyCoder

    rng = np.random.default_rng(0)
    try:
        coder = EntropyKeyCoder(np.exp(rng.normal(0, 1.0, (2, 64))), 2.5, ENTROPY_BLOCK)
        y = mx.array(rng.normal(size=(1, 2, 92, 64)).astype(np.float32))
        gpu = EntropyKernels(coder, backend)
        codes, encoded = gpu.encode_with_status(y, 4)
        host = coder.decode(codes, 4)  # raises on codes that do not decode
        decoded, status = gpu.decode_with_status(codes, 4)
        close = float(mx.max(mx.abs(host - y)).item()) < 1.0
        same = (np.array_equal(np.array(decoded), np.array(host))
                and not np.any(np.array(status)) and not np.any(np.array(encoded)))
    except Exception as e:  # noqa: BLE001 — any failure means: do not use them
        message = str(e).splitlines()[0][:200] if str(e) else ""
        return f"{type(e).__name__}: {message}"
    if not (same and close):
        return "codes or coefficients differ from the host's"
    return None


def _warp_tile_words(D: int, value_bits: int, key_words: int) -> int:
    """Words of the warp-tiled kernel's staged key and value word buffers (two per warp;
    a token's value words padded by 4 where they are a multiple of 8: kernel_source's
    VWS)."""
    value_words = D * value_bits // 32
    value_stride = value_words + 4 if WARP_VALUE_PAD and value_words % 8 == 0 else value_words
    tokens = 16 * _warp_tiles(D)  # a buffer's
    return WARPS * 2 * ((tokens * key_words + 4) + (tokens * value_stride + 4))


def _warp_tiles(D: int) -> int:
    """16-token tiles a warp of the warp-tiled kernel takes an iteration at head_dim D
    (TP)."""
    pairs = (0 < WARP_TILE_PAIRS <= D and WARP_QMMA
             and block_shared_limit() >= TILE_PAIR_BLOCK_SHARED
             # (the doubled word buffers need dynamic shared memory past head_dim 64)
             and (D <= WARP_BASIS_REGISTERS or WARP_BASIS_SHARED))
    return 2 if pairs and not (WARP_KEYS_EARLY or WARP_VALUES_EARLY) else 1


@cache
def block_shared_limit() -> int:
    """Shared memory a block may use in all on this machine's CUDA GPU
    (BLOCK_SHARED_BY_ARCH by the compute capability MLX reports; architectures past the
    table as the last entry before them): 99 KiB where MLX does not say, the smallest
    of current cards; without a CUDA GPU (the tests' emulator, ptxas checks on a CPU
    host) an H100/H200's 227 KiB, the cards the kernels are tested on."""
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return 227 * 1024
    try:
        info = mx.device_info(mx.gpu)
    except Exception:  # (a best-effort query: MLX builds differ in what they report)
        info = {}
    major, minor = info.get("compute_capability_major"), info.get("compute_capability_minor")
    arch = info.get("architecture")
    if not isinstance(major, int) and isinstance(arch, str) and arch[:3] == "sm_" \
            and arch[3:].isdigit() and len(arch) > 4:  # (MLX writes "sm_%d%d": "sm_90")
        major, minor = int(arch[3:-1]), int(arch[-1])
    if not isinstance(major, int) or not isinstance(minor, int):
        return 99 * 1024
    known = [arch for arch in BLOCK_SHARED_BY_ARCH if arch <= (major, minor)]
    return BLOCK_SHARED_BY_ARCH[max(known)] if known else 48 * 1024


def warp_shared_bytes(D: int, G: int, value_bits: int, value_group: int, key_words: int,
                      tiles: bool = True, pair_words: int = 0) -> int:
    """Static shared memory of the warp-tiled kernel (the VX_SHARED arrays of
    kernel_source.DECODE_WARP_BODY, in their order); without the word buffers
    (``tiles=False``) where they sit in dynamic shared memory (SBASIS launches);
    ``pair_words``: the key pair table's entries (KPAIR)."""
    sbw = 16 * (D // value_group) // 2
    tiles_an_iteration = _warp_tiles(D)
    key_tiles = WARPS * 2 * (16 * tiles_an_iteration * key_words + 4)
    merge = G * WARP_MAX_EXACT + G * WARP_MAX_SPLITS + 2 * G
    words = (510 + G * D + D  # codebook table, query, perm
             # key columns (RKMAX <= D; unpacked up to 64 and with the pair table), with
             # the unused layout's one-element array (an int4 may be padded to 16 bytes)
             + (4 * D + 1 if D <= 64 or pair_words else D + 7)
             # the key pair table and its pairs' int4s (RKMAX / 2 <= D / 2), or one of each
             + (pair_words + 2 * D if pair_words else 5)
             # RoPE rows 0-15 (and the unused step's one float2), or rows 0-7 and the step
             + (16 * (D + 8) + 2 if D <= 64 else 8 * (D + 8) + D)
             + (D if tiles_an_iteration == 2 else 2)  # the second tile's 16-row step
             + D  # the key mean
             + (_warp_tile_words(D, value_bits, key_words) if tiles else 2)  # word buffers
             # staged value scales, biases, key token scales (per tile)
             + WARPS * 2 * tiles_an_iteration * (2 * sbw + 8)
             # P, warp max/sum/output (QPAD: rows of the turned query D + 8 apart)
             + WARPS * 64 + 2 * WARPS * G + WARPS * G * (D + 8 * WARP_QUERY_PAD)
             + (1 if merge <= key_tiles else merge)  # merge scratch (in the key tiles)
             + 1)  # is_last
    return 4 * words


def warp_dynamic_bytes(D: int, G: int, value_bits: int, value_group: int, rank: int,
                       key_words: int, pair_words: int = 0) -> int:
    """Dynamic shared memory of a warp-tiled launch with the basis in shared memory
    (SBASIS): the basis (2 · D · rank bytes) and the staged key and value words. A block
    may use more than 48 KiB in all only once the kernel's limit is raised, which MLX
    does only for a dynamic size above 48,000 bytes: past 48 KiB in all the request is
    padded to that (before the padded buffers, head_dim 128, 4 query heads, rank 128,
    12 key words: 21,128 static + 47,360 dynamic B, padded; ncu on the H200: 21.14 kB
    static, the static estimate within WARP_SHARED_LIMIT's margin of the compiler's;
    padded, 21,688 + 49,408, above 48,000 already). MLX sets the limit when it
    first loads a kernel, keyed by name and template arguments: the request must depend on
    nothing else (here D, G, value bits and group, RKMAX, the key words and the pair
    table's entries, all template arguments)."""
    dynamic = 2 * D * rank + 4 * _warp_tile_words(D, value_bits, key_words)
    static = warp_shared_bytes(D, G, value_bits, value_group, key_words, tiles=False,
                               pair_words=pair_words)
    if static + dynamic <= WARP_SHARED_LIMIT:
        return dynamic
    return max(dynamic, 48016)


def _b_fragments(words: np.ndarray) -> np.ndarray:
    """The key basis as mma.m16n8k16 B fragments, in the order the warp-tiled decode
    kernel loads them: ``words`` (H, D, RKMAX/2) holds fp16 pairs along the coefficient
    axis; fragment register r of lane 4·gid + tig for n-tile nt and k-step ks is the pair
    at (dim nt·8 + gid, coefficients ks·16 + 8r + 2tig, +1), laid out as
    ((h, nt, ks), lane, r): a lane's two registers side by side, one 8-byte load."""
    H, D, half = words.shape
    frags = words.reshape(H, D // 8, 8, half // 8, 2, 4)  # h, nt, gid, ks, r, tig
    return np.ascontiguousarray(frags.transpose(0, 1, 3, 2, 5, 4)).reshape(-1)


def _offsets(bits: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((bits.shape[0], 1), np.int64),
                           np.cumsum(bits, axis=1)[:, :-1]], axis=1).astype(np.int32)


def reference_partials(queries: mx.array, scale: float, keys: mx.array, values: mx.array):
    """Attention partials (out unnormalised, max, sum) of decoded keys/values: the
    pure-MLX reference of ``SpectralKernels.attend`` (and the exact tokens' part)."""
    B, Hq, L, D = queries.shape
    H = keys.shape[1]
    G = Hq // H
    q = queries.reshape(B, H, G, D).astype(mx.float32) * scale
    s = q @ keys.astype(mx.float32).swapaxes(-1, -2)  # (B, H, G, T)
    top = mx.max(s, axis=-1)
    p = mx.exp(s - top[..., None])
    out = p @ values.astype(mx.float32)
    return out.reshape(B, Hq, D), top.reshape(B, Hq), p.sum(axis=-1).reshape(B, Hq)


def merge_partials(partials, dtype) -> mx.array:
    """Combine attention partials over disjoint token sets: (B, Hq, 1, D)."""
    tops = mx.stack([p[1] for p in partials])
    top = mx.max(tops, axis=0)
    out = 0
    total = 0
    for o, m, s in partials:
        w = mx.exp(m - top)
        out = out + o * w[..., None]
        total = total + s * w
    result = out / total[..., None]
    return result[:, :, None, :].astype(dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warp_splits(coded: int, heads: int, dim: int) -> tuple[int, int]:
    """(splits per KV head, tokens per split) of a warp-tiled launch over ``coded`` tokens
    of ``heads`` (batch x KV) heads of ``dim``: splits of whole 4-warp steps of 16-token
    tiles, at least WARP_MIN_TILES (2) tiles per warp — fewer, longer splits cost less to
    start and merge than they lose in parallelism (H200, default-model shape, 4k: 1 / 2 /
    4 tiles 54 / 49 / 55 µs) — and at most WARP_MAX_SPLITS per head, within the blocks
    above (WARP_WAVE_BLOCKS up to head_dim WARP_WAVE_DIM, else WARP_TARGET_BLOCKS)."""
    step = 16 * WARPS * _warp_tiles(dim)
    if heads * WARP_MAX_SPLITS <= WARP_WAVE_BLOCKS:
        most = WARP_MAX_SPLITS
    else:
        # (WARP_WAVE_BLOCKS=0, the choice before one wave, aims at WARP_TARGET_BLOCKS)
        wave = dim <= WARP_WAVE_DIM and WARP_WAVE_BLOCKS > 0
        target = WARP_WAVE_BLOCKS if wave else WARP_TARGET_BLOCKS
        most = min(WARP_MAX_SPLITS, _cdiv(target, heads))
    splits = max(1, min(_cdiv(coded, WARP_MIN_TILES * 16 * WARPS), most))
    per_split = _cdiv(_cdiv(coded, splits), step) * step
    return _cdiv(coded, per_split), per_split
