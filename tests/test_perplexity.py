"""Perplexity, KL and top-1 agreement: against a direct computation on a tiny model, and on the
real model (f32 vs q8_0)."""

import math

import numpy as np
import pytest

from llamacpu.errors import LlamacpuError
from llamacpu.perplexity import compare_logits, kl_divergence, log_softmax, perplexity, top1_agrees
from llamacpu.runtime import open_model
from test_convert import TEXT, tiny_hf

PROSE = "tests/data/prose/botchan.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_model(tiny_hf(tmp_path_factory.mktemp("ppl") / "tiny", seed=5), dequantize=True)


def direct_nll(runtime, ids: list[int]) -> list[float]:
    """-log p(ids[t+1] | ids[:t+1]) by token-by-token decoding and a plain softmax (no max shift)."""
    model = runtime.model
    cache = model.new_cache(len(ids))
    out = []
    for t in range(len(ids) - 1):
        z = model.forward(np.asarray([ids[t]]), cache).astype(np.float64)
        p = np.exp(z) / np.exp(z).sum()
        out.append(-np.log(p[ids[t + 1]]))
    return out


def test_matches_direct_computation(tiny):
    ids = tiny.tokenizer.encode(TEXT, add_bos=False)
    bos = tiny.tokenizer.bos_id
    assert tiny.tokenizer.add_bos and bos is not None  # so every chunk starts with BOS
    ctx = 16
    n_chunks = len(ids) // ctx
    assert n_chunks >= 3
    r = perplexity(tiny, TEXT, ctx=ctx)
    nll = [v for c in range(n_chunks) for v in direct_nll(tiny, [bos] + ids[c * ctx + 1:(c + 1) * ctx])]
    assert r.chunks == n_chunks and r.tokens == n_chunks * (ctx - 1) == len(nll)
    assert r.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
    assert r.nll == pytest.approx(np.mean(nll), rel=1e-5)
    assert r.kl is None and r.top1 is None
    two = perplexity(tiny, TEXT, ctx=ctx, chunks=2)
    assert two.chunks == 2 and two.ppl == pytest.approx(np.exp(np.mean(nll[:2 * (ctx - 1)])), rel=1e-5)
    d = r.to_dict()
    assert d["ppl"] == r.ppl and d["tokens"] == r.tokens and set(d) >= {"kl", "top1", "seconds", "chunks"}


def test_against_itself(tiny):
    r = perplexity(tiny, TEXT, ctx=16, chunks=2, reference=tiny)
    assert abs(r.kl) < 1e-9 and r.top1 == 1.0
    assert r.reference_ppl == pytest.approx(r.ppl, rel=1e-12)


def test_progress_and_bad_input(tiny):
    seen = []
    perplexity(tiny, TEXT, ctx=16, chunks=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(LlamacpuError, match="fewer than one chunk"):
        perplexity(tiny, "Hello", ctx=16)
    with pytest.raises(LlamacpuError, match="at least 2"):
        perplexity(tiny, TEXT, ctx=1)
    with pytest.raises(LlamacpuError, match="exceeds"):
        perplexity(tiny, TEXT, ctx=10_000)
    with pytest.raises(LlamacpuError, match="chunks"):
        perplexity(tiny, TEXT, ctx=16, chunks=0)


def test_log_softmax_is_stable():
    z = np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), -np.inf]])
    lp = log_softmax(z)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0)
    np.testing.assert_allclose(lp[0, :2], np.log(0.5))
    np.testing.assert_allclose(lp[1, :2], np.log([0.25, 0.75]))


def test_kl_divergence_of_known_distributions():
    # Identical rows (shifted by a constant, which softmax ignores): 0. Two points:
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3).
    z = np.array([[0.5, -2.0, 3.0], [10.0, 10.0, 10.0]], dtype=np.float32)
    assert kl_divergence(z, z + 7.0) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([[0.0, 0.0]]), np.array([[0.0, np.log(3.0)]])
    assert kl_divergence(p, q) == pytest.approx(0.5 * np.log(4 / 3), rel=1e-12)
    # The mean over positions: a second row with KL 0 halves it.
    assert kl_divergence(np.vstack([p, p]), np.vstack([q, p])) == pytest.approx(0.25 * np.log(4 / 3), rel=1e-12)


def _kl_row_by_hand(ref_row, row) -> float:
    """KL(softmax(ref_row) || softmax(row)) in plain Python floats (math.fsum): the reference."""
    def logp(z):
        z = [float(v) for v in z]
        top = max(z)
        lse = top + math.log(math.fsum(math.exp(v - top) for v in z))
        return [v - lse for v in z]
    a, b = logp(ref_row), logp(row)
    return math.fsum(math.exp(x) * (x - y) for x, y in zip(a, b))


def test_logit_comparisons_match_a_plain_python_reference():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 50)).astype(np.float32) * 4
    ours = ref + rng.standard_normal((5, 50)).astype(np.float32)
    ref[2], ours[2] = -np.arange(50), np.arange(50)  # one position disagrees for sure (argmax 0 vs 49)
    want = [_kl_row_by_hand(r, o) for r, o in zip(ref, ours)]
    assert kl_divergence(ref, ours) == pytest.approx(math.fsum(want) / len(want), rel=1e-6)
    agree = [max(range(50), key=lambda j: r[j]) == max(range(50), key=lambda j: o[j]) for r, o in zip(ref, ours)]
    assert list(top1_agrees(ref, ours)) == agree and not agree[2]
    d = compare_logits(ref, ours)
    assert d == {"max_err": pytest.approx(float(np.abs(ref - ours).max())), "kl": kl_divergence(ref, ours),
                 "top1": pytest.approx(sum(agree) / len(agree))}


def test_real_model_q8_0_against_f32(smollm2_path):
    # Two 128-token chunks of prose. Bound: q8_0 within 1% of f32 perplexity here (llama.cpp
    # measures +0.2% on 2k tokens); KL below 0.01 nats and top-1 agreement above 90%.
    text = open(PROSE, encoding="utf-8").read()[:4000]
    f32 = open_model(smollm2_path, dequantize=True)
    q8 = open_model(smollm2_path, quant="q8_0")
    r = perplexity(q8, text, ctx=128, chunks=2, reference=f32)
    assert r.tokens == 254 and r.chunks == 2
    assert 5 < r.reference_ppl < 200  # a sane language model on English prose
    assert abs(r.ppl / r.reference_ppl - 1) < 0.01
    assert 0 <= r.kl < 0.01
    assert 0.9 < r.top1 <= 1.0
