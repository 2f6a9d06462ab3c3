#!/usr/bin/env bash
# The first GPU call of the next session with device time (see docs/notes/handoff.md). Stage with
#   ../shared/tools/gpu-pack && cp docs/notes/gpu-next.sh .gpu/ && git rev-parse --short HEAD > .gpu/COMMIT
#   tar cJf .gpu.tar.xz .gpu          (under 64 MiB; delete it afterwards)
# and run with carry [".gpu.tar.xz"]:  rm -rf .gpu && tar xJf .gpu.tar.xz && bash .gpu/gpu-next.sh
# Everything goes to one log under $OUT (the device returns at most 8 files).
set -uo pipefail
log=${OUT:-/tmp}/gpu-next.log
{
  echo "== commit $(cat .gpu/COMMIT 2>/dev/null); $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  # 1. correctness: the gemv_tc default (issue 22), paged attention and batching on CUDA (issue 23)
  for t in gemv_tc_rows_are_bitwise_one_row_products paged_attention_is_bitwise_contiguous_attention_per_row \
           cuda_batched_greedy_equals_each_request_alone cuda_preempted_sequences cuda_verify_rows_equal_decode_steps; do
    echo "== test $t"; bash .gpu/run.sh test "$t" 2>&1 | tail -n 25
  done
  # 2. the verify curve, gemv_tc off and on (Qwen3-8B 4-bit after 512 tokens)
  for tc in 0 1; do
    echo "== verify curve FUSEBOX_GEMV_TC=$tc"
    FUSEBOX_GEMV_TC=$tc bash .gpu/run.sh exec fusebox bench --device cuda --synthetic qwen3-8b --quant q4g64 \
      --prompt-len 512 --gen 32 --reps 1 --verify-curve 16 2>&1 | tail -n 25
  done
} >"$log" 2>&1
tail -n 60 "$log"
