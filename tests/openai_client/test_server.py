"""`fusebox serve` through the official `openai` Python client.

Run by scripts/test-openai-client.sh, which starts the server on the
tiny-qwen3 fixture and sets FUSEBOX_BASE_URL; works under pytest or as a
plain script (`python tests/openai_client/test_server.py`).
"""

import os
import sys

import openai

BASE_URL = os.environ.get("FUSEBOX_BASE_URL", "http://127.0.0.1:8080/v1")
MODEL = os.environ.get("FUSEBOX_MODEL", "tiny-qwen3")


def client():
    return openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("FUSEBOX_API_KEY", "none"), max_retries=0)


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
    try:
        client().completions.create(model="no-such-model", prompt="Hello", max_tokens=1)
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.code == "model_not_found", e.body
    else:
        raise AssertionError("expected a 400")


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    for t in tests:
        t()
        print(f"ok {t.__name__}")
    print(f"{len(tests)} passed")
    sys.exit(0)
