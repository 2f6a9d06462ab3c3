#!/usr/bin/env bash
# The first GPU call of the next session with device time (see docs/notes/handoff.md). Stage with
#   ../shared/tools/gpu-pack && cp docs/notes/gpu-next.sh .gpu/ && git rev-parse --short HEAD > .gpu/COMMIT
#   tar cJf .gpu.tar.xz .gpu          (under 64 MiB; delete it afterwards)
# and run with carry [".gpu.tar.xz"]:  rm -rf .gpu && tar xJf .gpu.tar.xz && bash .gpu/gpu-next.sh
# Everything goes to one log under $OUT (the device returns at most 8 files).
set -uo pipefail
log=${OUT:-/tmp}/gpu-next.log
b() { bash .gpu/run.sh exec fusebox bench --device cuda "$@" --out-dir "${OUT:-/tmp}" 2>&1; }
{
  echo "== commit $(cat .gpu/COMMIT 2>/dev/null); $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  # 1. correctness: every test binary (FUSEBOX_REQUIRE_CUDA=1). New since the last GPU run: the engine
  #    decodes everything (CLI and server) -- cuda_batch's lone/generate tests check it against the
  #    Session loop (CUDA graphs of the lone decode step and round); CUDA paged attention
  #    (cuda_attention paged_attention_is_bitwise_contiguous_attention_per_row, cuda_batch batching);
  #    the attention tile loads (attn_row_off); the gemv_tc default (cuda_gemv, cuda_verify)
  echo "== all tests"; bash .gpu/run.sh 2>&1 | grep -E "^test |test result|panicked|FAILED|skipped" | tail -n 150
  # 2. batch-1 decode through the engine (bench) against the Session's decode step (the verify
  #    curve's k=0 row) in one process each: issue 23's "within 3%"
  for m in "--synthetic qwen3-8b --quant q4g64" "--synthetic qwen3-0.6b"; do
    echo "== engine decode: $m"; b $m --prompt-len 512 --gen 128 --reps 3 | tail -n 4
    echo "== session decode: $m"; b $m --prompt-len 512 --gen 8 --verify-curve 1 --rounds 20 | tail -n 5
  done
  # 3. batching on CUDA (FUSEBOX_CUDA_BATCHING=1): decode step cost by batch size
  echo "== batch curve qwen3-8b q4g64"
  FUSEBOX_CUDA_BATCHING=1 b --synthetic qwen3-8b --quant q4g64 --prompt-len 128 --gen 16 --batch-curve 64 | tail -n 12
  # 4. issue 23's serving record: the engine under load (concurrency 1 / 8 / 32 / 64, 512 + 128)
  for q in "--quant q4g64" "--quant bf16"; do
    echo "== serve qwen3-8b $q"
    FUSEBOX_CUDA_BATCHING=1 b --synthetic qwen3-8b $q --prompt-len 512 --gen 128 --serve 1,8,32,64 | tail -n 9
  done
  # 5. the verify curve, gemv_tc off and on (Qwen3-8B 4-bit after 512 tokens)
  for tc in 0 1; do
    echo "== verify curve FUSEBOX_GEMV_TC=$tc"
    FUSEBOX_GEMV_TC=$tc b --synthetic qwen3-8b --quant q4g64 --prompt-len 512 --gen 32 --reps 1 --verify-curve 16 | tail -n 22
  done
} >"$log" 2>&1
tail -n 80 "$log"
