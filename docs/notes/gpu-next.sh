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
  # 1. correctness: every test binary (FUSEBOX_REQUIRE_CUDA=1). Since the last GPU run: the gemv_tc
  #    default (issue 22); the attention kernels' tile loads (attn_load_tile addresses rows through
  #    attn_row_off now, the same addresses for a contiguous cache), their paged twins and batching on
  #    CUDA (issue 23: cuda_attention paged_attention_is_bitwise_contiguous_attention_per_row,
  #    fusebox-engine cuda_batch)
  echo "== all tests"; bash .gpu/run.sh 2>&1 | grep -E "^test |test result|panicked|FAILED|skipped" | tail -n 120
  # 2. batching on CUDA (FUSEBOX_CUDA_BATCHING=1): decode step cost by batch size, through BatchEngine
  for q in "--quant q4g64"; do
    echo "== batch curve qwen3-8b $q"
    FUSEBOX_CUDA_BATCHING=1 bash .gpu/run.sh exec fusebox bench --device cuda --synthetic qwen3-8b $q \
      --prompt-len 128 --gen 16 --batch-curve 64 --out-dir "${OUT:-/tmp}" 2>&1 | tail -n 15
  done
  # 3. the verify curve, gemv_tc off and on (Qwen3-8B 4-bit after 512 tokens)
  for tc in 0 1; do
    echo "== verify curve FUSEBOX_GEMV_TC=$tc"
    FUSEBOX_GEMV_TC=$tc bash .gpu/run.sh exec fusebox bench --device cuda --synthetic qwen3-8b --quant q4g64 \
      --prompt-len 512 --gen 32 --reps 1 --verify-curve 16 2>&1 | tail -n 25
  done
} >"$log" 2>&1
tail -n 60 "$log"
