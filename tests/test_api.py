"""The Python API (`llamacpu.load`) on the real SmolLM2 model."""

import json
import subprocess
import sys

import numpy as np
import pytest

import llamacpu
from llamacpu.api import LLM
from llamacpu.errors import LlamacpuError
from llamacpu.generate import Completion
from llamacpu.runtime import open_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def m(smollm2_path):
    return llamacpu.load(smollm2_path, ctx=512)


def test_tokenize_and_detokenize_match_llama_cpp(m, data_dir):
    cases = json.loads((data_dir / "tokenizer_reference.json").read_text())["cases"]
    plain = [c for c in cases if "<|" not in c["text"]]
    assert plain
    for case in plain:
        assert m.tokenize(case["text"]) == case["ids"], case["text"]
        assert m.detokenize(case["ids"]) == case["llama_cpp_decoded"]


def test_chat_reuses_the_cached_prefix_and_gives_the_same_answer(m):
    first, second = Completion(), Completion()
    a = "".join(m.chat(QUESTION, temperature=0, max_tokens=16, result=first))
    b = "".join(m.chat(QUESTION, temperature=0, max_tokens=16, result=second))
    assert a == b == first.text and "Paris" in a
    assert first.stats.prompt_tokens == len(m.encode_chat(QUESTION))
    assert second.stats.prompt_tokens == 1  # everything else came from the cache
    assert first.token_ids == second.token_ids


def test_generate_continues_plain_text_and_stops_before_a_stop_string(m):
    result = Completion()
    text = "".join(m.generate("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=", 7", result=result))
    assert text.startswith(" 5, 6") and ", 7" not in text and result.stats.stop_reason == "stop"
    pieces = list(m.generate("The capital of France is", max_tokens=4, temperature=0))
    assert len(pieces) >= 2 and all(isinstance(p, str) for p in pieces)


def test_seeded_sampling_is_reproducible_and_settings_are_checked(m):
    a = "".join(m.chat(QUESTION, max_tokens=12, temperature=1.0, seed=7))
    b = "".join(m.chat(QUESTION, max_tokens=12, temperature=1.0, seed=7))
    assert a == b
    with pytest.raises(LlamacpuError, match="top-p"):
        m.chat(QUESTION, top_p=0)
    with pytest.raises(LlamacpuError, match="unknown sampling setting 'tempreature'"):
        m.chat(QUESTION, tempreature=0)
    with pytest.raises(LlamacpuError, match="context holds 512"):
        m.generate(list(range(600)))


def test_run_json_is_the_api_at_temperature_0(m, smollm2_path):
    """`llamacpu run --json` goes through `LLM`: the same prompt gives the same ids and counts."""
    r = subprocess.run([sys.executable, "-m", "llamacpu.cli", "run", str(smollm2_path), QUESTION[0]["content"],
                        "--json", "--temp", "0", "-n", "16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    result = Completion()
    text = "".join(m.chat(QUESTION, temperature=0, max_tokens=16, result=result, reuse=False))
    assert (run["text"], run["token_ids"]) == (text, result.token_ids)
    assert (run["prompt_tokens"], run["completion_tokens"]) == (result.stats.prompt_tokens, len(result.token_ids))
    assert m.encode_prompt(QUESTION[0]["content"]) == m.encode_chat(QUESTION)


def test_a_session_remembers_reuses_its_cache_and_saves(m, tmp_path):
    s = m.session(temperature=0, max_tokens=24, system="Answer briefly.")
    "".join(s.say("My name is Ada."))
    first_prompt = s.last.prompt_tokens
    answer = "".join(s.say("What is my name?"))
    assert s.last.prompt_tokens == len(m.encode_chat(s.messages[:4]))  # the whole conversation so far
    # the second turn prefilled only its own tokens: the first turn came from the cache
    assert s.last.reused_tokens >= first_prompt and s.last.prefilled_tokens < 20
    assert [x["role"] for x in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[-1]["content"] == answer and s.stats()["turns"] == 2
    s.save(tmp_path / "t.json")
    s.reset()
    assert [x["role"] for x in s.messages] == ["system"]
    s.load(tmp_path / "t.json")
    assert s.messages[-1]["content"] == answer
    with pytest.raises(LlamacpuError, match="max_tokens"):
        m.session(max_tokens=0)


def test_logprobs_match_transformers(smollm2_path, data_dir):
    """Per-token log-probabilities of the f32 model against log_softmax of transformers' logits."""
    ref = np.load(data_dir / "smollm2_reference.npz")
    ids = ref["prompt_ids_0"].astype(np.int64).tolist()
    logits = ref["prompt0_logits"].astype(np.float64)  # (T, V) from transformers
    want = logits - logits.max(axis=1, keepdims=True)
    want -= np.log(np.exp(want).sum(axis=1, keepdims=True))
    f32 = LLM(open_model(smollm2_path, dequantize=True), ctx=128)
    got = f32.logprobs(ids, top=3)
    assert [e.id for e in got] == ids and got[0].logprob is None
    np.testing.assert_allclose([e.logprob for e in got[1:]], [want[i - 1, ids[i]] for i in range(1, len(ids))],
                               atol=1e-2)
    for i, e in enumerate(got[1:], 1):
        assert [t for t, _ in e.top] == np.argsort(-want[i - 1], kind="stable")[:3].tolist()

