#!/usr/bin/env bash
# One warm decode token, graph path and fused path side by side: kernels per
# token, kernel time per kernel family, and the GPU time between kernels.
#
#   scripts/capture-decode-trace.sh MODEL [OUT_DIR]
#
# MODEL is SHAPE:FORMAT for synthetic weights (qwen3-0.6b:bf16,
# qwen3-8b:q4g64, qwen3-30b-a3b:q4g64, ...) or a model directory / .gguf.
# "graph" runs every site on the graph path (FUSEBOX_FUSED_<SITE>=0), "fused"
# every site fused (=1).
#
# How: per variant,
#  1. `fusebox bench` with CUDA graphs on (as users run it) gives the decode
#     time per token (median of 3 repetitions), once with programmatic
#     dependent launch (the default) and once without (FUSEBOX_PDL=0);
#  2. Nsight Compute (--clock-control none, one metric: gpu__time_duration)
#     times every kernel of a decode run eagerly (prompt 120 + 8 tokens, so
#     the KV capacity, and with it the attention split, is the 128 of step 1),
#     and the last full decoded token is taken (a token ends with the
#     sampler's kernel).
# Kernel time is the sum of the kernels' isolated durations. Without PDL
# kernels run back to back, so "between kernels" = token time without PDL -
# kernel time is the GPU's idle time (launch latency, ramp-up and tails).
# With PDL a kernel's launch and ramp-up overlap its predecessor's tail, so
# the token is shorter than the sum of its kernels; the table shows both.
# Without ncu (or with TRACE_EVENTS=1), step 2 times each kernel with a pair
# of CUDA events instead (FUSEBOX_KERNEL_TIMING: eager launches, no PDL),
# which includes the launch gap before each kernel.
# FUSEBOX_BIN picks the binary (default: fusebox on PATH); TRACE_SKIP and
# TRACE_COUNT limit ncu to a window of kernel launches (large models: the
# weight fill and prefill kernels come first).
set -euo pipefail
model=${1:?usage: scripts/capture-decode-trace.sh MODEL [OUT_DIR]}
out=${2:-/tmp/decode-trace}
bin=${FUSEBOX_BIN:-fusebox}
mkdir -p "$out"
if [[ $model == *:* && ! -e $model ]]; then
    src=(--synthetic "${model%%:*}" --quant "${model#*:}")
else
    src=(-m "$model")
fi
sites=(QK_NORM MOE ADD_RMS_NORM ROPE_KV_APPEND)
variant_env() {  # variant -> env assignments
    local v=$1 on=0 s
    [[ $v == fused ]] && on=1
    for s in "${sites[@]}"; do printf 'FUSEBOX_FUSED_%s=%s ' "$s" "$on"; done
}
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1 || true)
[[ ${TRACE_EVENTS:-0} == 1 ]] && ncu=""
rm -f "$out"/*-ncu.csv "$out"/*-events.csv
window=()
[[ -n ${TRACE_SKIP:-} ]] && window+=(--launch-skip "$TRACE_SKIP")
[[ -n ${TRACE_COUNT:-} ]] && window+=(--launch-count "$TRACE_COUNT")
for v in graph fused; do
    for pdl in 1 0; do
        env $(variant_env $v) FUSEBOX_PDL=$pdl "$bin" bench --device cuda "${src[@]}" --prompt-len 64 --gen 64 \
            --reps 3 --out-dir "$out/bench" >"$out/$v-pdl$pdl-bench.txt" 2>"$out/$v-bench.err" \
            || { cat "$out/$v-bench.err" >&2; exit 2; }
    done
    if [[ -n $ncu ]]; then
        env $(variant_env $v) FUSEBOX_CUDA_GRAPH=0 "$ncu" "${window[@]}" --clock-control none --metrics gpu__time_duration.sum \
            --csv --print-units base "$bin" bench --device cuda "${src[@]}" --prompt-len 120 --gen 8 --reps 1 \
            --out-dir "$out/ncu-bench" >"$out/$v-ncu.csv" 2>"$out/$v-ncu.err" \
            || { tail -n 20 "$out/$v-ncu.err" >&2; exit 2; }
    else
        env $(variant_env $v) FUSEBOX_KERNEL_TIMING="$out/$v-events.csv" "$bin" bench --device cuda "${src[@]}" \
            --prompt-len 120 --gen 8 --reps 1 --out-dir "$out/events-bench" >/dev/null 2>"$out/$v-events.err" \
            || { tail -n 20 "$out/$v-events.err" >&2; exit 2; }
    fi
done
[[ -n $ncu ]] || echo "(no Nsight Compute: kernel times from CUDA events, launch gaps included)" 
python3 - "$out" "$model" <<'PY'
import csv, sys, collections, re
out, model = sys.argv[1], sys.argv[2]

def token_us(v, pdl):
    m = re.search(r"^decode\s+([\d.]+) tok/s", open(f"{out}/{v}-pdl{pdl}-bench.txt").read(), re.M)
    return 1e6 / float(m.group(1)), float(m.group(1))

def family(name):
    name = name.split("(")[0].split("<")[0].strip()
    for suf in ("_m1", "_mn"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return re.sub(r"_(f32|f16|bf16|q\d+(g16)?)$", "_<fmt>", name)

def last_token(v):
    try:
        rows = [r for r in csv.reader(open(f"{out}/{v}-ncu.csv")) if len(r) > 10]
        hdr, rows = rows[0], rows[1:]
        ki, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
        seq = [(family(r[ki]), float(r[vi].replace(",", "")) / 1000.0) for r in rows]
    except FileNotFoundError:
        rows = list(csv.reader(open(f"{out}/{v}-events.csv")))[1:]
        seq = [(family(r[0]), float(r[1])) for r in rows]
    ends = sorted(i for i, (n, _) in enumerate(seq) if n.startswith("sample"))
    marks = [e for j, e in enumerate(ends) if j + 1 == len(ends) or ends[j + 1] != e + 1]
    a, b = marks[-2] + 1, marks[-1] + 1
    return seq[a:b]

res = {}
for v in ("graph", "fused"):
    tok = last_token(v)
    agg = collections.defaultdict(lambda: [0, 0.0])
    for n, t in tok:
        agg[n][0] += 1
        agg[n][1] += t
    res[v] = (tok, agg, token_us(v, 1), token_us(v, 0))
print(f"# decode trace: {model}")
print()
print("| | graph path | fused path |")
print("|---|---|---|")
for label, f in [
    ("decode tok/s (CUDA graphs, PDL)", lambda r: f"{r[2][1]:.1f}"),
    ("time per token, PDL (us)", lambda r: f"{r[2][0]:.1f}"),
    ("time per token, no PDL (us)", lambda r: f"{r[3][0]:.1f}"),
    ("kernels per token", lambda r: f"{len(r[0])}"),
    ("kernel time, isolated (us)", lambda r: f"{sum(t for _, t in r[0]):.1f}"),
    ("idle between kernels, no PDL (us)", lambda r: f"{r[3][0] - sum(t for _, t in r[0]):.1f}"),
    ("hidden by PDL (us)", lambda r: f"{r[3][0] - r[2][0]:.1f}"),
]:
    print(f"| {label} | {f(res['graph'])} | {f(res['fused'])} |")
print()
print("| kernel family | graph: count, us | fused: count, us |")
print("|---|---|---|")
fams = sorted(set(res["graph"][1]) | set(res["fused"][1]),
              key=lambda n: -max(res["graph"][1].get(n, [0, 0])[1], res["fused"][1].get(n, [0, 0])[1]))
for n in fams:
    g = res["graph"][1].get(n)
    f = res["fused"][1].get(n)
    cell = lambda x: f"{x[0]} x, {x[1]:.1f}" if x else "-"
    print(f"| {n} | {cell(g)} | {cell(f)} |")
PY
