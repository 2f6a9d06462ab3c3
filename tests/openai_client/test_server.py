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
