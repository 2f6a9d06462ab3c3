#!/usr/bin/env bash
# The CUDA records of docs/benchmark_results/speculative-*.md:
#  1. the verify-cost curve t(k+1 rows) / t(1 row) for k = 0..16 on synthetic
#     Qwen3-0.6B bf16 and Qwen3-8B MLX 4-bit (context of 512 tokens);
#  2. plain vs speculative decoding interleaved in one process: prompt lookup
#     on synthetic Qwen3-0.6B bf16 and Qwen3-8B 4-bit / bf16 (a random prompt;
#     random weights fall into loops that prompt lookup finds, so read the
#     ratio with its acceptance), and on SmolLM2-135M-Instruct Q4_1 (an edit
#     request) when the GGUF file is at $SMOLLM2.
#   scripts/bench-spec-gpu.sh [OUT_DIR=bench-results]
set -uo pipefail
out=${1:-bench-results}
bin=${FUSEBOX_BIN:-fusebox}
smollm2=${SMOLLM2:-$HOME/.cache/fusebox/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
edit="Repeat the following paragraph word for word, changing only 'Tuesday' to 'Friday'. Paragraph: On Tuesday morning the library opened an hour late because the heating had failed overnight. The staff set up a table of hot drinks by the entrance, and the children's reading group moved into the sunny room upstairs, where they read stories about dragons, ships and faraway islands until lunch."
for spec in qwen3-0.6b:bf16 qwen3-8b:q4g64; do
    shape=${spec%%:*} quant=${spec##*:}
    echo "== verify curve: $shape $quant"
    "$bin" bench --device cuda --synthetic "$shape" --quant "$quant" --prompt-len 512 --gen 16 \
        --verify-curve 16 --rounds 20 --out-dir "$out" || echo "FAILED: verify curve $shape $quant"
done
for spec in qwen3-0.6b:bf16:2 qwen3-0.6b:bf16:4 qwen3-0.6b:bf16:8 qwen3-8b:q4g64:4 qwen3-8b:bf16:4; do
    IFS=: read -r shape quant k <<<"$spec"
    echo "== ngram k=$k: synthetic $shape $quant, random prompt"
    "$bin" bench --device cuda --synthetic "$shape" --quant "$quant" --prompt-len 512 --gen 128 --spec ngram \
        --spec-k "$k" --rounds 5 --out-dir "$out" || echo "FAILED: ngram k=$k $shape $quant"
done
if [[ -f $smollm2 ]]; then
    for k in 4 8; do
        echo "== ngram k=$k: SmolLM2 Q4_1, edit request"
        "$bin" bench --device cuda -m "$smollm2" --prompt-text "$edit" --gen 64 --spec ngram --spec-k "$k" \
            --rounds 10 --out-dir "$out" || echo "FAILED: ngram k=$k SmolLM2"
    done
else
    echo "SKIP SmolLM2 ngram: $smollm2 not present"
fi
