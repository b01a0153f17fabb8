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


def test_observer_sees_every_linear_input():
    """`observe` gets each matrix group's actual input, layer by layer, and changes nothing: layer 0's
    qkv input is RMSNorm(embedding) · gain, w_down's is silu(gate) · up of the gate_up input,
    and a q8_0 model's one-token forward (layer loop, to be observed) matches the fused decode."""
    from llamacpu.model import LINEAR_GROUPS, Model
    from llamacpu.quant import QTensor, quantize
    from tiny import random_tensors, tiny_config
    c = tiny_config()
    raw = random_tensors(c, seed=7)
    model = Model(c, {k: QTensor("f32", v.shape, v) for k, v in raw.items()}, threads=1)
    seen = []
    tokens = np.array([3, 17, 5, 99, 42])
    plain = model.forward(tokens, model.new_cache(8), all_logits=True)
    observed = model.forward(tokens, model.new_cache(8), all_logits=True,
                             observe=lambda layer, group, h: seen.append((layer, group, h.copy())))
    np.testing.assert_array_equal(observed, plain)
    assert [(layer, g) for layer, g, _ in seen] == [(i, g) for i in range(c.num_hidden_layers) for g in LINEAR_GROUPS]
    inputs = {(layer, g): h for layer, g, h in seen}
    width = {"qkv": c.hidden_size, "wo": c.q_dim, "gate_up": c.hidden_size, "w_down": c.intermediate_size}
    assert all(h.shape == (len(tokens), width[g]) for (_, g), h in inputs.items())
    x = raw["embed"][tokens].astype(np.float64)
    h0 = x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * raw["layers.0.attn_norm"]
    np.testing.assert_allclose(inputs[0, "qkv"], h0, rtol=1e-5, atol=1e-6)
    for i in range(c.num_hidden_layers):
        h = inputs[i, "gate_up"].astype(np.float64)
        g, u = h @ raw[f"layers.{i}.w_gate"].T, h @ raw[f"layers.{i}.w_up"].T
        np.testing.assert_allclose(inputs[i, "w_down"], g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-5)
    q8 = Model(c, {k: quantize(v, "q8_0") if v.ndim == 2 else QTensor("f32", v.shape, v) for k, v in raw.items()},
               threads=1)
    assert q8.decode_weights is not None
    fused = q8.forward([3], q8.new_cache(4))
    calls = []
    looped = q8.forward([3], q8.new_cache(4), observe=lambda *a: calls.append(a[:2]))
    assert len(calls) == 4 * c.num_hidden_layers
    np.testing.assert_allclose(looped, fused, atol=1e-3, rtol=0)


def test_a_long_prompt_runs_in_parts_that_equal_one_pass(rt):
    """`forward` runs a prompt PREFILL_ROWS at a time; the parts must stitch into what one pass
    over every row gives (the layer loop `_prefill` with a single span), cache included."""
    from llamacpu.model import PREFILL_ROWS
    m = rt.model
    T = 2 * PREFILL_ROWS + 37
    ids = np.random.default_rng(3).integers(0, m.config.vocab_size, T)
    parts, whole = m.new_cache(T + 1), m.new_cache(T + 1)
    got = m.forward(ids, parts, all_logits=True)  # (T, V), in three parts
    want = m._prefill(ids, [(whole, 0, T)], True)  # (T, V), one pass
    assert got.shape == want.shape == (T, m.config.vocab_size)
    assert parts.pos == whole.pos == T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    np.testing.assert_allclose(parts.k[:, :T], whole.k[:, :T], rtol=0, atol=1e-5)
    last = m.new_cache(T + 1)
    np.testing.assert_array_equal(m.forward(ids, last), got[-1])  # the last row alone, same parts
