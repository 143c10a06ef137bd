"""The card's own rates for the work a pre-RoPE spectral decode kernel cannot avoid, and
what they make of issue #6's attention targets.

    python benchmarks/tensor_floor.py [--json OUT]

Measures on the GPU (MLX CUDA, `mx.fast.cuda_kernel`), each as extra work over extra time
between two loop lengths so launch costs cancel:
- `mma.sync.m16n8k16` with fp16 inputs and fp32 accumulation (what the warp-tiled kernel
  issues; Hopper's full tensor-core rate needs `wgmma`, which has no Metal counterpart),
  per SM and clock;
- warp instructions per SM and clock for independent FFMA chains (the issue rate of the
  scalar work: RoPE, token scale and mean, the query products, code extraction).
Then, per benchmark shape and context, a lower bound on the kernel's time from the
layout decode.py measures (every dim coded: water-filled 3-bit keys of the default
model's spectrum leave no dim at 0 bits), next to cuDNN's measured time
(`results-ncu-attention-h200.json`) and the targets' times:
- tensor: per 16-token tile and KV head, (D/8)·(R/16) mma to rebuild the keys and D/8 for
  probabilities × values;
- scalar: per tile, per rebuilt key element RoPE (2) and token scale and mean (1), per
  coefficient its extraction (3), per value element its dequantisation (2) —
  instructions a lane cannot skip, counted generously low. The G query products are
  left out of both terms: a kernel may do them in scalar FMAs (G per key element, as the
  warp-tiled kernel does) or on tensor cores (D/16 more mma per tile), and either way
  the bound holds;
- the floor is the larger of the two (perfect overlap, no set-up, no merge, no memory
  stalls): a lower bound for any kernel on this card with this format.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
SHAPES = {"smollm2": (3, 3, 64), "1b": (8, 4, 64), "8b": (8, 4, 128)}  # KV heads, G, D

MMA_SOURCE = """
unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
unsigned int a0 = seed[0] ^ t, a1 = seed[1], a2 = seed[2] ^ t, a3 = seed[3];
unsigned int b0 = seed[4], b1 = seed[5] ^ t;
float c[CH][4];
for (int j = 0; j < CH; ++j) { c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.0f; }
int n = iters[0];
for (int i = 0; i < n; ++i) {
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[j][0]), "+f"(c[j][1]), "+f"(c[j][2]), "+f"(c[j][3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
float s = 0.0f;
for (int j = 0; j < CH; ++j) { s += c[j][0] + c[j][1] + c[j][2] + c[j][3]; }
out[t] = s;
"""

FMA_SOURCE = """
unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
float a = __uint_as_float(seed[0]) , b = __uint_as_float(seed[1]);
float x[CH];
for (int j = 0; j < CH; ++j) { x[j] = (float)(t + j); }
int n = iters[0];
for (int i = 0; i < n; ++i) {
#pragma unroll
  for (int j = 0; j < CH; ++j) { x[j] = fmaf(x[j], a, b); }
}
float s = 0.0f;
for (int j = 0; j < CH; ++j) { s += x[j]; }
out[t] = s;
"""

CHAINS = 8
THREADS = 128
BLOCKS_PER_SM = 8


def sm_count(name: str, override: int | None) -> int:
    if override:
        return override
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("multi_processor_count", "num_sms", "sm_count"):
        if key in info:
            return int(info[key])
    if "H100" in name and "PCIe" in name:
        return 114
    if "H100" in name or "H200" in name:  # SXM boards
        return 132
    raise SystemExit(f"unknown SM count for {name!r}: pass --sms")


def sm_clock_mhz() -> tuple[float, float]:
    """(current, max) SM clock from nvidia-smi, MHz."""
    q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True,
                       check=True).stdout.split("\n")[0]
    cur, top = (float(x) for x in q.split(","))
    return cur, top


def device_name() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True).stdout.strip()


def rate(source: str, sms: int, reps: int) -> float:
    """Operations (one mma or one FFMA per thread-chain step, counted per warp) per
    microsecond on the whole card: extra work / extra time between two loop lengths."""
    kernel = mx.fast.cuda_kernel(name=f"floor_{abs(hash(source)) % 10**8}",
                                 input_names=["seed", "iters"], output_names=["out"],
                                 source=source)
    seed = mx.array([0x3C003C00, 0x3C003C00, 0x3C003C00, 0x3C003C00, 0x3C003C00,
                     0x3C003C00], dtype=mx.uint32)
    threads = sms * BLOCKS_PER_SM * THREADS

    def seconds(n: int) -> float:
        it = mx.array([n], dtype=mx.int32)
        times = []
        for _ in range(reps):
            mx.synchronize()
            t0 = time.perf_counter()
            (out,) = kernel(inputs=[seed, it], template=[("CH", CHAINS)],
                            grid=(threads, 1, 1), threadgroup=(THREADS, 1, 1),
                            output_shapes=[(threads,)], output_dtypes=[mx.float32])
            mx.eval(out)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    short, long = 2000, 20000
    seconds(short)  # compile, warm up
    dt = seconds(long) - seconds(short)
    warps = threads // 32
    return warps * CHAINS * (long - short) / (dt * 1e6)


def floors(mma_per_us: float, inst_per_us: float, cudnn: dict) -> list[dict]:
    rows = []
    for shape, (H, _queries_per_head, D) in SHAPES.items():
        R = D  # every dim coded (see the docstring)
        for tokens in (4096, 16384, 65536):
            tiles = tokens // 16 * H
            mma = tiles * (D // 8) * (R // 16 + 1)
            lane_ops = 16 * D * 3 + 16 * R * 3 + 16 * D * 2  # per tile (see the docstring)
            inst = tiles * lane_ops / 32
            tensor_us, scalar_us = mma / mma_per_us, inst / inst_per_us
            floor_us = max(tensor_us, scalar_us)
            fp16 = cudnn.get((shape, tokens))
            target = None if fp16 is None else fp16 / (2.0 if tokens >= 16384 else 1.0)
            code_bytes = tokens * H * (D * 3 / 8 + 2 + D / 2 + 4 * D / 64)  # keys, scale, values
            rows.append(dict(shape=shape, tokens=tokens, tensor_us=tensor_us,
                             scalar_us=scalar_us, floor_us=floor_us, cudnn_us=fp16,
                             target_us=target,
                             floor_vs_target=None if target is None else floor_us / target,
                             bandwidth_at_floor_tb_s=code_bytes / floor_us / 1e6))
    return rows


def cudnn_times() -> dict:
    """cuDNN's fp16 SDPA kernel time per (shape, tokens), Nsight Compute (ncu_attention.py)."""
    rows = json.loads((HERE / "results-ncu-attention-h200.json").read_text())
    return {(r["shape"], int(r["tokens"])): float(r["fp16_us"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-json", type=Path, default=None,
                    help="recompute the floors from a saved run's rates (no GPU)")
    ap.add_argument("--sms", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.from_json:
        result = json.loads(a.from_json.read_text())
        result["rows"] = floors(result["mma_per_us"], result["ffma_warp_inst_per_us"],
                                cudnn_times())
        for r in result["rows"]:
            print(json.dumps(r))
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        return
    name = device_name()
    sms = sm_count(name, a.sms)
    clock_before = sm_clock_mhz()
    mma_us = rate(MMA_SOURCE, sms, a.reps)
    fma_us = rate(FMA_SOURCE, sms, a.reps)
    clock_after = sm_clock_mhz()
    mhz = max(clock_before[0], clock_after[0])  # a sample may catch the card idling
    per_sm_clock = lambda r: r / sms / mhz  # noqa: E731  (per µs -> per SM per clock)
    result = dict(device=name, sms=sms, sm_clock_mhz=[clock_before, clock_after],
                  mma_per_us=mma_us, mma_per_sm_clock=per_sm_clock(mma_us),
                  ffma_warp_inst_per_us=fma_us, ffma_warp_inst_per_sm_clock=per_sm_clock(fma_us),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        result["rows"] = floors(mma_us, fma_us, cudnn_times())
    except (OSError, KeyError, ValueError) as e:
        result["rows_error"] = repr(e)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    for r in result.get("rows", []):
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
