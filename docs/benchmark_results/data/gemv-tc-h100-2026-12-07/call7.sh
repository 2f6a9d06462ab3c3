#!/usr/bin/env bash
# GPU call: gemv_tc (4-bit int_dot rows 2-16 on tensor cores) bitwise test, verify-curve A/B, micro bench,
# then every CUDA test binary at the defaults until the time is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
R=$PWD; O=${OUT:-/tmp/out}; mkdir -p $O; T0=$(date +%s)
orig=$(cat .gpu/ROOT); [[ $orig != "$R" && ! -e $orig ]] && { mkdir -p "$(dirname "$orig")"; ln -s "$R" "$orig"; }
el() { echo $(( $(date +%s)-T0 )); }
echo "commit $(cat .gpu/COMMIT)"; nvidia-smi --query-gpu=name --format=csv,noheader
export FUSEBOX_REQUIRE_CUDA=1 PATH=$R/.gpu/bin:$PATH
bin() { grep "^$1-" .gpu/tests/MANIFEST | head -1; }
runt() { # name dir log args...
  local b=$1 d=$2 log=$3; shift 3
  (cd $d && timeout 150 $R/.gpu/tests/$b "$@" > $O/$log 2>&1; echo "$b $* rc=$? $(grep -E '^test result' $O/$log | tail -1) at $(el) s"); grep -E "panicked|FAILED" $O/$log | head -5; }
read -r GB GD < <(bin cuda_gemv)
runt $GB $GD t-gemv-tc.log gemv_tc_rows --test-threads 1 --nocapture
for v in 0 1 0 1; do
  FUSEBOX_GEMV_TC=$v timeout 120 fusebox bench --device cuda --synthetic qwen3-8b --quant q4g64 --prompt-len 512 --gen 32 --reps 1 --verify-curve 16 --out-dir $O/vc$v > $O/vc-$v-$(el).log 2>&1
  echo "verify curve GEMV_TC=$v rc=$? at $(el) s"
done
for f in $O/vc-*.log; do echo "== $f"; grep -iE "rows|verify|decode|x " $f | head -30; done
read -r VB VD < <(bin cuda_verify)
FUSEBOX_GEMV_TC=1 runt $VB $VD t-verify-tc.log --test-threads 1
for v in 0 1; do
  FUSEBOX_GEMV_TC=$v FUSEBOX_BENCH_ONLY="4-bit g64" FUSEBOX_BENCH_M=1,2,4,8,16 runt $GB $GD bw-$v.log cuda_gemv_bandwidth --ignored --nocapture --test-threads 1
  grep -E "m +[0-9]+ " $O/bw-$v.log
done
while read -r b dir; do
  left=$(( 585 - $(el) )); (( left < 20 )) && { echo "no time for $b"; continue; }
  args=(); [[ $b == fusion_parity-* ]] && args=(cuda)
  (cd $dir && timeout $left $R/.gpu/tests/$b "${args[@]}" --test-threads 1 > $O/t-$b.log 2>&1; echo "$b rc=$? $(grep -E '^test result' $O/t-$b.log | tail -1) at $(el) s")
  grep -E "panicked|FAILED" $O/t-$b.log | head -5
done < <(grep -E "^(cuda_gemv|cuda_qmm|cuda_fused|cuda_ops|cuda_attention|cuda_moe_sample|fusion_parity|cuda_models|cuda_dflash|cuda_compile)-" .gpu/tests/MANIFEST)
