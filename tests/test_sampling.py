"""Samplers: pure functions of logits and a seeded Generator."""

import numpy as np
import pytest

from llamacpu.errors import LlamacpuError
from llamacpu.sampling import apply_repeat_penalty, candidates, make_sampler


def draws(sampler, logits, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([sampler(logits, rng) for _ in range(n)])


def test_temperature_zero_is_greedy_and_ignores_the_rng():
    logits = np.array([0.1, 3.0, -2.0, 2.9], dtype=np.float32)
    sampler = make_sampler(0.0, top_k=1, top_p=0.1, min_p=0.5)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sampler(logits, rng) == 1
    assert rng.bit_generator.state == state


def test_same_seed_same_draws_and_different_seed_differs():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    sampler = make_sampler(1.0)
    assert (draws(sampler, logits, 50, seed=7) == draws(sampler, logits, 50, seed=7)).all()
    assert (draws(sampler, logits, 50, seed=7) != draws(sampler, logits, 50, seed=8)).any()


def test_temperature_one_matches_softmax_frequencies():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    counts = np.bincount(draws(make_sampler(1.0), logits, 6000), minlength=3) / 6000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_low_temperature_sharpens():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    counts = np.bincount(draws(make_sampler(0.25), logits, 2000), minlength=3) / 2000
    p = np.array([0.5, 0.3, 0.2]) ** 4
    assert np.allclose(counts, p / p.sum(), atol=0.03)


def test_top_k_keeps_only_the_k_best():
    logits = np.array([1.0, 5.0, 4.0, 3.0, 2.0], dtype=np.float32)
    ids, z = candidates(logits, top_k=2, top_p=1.0, min_p=0.0)
    assert list(ids) == [1, 2] and list(z) == [5.0, 4.0]
    assert set(draws(make_sampler(5.0, top_k=2), logits, 500)) == {1, 2}


def test_top_p_keeps_the_smallest_head_reaching_the_mass():
    logits = np.log(np.array([0.1, 0.45, 0.3, 0.15], dtype=np.float32))
    assert list(candidates(logits, 0, 0.7, 0.0)[0]) == [1, 2]  # 0.45 < 0.7 <= 0.75
    assert list(candidates(logits, 0, 0.74, 0.0)[0]) == [1, 2]
    assert list(candidates(logits, 0, 0.76, 0.0)[0]) == [1, 2, 3]
    assert list(candidates(logits, 0, 1e-6, 0.0)[0]) == [1]  # always at least one


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (0, 0.9, 0.0), (0, 0.5, 0.0), (0, 0.999, 0.0), (100, 0.9, 0.0), (0, 0.9, 0.01), (0, 1.0, 0.02), (50, 1.0, 0.0),
])
def test_filters_on_a_large_vocabulary_match_a_full_sort(top_k, top_p, min_p):
    """The fast paths (partitioned heads, no full sort) keep exactly what sorting everything keeps."""
    for scale in (0.5, 3.0, 10.0):  # flat to peaked distributions
        logits = (np.random.default_rng(3).standard_normal(20000) * scale).astype(np.float32)
        order = np.argsort(-logits, kind="stable")
        if top_k:
            order = order[:top_k]
        p = np.exp(logits[order].astype(np.float64) - logits.max())
        p /= p.sum()
        n = len(order)
        if top_p < 1:
            n = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        if min_p > 0:
            n = min(n, int((p >= min_p * p[0]).sum()))
        ids, z = candidates(logits, top_k, top_p, min_p)
        assert list(ids) == list(order[:n])
        assert (z == logits[ids]).all()


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert sorted(candidates(logits, 0, 1.0, 0.25)[0]) == [0, 1, 2]  # 0.05 < 0.25 * 0.5
    assert sorted(candidates(logits, 0, 1.0, 0.7)[0]) == [0]
    # combined with top-k, min-p is taken relative to the same best token
    assert list(candidates(logits, 3, 1.0, 0.5)[0]) == [0, 1]


def test_filters_compose_in_llama_cpp_order():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    # top-k 3 renormalises to 4/9, 3/9, 2/9; top-p 0.7 then keeps two (4/9 + 3/9 >= 0.7)
    assert list(candidates(logits, 3, 0.7, 0.0)[0]) == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top-p"),
    (dict(top_p=1.5), "top-p"),
    (dict(min_p=-0.1), "min-p"),
    (dict(min_p=1.1), "min-p"),
    (dict(top_k=-1), "top-k"),
])
def test_out_of_range_settings_are_refused(kwargs, message):
    with pytest.raises(LlamacpuError, match=message):
        make_sampler(**{"temperature": 1.0, **kwargs})


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1, 1], 2.0)  # a repeated id is penalised once
    assert list(out) == [1.0, -4.0, 1.0, 0.5]
    assert list(logits) == [2.0, -2.0, 1.0, 0.5]  # the input is not modified
    assert apply_repeat_penalty(logits, [0], 1.0) is logits
