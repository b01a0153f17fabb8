"""How many threads the compute uses: set once around a piece of work, restored afterwards.

Two pools do the work: Numba's (the kernels' parallel regions) and the BLAS's (numpy matmul in
prefill and attention). `thread_limit(n)` sets both for a `with` block. The model never changes
them itself: a forward pass reads process state, it does not set it. The CLI enters one limit
per command; library code wraps a session of forwards (a generation, a bench, a perplexity run)
in `with thread_limit(model.threads):`. Outside any limit both pools use every core, which is
also `Model`'s default thread count.
"""

from __future__ import annotations

import os
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
