"""How many threads the compute uses: set once around a piece of work, restored afterwards.

Two pools do the work: Numba's (the kernels' parallel regions) and the BLAS's (numpy matmul, for
f32/f16 weights only). `thread_limit(n)` sets both for a `with` block; `start_pools` starts
Numba's workers once, waiting passively between regions (see OMP_WAIT_POLICY below). The model never changes
them itself: a forward pass reads process state, it does not set it. The CLI enters one limit
per command; library code wraps a session of forwards (a generation, a bench, a perplexity run)
in `with thread_limit(model.threads):`. Outside any limit both pools use every core, which is
also `Model`'s default thread count.

On a shared machine more threads can be much slower: a parallel region waits for its slowest
thread. Measured (before start_pools, with spinning workers) on the AMD EPYC Zen 5 (2 cores) with ~13 other runnable processes, decoding
the TinyLlama-1.1B shape (Q4_0) ran at 0.8 tok/s with 2 threads and 5.9 with 1 (with one more
busy loop: 0.3 and 2.9). `AdaptiveThreads` (opt-in: the CLI's --adaptive-threads) wraps a
model and times its decode steps to pick `threads` or 1, between forward passes.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Iterator

import numba


def default_threads() -> int:
    """The cores this process may run on, capped by Numba's thread pool."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


# How Numba's OpenMP workers wait between parallel regions. libgomp's default spins (~300k
# rounds) before sleeping; on a shared machine a spinning worker spends its share of the core
# and then waits behind the other processes when the next region needs it. Measured on the AMD
# EPYC Zen 5 (2 cores) with ~9 other runnable processes (niced), SmolLM2 Q4_0, 2 threads:
# spinning 160-290 tok/s prefill and 4-20 tok/s decode; passive 630-840 and 97-165.
# But on a quiet machine, passive workers halve decode at 135M (2 threads, `bench` on Q8_0:
# OpenMP's default/ACTIVE 142 tok/s, PASSIVE 71; prefill the same), since each of ~90 short
# regions per token waits for its workers to wake. Quiet machines are the common case, and a
# busy one has `--adaptive-threads`; so OpenMP's default stays, and OMP_WAIT_POLICY=PASSIVE
# is the user's choice. None: leave the wait policy to OpenMP.
OMP_WAIT_POLICY: str | None = None


def start_pools() -> None:
    """Start Numba's worker threads now (once per process; later calls do nothing), OpenMP's
    workers waiting as OMP_WAIT_POLICY says (when set) unless the environment already chooses
    how (OMP_WAIT_POLICY or GOMP_SPINCOUNT). The variable is set only while the pool starts, so
    that child processes (a llama.cpp peer in a benchmark) do not inherit it. A no-op when the
    pool is already running or Numba uses another threading layer."""
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or OMP_WAIT_POLICY is None
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY  # libgomp reads it as it loads
    # The workers inherit a block of Ctrl-C/SIGTERM/SIGHUP, so those always reach the main
    # thread (see cli._start_worker_threads).
    blocked = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()  # what the first parallel kernel would do
    except (ImportError, AttributeError):  # another numba: its pool starts with the first kernel
        pass
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]


@contextmanager
def thread_limit(n: int) -> Iterator[None]:
    """Run the block with `n` Numba threads (this Python thread's) and `n` BLAS threads."""
    from threadpoolctl import threadpool_limits
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(old)


class ThreadChooser:
    """Picks the decode step's thread count: `threads`, or 1 when that measures clearly faster.

    On a shared machine a parallel region waits for its slowest thread, and with the other
    core busy 2-thread decoding was measured 4-7x *slower* than 1 thread (on a quiet machine
    it is ~1.7x faster). So steps are timed: each option is tried first, then the faster one
    is used and the other re-tried now and then in case the load changed. An option's speed
    is the minimum of its last RECENT timings (noise only ever adds time); 1 thread must win
    by MARGIN to be chosen. A re-try that loses doubles the interval to the next, up to
    MAX_PROBE_EVERY, as a collapsed step is costly.
    """

    PROBE_EVERY = 32
    MAX_PROBE_EVERY = 1024
    RECENT = 4
    MARGIN = 0.8  # 1 thread is chosen when it takes under 80% of the time of `threads`

    def __init__(self, threads: int, warmed: bool = False):
        self.options = [threads, 1] if threads > 1 else [1]
        self.timings: dict[int, list[float]] = {n: [] for n in self.options}
        # an option's first step (kernel loading) is not timed, unless `warmed`
        self.warmed: set[int] = set(self.options) if warmed else set()
        self.probe_every = self.PROBE_EVERY
        self.next_probe = self.PROBE_EVERY
        self.steps = 0

    def seconds(self, n: int) -> float:
        return min(self.timings[n])

    def best(self) -> int:
        if len(self.options) == 1:
            return self.options[0]
        many, one = self.options
        return one if self.seconds(one) < self.MARGIN * self.seconds(many) else many

    def pick(self) -> int:
        self.steps += 1
        untried = [n for n in self.options if not self.timings[n]]
        if untried:
            return untried[0]
        best = self.best()
        if len(self.options) > 1 and self.steps >= self.next_probe:
            return next(n for n in self.options if n != best)
        return best

    def record(self, threads: int, seconds: float) -> None:
        if threads not in self.warmed:
            self.warmed.add(threads)
            return
        probing = all(self.timings.values()) and threads != self.best()
        recent = self.timings[threads]
        recent.append(seconds)
        del recent[:-self.RECENT]
        if probing:
            won = self.best() == threads
            self.probe_every = self.PROBE_EVERY if won else min(2 * self.probe_every, self.MAX_PROBE_EVERY)
            self.next_probe = self.steps + self.probe_every


class AdaptiveThreads:
    """A model whose decode steps run with `model.threads` or 1 thread, whichever measures faster.

    Wraps anything with `forward(tokens, cache, ...)` and a `threads` count; every other attribute
    is the model's. Each one-token forward is timed and the choice (a `ThreadChooser`) is applied
    by setting Numba's pool around the call, outside the forward pass; the kernels then run their
    `threads` chunks on that many workers. Prefill runs at the pools' current setting.
    """

    def __init__(self, model):
        self.model = model
        self.chooser = ThreadChooser(model.threads)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, cache, **kwargs):
        if len(tokens) != 1:
            return self.model.forward(tokens, cache, **kwargs)
        n = self.chooser.pick()
        old = numba.get_num_threads()
        numba.set_num_threads(min(n, old))
        t0 = time.perf_counter()
        try:
            return self.model.forward(tokens, cache, **kwargs)
        finally:
            self.chooser.record(n, time.perf_counter() - t0)
            numba.set_num_threads(old)
