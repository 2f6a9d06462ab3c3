"""`fusebox serve` through the official `openai` Python client.

Run by scripts/test-openai-client.sh, which starts the server on the
tiny-qwen3 fixture and sets FUSEBOX_BASE_URL; works under pytest or as a
plain script (`python tests/openai_client/test_server.py`). The API-key and
full-queue tests start a second server themselves, from the binary at
$FUSEBOX_BIN (default target/debug/fusebox), and stop it with SIGTERM.
"""

import atexit
import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import openai
from _common import main, run_at_once

BASE_URL = os.environ.get("FUSEBOX_BASE_URL", "http://127.0.0.1:8080/v1")
MODEL = os.environ.get("FUSEBOX_MODEL", "tiny-qwen3")
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FUSEBOX_BIN", ROOT / "target" / "debug" / "fusebox"))
KEY = "sekret"


def client(base_url=None, api_key=None):
    key = api_key or os.environ.get("FUSEBOX_API_KEY", "none")
    return openai.OpenAI(base_url=base_url or BASE_URL, api_key=key, max_retries=0)


class Server:
    """A second `fusebox serve` on the fixture with an API key and a queue of 1."""

    _started = None

    def __init__(self):
        args = [str(BIN), "serve", "-m", str(ROOT / "tests" / "fixtures" / "tiny-qwen3"), "--device", "cpu"]
        args += ["--port", "0", "--api-key", KEY, "--max-queue", "1"]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            if " at http://" in line:
                self.base_url = "http://" + line.split(" at http://")[1].split()[0] + "/v1"
                break
        else:
            raise AssertionError("fusebox serve did not start: " + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    @classmethod
    def get(cls):
        if cls._started is None:
            cls._started = Server()
            atexit.register(cls._started.stop)
        return cls._started

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise


def expect(error, call, **attrs):
    """`call()` raises `error` whose attributes (status_code, code, param, ...) are `attrs`."""
    try:
        call()
    except error as e:
        for k, v in attrs.items():
            assert getattr(e, k) == v, (k, getattr(e, k), v, e.body)
        assert isinstance(e.body, dict) and {"message", "type", "param", "code"} <= set(e.body), e.body
        return e
    raise AssertionError(f"expected {error.__name__}")


def test_models_list():
    ids = [m.id for m in client().models.list()]
    assert ids == [MODEL], ids


def test_completion():
    c = client()
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert 0 < r.usage.prompt_tokens
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # greedy is deterministic
    again = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text


def test_chat_completion():
    r = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=8,
        temperature=0,
        seed=1,
    )
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8


CHAT = [{"role": "user", "content": "Tell me a story"}]


def test_streaming_chat_with_usage_equals_non_streaming():
    c = client()
    whole = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({(ch.id, ch.created, ch.model) for ch in chunks}) == 1, chunks
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choice, last = chunks
    assert last.choices == [] and last.usage is not None, last
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(ch.usage is None for ch in with_choice)
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choice)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    assert with_choice[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in with_choice[:-1])


def test_streaming_completion_equals_non_streaming():
    c = client()
    whole = c.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0)
    chunks = list(
        c.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0, stream=True)
    )
    assert all(ch.object == "text_completion" and ch.usage is None for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings():
    c = client()
    full = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
    assert len(full) >= 8, full
    stop = full[4:7]
    want = full[: full.index(stop)]
    r = c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=["not in it", stop]
    )
    assert r.choices[0].text == want, (r.choices[0].text, want)
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        c.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_unknown_model_is_bad_request():
    e = expect(
        openai.BadRequestError,
        lambda: client().completions.create(model="no-such-model", prompt="Hello", max_tokens=1),
        status_code=400,
        code="model_not_found",
        param="model",
    )
    assert "no-such-model" in e.message


def test_bad_requests():
    c = client()
    bad = openai.BadRequestError
    # a field of the wrong type, named
    expect(bad, lambda: c.completions.create(model=MODEL, prompt="x", max_tokens="many"), param="max_tokens")
    expect(bad, lambda: c.completions.create(model=MODEL, prompt="x", temperature="hot"), param="temperature")
    # a missing required field
    expect(bad, lambda: c.post("/completions", body={"model": MODEL}, cast_to=httpx.Response), param="prompt")
    # a prompt longer than the context, with both lengths
    e = expect(
        bad,
        lambda: c.completions.create(model=MODEL, prompt=[1] * 200, max_tokens=1),
        code="context_length_exceeded",
    )
    assert "200" in e.message and "128" in e.message, e.message
    # empty messages; more choices than a request may ask for
    expect(bad, lambda: c.chat.completions.create(model=MODEL, messages=[]), param="messages")
    e = expect(bad, lambda: c.completions.create(model=MODEL, prompt="x", n=17), param="n")
    assert "between 1 and 16" in e.message, e.message
    # n choices, in order (greedy: all the same answer)
    r = c.completions.create(model=MODEL, prompt="x", n=2, max_tokens=4, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text, r
    # malformed JSON (the client never sends it): the same error shape
    r = httpx.post(BASE_URL + "/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error", r.text


def test_unknown_routes_and_methods():
    c = client()
    expect(openai.NotFoundError, lambda: c.get("/no-such-route", cast_to=httpx.Response), code="not_found")
    expect(openai.APIStatusError, lambda: c.get("/completions", cast_to=httpx.Response), status_code=405)


ROOT_URL = BASE_URL.removesuffix("/v1")


def test_completion_logprobs_whole_and_streamed():
    c = client()
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    plain = c.completions.create(**args)
    r = c.completions.create(logprobs=2, **args)
    assert r.choices[0].text == plain.choices[0].text, "logprobs change the answer"
    assert plain.choices[0].logprobs is None
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n, lp
    assert all(x <= 0 for x in lp.token_logprobs), lp.token_logprobs
    for got, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2, top
        assert abs(max(top.values()) - got) < 1e-6, (got, top)  # greedy draws the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, lp.text_offset
    chunks = list(c.completions.create(logprobs=2, stream=True, **args))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    streamed = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs, (streamed, lp.token_logprobs)


def test_chat_logprobs_whole_and_streamed():
    c = client()
    args = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    plain = c.chat.completions.create(**args)
    r = c.chat.completions.create(logprobs=True, top_logprobs=3, **args)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert plain.choices[0].logprobs is None
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and isinstance(item.token, str) and isinstance(item.bytes, list), item
        assert len(item.top_logprobs) == 3, item
        assert item.top_logprobs[0].token == item.token, item
    text = bytes(b for item in content for b in item.bytes).decode("utf-8", errors="replace")
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    chunks = list(c.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **args))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]
    expect(
        openai.BadRequestError,
        lambda: c.chat.completions.create(logprobs=True, top_logprobs=21, **args),
        param="top_logprobs",
    )


def test_seed_reproducibility():
    c = client()

    def completion():
        r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=42)
        return r.choices[0].text

    def chat():
        r = c.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, temperature=0.8, top_p=0.95, seed=42
        )
        return r.choices[0].message.content

    for create in (completion, chat):
        a, b = create(), create()
        assert a == b, (a, b)


def test_penalties():
    c = client()
    args = dict(model=MODEL, prompt="Hello Hello Hello Hello", max_tokens=24, temperature=0)
    plain = c.completions.create(**args).choices[0].text
    penalised = c.completions.create(frequency_penalty=2.0, presence_penalty=0.5, **args).choices[0].text
    assert penalised != plain, plain
    expect(openai.BadRequestError, lambda: c.completions.create(frequency_penalty=3, **args), param="frequency_penalty")


def test_tokenize_detokenize_round_trip():
    text = "The quick brown fox"
    r = httpx.post(ROOT_URL + "/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["count"] == len(v["tokens"]) > 0 and v["max_model_len"] == 128, v
    r = httpx.post(ROOT_URL + "/detokenize", json={"model": MODEL, "tokens": v["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}, r.text
    chat = httpx.post(ROOT_URL + "/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > len(CHAT[0]["content"].split()), chat
    r = httpx.post(ROOT_URL + "/detokenize", json={"tokens": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text


def test_metrics():
    client().completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    r = httpx.get(ROOT_URL + "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
    for name in (
        "fusebox_requests_total",
        "fusebox_request_duration_seconds",
        "fusebox_prompt_tokens_total",
        "fusebox_generated_tokens_total",
        "fusebox_queue_depth",
        "fusebox_time_to_first_token_seconds",
        "fusebox_inter_token_latency_seconds",
    ):
        assert f"# TYPE {name} " in r.text, name
    samples = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#"))
    assert float(samples['fusebox_requests_total{endpoint="/v1/completions",status="200"}']) >= 1, r.text
    assert float(samples["fusebox_generated_tokens_total"]) >= 1, r.text


def test_api_key():
    if not BIN.exists():
        print(f"SKIP test_api_key: {BIN} not built")
        return
    s = Server.get()
    for key in ["wrong", KEY + "x"]:
        expect(
            openai.AuthenticationError,
            lambda: client(s.base_url, key).models.list(),
            status_code=401,
            code="invalid_api_key",
        )
    ids = [m.id for m in client(s.base_url, KEY).models.list()]
    assert ids == [MODEL], ids
    r = httpx.get(s.base_url.removesuffix("/v1") + "/health")
    assert r.status_code == 200, r.text


def test_full_queue_is_rate_limited():
    if not BIN.exists():
        print(f"SKIP test_full_queue_is_rate_limited: {BIN} not built")
        return
    s = Server.get()
    c = client(s.base_url, KEY)

    def one(_):
        try:
            c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=120, temperature=0)
            return "ok"
        except openai.RateLimitError as e:
            assert e.code == "queue_full", e.body
            assert e.response.headers.get("retry-after") == "1", e.response.headers
            return "429"

    results = run_at_once(32, one)
    assert set(results) <= {"ok", "429"}, results
    assert "ok" in results and "429" in results, results
    # and the server serves once the burst is over
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_shutdown_exits_0():
    if not BIN.exists():
        print(f"SKIP test_shutdown_exits_0: {BIN} not built")
        return
    s = Server.get()
    s.stop()
    Server._started = None
    assert s.proc.returncode == 0, (s.proc.returncode, "".join(s.log))


if __name__ == "__main__":
    main(globals())
