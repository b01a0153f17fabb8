"""Quantized linear layers: y = x @ W.T over QTensor weights, packed once at load for the kernels.

The kernels (`kernels.py`) want a block's scale apart from its quants, so that the quants of a
row are one contiguous run of bytes. Packing splits ggml's interleaved blocks once, at load,
keeping every byte (scales stay f16, stored as their uint16 bits), so a packed matrix is
exactly as big as the ggml one:

    q8_0   → w (R, C) uint8 (int8 quants), d (R, C/32), m (R, 0)         bits 8, w = d q
    q4_0   → w (R, C/2) uint8 (same nibble order), d (R, C/32), m (R, 0)  bits 4, w = d (q - 8)
    q4_1   → w (R, C/2) uint8, d, m (R, C/32)                             bits 4, w = d q + m

Several matrices that read the same input (wq, wk, wv; w_gate, w_up) are packed as one,
rows concatenated, so the decoder launches one parallel kernel for them. A group mixing q4_0
and q4_1 packs as q4_1 (m = -8 d, exact in f16); a group mixing 8-bit and 4-bit formats
widens the 4-bit members to 8-bit quants (q - 8, or q with their m): lossless, only bigger.
The packed copy costs the weights' size in RAM once; the mmapped originals' pages are released
as each matrix is copied (`pages.release`), so the file is not resident a second time.

Decode (one row) quantizes x to 8- or 16-bit blocks (`act_dtype` int8 or int16) and runs the
integer matvec kernel; prefill (T rows) dequantizes the matrix into a reused f32 panel and hands
it to numpy's BLAS.
f32/f16 QTensors (the dequantized reference path) use numpy directly.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import LlamacpuError
from .pages import release
from .quant import BLOCK, BLOCK_BYTES, FLOAT_DTYPES, QTensor

FOUR_BIT = ("q4_0", "q4_1")
# Up to this many rows, x is quantized to integer blocks and multiplied by the integer kernel
# (weights read once, no dequantization); beyond it, dequantizing W for BLAS is faster.
# Measured on SmolLM2 (2 threads, q8_0 and q4_0): break-even near 40 rows. 1 row is the decode path.
INT8_ROWS = 32


@functools.lru_cache(maxsize=1)
def _openblas_thread_setter():
    """numpy's OpenBLAS `set_num_threads`, found in the loaded libraries, or None.

    OpenBLAS reads its thread count once from the environment; changing it later needs
    this call (threadpoolctl does the same). Found through /proc/self/maps, so Linux only."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                return fn
    return None


def set_blas_threads(n: int) -> bool:
    """Make numpy's matmul use `n` threads; False if the BLAS is not an OpenBLAS we can reach."""
    fn = _openblas_thread_setter()
    if fn is None:
        return False
    fn(int(n))
    return True


@dataclass(frozen=True)
class PackedBlocks:
    """A matrix, or a stack of matrices (leading axes), in the kernels' block layout.

    w: (..., R, C) uint8 if bits == 8, (..., R, C/2) if bits == 4; d: (..., R, C/32) f16 bits
    (uint16); m: (..., R, C/32) f16 bits, or (..., R, 0) when the format has no offsets
    (q8_0: w = d q; 4-bit without m is q4_0: w = d (q - 8)).
    """

    w: np.ndarray
    d: np.ndarray
    m: np.ndarray
    bits: int
    cols: int

    def __post_init__(self) -> None:
        # Everything a kernel indexes is checked here, once, so kernels may skip bounds checks.
        nb = self.cols // BLOCK
        lead = self.d.shape[:-1]  # (..., R)
        ok = (self.bits in (8, 4) and self.cols % BLOCK == 0 and self.cols > 0
              and self.w.dtype == np.uint8 and self.d.dtype == np.uint16 and self.m.dtype == np.uint16
              and self.d.shape == lead + (nb,) and self.m.shape in (lead + (nb,), lead + (0,))
              and self.w.shape == lead + (self.cols * self.bits // 8,)
              and all(a.flags.c_contiguous for a in (self.w, self.d, self.m)))
        if not ok:
            raise LlamacpuError(f"inconsistent packed weight: w {self.w.dtype}{self.w.shape}, "
                                f"d {self.d.shape}, m {self.m.shape}, bits {self.bits}, cols {self.cols}")

    @property
    def rows(self) -> int:
        return self.d.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.d.nbytes + self.m.nbytes

    def __getitem__(self, i: int) -> "PackedBlocks":
        """Matrix i of a stack."""
        return PackedBlocks(self.w[i], self.d[i], self.m[i], self.bits, self.cols)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(R, nb, block_bytes) uint8 → the f16 bits at byte `offset` of every block, uint16 (R, nb)."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.uint16)[..., 0]


def _neg8(d: np.ndarray) -> np.ndarray:
    """f16 bits of -8 d (exact: a power-of-two multiple), for q4_0 rows packed as q4_1."""
    with np.errstate(over="raise"):
        return (d.view(np.float16) * np.float16(-8)).view(np.uint16)


def _split(t: QTensor, bits: int, with_m: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One ggml block matrix → (w, d, m or None) in the packed layout of `bits` (m if `with_m`)."""
    R, C = t.shape
    nb = C // BLOCK
    b = t.data.reshape(R, nb, BLOCK_BYTES[t.fmt])  # (R, nb, block_bytes), a view of the mmap
    d = _f16_field(b, 0)
    if t.fmt == "q8_0":
        return b[..., 2:].reshape(R, C), d, (np.zeros_like(d) if with_m else None)
    nibbles = b[..., 4:] if t.fmt == "q4_1" else b[..., 2:]  # (R, nb, 16)
    if bits == 4:
        m = _f16_field(b, 2) if t.fmt == "q4_1" else (_neg8(d) if with_m else None)
        return nibbles.reshape(R, C // 2), d, m
    # Widen to 8-bit quants in element order: low nibbles are elements 0..15, high 16..31.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(R, C).astype(np.int16)
    if t.fmt == "q4_0":
        return (q - 8).astype(np.int8).view(np.uint8), d, np.zeros_like(d)
    return q.astype(np.uint8), d, _f16_field(b, 2)


def pack_stack(groups: list[list[QTensor]]) -> PackedBlocks:
    """Pack L groups of block matrices (rows concatenated within a group) into one (L, R, ...) stack.

    Every group must have the same member shapes; 4-bit only if every member is 4-bit."""
    first = groups[0]
    cols = first[0].cols
    for g in groups:
        if [t.shape for t in g] != [t.shape for t in first]:
            raise LlamacpuError("layers disagree on weight shapes")
        for t in g:
            if t.fmt not in BLOCK_BYTES:
                raise LlamacpuError(f"{t.fmt} weights cannot be packed into blocks")
            if t.cols != cols:
                raise LlamacpuError("fused weights must share their input width")
    fmts = {t.fmt for g in groups for t in g}
    bits = 4 if fmts <= set(FOUR_BIT) else 8
    has_m = "q4_1" in fmts or (bits == 8 and bool(fmts & set(FOUR_BIT)))
    L, R, nb = len(groups), sum(t.rows for t in first), cols // BLOCK
    w = np.empty((L, R, cols * bits // 8), dtype=np.uint8)
    d = np.empty((L, R, nb), dtype=np.uint16)
    m = np.zeros((L, R, nb if has_m else 0), dtype=np.uint16)
    for li, g in enumerate(groups):
        r0 = 0
        for t in g:
            tw, td, tm = _split(t, bits, has_m)
            w[li, r0:r0 + t.rows] = tw
            d[li, r0:r0 + t.rows] = td
            if has_m:
                m[li, r0:r0 + t.rows] = tm
            r0 += t.rows
            release(t.data)  # copied: its mmapped pages need not stay resident too
    return PackedBlocks(w, d, m, bits, cols)


def pack(t: QTensor) -> PackedBlocks:
    """One block matrix in the packed layout."""
    return pack_stack([[t]])[0]


class Linear:
    """y = x @ W.T for a weight W of shape (out, in): packed blocks, or dense f32/f16.

    Call with x (T, in) f32. Up to INT8_ROWS rows run the integer kernels, on x quantized to
    blocks of `act_dtype` (int8 or int16) quants; more rows dequantize W into `panel` (a reused
    f32 buffer of at least out*in) and use BLAS.
    """

    def __init__(self, weight: PackedBlocks | QTensor, threads: int = 1, act_dtype=np.int16):
        self.threads = threads
        self.act_dtype = act_dtype
        if isinstance(weight, PackedBlocks):
            if weight.w.ndim != 2:
                raise LlamacpuError("Linear takes one matrix, not a stack")
            self.packed, self.dense = weight, None
            self.shape = (weight.rows, weight.cols)
        elif weight.fmt in FLOAT_DTYPES:
            if len(weight.shape) != 2:
                raise LlamacpuError(f"a linear weight must be a matrix, got shape {weight.shape}")
            self.packed, self.dense = None, weight.data  # (out, in), f32 or f16
            self.shape = weight.shape
        else:
            self.packed, self.dense = pack(weight), None
            self.shape = weight.shape

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def __call__(self, x: np.ndarray, panel: np.ndarray | None = None) -> np.ndarray:
        """x (T, in) → (T, out) float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise LlamacpuError(f"linear layer of shape {self.shape} cannot take input {x.shape}")
        if self.dense is not None:
            w = self.dense if self.dense.dtype == np.float32 else self.dense.astype(np.float32)
            return x @ w.T
        p = self.packed
        T, nb = x.shape[0], self.in_features // BLOCK
        if T == 1:
            y = np.empty((1, self.out_features), dtype=np.float32)
            kernels.matvec_blocks(p.w, p.d, p.m, p.bits, x[0], np.empty(self.in_features, self.act_dtype),
                                  np.empty(nb, np.float32), np.empty(nb, np.float32), y[0], self.threads)
            return y
        if T <= INT8_ROWS:
            xq = np.empty(x.shape, dtype=self.act_dtype)  # (T, in)
            xd, xs = np.empty((T, nb), dtype=np.float32), np.empty((T, nb), dtype=np.float32)
            for t in range(T):
                kernels.quantize_act(x[t], xq[t], xd[t], xs[t])
            y = np.empty((T, self.out_features), dtype=np.float32)
            kernels.matmul_blocks(p.w, p.d, p.m, p.bits, xq, xd, xs, y, self.threads)
            return y
        return x @ self.dequantize(panel).T

    def dequantize(self, panel: np.ndarray | None = None) -> np.ndarray:
        """W as f32 (out, in), written into `panel` (flat f32, reused between calls) if given."""
        if self.dense is not None:
            return self.dense.astype(np.float32, copy=False)
        n = self.out_features * self.in_features
        if panel is None or panel.dtype != np.float32 or panel.size < n or not panel.flags.c_contiguous:
            panel = np.empty(n, dtype=np.float32)
        out = panel[:n].reshape(self.shape)
        p = self.packed
        kernels.dequantize_blocks(p.w, p.d, p.m, p.bits, out, self.threads)
        return out
