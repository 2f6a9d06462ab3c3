#!/usr/bin/env bash
# Where one decode token's time goes, per kernel family: runs `fusebox bench`
# on a synthetic model under Nsight Compute (--clock-control none, one metric:
# gpu__time_duration), eagerly (FUSEBOX_CUDA_GRAPH=0, so every kernel is its
# own launch), and prints the kernels of the last decoded token grouped by
# name: count, total microseconds, share. Kernel time only: launch gaps are
# the difference to the measured tokens/s.
#   scripts/kernel-profile.sh SHAPE QUANT [OUT_CSV]
set -euo pipefail
shape=${1:?usage: scripts/kernel-profile.sh SHAPE QUANT [OUT_CSV]}
quant=${2:?usage: scripts/kernel-profile.sh SHAPE QUANT [OUT_CSV]}
csv=${3:-/tmp/kernel-profile-$shape-$quant.csv}
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)
[[ -n $ncu ]] || { echo "error: ncu (Nsight Compute) not found" >&2; exit 2; }
[[ ${ANALYZE_ONLY:-0} == 1 ]] || FUSEBOX_CUDA_GRAPH=0 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "${FUSEBOX_BIN:-fusebox}" bench --device cuda --synthetic "$shape" --quant "$quant" \
    --prompt-len 8 --gen 6 --reps 1 --out-dir /tmp/kernel-profile-bench >"$csv" 2>/dev/null
python3 - "$csv" "$shape" "$quant" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
seq = [(r[ki].split("(")[0].split("<")[0].strip(), float(r[vi].replace(",", "")) / 1000.0) for r in rows]
# a decoded token ends with the sampler's last kernel; take the last full token
ends = [i for i, (n, _) in enumerate(seq) if n.startswith("sample_draw") or n.startswith("sample")]
ends = sorted(set(ends))
# collapse runs of sampler kernels to their last index
marks = [e for j, e in enumerate(ends) if j + 1 == len(ends) or ends[j + 1] != e + 1]
a, b = marks[-2] + 1, marks[-1] + 1
tok = seq[a:b]
agg = collections.OrderedDict()
for n, t in tok:
    c, s = agg.get(n, (0, 0.0)); agg[n] = (c + 1, s + t)
total = sum(t for _, t in tok)
print(f"{sys.argv[2]} {sys.argv[3]}: one decode token = {len(tok)} kernels, {total:.1f} us of kernel time")
for n, (c, s) in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"  {n:40s} {c:5d} x  {s:9.1f} us  {100*s/total:5.1f}%  ({s/c:6.2f} us each)")
PY
