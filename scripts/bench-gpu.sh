#!/usr/bin/env bash
# The CUDA benchmark matrix of docs/benchmark_results/cuda-graph-path-*.md:
# synthetic Qwen3-0.6B bf16, Qwen3-8B MLX 4-bit and bf16, Qwen3-30B-A3B MLX
# 4-bit (pp512 + tg128, warm-up + REPS repetitions), each with CUDA graphs on
# and off, then prints one summary table. JSON results go to OUT_DIR.
#   scripts/bench-gpu.sh [OUT_DIR=bench-results] [REPS=5]
set -euo pipefail
out=${1:-bench-results}
reps=${2:-5}
bin=${FUSEBOX_BIN:-fusebox}
for spec in qwen3-0.6b:bf16 qwen3-8b:q4g64 qwen3-8b:bf16 qwen3-30b-a3b:q4g64; do
    shape=${spec%%:*} quant=${spec##*:}
    for graph in 1 0; do
        echo "== $shape $quant FUSEBOX_CUDA_GRAPH=$graph"
        FUSEBOX_CUDA_GRAPH=$graph "$bin" bench --device cuda --synthetic "$shape" --quant "$quant" \
            --prompt-len 512 --gen 128 --reps "$reps" --out-dir "$out" || echo "FAILED: $shape $quant graph=$graph"
    done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).rglob("*.json")):
    r = json.loads(p.read_text())
    rows.append((r["model"], "on" if r.get("cuda_graphs", True) else "off", r["prefill_tok_s"]["median"],
                 r["decode_tok_s"]["median"], r["decode_tok_s"]["min"], r["decode_tok_s"]["max"],
                 100 * r["roofline_fraction"], r["copy_bandwidth_bytes_s"] / 1e9, r["device"], r["commit"]))
print("| model | graphs | prefill tok/s | decode tok/s (median, min-max) | % roofline | copy GB/s |")
print("|---|---|---|---|---|---|")
for m, g, p, d, lo, hi, rf, bw, dev, c in rows:
    print(f"| {m} | {g} | {p:,.0f} | {d:,.1f} ({lo:,.1f}-{hi:,.1f}) | {rf:.0f}% | {bw:,.0f} |")
print(f"device: {rows[0][8] if rows else '?'}, commit {rows[0][9] if rows else '?'}")
PY
