#!/usr/bin/env bash
# `fusebox serve` through the official openai Python client: builds the CLI,
# makes a venv with a pinned openai (target/openai-venv, from PyPI), starts the
# server on the tiny-qwen3 fixture on a free port (queue 64), runs
# tests/openai_client/test_server.py, test_same_answer.py and test_load.py
# and a short scripts/bench-serve.py run against it and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENAI_VERSION=1.109.1
venv=target/openai-venv
bin=target/debug/fusebox

cargo build -q -p fusebox
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "openai==$OPENAI_VERSION"
fi

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$bin" serve -m tests/fixtures/tiny-qwen3 --port "$port" --device cpu --max-queue 64 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT

up=
for _ in $(seq 300); do
    if "$venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
        up=1
        break
    fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "fusebox serve exited:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done
cat "$log" >&2
if [ -z "$up" ]; then
    echo "fusebox serve did not answer /health on port $port" >&2
    exit 1
fi

export FUSEBOX_BASE_URL="http://127.0.0.1:$port/v1"
for t in test_server test_same_answer test_load; do
    echo "== tests/openai_client/$t.py"
    "$venv/bin/python" "tests/openai_client/$t.py"
done

echo "== scripts/bench-serve.py (smoke run)"
bench_out=$(mktemp -d)
python3 scripts/bench-serve.py --url "http://127.0.0.1:$port" --device cpu --requests 8 --concurrency 4 \
    --max-tokens 16 --out-dir "$bench_out"
rm -rf "$bench_out"
