"""Thread policy: ThreadChooser's choice, and AdaptiveThreads applying it between forward passes."""

from __future__ import annotations

import numba
import numpy as np

from llamacpu.threads import AdaptiveThreads, ThreadChooser, thread_limit


def test_thread_chooser_prefers_the_faster_option_and_reprobes():
    tc = ThreadChooser(2)
    cost = {2: 0.030, 1: 0.010}  # the other core is busy: 1 thread wins
    picks = []
    for _ in range(600):
        n = tc.pick()
        picks.append(n)
        tc.record(n, cost[n])
    assert picks[:4] == [2, 2, 1, 1]  # warm-up then a timed step for each option
    probes = [i for i, n in enumerate(picks) if i >= 4 and n == 2]
    assert 3 <= len(probes) <= 6  # re-probed, with growing intervals after each loss
    assert np.all(np.diff(probes) > 0) and np.diff(probes)[-1] > np.diff(probes)[0]
    cost = {2: 0.005, 1: 0.010}  # load went away: the next probe switches back
    for _ in range(1100):
        n = tc.pick()
        tc.record(n, cost[n])
    assert tc.best() == 2
    # noise: one slow 2-thread step, or 1 thread only slightly faster, does not switch
    tc.record(2, 0.050)
    assert tc.best() == 2
    tc.timings[1] = [0.0045]
    assert tc.best() == 2
    assert ThreadChooser(1).pick() == 1


class SeesThreads:
    """A stand-in model that records Numba's pool size during each forward."""

    def __init__(self, threads):
        self.threads, self.seen, self.config = threads, [], "cfg"

    def forward(self, tokens, cache, **kwargs):
        self.seen.append((len(tokens), numba.get_num_threads()))
        return kwargs


def test_adaptive_threads_sets_the_pool_around_decode_steps_only():
    n = numba.config.NUMBA_NUM_THREADS
    inner = SeesThreads(n)
    model = AdaptiveThreads(inner)
    assert model.config == "cfg" and model.threads == n  # everything else is the model's
    with thread_limit(n):
        assert model.forward([1, 2, 3], None, all_logits=True) == {"all_logits": True}
        for _ in range(4):
            model.forward([1], None)
        assert numba.get_num_threads() == n  # restored after every step
    expected_decode = [n, n, 1, 1] if n > 1 else [1, 1, 1, 1]  # ThreadChooser: warm-up + timing of each
    assert inner.seen == [(3, n)] + [(1, t) for t in expected_decode]
