#!/usr/bin/env bash
# next session's first GPU call: the model-level parity gate for CUDA int_dot, then H200/H100 decode A/B.
# Pack: on main, ../shared/tools/gpu-pack; keep tests fusion_parity|cuda_models|cuda_verify|cuda_gemv|cuda_fused;
# copy this script into .gpu; tar cJf .gpu.tar.xz .gpu; run: rm -rf .gpu && tar xJf .gpu.tar.xz && bash .gpu/call3.sh
set -uo pipefail
cd "$(dirname "$0")/.."
R=$PWD; O=${OUT:-/tmp/out}; mkdir -p $O
export FUSEBOX_REQUIRE_CUDA=1
orig=$(cat .gpu/ROOT); [[ $orig != "$R" && ! -e $orig ]] && { mkdir -p "$(dirname "$orig")"; ln -s "$R" "$orig"; }
echo "commit $(cat .gpu/COMMIT)"; nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s)
# NOTE: run.sh test FILTER filters test names; run binaries directly from their crate dir
(cd crates/fusebox-engine && timeout 200 $R/.gpu/tests/fusion_parity-* cuda --nocapture --test-threads 1 > $O/parity.log 2>&1; echo "fusion_parity cuda rc=$?")
grep -E "int_dot|all fused|test result|panicked" $O/parity.log | head -20
(cd crates/fusebox-engine && FUSEBOX_FUSED_INT_DOT=1 timeout 150 $R/.gpu/tests/cuda_models-* > $O/models-int.log 2>&1; echo "cuda_models INT=1 rc=$?")
grep -E "test result|panicked" $O/models-int.log
(cd crates/fusebox-core && FUSEBOX_FUSED_INT_DOT=1 timeout 150 $R/.gpu/tests/cuda_fused-* > $O/fused-int.log 2>&1; echo "cuda_fused INT=1 rc=$?")
grep -E "test result|panicked" $O/fused-int.log
(cd crates/fusebox-engine && FUSEBOX_FUSED_INT_DOT=1 timeout 150 $R/.gpu/tests/cuda_verify-* > $O/verify-int.log 2>&1; echo "cuda_verify INT=1 rc=$?")
grep -E "test result|panicked" $O/verify-int.log
echo "at $(( $(date +%s)-T0 )) s"
export PATH=$R/.gpu/bin:$PATH
for round in 1 2; do
  for spec in "qwen3-8b q4g64" "qwen3-30b-a3b q4g64"; do
    set -- $spec
    for d in 0 1; do
      FUSEBOX_FUSED_INT_DOT=$d timeout 100 fusebox bench --device cuda --synthetic $1 --quant $2 --prompt-len 512 --gen 128 --reps 3 --out-dir /tmp/b > $O/bench-$1-$2-int$d-$round.txt 2>&1
      echo "$1 $2 INT=$d r$round: $(grep -E '^decode' $O/bench-$1-$2-int$d-$round.txt | head -1)"
    done
  done
done
echo "at $(( $(date +%s)-T0 )) s"
