#!/usr/bin/env bash
# Minimal: cuda_qmm with the staged kernels (from 5 rows, and every row count), then one curve shape 33 vs 5.
set -u
mkdir -p $OUT/r
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64 PATH=$PWD/.gpu/bin:$PATH
orig=$(cat .gpu/ROOT); [[ -e $orig ]] || { mkdir -p $(dirname $orig) && ln -s $PWD $orig; }
cd crates/fusebox-core
for v in 5 1; do echo "== cuda_qmm staged_rows=$v"; FUSEBOX_REQUIRE_CUDA=1 FUSEBOX_QMM_STAGED_ROWS=$v ../../.gpu/tests/cuda_qmm-* --test-threads=1 --nocapture 2>&1 | grep -E "worst|test result|panicked|FAILED|mismatch" ; done | tee $OUT/r/qmm.log
echo "elapsed $SECONDS"
for v in 33 5 1 33 5; do
  FUSEBOX_QMM_STAGED_ROWS=$v FUSEBOX_FUSED_TC_MATMUL=1 FUSEBOX_BENCH_ONLY="4-bit g64 4096x12288" FUSEBOX_BENCH_M=1,8,16,32 ../../.gpu/tests/cuda_gemv-* --ignored --nocapture cuda_gemv_bandwidth 2>&1 | grep "of copy" | sed "s|^|staged_rows=$v |"
done | tee $OUT/r/curve.txt
echo "elapsed $SECONDS"
cd ../..
for v in 33 5; do echo "== verify staged_rows=$v"; FUSEBOX_QMM_STAGED_ROWS=$v FUSEBOX_FUSED_TC_MATMUL=1 timeout 60 fusebox bench --device cuda --synthetic qwen3-8b --quant q4g64 --prompt-len 256 --gen 16 --reps 3 --verify-curve 16 --out-dir /tmp/vc-$v 2>&1 | grep -E "verify +(1|2|4|8|9|16) rows"; done | tee $OUT/r/vc.log
echo "elapsed $SECONDS"
