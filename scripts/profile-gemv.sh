#!/usr/bin/env bash
# The 4-bit matmul at a few row counts, on the GPU machine: the row-count
# curve of the GEMV and of `tc_matmul` (cuda_gemv's ignored bandwidth bench),
# then Nsight Compute's detail of one shape per kernel and row count (speed
# of light, memory chart, warp stalls, occupancy, instruction mix, L2 and
# DRAM bytes), to see what holds each kernel below the copy bandwidth.
#
#   scripts/profile-gemv.sh [OUT_DIR]      (from the repository root, after gpu-pack)
#
# Environment: SHAPES ("4096x12288 4096x4096": n x k, as the bench labels
# them), ROWS_CURVE (1,2,4,8,16), ROWS_NCU (1 16), TEST_BIN (the cuda_gemv test
# executable; default: the one .gpu/run.sh knows), NCU=0 skips Nsight Compute,
# CURVE=0 the curve.
set -euo pipefail
out=${1:-${OUT:-/tmp}/profile-gemv}
mkdir -p "$out"
bin=${TEST_BIN:-$(ls .gpu/tests/cuda_gemv-* 2>/dev/null | head -n1)}
[[ -x $bin ]] || { echo "error: no cuda_gemv test executable (TEST_BIN, or .gpu/tests/cuda_gemv-*)" >&2; exit 2; }
bin=$(realpath "$bin")
shapes=${SHAPES:-4096x12288 4096x4096}
curve=${ROWS_CURVE:-1,2,4,8,16}
cd crates/fusebox-core
for site in $([[ ${CURVE:-1} == 1 ]] && echo 0 1); do
    for s in $shapes; do
        FUSEBOX_FUSED_TC_MATMUL=$site FUSEBOX_BENCH_ONLY="4-bit g64 ${s}" FUSEBOX_BENCH_M=$curve \
            "$bin" --ignored --nocapture cuda_gemv_bandwidth 2>&1 | grep -E "copy bandwidth|of copy" |
            sed "s/^/tc_matmul=$site /" | tee -a "$out/curve.txt"
    done
done
[[ ${NCU:-1} == 1 ]] || exit 0
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1 || true)
[[ -n $ncu ]] || { echo "no ncu: curve only" | tee -a "$out/curve.txt"; exit 0; }
sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy
    --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats)
metrics=dram__bytes_read.sum,lts__t_bytes.sum,l1tex__t_bytes.sum,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active
s=${shapes%% *}
for site in 0 1; do
    for m in ${ROWS_NCU:-1 16}; do
        # the first 300 launches are warm-up (graph capture and replays); take one product kernel after them
        FUSEBOX_FUSED_TC_MATMUL=$site FUSEBOX_BENCH_ONLY="4-bit g64 ${s}" FUSEBOX_BENCH_M=$m FUSEBOX_CUDA_GRAPH=1 \
            timeout 300 "$ncu" --clock-control none -k "regex:gemv_|qmm4_|qmm_prep" --launch-skip 300 --launch-count 3 \
            "${sections[@]}" --metrics "$metrics" "$bin" --ignored --nocapture cuda_gemv_bandwidth \
            >"$out/ncu-tc$site-m$m.txt" 2>&1 || echo "ncu tc_matmul=$site m=$m: rc $?" | tee -a "$out/curve.txt"
    done
done
echo "done: $out"
