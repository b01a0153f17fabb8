"""The decoder against transformers' outputs (tests/data, made by tools/make_reference.py).

Tiny random HF checkpoints cover the HF loader (sharded bf16, tied f32 with Llama-3 RoPE
scaling, Mistral f16); the real SmolLM2 goldens cover the GGUF path end to end in f32.
"""

import json

import numpy as np
import pytest

from llamacpu.checkpoint import load_checkpoint
from llamacpu.model import Model


def _greedy(model, prompt, n):
    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(prompt, cache)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache)
    return out


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama3", "tiny_mistral"])
def test_tiny_hf_checkpoint_matches_transformers(data_dir, name):
    ref = np.load(data_dir / name / "reference.npz")
    ck = load_checkpoint(data_dir / name)
    model = Model(ck.config, ck.tensors)
    ids = ref["input_ids"].astype(np.int64)
    logits = model.forward(ids, model.new_cache(64), all_logits=True)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    assert _greedy(model, ids, len(ref["greedy_ids"])) == ref["greedy_ids"].tolist()


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path):
    ck = load_checkpoint(smollm2_path, dequantize=True)
    return Model(ck.config, ck.tensors)


@pytest.fixture(scope="module")
def smollm2_ref(data_dir, smollm2_path):
    from llamacpu.fetch import sha256_of
    meta = json.loads((data_dir / "smollm2_reference.json").read_text())
    assert meta["model_sha256"] == sha256_of(smollm2_path)
    return np.load(data_dir / "smollm2_reference.npz")


@pytest.mark.parametrize("i", range(5))
def test_smollm2_f32_matches_transformers(smollm2_f32, smollm2_ref, i):
    prompt = smollm2_ref[f"prompt_ids_{i}"].astype(np.int64)
    expected = smollm2_ref["greedy_ids"][i].tolist()
    cache = smollm2_f32.new_cache(len(prompt) + len(expected))
    logits = smollm2_f32.forward(prompt, cache)
    assert np.abs(logits - smollm2_ref["last_logits"][i]).max() < 1e-2
    got = []
    for _ in expected:
        got.append(int(np.argmax(logits)))
        logits = smollm2_f32.forward([got[-1]], cache)
    assert got == expected


def test_smollm2_every_prompt_position_matches_transformers(smollm2_f32, smollm2_ref):
    prompt = smollm2_ref["prompt_ids_0"].astype(np.int64)
    logits = smollm2_f32.forward(prompt, smollm2_f32.new_cache(64), all_logits=True)
    assert np.abs(logits - smollm2_ref["prompt0_logits"]).max() < 1e-2


def test_smollm2_cached_decode_equals_full_forward(smollm2_f32, smollm2_ref):
    ids = np.concatenate([smollm2_ref["prompt_ids_1"], smollm2_ref["greedy_ids"][1][:16]]).astype(np.int64)
    full = smollm2_f32.forward(ids, smollm2_f32.new_cache(64), all_logits=True)
    cache = smollm2_f32.new_cache(64)
    split = len(ids) - 16
    steps = [smollm2_f32.forward(ids[:split], cache)]
    steps += [smollm2_f32.forward([t], cache) for t in ids[split:-1]]
    np.testing.assert_allclose(np.array(steps), full[split - 1:-1], atol=1e-4, rtol=0)
