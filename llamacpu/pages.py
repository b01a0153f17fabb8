"""Give a read-only file mapping's pages back once their bytes have been copied elsewhere.

The loaders map weight files (`np.memmap`, mode "r") and the model repacks block weights into
its own arrays. Without help, every page the repacking read stays in the process's resident
set, so a model is resident twice (at the Llama-2-7B shape, Q4_0: 7.1 GiB for a 3.5 GiB file).
`release` drops those pages with madvise(MADV_DONTNEED). For a read-only file mapping this is
always safe: the page cache keeps the data, and a later read faults the page back in from
the file. Anonymous memory is never touched: an array that does not view a read-only
`np.memmap` is left alone.
"""

from __future__ import annotations

import mmap

import numpy as np


_byte_bounds = getattr(np.lib, "array_utils", np).byte_bounds  # numpy 2 moved it


def _mapping(a: np.ndarray) -> mmap.mmap | None:
    """The read-only mmap.mmap that `a` views, or None."""
    while a is not None:
        mm = getattr(a, "_mmap", None)  # np.memmap and its views carry the mmap object
        if isinstance(mm, mmap.mmap):
            return mm if getattr(a, "mode", None) == "r" else None
        a = a.base if isinstance(a, np.ndarray) else None
    return None


def release(a: np.ndarray) -> int:
    """Drop the whole pages under `a` from this process's RSS if `a` views a read-only file
    mapping; returns the bytes released (0 when there is nothing to do or madvise is missing)."""
    mm = _mapping(a)
    if mm is None or not hasattr(mm, "madvise") or a.size == 0:
        return 0
    start = np.frombuffer(mm, dtype=np.uint8).ctypes.data  # address of the mapping's first byte
    lo, hi = _byte_bounds(a)
    page = mmap.PAGESIZE
    first = -(-(lo - start) // page) * page  # inward to whole pages: neighbours keep theirs
    last = (hi - start) // page * page
    if last <= first:
        return 0
    mm.madvise(mmap.MADV_DONTNEED, first, last - first)
    return last - first
