#!/usr/bin/env bash
# Nsight Compute summary of the warp-tiled decode kernel (one launch after two warm-ups) for
# several shapes, plus per-SASS-instruction counts for the default model's shape at 64k.
#   bash benchmarks/ncu_warp.sh OUT_DIR [SHAPE:TOKENS ...]
# Needs MLX CUDA on the path (the lent H100/H200). Writes ncu-SHAPE-TOKENS.txt (launch,
# occupancy, warp stalls, scheduler, instruction counts) and sass-smollm2-65536.csv.
set -u
out=${1:?output folder}; shift
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-}:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
for st in ${@:-smollm2:65536 1b:65536 8b:65536 smollm2:4096}; do
  s=${st%%:*}; t=${st##*:}
  "$NCU" --clock-control none --kernel-name regex:velox_decode_warp --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --print-summary none \
    python3 benchmarks/profile_decode.py --shape "$s" --tokens "$t" --reps 3 > "$out/ncu-$s-$t.txt" 2>&1
  echo "== $s $t"
  grep -E "Duration|Registers Per|Theoretical Occupancy|Achieved Occupancy|Executed Ipc Active|Issue Slots Busy|No Eligible|Executed Instructions  |Block Limit Registers|Block Limit Shared" \
    "$out/ncu-$s-$t.txt" | head -14
done
"$NCU" --clock-control none --kernel-name regex:velox_decode_warp --launch-skip 2 --launch-count 1 \
  --section SourceCounters --section WarpStateStats --import-source no --page source --print-source sass --csv \
  python3 benchmarks/profile_decode.py --shape smollm2 --tokens 65536 --reps 3 > "$out/sass-smollm2-65536.csv" 2>&1
