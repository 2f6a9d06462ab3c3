"""Same answer: a greedy completion through `fusebox serve` equals `fusebox
generate --json` on the same raw prompt, token for token.

Run by scripts/test-openai-client.sh against the server it starts on the
tiny-qwen3 fixture; runs the CLI at $FUSEBOX_BIN (default
target/debug/fusebox) on the same model. Works under pytest or as a plain
script.
"""

import json
import os
import subprocess
from pathlib import Path

import httpx
from _common import main

BASE_URL = os.environ.get("FUSEBOX_BASE_URL", "http://127.0.0.1:8080/v1")
ROOT_URL = BASE_URL.removesuffix("/v1")
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FUSEBOX_BIN", ROOT / "target" / "debug" / "fusebox"))
MODEL_DIR = ROOT / "tests" / "fixtures" / "tiny-qwen3"
PROMPTS = ["Once upon a time", "Hello Hello", "The capital of France is"]
MAX_TOKENS = 48


def generate(prompt):
    """`fusebox generate --json`, greedy, on the raw prompt."""
    args = [str(BIN), "generate", "-m", str(MODEL_DIR), "--device", "cpu", "-p", prompt]
    args += ["--no-chat-template", "--temp", "0", "-n", str(MAX_TOKENS), "--json"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def complete(prompt, **extra):
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = httpx.post(BASE_URL + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(prompt):
    """The text of a streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text = ""
    with httpx.stream("POST", BASE_URL + "/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
    return text


def piece(token_id):
    """A token's text as the server shows it in logprobs (special tokens included)."""
    r = httpx.post(ROOT_URL + "/detokenize", json={"tokens": [token_id]})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_greedy_completion_equals_generate():
    if not BIN.exists():
        print(f"SKIP test_greedy_completion_equals_generate: {BIN} not built")
        return
    for prompt in PROMPTS:
        g = generate(prompt)
        finish = {"max_tokens": "length", "eos": "stop"}[g["stop"]]
        pieces = [piece(t) for t in g["tokens"]]
        # the same prompt as text and as generate's token ids
        for p in [prompt, g["prompt_tokens"]]:
            v = complete(p)
            c = v["choices"][0]
            assert v["usage"]["prompt_tokens"] == len(g["prompt_tokens"]), (prompt, v["usage"])
            assert v["usage"]["completion_tokens"] == len(g["tokens"]), (prompt, v["usage"], g)
            assert c["text"] == g["text"], (prompt, c["text"], g["text"])
            assert c["finish_reason"] == finish, (prompt, c["finish_reason"], g["stop"])
            # token for token, through the pieces logprobs names
            lp = complete(p, logprobs=0)["choices"][0]["logprobs"]
            assert lp["tokens"] == pieces, (prompt, lp["tokens"], pieces)
            # and streamed
            text = streamed(p)
            assert text == g["text"], (prompt, text, g["text"])


if __name__ == "__main__":
    main(globals())
