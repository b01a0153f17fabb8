"""pages.release: a read-only mapping's pages leave the resident set, and nothing else is touched."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from llamacpu.pages import release

PAGE = mmap.PAGESIZE


def mapping_rss_kb(a: np.ndarray) -> int:
    """Resident KB of the mapping that holds `a`, from /proc/self/smaps (Linux)."""
    addr = a.ctypes.data
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
                return int(rss.split()[1])
    raise AssertionError("mapping not found")


@pytest.fixture
def mapped(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    path = tmp_path / "w.bin"
    data.tofile(path)
    return data, np.memmap(path, dtype=np.uint8, mode="r")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_release_drops_the_pages_of_a_read_only_view_and_they_read_back(mapped):
    data, m = mapped
    assert int(m.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # fault every page in
    assert mapping_rss_kb(m) >= 64 * PAGE // 1024
    view = m[PAGE // 2: 40 * PAGE + 7].reshape(-1)  # not page-aligned at either end
    assert release(view) == 39 * PAGE  # whole pages inside the view only
    assert mapping_rss_kb(m) <= 25 * PAGE // 1024 + 4  # the 24 other pages, plus the two edge pages
    np.testing.assert_array_equal(m, data)  # the file is still there: pages fault back in


def test_release_leaves_anonymous_and_writable_memory_alone(tmp_path):
    a = np.arange(10 * PAGE, dtype=np.uint8)
    assert release(a) == 0 and release(a[PAGE:]) == 0
    np.testing.assert_array_equal(a, np.arange(10 * PAGE, dtype=np.uint8))
    path = tmp_path / "rw.bin"
    np.zeros(4 * PAGE, np.uint8).tofile(path)
    rw = np.memmap(path, dtype=np.uint8, mode="r+")
    rw[:] = 7  # dirty pages of a writable mapping: MADV_DONTNEED could drop unwritten data
    assert release(rw) == 0
    assert (rw == 7).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_full_context_kv_cache_is_resident_only_where_written():
    from llamacpu.model import KVCache
    from tiny import tiny_config
    c = tiny_config(num_hidden_layers=4, num_key_value_heads=2)
    cache = KVCache(c, 32768, np.float32)  # 4 layers x 32768 positions x 2 heads x hd: MBs per layer
    per_layer = cache.k[0].nbytes
    assert per_layer >= 4 * 2**20 and not cache.k.any()  # zeros, as np.zeros would be
    cache.k[:, :3] = 1.0  # three positions in every layer
    assert mapping_rss_kb(cache.k) <= c.num_hidden_layers * 2 * PAGE // 1024  # not 2 MiB huge pages each
    assert cache.k[:, :3].all() and not cache.k[:, 3:].any()
