#!/usr/bin/env bash
# Validate + A/B branch wip/qmm-lean against main, and FB_GEMV_SDT: about 8-10 min (PART=1, then PART=2, if one call is short).
# Pack (here): git checkout wip/qmm-lean && ../shared/tools/gpu-pack; keep tests cuda_qmm cuda_models cuda_gemv
# cuda_verify fusion_parity cuda_fused (see the trimming loop in note-2026-12-07c.md); then build main's fusebox
# and cuda_gemv test binary (git checkout main && cargo build --release && cargo test --release --no-run -p fusebox-core
# --test cuda_gemv) into .gpu/bin/fusebox_main and .gpu/old/; copy this file to .gpu/callQ.sh; tar cJf .gpu.tar.xz .gpu.
# Run: carry [".gpu.tar.xz"], command: rm -rf .gpu && tar xJf .gpu.tar.xz && bash .gpu/callQ.sh
set -u
export FUSEBOX_COMMIT=${FUSEBOX_COMMIT:-$(cat .gpu/COMMIT 2>/dev/null || echo wip)}
mkdir -p $OUT/r
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64 PATH=$PWD/.gpu/bin:$PATH
orig=$(cat .gpu/ROOT); [[ -e $orig ]] || { mkdir -p $(dirname $orig) && ln -s $PWD $orig; }
# PART=1 (default 12: both) runs the qmm-lean part, PART=2 the FB_GEMV_SDT part: split them if 600 s is short
if [[ ${PART:-12} == *1* ]]; then
(bash .gpu/run.sh test; echo '== TC_MATMUL=1'; FUSEBOX_FUSED_TC_MATMUL=1 bash .gpu/run.sh test;
 echo '== grouped, FUSEBOX_GROUPED_STAGED=0'; bash .gpu/run.sh exec bash -c 'cd crates/fusebox-core && FUSEBOX_GROUPED_STAGED=0 ../../.gpu/tests/cuda_qmm-* --test-threads=1 --nocapture grouped') > $OUT/r/tests.log 2>&1
grep -E "^== |test result|panicked|FAILED|gpu tests" $OUT/r/tests.log | head -40
cd crates/fusebox-core
for b in .gpu/tests .gpu/old; do for s in 4096x12288 4096x4096 12288x4096; do
  FUSEBOX_FUSED_TC_MATMUL=1 FUSEBOX_BENCH_ONLY="4-bit g64 $s" FUSEBOX_BENCH_M=1,4,8,16,32 ../../$b/cuda_gemv-* --ignored --nocapture cuda_gemv_bandwidth 2>&1 | grep "of copy" | sed "s|^|$b |"
done; done | tee $OUT/r/curve.txt
# kernel variants of the one-tile tc_matmul (FUSEBOX_NVRTC_DEFINES, wip binary only)
for v in "-DFB_QMM_MINB_N1=3" "-DFB_QMM_DEPTH_N1=6" "-DFB_QMM_DEPTH_N1=8"; do
  for s in 4096x12288 4096x4096; do
    FUSEBOX_NVRTC_DEFINES="$v" FUSEBOX_FUSED_TC_MATMUL=1 FUSEBOX_BENCH_ONLY="4-bit g64 $s" FUSEBOX_BENCH_M=1,16 ../../.gpu/tests/cuda_gemv-* --ignored --nocapture cuda_gemv_bandwidth 2>&1 | grep "of copy" | sed "s|^|$v |"
  done
done | tee -a $OUT/r/curve.txt
cd ../..
for bb in fusebox fusebox_main; do
  echo "== verify curve $bb tc_matmul=1" >> $OUT/r/vc.log
  FUSEBOX_FUSED_TC_MATMUL=1 timeout 90 $bb bench --device cuda --synthetic qwen3-8b --quant q4g64 --prompt-len 512 --gen 32 --reps 3 --verify-curve 16 --out-dir /tmp/vc-$bb 2>&1 | grep -E "verify +[0-9]+ rows|decode " >> $OUT/r/vc.log
done
cat $OUT/r/vc.log
b() { echo "== $1 $2 $3 $4" >> $OUT/r/pp.log
  timeout 120 $1 bench --device cuda --synthetic $2 --quant $3 --prompt-len 512 --gen 32 --reps 3 --out-dir /tmp/pp 2>&1 | grep -E "prefill |decode " >> $OUT/r/pp.log; }
for r in 1 2; do
  b fusebox_main qwen3-30b-a3b q4g64 r$r; b fusebox qwen3-30b-a3b q4g64 r$r
  b fusebox qwen3-30b-a3b q4g32 r$r; b fusebox_main qwen3-30b-a3b q4g32 r$r
done
cat $OUT/r/pp.log
echo "elapsed $SECONDS"
fi
[[ ${PART:-12} == *2* ]] || exit 0
# FB_GEMV_SDT (branch wip/gemv-sdt, off by default; the binary must include that branch): decode A/B in the wip binary, interleaved
for r in 1 2; do for v in "" "-DFB_GEMV_SDT"; do
  echo "== decode 8B q4g64 defines=[$v] r$r" >> $OUT/r/sdt.log
  FUSEBOX_NVRTC_DEFINES="$v" timeout 90 fusebox bench --device cuda --synthetic qwen3-8b --quant q4g64 --prompt-len 128 --gen 128 --reps 3 --out-dir /tmp/sdt 2>&1 | grep -E "decode |roofline" >> $OUT/r/sdt.log
done; done
cat $OUT/r/sdt.log
(FUSEBOX_NVRTC_DEFINES=-DFB_GEMV_SDT timeout 120 bash .gpu/run.sh test > $OUT/r/tests-sdt.log 2>&1); grep -E "test result|FAILED|gpu tests" $OUT/r/tests-sdt.log | tail -8
echo "elapsed $SECONDS"
