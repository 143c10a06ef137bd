#!/usr/bin/env bash
# bash benchmarks/ncu_e2e.sh [TOKENS] — on the lent GPU, MLX CUDA on the path.
# Kernel durations inside a real decode step (default-model shape, 4k tokens): the fused
# attention kernel vs fp16 SDPA, and the whole step's kernels by name.
set -u
export PYTHONPATH=/root/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
for spec in "fp16:regex:sdpa|attention|flash" "spectral-vh:regex:velox"; do
  m=${spec%%:*}; k=${spec#*:}
  echo "== $m ($k)"
  $NCU --clock-control none --kernel-name "$k" --launch-skip 200 --launch-count 6 --section SpeedOfLight --section LaunchStats --section Occupancy --print-summary none \
    python3 benchmarks/decode.py --shapes smollm2 --contexts ${1:-4096} --methods $m --parts end_to_end --decode-tokens 8 --out /tmp/n-$m 2>&1 \
    | grep -E "^  [a-z_]|velox|sdpa|Duration|Registers Per|Achieved Occupancy|Block Size|Grid Size|Memory Throughput|Compute \(SM\) Throughput" | head -60
done
