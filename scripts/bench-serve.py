#!/usr/bin/env python3
"""Benchmark a running `fusebox serve` (or any OpenAI-compatible server).

Sends --requests streamed /v1/completions, --concurrency at a time, and
reports output tok/s (all requests' tokens over the wall time), time to first
token and inter-token latency (p50/p99), and each request's decode tok/s
(tokens after the first over the time after the first; at concurrency 1 this
is the number to set beside `fusebox bench` decode). Writes serve-*.json and
serve-*.md to --out-dir and prints the table. Standard library only.

  scripts/bench-serve.py --url http://127.0.0.1:8080 --requests 32 --concurrency 8
  # or start the server itself (any `fusebox serve` flags after --serve-args):
  scripts/bench-serve.py --fusebox target/release/fusebox -m ./Qwen3-0.6B --serve-args "--device cuda"
"""

import argparse
import http.client
import json
import re
import shlex
import statistics
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(xs, p):
    """The p-th percentile of xs (nearest rank), or None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def one_request(url, body, api_key):
    """One streamed completion: its token arrival times and usage."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, usage, done = [], None, False
    while line := r.readline():
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            times.append(time.perf_counter())
    conn.close()
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"start": start, "times": times, "tokens": tokens, "end": time.perf_counter()}


def run(url, body, n, concurrency, api_key):
    results, errors, lock, next_i = [], [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if next_i[0] >= n:
                    return
                next_i[0] += 1
            try:
                res = one_request(url, body, api_key)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - t0


def summarize(results, errors, wall):
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    decode = [
        (len(r["times"]) - 1) / (r["times"][-1] - r["times"][0])
        for r in results
        if len(r["times"]) > 1 and r["times"][-1] > r["times"][0]
    ]
    tokens = sum(r["tokens"] for r in results)
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_secs": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall if wall > 0 else None,
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99))},
        "itl_ms": {"p50": ms(pct(itl, 50)), "p99": ms(pct(itl, 99))},
        "decode_tok_s_per_request": {"median": statistics.median(decode) if decode else None},
    }


def markdown(rec):
    f = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
    s = rec["summary"]
    return "\n".join(
        [
            f"# fusebox serve benchmark: {rec['model']} on {rec['device']}",
            "",
            f"{rec['requests']} streamed /v1/completions, {rec['concurrency']} at a time, "
            f"max_tokens {rec['max_tokens']}, prompt {rec['prompt_words']} words; commit {rec['commit']}, {rec['date']}.",
            "",
            "| requests | errors | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | decode tok/s per request (median) |",
            "|---|---|---|---|---|---|---|---|",
            f"| {s['requests']} | {s['errors']} | {f(s['output_tok_s'])} | {f(s['ttft_ms']['p50'])} | {f(s['ttft_ms']['p99'])} "
            f"| {f(s['itl_ms']['p50'], 2)} | {f(s['itl_ms']['p99'], 2)} | {f(s['decode_tok_s_per_request']['median'])} |",
            "",
        ]
    )


def commit():
    try:
        c = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"], capture_output=True, text=True)
        return c.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if c.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def start_server(binary, model, extra):
    """`fusebox serve` on a free port; (process, base url, device) once its startup line is out."""
    args = [binary, "serve", "-m", model, "--port", "0", *shlex.split(extra)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    log = []
    for line in proc.stderr:
        log.append(line)
        m = re.search(r" on (.+?) at (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(2), m.group(1)
    raise SystemExit("fusebox serve did not start:\n" + "".join(log))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the server (default: %(default)s)")
    ap.add_argument("--fusebox", metavar="BIN", help="start `BIN serve -m MODEL` on a free port instead of --url")
    ap.add_argument("-m", "--model", help="the model for --fusebox")
    ap.add_argument("--serve-args", default="", help="more `fusebox serve` flags for --fusebox, one string")
    ap.add_argument("--device", help="device label for the record (default: the server's, from /v1/models)")
    ap.add_argument("--requests", type=int, default=16, help="requests in all (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each (default: %(default)s)")
    ap.add_argument("--prompt-words", type=int, default=32, help="words in the prompt (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests first (default: %(default)s)")
    ap.add_argument("--api-key")
    ap.add_argument("--out-dir", default="bench-results", help="where the JSON and markdown go (default: %(default)s)")
    a = ap.parse_args()

    proc, url, device = None, a.url.rstrip("/"), a.device
    if a.fusebox:
        if not a.model:
            ap.error("--fusebox needs -m MODEL")
        proc, url, started_on = start_server(a.fusebox, a.model, a.serve_args)
        device = device or started_on
    try:
        req = urllib.request.Request(url + "/v1/models")
        if a.api_key:
            req.add_header("Authorization", f"Bearer {a.api_key}")
        card = json.load(urllib.request.urlopen(req, timeout=30))["data"][0]
        model = card["id"]
        device = device or card.get("device")
        prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * (a.prompt_words // 9 + 1)).split()
        body = {"model": model, "prompt": " ".join(prompt[: a.prompt_words]), "max_tokens": a.max_tokens}
        body |= {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        if a.warmup:
            run(url, body, a.warmup, 1, a.api_key)
        results, errors, wall = run(url, body, a.requests, a.concurrency, a.api_key)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)

    rec = {
        "kind": "serve",
        "model": model,
        "device": device or "unknown (pass --device)",
        "url": url,
        "commit": commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requests": a.requests,
        "concurrency": a.concurrency,
        "max_tokens": a.max_tokens,
        "prompt_words": a.prompt_words,
        "summary": summarize(results, errors, wall),
    }
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}-c{a.concurrency}"
    (out / f"{stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
    md = markdown(rec)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md")
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[:3]}")


if __name__ == "__main__":
    main()
