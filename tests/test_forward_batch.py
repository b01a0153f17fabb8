"""Batched decode (`Model.forward_batch`): B sequences, each with its own cache and position,
through one pass, against each sequence run alone through `forward`. Caches of one pool
(`Model.new_caches`, as the server's) take the fused decode kernel; others the layer loop."""

import numpy as np
import pytest

from llamacpu.errors import LlamacpuError
from llamacpu.runtime import open_model

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Count to five, please.",
           "Why is the sky blue? Answer in one sentence."]


@pytest.fixture(scope="module")
def rt(smollm2_path):
    return open_model(smollm2_path)


def _prefilled(rt, prompt, max_seq=256, cache=None):
    ids = rt.tokenizer.encode(prompt, add_bos=False)
    cache = cache if cache is not None else rt.model.new_cache(max_seq)
    logits = rt.model.forward(ids, cache)
    return cache, int(np.argmax(logits))


def _pooled(rt, prompts, max_seq=256):
    """Prefilled caches of one pool: forward_batch runs them through the fused decode kernel."""
    return [_prefilled(rt, p, cache=c) for p, c in zip(prompts, rt.model.new_caches(len(prompts), max_seq))]


@pytest.mark.parametrize("pooled", [False, True], ids=["layer loop", "fused kernel"])
def test_each_row_is_its_sequence_decoded_alone(rt, pooled):
    m = rt.model
    alone = [_prefilled(rt, p) for p in PROMPTS]  # caches at different positions (prompt lengths differ)
    batch = _pooled(rt, PROMPTS) if pooled else [_prefilled(rt, p) for p in PROMPTS]
    assert len({c.pos for c, _ in alone}) > 1
    tokens = [t for _, t in alone]
    for step in range(3):
        want = np.stack([m.forward([t], c) for t, (c, _) in zip(tokens, alone)])  # (B, V), fused decode kernel
        got = m.forward_batch(tokens, [c for c, _ in batch])  # (B, V)
        assert got.shape == want.shape
        if pooled:  # the very kernel `forward` runs, with B rows: bit for bit what each gets alone
            np.testing.assert_array_equal(got, want)
        else:  # the fused kernel and the layer loop differ only in float rounding (and a fast exp)
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)
        assert [c.pos for c, _ in batch] == [c.pos for c, _ in alone]
        tokens = [int(i) for i in np.argmax(want, axis=1)]
    for (a, _), (b, _) in zip(alone, batch):
        np.testing.assert_allclose(b.k[:, :b.pos], a.k[:, :a.pos], atol=1e-2, rtol=0)


@pytest.mark.parametrize("pooled", [False, True], ids=["layer loop", "fused kernel"])
def test_a_row_does_not_depend_on_its_batch_mates(rt, pooled):
    m = rt.model
    solo = _pooled(rt, PROMPTS[:2]) if pooled else [_prefilled(rt, p) for p in PROMPTS[:2]]
    four = _pooled(rt, PROMPTS) if pooled else [_prefilled(rt, p) for p in PROMPTS]
    pair = m.forward_batch([t for _, t in solo], [c for c, _ in solo])
    quad = m.forward_batch([t for _, t in four], [c for c, _ in four])
    np.testing.assert_array_equal(pair, quad[:2])  # rows are computed independently: bitwise equal


def test_one_cache_per_token_and_no_cache_twice(rt):
    m = rt.model
    c, t = _prefilled(rt, PROMPTS[0])
    with pytest.raises(LlamacpuError, match="one distinct cache per token"):
        m.forward_batch([t, t], [c, c])
    with pytest.raises(LlamacpuError, match="one distinct cache per token"):
        m.forward_batch([t, t], [c])
    full = m.new_cache(1)
    m.forward([t], full)
    with pytest.raises(LlamacpuError, match="context is full"):
        m.forward_batch([t, t], [c, full])
    a, b = m.new_caches(2, 1)
    m.forward([t], a)
    with pytest.raises(LlamacpuError, match="context is full"):  # checked before the kernel runs
        m.forward_batch([t, t], [b, a])
    assert b.pos == 0
