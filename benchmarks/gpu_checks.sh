#!/usr/bin/env bash
# One GPU session's checks, in the order they matter (run on the lent H100/H200 after
# staging MLX CUDA and the default model: ../shared/device/prepare-mlx-cuda.sh --with-model).
#   bash benchmarks/gpu_checks.sh OUT_DIR [smoke|tests|decode|e2e|phases|scores|hostcost|kernel-ab|variants|stalls|quality]...
#   (default: tests, decode, quality)
# smoke:   seconds: the kernel self-test and 70 fused decode steps against the reference
# tests:   the fused kernels against the pure-MLX reference (tests/test_kernels.py)
# decode:  benchmarks/decode.py on 1B/8B/default-model shapes, 1k-64k
# e2e:     whole decode steps, fp16 and spectral interleaved (decode.py --interleave),
#          spectral also coding decoded tokens 64 at a time (-ab64)
# phases:  the warp-tiled kernel's per-phase timestamps (set-up, tiles, the last block's
#          merge) for the default model's and the 8B shape at 16k and 64k
# scores:  the warp-tiled kernel's scores on tensor cores (the default) and as FMAs
#          (VELOX_WARP_QMMA=0): their test on the GPU, then Nsight Compute of the FMA
#          build against the default
# hostcost: a launch's host cost: mx.fast.cuda_kernel's call against its arguments and text
#          (and #included texts), one layer's fused attend against SDPA, and a step's
#          attention over every layer (default-model and 1B shapes at 16k)
# kernel-ab: Nsight Compute of the warp-tiled kernel alone, this tree against BASE (a folder
#          holding another commit's veloxcore/ and benchmarks/, e.g. `git archive C
#          veloxcore benchmarks assets/bundles | tar -x -C DIR`), in one lease
# variants: the warp-tiled kernel's defaults turned off or back (tile pairs at head_dim
#          128, and their two blocks an SM; padded buffers, launch bounds for three blocks
#          an SM, KPALL, 2,048 table entries) and tile pairs at head_dim 64 too, against
#          the default: gpu_smoke.py with tile pairs at 64, then spans by timestamps
#          (warp_variants.py; default-model, 1B and 8B shapes at 16k and 64k; VARIANTS=a,b
#          picks others)
# stalls:  where the 1B shape's kernel at 64k waits: Nsight Compute SASS counters and warp
#          stall reasons (ncu_warp.sh SASS_SHAPE=1b:65536, then sass_summary.py)
# quality: the 8k sweep of the default configuration and its neighbours at <= 3.5 bits
#          (QUALITY_METHODS overrides the list)
set -euo pipefail
out=${1:?output folder}; shift
parts=${*:-tests decode quality}
mkdir -p "$out"
# The current default, the adaptive key plan (+ad) and Hadamard-rotated values (+vh)
# and their neighbours at <= 3.5 bits.
QUALITY_METHODS=${QUALITY_METHODS:-fp16,affine4,spectral:wf3/a4g64+tf0.7+qa,\
spectral:wf3/a4g64+tf0.7+qa+ad+x1.5,spectral:wf3/a4g64+tf0.7+qa+ad+x1.5+vh,\
spectral:wf3/a4g64+tf0.7+qa+vh,spectral:wf2.5/a4g64+tf0.7+qa+ad+x1.5+vh,\
spectral:wf2.5/a4g64+qa+ad+x1.5+vh,spectral:wf2/a4g64+tf0.7+qa+ad+x1.5+vh,\
spectral:wf3/a3g64+qa+ad+x1.5+vh,spectral:wf3.5/a4g64+tf0.7+qa+ad+x1.5+vh,\
spectral:wf4/a4g64+tf0.7+qa+ad+x1.5+vh}
export PYTHONUNBUFFERED=1
for part in $parts; do
  case $part in
    smoke)
      python3 benchmarks/gpu_smoke.py | tee "$out/smoke.txt" ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not emulated" \
        2>&1 | tee "$out/tests.txt" | tail -5 ;;
    decode)
      python3 benchmarks/decode.py --shapes smollm2,1b,8b --contexts 1024,4096,16384,65536 \
        --methods fp16,affine4,spectral --reps 30 --out "$out/decode" | grep -v '^{' ;;
    e2e)  # end to end, methods interleaved in 64-step blocks, paired against fp16
      python3 benchmarks/decode.py --shapes smollm2,1b,8b --contexts 8192,16384,65536 \
        --methods fp16,spectral-vh,spectral-vh-ab64 --parts end_to_end --interleave 64 \
        --blocks 8 \
        --out "$out/e2e" | grep -v '^{' ;;
    phases)
      python3 benchmarks/warp_phases.py --shapes smollm2,8b --contexts 16384,65536 \
        --out "$out/phases" ;;
    scores)
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "scores" \
        2>&1 | tee "$out/tests-scores.txt" | tail -3
      NO_SASS=1 VARIANT="fma VELOX_WARP_QMMA=0" bash benchmarks/ncu_warp.sh "$out/scores" \
        smollm2:16384 1b:65536 8b:16384 ;;
    hostcost)
      python3 benchmarks/kernel_call_cost.py | tee "$out/kernel-call-cost.txt"
      python3 benchmarks/host_cost_probe.py --tokens 16384 | cut -c1-400 \
        | tee "$out/host-cost.txt"
      for shape in smollm2 1b; do
        python3 benchmarks/layer_chain.py --shape $shape --tokens 16384 \
          --methods fp16,fp16+nop,spectral-vh --json "$out/layer-chain-$shape.json"
      done ;;
    kernel-ab)
      NO_SASS=1 BASE=${BASE:?kernel-ab needs BASE=DIR} bash benchmarks/ncu_warp.sh "$out/ab" \
        smollm2:16384 smollm2:65536 1b:65536 8b:16384 \
        | grep -E "^==|Duration|Executed Instructions  |Registers Per" ;;
    variants)  # (first the smoke check with the off-by-default flags on)
      VELOX_WARP_TILE_PAIRS=64 python3 benchmarks/gpu_smoke.py | tee "$out/smoke-flags.txt"
      python3 benchmarks/warp_variants.py --shapes smollm2,1b,8b --contexts 16384,65536 \
        --variants ${VARIANTS:-base,no-tile-pairs,tile-pairs,tile-pairs-mb3,no-pads,no-launch-bounds,no-kpall,key-pairs2048} \
        --rounds 2 \
        --out "$out/variants" | grep -v '^{' ;;
    stalls)
      # (shared-memory loads and their bank conflicts: the tile's codebook and pair-table
      # lookups are data-dependent addresses)
      NCU_METRICS=l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,sass__inst_executed_shared_loads.sum \
        SASS_SHAPE=1b:65536 bash benchmarks/ncu_warp.sh "$out/stalls" 1b:65536
      python3 benchmarks/sass_summary.py "$out/stalls/sass-1b-65536.csv" --tiles 32768 \
        | tee "$out/stalls/summary.txt" | head -60 ;;
    quality)
      python3 benchmarks/quality.py --model /root/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --bundle assets/bundles/smollm2-135m-instruct-pre --ctx 8192 --decode-tokens 16 \
        --methods "$QUALITY_METHODS" \
        --out "$out/quality" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
