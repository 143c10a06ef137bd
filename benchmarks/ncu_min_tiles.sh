#!/usr/bin/env bash
# bash benchmarks/ncu_min_tiles.sh [TOKENS] [VALUES] — the warp-tiled decode kernel's
# duration inside decode steps (default-model shape) for several VELOX_WARP_MIN_TILES.
set -u
export PYTHONPATH=/root/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
for n in ${2:-1 2 4}; do
  echo "== VELOX_WARP_MIN_TILES=$n"
  VELOX_WARP_MIN_TILES=$n $NCU --clock-control none --kernel-name regex:velox_decode --launch-skip 200 --launch-count 3 --section SpeedOfLight --section LaunchStats --print-summary none \
    python3 benchmarks/decode.py --shapes smollm2 --contexts ${1:-4096} --methods spectral-vh --parts end_to_end --decode-tokens 8 --out /tmp/t-$n 2>&1 \
    | grep -E "Duration|Grid Size" | head -6
done
