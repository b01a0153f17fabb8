"""Quantized linear layers: y = x @ W.T over QTensor weights, packed once at load for the kernels.

The kernels (`kernels.py`) want 16 rows' quants side by side, block by block, with each block's
scales apart from its quants. Packing rearranges ggml's interleaved blocks once, at load,
into row groups of 16 (the layout is described at `kernels.gemm_blocks`), keeping the quants
and the f16 scales as they are:

    q8_0   → bits 8: w (G, nb, 512) int8 quants, d (G, nb, 16), s = per-block sums of quants
    q4_0   → bits 4: w (G, nb, 256) ggml's nibble bytes, d (G, nb, 16)      w = d (q - 8)
    q4_1   → bits 4: w, d, m (G, nb, 16)                                   w = d q + m

(G = rows/16 rounded up: missing rows are zero and their outputs are dropped; nb = cols/32.)
A packed q4 matrix is as big as the ggml one; q8_0 carries 2 more bytes per block (s).

Several matrices that read the same input (wq, wk, wv; w_gate, w_up) are packed as one,
rows concatenated, so one kernel call computes them. A group mixing q4_0 and q4_1 packs as
q4_1 (m = -8 d, exact in f16); a group mixing 8-bit and 4-bit formats widens the 4-bit
members to 8-bit quants (q - 8, or q with their m): lossless, only bigger.
The packed copy costs the weights' size in RAM once; the mmapped originals' pages are released
as each matrix is copied (`pages.release`), so the file is not resident a second time.

Every product, decode (one row) or prefill (T rows), quantizes x to 8-bit blocks (1 plane,
ggml's Q8 activations) or 15-bit ones (2 planes, see `kernels.quantize_planes`) and runs the
integer GEMM `kernels.linear_blocks`. f32/f16 weights use numpy's BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import LlamacpuError
from .pages import release
from .quant import BLOCK, BLOCK_FORMATS, FLOAT_DTYPES, QTensor

PACKABLE = ("q8_0", "q4_0", "q4_1")  # formats the kernels run
FOUR_BIT = ("q4_0", "q4_1")
RG = kernels.RG  # rows per group
ACT_PLANES = {8: 1, 16: 2}  # act_bits → int8 planes per token (16 means the 15-bit split)


@dataclass(frozen=True)
class PackedBlocks:
    """A matrix, or a stack of matrices (leading axes), in the kernels' row-group layout.

    w: (..., G, nb, 512) uint8 if bits == 8, (..., G, nb, 256) if bits == 4; d: (..., G, nb, 16)
    f16 bits (uint16); m: (..., G, nb, 16) f16 bits, or (..., G, nb, 0) when the format has no
    offsets (bits 8: w = d q; bits 4 without m is q4_0: w = d (q - 8)); s: (..., G, nb, 16)
    int16 sums of each block's quants (bits 8), or (..., G, nb, 0). `rows` real rows out of 16 G.
    """

    w: np.ndarray
    d: np.ndarray
    m: np.ndarray
    s: np.ndarray
    bits: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        # Everything a kernel indexes is checked here, once, so kernels may skip bounds checks.
        nb = self.cols // BLOCK
        lead = self.d.shape[:-2]  # (..., G)
        ok = (self.bits in (8, 4) and self.cols % BLOCK == 0 and self.cols > 0 and len(lead) >= 1
              and 0 < self.rows <= lead[-1] * RG and self.rows > (lead[-1] - 1) * RG
              and self.w.dtype == np.uint8 and self.d.dtype == np.uint16 and self.m.dtype == np.uint16
              and self.s.dtype == np.int16
              and self.d.shape == lead + (nb, RG) and self.m.shape in (lead + (nb, RG), lead + (nb, 0))
              and self.s.shape == lead + (nb, RG if self.bits == 8 else 0)
              and self.w.shape == lead + (nb, RG * BLOCK * self.bits // 8)
              and all(a.flags.c_contiguous for a in (self.w, self.d, self.m, self.s)))
        if not ok:
            raise LlamacpuError(f"inconsistent packed weight: w {self.w.dtype}{self.w.shape}, "
                                f"d {self.d.shape}, m {self.m.shape}, s {self.s.shape}, bits {self.bits}, "
                                f"rows {self.rows}, cols {self.cols}")

    @property
    def padded_rows(self) -> int:
        return self.d.shape[-3] * RG

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.d.nbytes + self.m.nbytes + self.s.nbytes

    @property
    def kernel_args(self) -> tuple:
        """(w, d, m, s, bits): the tuple the kernels take."""
        return (self.w, self.d, self.m, self.s, self.bits)

    def __getitem__(self, i: int) -> "PackedBlocks":
        """Matrix i of a stack."""
        return PackedBlocks(self.w[i], self.d[i], self.m[i], self.s[i], self.bits, self.rows, self.cols)

    def dequantize(self) -> np.ndarray:
        """One matrix as f32 (rows, cols), read back from the packed layout (numpy; for tests
        and for checking a packing)."""
        if self.w.ndim != 3:
            raise LlamacpuError("dequantize takes one matrix, not a stack")
        G, nb, _ = self.w.shape
        if self.bits == 8:
            q = self.w.view(np.int8).reshape(G, nb, 8, RG, 4).transpose(0, 3, 1, 2, 4)  # (G, 16, nb, 8, 4)
            q = q.reshape(G, RG, nb, BLOCK).astype(np.float32)
        else:
            b = self.w.reshape(G, nb, 4, RG, 4).transpose(0, 3, 1, 2, 4).reshape(G, RG, nb, 16)
            q = np.concatenate([b & 0x0F, b >> 4], axis=-1).astype(np.float32)  # (G, 16, nb, 32)
        d = self.d.view(np.float16).astype(np.float32).transpose(0, 2, 1)[..., None]  # (G, 16, nb, 1)
        if self.m.shape[-1]:
            out = d * q + self.m.view(np.float16).astype(np.float32).transpose(0, 2, 1)[..., None]
        elif self.bits == 4:
            out = d * (q - 8)
        else:
            out = d * q
        return out.reshape(G * RG, nb * BLOCK)[:self.rows]


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
    b = t.data.reshape(R, nb, BLOCK_FORMATS[t.fmt].nbytes)  # (R, nb, block_bytes), a view of the mmap
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


def _to_groups(a: np.ndarray, G: int, unit: int) -> np.ndarray:
    """(R, nb, k*unit) per-row block data → (G, nb, k, 16, unit): 16 rows side by side, `unit`
    bytes of a row at a time (rows past R are zero)."""
    R, nb, width = a.shape
    padded = np.zeros((G * RG, nb, width), dtype=a.dtype)
    padded[:R] = a
    return padded.reshape(G, RG, nb, width // unit, unit).transpose(0, 2, 3, 1, 4)


def pack_stack(groups: list[list[QTensor]]) -> PackedBlocks:
    """Pack L groups of block matrices (rows concatenated within a group) into one (L, G, ...) stack.

    Every group must have the same member shapes; 4-bit only if every member is 4-bit."""
    first = groups[0]
    cols = first[0].cols
    for g in groups:
        if [t.shape for t in g] != [t.shape for t in first]:
            raise LlamacpuError("layers disagree on weight shapes")
        for t in g:
            if t.fmt not in PACKABLE:
                raise LlamacpuError(f"{t.fmt} weights cannot be packed into blocks")
            if t.cols != cols:
                raise LlamacpuError("fused weights must share their input width")
    fmts = {t.fmt for g in groups for t in g}
    bits = 4 if fmts <= set(FOUR_BIT) else 8
    has_m = "q4_1" in fmts or (bits == 8 and bool(fmts & set(FOUR_BIT)))
    L, R, nb = len(groups), sum(t.rows for t in first), cols // BLOCK
    G = -(-R // RG)
    w = np.empty((L, G, nb, RG * BLOCK * bits // 8), dtype=np.uint8)
    d = np.empty((L, G, nb, RG), dtype=np.uint16)
    m = np.empty((L, G, nb, RG if has_m else 0), dtype=np.uint16)
    s = np.empty((L, G, nb, RG if bits == 8 else 0), dtype=np.int16)
    for li, g in enumerate(groups):
        parts = [_split(t, bits, has_m) for t in g]
        gw = np.concatenate([p[0] for p in parts])  # (R, C*bits/8)
        gd = np.concatenate([p[1] for p in parts])  # (R, nb)
        # (R, nb, 32 or 16 bytes) → 4 bytes of each of 16 rows at a time
        w[li] = _to_groups(gw.reshape(R, nb, -1), G, 4).reshape(G, nb, -1)
        d[li] = _to_groups(gd.reshape(R, nb, 1), G, 1).reshape(G, nb, RG)
        if has_m:
            gm = np.concatenate([p[2] for p in parts])
            m[li] = _to_groups(gm.reshape(R, nb, 1), G, 1).reshape(G, nb, RG)
        if bits == 8:
            sums = gw.view(np.int8).reshape(R, nb, BLOCK).sum(axis=-1, dtype=np.int16)  # |sum| <= 32*128
            s[li] = _to_groups(sums.reshape(R, nb, 1), G, 1).reshape(G, nb, RG)
        for t in g:
            release(t.data)  # copied: its mmapped pages need not stay resident too
    return PackedBlocks(w, d, m, s, bits, R, cols)


def pack(t: QTensor) -> PackedBlocks:
    """One block matrix in the packed layout."""
    return pack_stack([[t]])[0]


class Linear:
    """y = x @ W.T for a weight W of shape (out, in): packed blocks, or dense f32/f16.

    Call with x (T, in) f32. Packed weights run the integer GEMM on x quantized per token to
    `act_bits` (8: one int8 plane, as ggml; 16: the 15-bit two-plane split, near-f32 logits).
    Dense weights (a f32/f16 QTensor or array) use numpy's BLAS.
    """

    def __init__(self, weight: PackedBlocks | QTensor | np.ndarray, threads: int = 1, act_bits: int = 16):
        if act_bits not in ACT_PLANES:
            raise LlamacpuError(f"act_bits must be 8 or 16, got {act_bits}")
        self.threads = threads
        self.act_bits = act_bits
        if isinstance(weight, np.ndarray):
            weight = QTensor("f32" if weight.dtype == np.float32 else "f16", weight.shape, weight)
        if isinstance(weight, PackedBlocks):
            if weight.w.ndim != 3:
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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (T, in) → (T, out) float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise LlamacpuError(f"linear layer of shape {self.shape} cannot take input {x.shape}")
        if self.dense is not None:
            w = self.dense if self.dense.dtype == np.float32 else self.dense.astype(np.float32)
            return x @ w.T
        p = self.packed
        T, C = x.shape
        n = T * ACT_PLANES[self.act_bits]  # int8 rows of activations
        y = np.empty((T, p.padded_rows), dtype=np.float32)
        kernels.linear_blocks(x, p.kernel_args, np.empty(n * C, np.int8), np.empty(n * C, np.uint8),
                              np.empty(n * C // BLOCK, np.float32), np.empty(n * C // BLOCK, np.float32),
                              ACT_PLANES[self.act_bits], y, self.threads)
        return y[:, :self.out_features] if p.padded_rows != self.out_features else y

    def dequantize(self) -> np.ndarray:
        """W as f32 (out, in)."""
        if self.dense is not None:
            return self.dense.astype(np.float32, copy=False)
        return self.packed.dequantize()
