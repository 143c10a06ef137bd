#!/usr/bin/env bash
# Nsight Compute summary of the warp-tiled decode kernel (one launch after two warm-ups) for
# several shapes, plus per-SASS-instruction counts for the default model's shape at 64k.
#   bash benchmarks/ncu_warp.sh OUT_DIR [SHAPE:TOKENS ...]
#   BASE=DIR bash benchmarks/ncu_warp.sh OUT_DIR ...  # also the tree in DIR (e.g. a `git
#                                                    # archive` of an earlier commit), A/B
#   VARIANT="NAME VAR=VALUE ..." ...                 # also this tree with those variables
#   SASS_SHAPE=1b:65536 ...  # the SASS counters (and stall reasons) of another shape
#   NCU_METRICS=a.sum,b.sum ...  # also these metrics (e.g. shared-memory bank conflicts)
# Needs MLX CUDA on the path (the lent H100/H200). Writes ncu-TAG-SHAPE-TOKENS.txt (launch,
# occupancy, warp stalls, scheduler, instruction counts; TAG new, base or NAME) and, unless
# NO_SASS=1, sass-SHAPE-TOKENS.csv for SASS_SHAPE (default smollm2:65536; summarise it:
# python benchmarks/sass_summary.py CSV).
set -u
out=${1:?output folder}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
site=${PYTHONPATH:-}

run() {  # TAG ROOT SHAPE TOKENS [VAR=VALUE ...]
  local tag=$1 root=$2 s=$3 t=$4; shift 4
  # The tree first: a PYTHONPATH that already names this checkout must not make the BASE
  # run profile this tree's kernel (it did once: both rows were the new kernel).
  env "$@" PYTHONPATH="$root:$root/benchmarks:$site" "$NCU" --clock-control none \
    --kernel-name regex:velox_decode_warp --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --print-summary none \
    ${NCU_METRICS:+--metrics "$NCU_METRICS"} \
    python3 "$root/benchmarks/profile_decode.py" --shape "$s" --tokens "$t" --reps 3 \
    > "$out/ncu-$tag-$s-$t.txt" 2>&1
  echo "== $tag $s $t $*"
  grep -E "^    Duration|Registers Per|Theoretical Occupancy|Achieved Occupancy|Executed Ipc Active|Issue Slots Busy|No Eligible|Executed Instructions  |Block Limit Registers|Block Limit Shared|Dynamic Shared|bank_conflicts|wavefronts_mem_shared|shared_loads" \
    "$out/ncu-$tag-$s-$t.txt" | head -20
}

for st in ${@:-smollm2:65536 1b:65536 8b:65536 smollm2:4096}; do
  s=${st%%:*}; t=${st##*:}
  if [ -n "${BASE:-}" ]; then run base "$BASE" "$s" "$t"; fi
  run new "$PWD" "$s" "$t"
  if [ -n "${VARIANT:-}" ]; then
    # shellcheck disable=SC2086  # the variant's words are its name and its variables
    run $(echo "$VARIANT" | cut -d' ' -f1) "$PWD" "$s" "$t" $(echo "$VARIANT" | cut -d' ' -f2-)
  fi
done
if [ "${NO_SASS:-0}" != 1 ]; then
  sass=${SASS_SHAPE:-smollm2:65536}
  PYTHONPATH="$PWD:$PWD/benchmarks:$site" "$NCU" --clock-control none \
    --kernel-name regex:velox_decode_warp --launch-skip 2 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --import-source no --page source \
    --print-source sass --csv \
    python3 benchmarks/profile_decode.py --shape "${sass%%:*}" --tokens "${sass##*:}" --reps 3 \
    > "$out/sass-${sass%%:*}-${sass##*:}.csv" 2>&1
fi
