"""Thread policy: ThreadChooser's choice, AdaptiveThreads applying it between forward passes, and
start_pools starting the workers without leaving its setting in the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

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


_POOLS = """
import os, subprocess, sys
from llamacpu.threads import start_pools
start_pools()
start_pools()  # again: nothing more happens
import numba
from llamacpu import kernels
import numpy as np
out = np.empty((2, 3), np.float32)
kernels.swiglu_rows(np.ones((2, 6), np.float32), out, 2)  # a parallel kernel runs on the pool
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                       capture_output=True, text=True).stdout.strip()
print(os.environ.get("OMP_WAIT_POLICY"), child, numba.threading_layer())
"""


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_start_pools_leaves_the_environment_as_it_was(preset):
    """start_pools sets OMP_WAIT_POLICY only while Numba's pool starts: neither this process's
    environment afterwards nor a child's holds it; a value the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", _POOLS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    mine, child, _layer = out.stdout.split()
    assert mine == child == str(preset)
