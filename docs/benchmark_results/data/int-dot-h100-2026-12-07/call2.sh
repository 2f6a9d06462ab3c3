#!/usr/bin/env bash
# call 2 (session 2026-12-07e): int_dot on CUDA: correctness, GEMV bandwidth A/B, decode A/B; then cuda_qmm
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}; mkdir -p $O
echo "commit $(cat .gpu/COMMIT)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
T0=$(date +%s)
bash .gpu/run.sh test cuda_gemv > $O/t-gemv.log 2>&1; echo "cuda_gemv rc=$?"; grep -E "test result|worst|panicked" $O/t-gemv.log | head -20
echo "tests $(( $(date +%s)-T0 )) s"
GB=$(ls .gpu/tests/cuda_gemv-*)
for round in 1 2; do
  for d in 0 1; do
    FUSEBOX_BENCH_ALL=1 FUSEBOX_BENCH_M=1,8 FUSEBOX_FUSED_INT_DOT=$d FUSEBOX_REQUIRE_CUDA=1 timeout 100 $GB --ignored cuda_gemv_bandwidth --nocapture --test-threads 1 > $O/bw-int$d-$round.log 2>&1
    echo "== bw INT=$d round $round"; grep -E "4-bit|8-bit|copy bandwidth" $O/bw-int$d-$round.log | head -30
  done
  [[ $(( $(date +%s)-T0 )) -gt 200 ]] && break
done
echo "at $(( $(date +%s)-T0 )) s"
export PATH=$PWD/.gpu/bin:$PATH
for round in 1 2; do
  for spec in "qwen3-8b q4g64" "qwen3-30b-a3b q4g64" "qwen3-8b q8g64"; do
    set -- $spec
    [[ $round == 2 && $2 == q8g64 ]] && continue
    [[ $round == 2 && $1 == qwen3-30b-a3b ]] && continue
    for d in 0 1; do
      FUSEBOX_FUSED_INT_DOT=$d timeout 100 fusebox bench --device cuda --synthetic $1 --quant $2 --prompt-len 128 --gen 128 --reps 3 --out-dir /tmp/b > $O/bench-$1-$2-int$d-$round.txt 2>&1
      echo "$1 $2 INT=$d r$round: $(grep -E '^decode' $O/bench-$1-$2-int$d-$round.txt | head -1)"
    done
  done
done
echo "at $(( $(date +%s)-T0 )) s"
bash .gpu/run.sh test cuda_qmm > $O/t-qmm.log 2>&1; echo "cuda_qmm default rc=$?"; grep "test result" $O/t-qmm.log
echo "at $(( $(date +%s)-T0 )) s"
