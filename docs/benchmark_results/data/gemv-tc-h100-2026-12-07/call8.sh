#!/usr/bin/env bash
# GPU call: gemv_tc v2 (prefetch, NT=1|2): bitwise test, micro bench and verify curve A/B (TC off, NT1, NT2),
# model verify test; llama-bench build in the background (nice), then peer rows with the time left.
set -uo pipefail
cd "$(dirname "$0")/.."
R=$PWD; O=${OUT:-/tmp/out}; mkdir -p $O/peer; T0=$(date +%s)
orig=$(cat .gpu/ROOT); [[ $orig != "$R" && ! -e $orig ]] && { mkdir -p "$(dirname "$orig")"; ln -s "$R" "$orig"; }
el() { echo $(( $(date +%s)-T0 )); }
echo "commit $(cat .gpu/COMMIT)"; nvidia-smi --query-gpu=name --format=csv,noheader
ROWS="qwen3-30b-a3b-q4_0 qwen3-8b-mlx-q4g64 qwen3-30b-a3b-mlx-q4g64 qwen3-8b-q4_k_m qwen3-0.6b-bf16"
( OUT=$O/peer ROUNDS=1 REPS=5 STOP_AFTER_S=1 FUSEBOX_COMMIT=$(cat .gpu/COMMIT) nice -n 19 timeout 400 scripts/peer-bench.sh gpu $ROWS > $O/peer-build.log 2>&1; echo "build rc=$? at $(el) s" >> $O/peer-build.log ) &
BPID=$!
export FUSEBOX_REQUIRE_CUDA=1 PATH=$R/.gpu/bin:$PATH
bin() { grep "^$1-" .gpu/tests/MANIFEST | head -1; }
runt() { local b=$1 d=$2 log=$3; shift 3
  (cd $d && timeout 150 $R/.gpu/tests/$b "$@" > $O/$log 2>&1; echo "$b $* rc=$? $(grep -E '^test result' $O/$log | tail -1) at $(el) s"); grep -E "panicked|FAILED" $O/$log | head -5; }
read -r GB GD < <(bin cuda_gemv)
read -r VB VD < <(bin cuda_verify)
for nt in 1 2; do FUSEBOX_GEMV_TC_NT=$nt runt $GB $GD tc-test-$nt.log gemv_tc_rows --test-threads 1; done
for cfg in "0 1" "1 1" "1 2"; do set -- $cfg
  FUSEBOX_GEMV_TC=$1 FUSEBOX_GEMV_TC_NT=$2 FUSEBOX_BENCH_ONLY="4-bit g64" FUSEBOX_BENCH_M=1,2,4,8,16 runt $GB $GD bw-$1-$2.log cuda_gemv_bandwidth --ignored --nocapture --test-threads 1
  echo "== TC=$1 NT=$2"; grep -E "m +[0-9]+ " $O/bw-$1-$2.log | sed 's/ \+/ /g'
done
for round in 1 2; do for cfg in "0 1" "1 1" "1 2"; do set -- $cfg
  FUSEBOX_GEMV_TC=$1 FUSEBOX_GEMV_TC_NT=$2 timeout 120 fusebox bench --device cuda --synthetic qwen3-8b --quant q4g64 --prompt-len 512 --gen 32 --reps 1 --verify-curve 16 --out-dir $O/vc > $O/vc-$1-$2-r$round.log 2>&1
  echo "vc TC=$1 NT=$2 r$round: $(grep -E 'verify +(1|2|4|8|9|16|17) rows' $O/vc-$1-$2-r$round.log | awk '{print $2":"$(NF-4)}' | tr '\n' ' ') at $(el) s"
done; done
for nt in 1 2; do FUSEBOX_GEMV_TC=1 FUSEBOX_GEMV_TC_NT=$nt runt $VB $VD verify-tc-$nt.log --test-threads 1; done
unset FUSEBOX_REQUIRE_CUDA
wait $BPID; tail -3 $O/peer-build.log
left=$(( ${MAXT:-480} - $(el) )); echo "peer rows with $left s left"
OUT=$O/peer ROUNDS=1 REPS=5 STOP_AFTER_S=$(( left - 150 )) FUSEBOX_COMMIT=$(cat .gpu/COMMIT) timeout $left scripts/peer-bench.sh gpu $ROWS > $O/peer-run.log 2>&1
echo "peer rc=$? at $(el) s"; grep -E "done at|stopped|rows left|measured already|total" $O/peer-run.log | tail -8
cat $O/peer/peer-gpu.md 2>/dev/null | grep "^|" | head -12
mkdir -p $O/logs; mv $O/*.log $O/logs/ 2>/dev/null; tar czf $O/logs.tar.gz -C $O logs && rm -rf $O/logs $O/vc
