"""`llamacpu serve` through the real `openai` client and raw HTTP, against a server this test
starts on a free port of 127.0.0.1, serving the pinned SmolLM2 model."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Name three colours.",
           "Why is the sky blue? Answer in one sentence."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _start(model: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamacpu.cli", "serve", str(model), "--port", str(port), *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc, base = _start(smollm2_path)
    yield base
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, prompt, max_tokens=24, **kw):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=max_tokens, **kw)


def test_models_health_and_doubled_slashes(server, client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert httpx.get(server + "/v1//models").json()["data"][0]["id"] == ids[0]
    assert httpx.get(server + "//health").json()["status"] == "ok"


def test_chat_at_temperature_0_is_what_run_json_gives(client, smollm2_path):
    run = subprocess.run([sys.executable, "-m", "llamacpu.cli", "run", str(smollm2_path), QUESTION, "--json",
                          "--temperature", "0", "--max-tokens", "24"],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    got = _chat(client, QUESTION)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["text"]
    assert got.usage.prompt_tokens == want["prompt_tokens"]
    assert got.usage.completion_tokens == want["completion_tokens"]
    assert got.choices[0].finish_reason == ("stop" if want["stop_reason"] == "eos" else "length")


def test_a_shared_prompt_prefix_comes_from_the_cache(client):
    first = _chat(client, "Tell me a fact about owls.")
    again = _chat(client, "Tell me a fact about owls.")
    assert again.choices[0].message.content == first.choices[0].message.content
    # Every prompt token but the last (whose logits are needed) was already in a slot.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    other = _chat(client, "Tell me a fact about cats.")  # shares the system turn and "Tell me a fact about"
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens - 2


def test_streaming_chat_ends_with_the_usage_chunk(client):
    whole = _chat(client, QUESTION)
    chunks = list(_chat(client, QUESTION, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_in_the_chat_shape(client):
    got = _chat(client, QUESTION, max_tokens=6, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert "".join(t.token for t in content) == got.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the chosen is the top
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())


def test_stop_strings_and_max_tokens(client):
    got = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[", 8", "zz"])
    assert got.choices[0].text.startswith(" 5, 6, 7") and ", 8" not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    got = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=3, temperature=0)
    assert got.usage.completion_tokens == 3 and got.choices[0].finish_reason == "length"


def test_completion_echo_logprobs_equal_the_python_api(client, smollm2_path):
    import llamacpu
    from llamacpu.api import token_text
    text = "The quick brown fox jumps over the lazy dog."
    m = llamacpu.load(smollm2_path, ctx=256)
    want = m.logprobs(text, top=1)
    # lm-evaluation-harness's loglikelihood request: echo, one generated token, top-1 logprobs.
    got = client.completions.create(model="x", prompt=[text], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = got.choices[0].logprobs
    n = len(want)
    assert lp.tokens[:n] == [e.text for e in want] and len(lp.tokens) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx([e.logprob for e in want[1:]], abs=1e-4)
    assert [list(d) for d in lp.top_logprobs[1:n]] == [[token_text(m.tokenizer, e.top[0][0])] for e in want[1:]]
    assert lp.text_offset[:n] == [len(m.detokenize(m.tokenize(text)[:i])) for i in range(n)]
    assert got.choices[0].text.startswith(text)
    zero = client.completions.create(model="x", prompt=text, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert zero.choices[0].text == text and zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]


def test_four_concurrent_streams_each_equal_their_sequential_answer(server, client):
    sequential = [_chat(client, p, max_tokens=32).choices[0].message.content for p in PROMPTS]
    results: dict[int, str] = {}

    def stream(i):
        results[i] = "".join(c.choices[0].delta.content or "" for c in _chat(client, PROMPTS[i], max_tokens=32,
                                                                               stream=True))
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(len(PROMPTS))] == sequential
    assert httpx.get(server + "/health").json()["max_batch"] >= 3  # they were decoded together


def test_bad_requests_get_400_in_openai_shape_and_the_server_keeps_serving(server, client):
    url = server + "/v1/chat/completions"
    good = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 8}
    cases = [
        (b"{not json", None),
        (json.dumps({**good, "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({**good, "max_tokens": 1.5}).encode(), "max_tokens"),
        (json.dumps({**good, "stop": [1, 2]}).encode(), "stop"),
        (json.dumps({**good, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages.0.role"),
        (json.dumps({**good, "messages": []}).encode(), "messages"),
        (json.dumps({**good, "n": 2}).encode(), "n"),
        (json.dumps([1, 2]).encode(), None),
    ]
    for body, param in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, body
    r = httpx.post(url, content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="x", prompt="hi", max_tokens=10 ** 6, temperature=5)
    # Unknown fields are ignored; max_tokens beyond the context is capped, not refused.
    r = httpx.post(url, json={**good, "frobnicate": {"a": 1}, "max_tokens": 10 ** 9, "user": "me"}, timeout=60)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    assert "Paris" in _chat(client, QUESTION).choices[0].message.content


def test_a_client_leaving_mid_stream_cancels_its_generation(server, client):
    before = _chat(client, QUESTION).choices[0].message.content
    body = {"prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(8)) if line.startswith("data: ")]
        assert len(got) >= 3
    # The server notices the closed connection and frees the slot long before 2000 tokens.
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0
    assert _chat(client, QUESTION).choices[0].message.content == before


def test_sigterm_finishes_the_stream_in_flight_then_exits(smollm2_path):
    proc, base = _start(smollm2_path)
    body = {"prompt": "1, 2, 3, 4,", "max_tokens": 60, "temperature": 0, "stream": True}
    lines = []
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 6:
                    proc.send_signal(signal.SIGTERM)
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        finals = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        proc.wait(timeout=30)
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_binding_beyond_loopback_needs_an_api_key_and_the_key_is_checked(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "llamacpu.cli", "serve", str(smollm2_path), "--host", "0.0.0.0"],
                       env={**_env(), "LLAMACPU_API_KEY": ""}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "api-key" in r.stderr and "Traceback" not in r.stderr
    proc, base = _start(smollm2_path, "--api-key", "sesame", "--parallel", "1")
    try:
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        _stop(proc)
