"""Load on loopback: 64 concurrent streaming clients, then 16 that hang up.

Run by scripts/test-openai-client.sh against the server it starts (with a
queue of at least 64); works under pytest or as a plain script. Speaks raw
server-sent events through httpx, to see each stream's `data: [DONE]`.
"""

import json
import os
import time

import httpx
from _common import main, run_at_once

BASE_URL = os.environ.get("FUSEBOX_BASE_URL", "http://127.0.0.1:8080/v1")
ROOT_URL = BASE_URL.removesuffix("/v1")
CLIENTS = 64
HANGUPS = 16
MAX_TOKENS = 8


def stream(i):
    """One streamed completion read to its end: "ok" if it ended in [DONE] with usage."""
    body = {
        "prompt": f"Client {i} says",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = []
    with httpx.stream("POST", BASE_URL + "/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.read()!r}"
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(line.removeprefix("data: "))
    if not data or data[-1] != "[DONE]":
        return f"no [DONE]: {data[-3:]}"
    chunks = [json.loads(d) for d in data[:-1]]
    if any("error" in c for c in chunks):
        return f"error chunk: {chunks}"
    usage = chunks[-1].get("usage") or {}
    if not 1 <= usage.get("completion_tokens", 0) <= MAX_TOKENS:
        return f"usage: {usage}"
    return "ok"


def hang_up(i):
    """Start a long stream, read its first token, and close the connection."""
    body = {"prompt": f"Client {i} hangs up", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", BASE_URL + "/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return f"status {r.status_code}"
        for line in r.iter_lines():
            if line.startswith("data: "):
                return "ok"
    return "no data"


def gauge(name):
    text = httpx.get(ROOT_URL + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_64_concurrent_streams_all_end_in_done():
    t = time.monotonic()
    results = run_at_once(CLIENTS, stream)
    bad = [(i, r) for i, r in enumerate(results) if r != "ok"]
    assert not bad, bad
    print(f"  {CLIENTS} streams in {time.monotonic() - t:.1f} s")


def test_clients_that_hang_up_leave_the_server_serving():
    results = run_at_once(HANGUPS, hang_up)
    assert results == ["ok"] * HANGUPS, results
    # the rest of the queue is cancelled at its next token (or dropped before it starts)
    deadline = time.monotonic() + 20
    while (gauge("fusebox_queue_depth"), gauge("fusebox_running_requests")) != (0, 0):
        assert time.monotonic() < deadline, httpx.get(ROOT_URL + "/metrics").text
        time.sleep(0.05)
    assert stream(0) == "ok"


if __name__ == "__main__":
    main(globals())
