#!/usr/bin/env bash
# Nsight Compute profile of the fused decode kernel (8B shape, one layer, 64k tokens).
#   bash benchmarks/ncu_decode.sh OUT_DIR [SHAPE] [TOKENS]
# Needs MLX CUDA on the path (run on the lent H100/H200). Writes ncu.txt (speed of light,
# launch, occupancy, warp stalls, scheduler, memory, instruction mix, hottest source lines).
set -euo pipefail
out=${1:?output folder}; shape=${2:-8b}; tokens=${3:-65536}
mkdir -p "$out"
ncu --clock-control none --kernel-name regex:velox_decode --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \
  --section SourceCounters --print-summary none \
  python3 benchmarks/profile_decode.py --shape "$shape" --tokens "$tokens" --reps 3 \
  > "$out/ncu-$shape-$tokens.txt" 2>&1 || true
grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Local|Stall|Issued|Block Limit|Shared Memory Config|Executed Ipc|Memory Throughput|Compute \(SM\)" \
  "$out/ncu-$shape-$tokens.txt" | head -60
