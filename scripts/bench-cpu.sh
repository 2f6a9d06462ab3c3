#!/usr/bin/env bash
# Decode speed on the CPU until `fusebox bench` exists: runs `fusebox generate`
# REPS times (greedy, raw prompt, EOS ignored) and prints the median decode
# and prefill tokens/s.
#   scripts/bench-cpu.sh MODEL_DIR [GEN_TOKENS=128] [REPS=5]
set -euo pipefail
model=${1:?usage: scripts/bench-cpu.sh MODEL_DIR [GEN_TOKENS] [REPS]}
gen=${2:-128}
reps=${3:-5}
bin=${FUSEBOX_BIN:-target/release/fusebox}
prompt="The history of the city begins in the early middle ages, when a small settlement grew up beside the river crossing."
for _ in $(seq "$reps"); do
    "$bin" generate -m "$model" -p "$prompt" --no-chat-template -n "$gen" --ignore-eos --temp 0 --json
done | python3 -c '
import json, statistics, sys
runs = [json.loads(l)["timings"] for l in sys.stdin]
d = [r["decode_tok_s"] for r in runs]
p = [r["prefill_tok_s"] for r in runs]
n = runs[0]["prefill_tokens"]
print(f"decode tok/s median {statistics.median(d):.1f} (min {min(d):.1f}, max {max(d):.1f}); "
      f"prefill tok/s median {statistics.median(p):.1f} ({n} tokens); {len(d)} runs")
'
