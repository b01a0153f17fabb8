"""Quantized linear layers: y = x @ W.T over QTensor weights, packed once at load for the kernels.

The kernels (`kernels.py`) want 16 rows' quants side by side, block by block, with each block's
scales apart from its quants. Packing rearranges ggml's interleaved blocks once, at load,
into row groups of 16 (the layout is described at `kernels.gemm_blocks`), keeping the quants
and the f16 scales as they are:

    q8_0   → bits 8: w (G, nb, 512) int8 quants, d (G, nb, 16), s = per-block sums of quants
    q4_0   → bits 4: w (G, nb, 256) ggml's nibble bytes, d (G, nb, 16)      w = d (q - 8)
    q4_1   → bits 4: w, d, m (G, nb, 16)                                   w = d q + m
    q5_0   → bits 8, quants widened to q - 16 (as q8_0)
    q5_1   → bits 8, quants widened, with m (as q4_1 widened)
    q4_k, q5_k, q6_k → a K-quant kind (`kernels.KQ_KINDS`): quants in 4-bit + 1- or 2-bit planes,
             the integer sub-block scales and the f16 super-block scales kept as they are

(G = rows/16 rounded up: missing rows are zero and their outputs are dropped; nb = cols/32.)
A packed q4 matrix is as big as the ggml one; q8_0 carries 2 more bytes per block (s).
K-quants, bits per weight packed (file): q4_k 4.625 (4.5), q5_k 5.625 (5.5), q6_k 6.5625 (6.5625);
a fused group mixing q6_k with q4_k/q5_k rows (llama.cpp's Q4_K_M/Q5_K_M put attn_v in q6_k in
some layers) packs every member in the general K kind: 6-bit planes with mins, 7.1 bits per weight.

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
from .quant import BLOCK, BLOCK_FORMATS, FLOAT_DTYPES, QK_K, QTensor, k_scales_mins, unpack

K_QUANTS = ("q4_k", "q5_k", "q6_k")  # 256-weight super-blocks: the kernels' KQ_KINDS
PACKABLE = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", *K_QUANTS)  # formats the kernels run
FOUR_BIT = ("q4_0", "q4_1")
WITH_MIN = ("q4_1", "q5_1")
RG = kernels.RG  # rows per group
ACT_PLANES = {8: 1, 16: 2}  # act_bits → int8 planes per token (16 means the 15-bit split)


@dataclass(frozen=True)
class PackedBlocks:
    """A matrix, or a stack of matrices (leading axes), in the kernels' row-group layout.

    w: (..., G, nb, 512) uint8 if bits == 8, (..., G, nb, 256) if bits == 4; d: (..., G, nb, 16)
    f16 bits (uint16); m: (..., G, nb, 16) f16 bits, or (..., G, nb, 0) when the format has no
    offsets (bits 8: w = d q; bits 4 without m is q4_0: w = d (q - 8)); s: (..., G, nb, 16)
    int16 sums of each block's quants (bits 8), or (..., G, nb, 0). `rows` real rows out of 16 G.
    `bits` may instead be a K-quant kind (`kernels.KQ_KINDS`), whose planes are laid out at
    kernels' K-quant section: w (..., G, nb, 256 | 320 | 384), d (..., G, nb/8, 16 | 32),
    s (..., G, nb, 16) sub-scales, m (..., G, nb, 16 | 0) mins.
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
        if self.bits in kernels.KQ_KINDS:
            ok = self._k_shapes_ok()
        else:
            ok = self._shapes_ok(nb, lead)
        if not ok:
            raise LlamacpuError(f"inconsistent packed weight: w {self.w.dtype}{self.w.shape}, "
                                f"d {self.d.shape}, m {self.m.shape}, s {self.s.shape}, bits {self.bits}, "
                                f"rows {self.rows}, cols {self.cols}")

    def _k_shapes_ok(self) -> bool:
        qbits, form = kernels.KQ_KINDS[self.bits]
        nb = self.cols // BLOCK
        lead = self.s.shape[:-2]  # (..., G)
        return (self.cols % QK_K == 0 and self.cols > 0 and len(lead) >= 1
                and 0 < self.rows <= lead[-1] * RG and self.rows > (lead[-1] - 1) * RG
                and self.w.dtype == np.uint8 and self.d.dtype == np.uint16 and self.m.dtype == np.uint16
                and self.s.dtype == np.int16
                and self.w.shape == lead + (nb, kernels.KQ_BYTES[qbits])
                and self.d.shape == lead + (nb // 8, RG if form == kernels.K_CENTER else 2 * RG)
                and self.s.shape == lead + (nb, RG)
                and self.m.shape == lead + (nb, RG if form == kernels.K_GENERAL else 0)
                and all(a.flags.c_contiguous for a in (self.w, self.d, self.m, self.s)))

    def _shapes_ok(self, nb: int, lead: tuple) -> bool:
        return (self.bits in (8, 4) and self.cols % BLOCK == 0 and self.cols > 0 and len(lead) >= 1
              and 0 < self.rows <= lead[-1] * RG and self.rows > (lead[-1] - 1) * RG
              and self.w.dtype == np.uint8 and self.d.dtype == np.uint16 and self.m.dtype == np.uint16
              and self.s.dtype == np.int16
              and self.d.shape == lead + (nb, RG) and self.m.shape in (lead + (nb, RG), lead + (nb, 0))
              and self.s.shape == lead + (nb, RG if self.bits == 8 else 0)
              and self.w.shape == lead + (nb, RG * BLOCK * self.bits // 8)
              and all(a.flags.c_contiguous for a in (self.w, self.d, self.m, self.s)))

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
        if self.bits in kernels.KQ_KINDS:
            return self._k_dequantize()
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

    def _k_dequantize(self) -> np.ndarray:
        """A K-quant kind's planes read back (see kernels' K-quant section), in f64, rounded once."""
        qbits, form = kernels.KQ_KINDS[self.bits]
        G, nb, _ = self.w.shape
        b = self.w[..., :256].reshape(G, nb, 4, RG, 4).transpose(0, 3, 1, 2, 4).reshape(G, RG, nb, 16)
        q = np.concatenate([b & 0x0F, b >> 4], axis=-1).astype(np.int64)  # (G, 16, nb, 32)
        if qbits == 5:  # byte j of a row, bit k: element 4k + j
            p = self.w[..., 256:320].reshape(G, nb, RG, 4).transpose(0, 2, 1, 3)[..., None, :]  # (G, 16, nb, 1, 4)
            q |= (((p >> np.arange(8, dtype=np.uint8)[:, None]) & 1).astype(np.int64) << 4).reshape(G, RG, nb, 32)
        elif qbits == 6:  # plane p, byte j, bits 2i..2i+1: element 4 (4p + i) + j
            p = self.w[..., 256:384].reshape(G, nb, 2, RG, 4).transpose(0, 3, 1, 2, 4)[..., None, :]  # (G,16,nb,2,1,4)
            hb = (p >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (G, 16, nb, 2, 4, 4)
            q |= hb.astype(np.int64).reshape(G, RG, nb, 32) << 4
        per_block = lambda a: np.repeat(a.view(np.float16).astype(np.float64).transpose(0, 2, 1), 8, axis=2)  # noqa: E731
        d = per_block(self.d[..., :RG])[..., None]  # (G, 16, nb, 1)
        sv = self.s.view(np.uint16).transpose(0, 2, 1)  # (G, 16, nb)
        lo, hi = (sv & 0xFF).astype(np.int64), (sv >> 8).astype(np.int64)
        q = q.reshape(G, RG, nb, 2, 16).astype(np.float64)
        if form == kernels.K_MIN:
            out = d[..., None] * lo[..., None, None] * q - (per_block(self.d[..., RG:]) * hi)[..., None, None]
        else:
            sc = np.stack([lo, hi], axis=-1).astype(np.uint8).view(np.int8)[..., None]  # (G, 16, nb, 2, 1)
            if form == kernels.K_CENTER:
                out = d[..., None] * sc * (q - 32)
            else:
                mv = self.m.transpose(0, 2, 1)
                mn = np.stack([mv & 0xFF, mv >> 8], axis=-1).astype(np.uint8).view(np.int8)[..., None]
                out = d[..., None] * sc * q - per_block(self.d[..., RG:])[..., None, None] * mn
        return out.astype(np.float32).reshape(G * RG, nb * BLOCK)[:self.rows]


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
    bf = BLOCK_FORMATS[t.fmt]
    b = t.data.reshape(R, nb, bf.nbytes)  # (R, nb, block_bytes), a view of the mmap
    d = _f16_field(b, 0)
    if t.fmt in ("q5_0", "q5_1"):  # widened to 8-bit quants, exactly: q - 16 (q5_0), or q with its m
        q = unpack(t.fmt, b.reshape(R * nb, bf.nbytes)).q.reshape(R, C)
        d = np.ascontiguousarray(bf.field(b, "d")).view(np.uint16)[..., 0]
        if t.fmt == "q5_1":
            return q.view(np.uint8), d, np.ascontiguousarray(bf.field(b, "m")).view(np.uint16)[..., 0]
        return q.view(np.uint8), d, (np.zeros_like(d) if with_m else None)
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

    Every group must have the same member shapes; 4-bit only if every member is 4-bit; K-quants
    only with K-quants (`fusable`)."""
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
    if fmts & set(K_QUANTS):
        if not fmts <= set(K_QUANTS):
            raise LlamacpuError(f"cannot fuse K-quant weights with {', '.join(sorted(fmts - set(K_QUANTS)))}")
        return _pack_k_stack(groups, fmts)
    bits = 4 if fmts <= set(FOUR_BIT) else 8
    has_m = bool(fmts & set(WITH_MIN)) or (bits == 8 and bool(fmts & set(FOUR_BIT)))
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


def fusable(group: list[QTensor]) -> bool:
    """Whether the kernels can run these matrices (same input) as one packed matrix."""
    fmts = {t.fmt for t in group}
    return fmts <= set(PACKABLE) and (fmts <= set(K_QUANTS) or not fmts & set(K_QUANTS))


def stackable(groups: list[list[QTensor]]) -> bool:
    """Whether `pack_layers` takes these per-layer groups: each fusable, and K-quants in every
    layer or in none."""
    return (all(fusable(g) for g in groups)
            and len({all(t.fmt in K_QUANTS for t in g) for g in groups}) == 1)


def k_kind(fmts: set[str]) -> int:
    """The kernels' K-quant kind that holds every member format exactly (see `kernels.KQ_KINDS`)."""
    if fmts <= {"q4_k"}:
        return kernels.KQ4
    if fmts <= {"q4_k", "q5_k"}:
        return kernels.KQ5
    return kernels.KQ6 if fmts == {"q6_k"} else kernels.KQG


def _k_parts(t: QTensor) -> tuple[np.ndarray, ...]:
    """A K-quant matrix → its unsigned quants q (R, nb, 32) uint8, f16 bits d, dmin (R, nsb)
    (dmin None for q6_k), and per 32-block the two halves' integer scales sc (R, nb, 2) and
    mins mn (R, nb, 2) (None for q6_k), all read through the block descriptor."""
    R, C = t.shape
    bf = BLOCK_FORMATS[t.fmt]
    nsb, nb = C // QK_K, C // BLOCK
    blocks = t.data.reshape(R * nsb, bf.nbytes)
    u = unpack(t.fmt, blocks)
    d = np.ascontiguousarray(bf.field(blocks, "d")).view(np.uint16).reshape(R, nsb)
    if t.fmt == "q6_k":
        q = (u.q.astype(np.int16) + bf.center).astype(np.uint8).reshape(R, nb, BLOCK)
        sc = bf.field(blocks, "scales").view(np.int8).reshape(R, nb, 2).astype(np.int16)
        return q, d, None, sc, None
    dmin = np.ascontiguousarray(bf.field(blocks, "dmin")).view(np.uint16).reshape(R, nsb)
    sc, mn = k_scales_mins(bf.field(blocks, "scales"))  # (R*nsb, 8) each: one per 32-block
    two = lambda a: np.repeat(a.reshape(R, nb, 1).astype(np.int16), 2, axis=2)  # noqa: E731
    return u.q.reshape(R, nb, BLOCK), d, dmin, two(sc), two(mn)


def _k_planes(q: np.ndarray, qbits: int) -> np.ndarray:
    """Unsigned quants (R, nb, 32) → per block the bytes of one row in the K planes (R, nb, 16 | 20 | 24):
    16 nibble bytes (element j low, j + 16 high), then bit 4 (byte j, bit k: element 4k + j) or
    bits 4-5 (plane p, byte j, bits 2i: element 4 (4p + i) + j)."""
    nib = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
    hi = (q >> 4).reshape(*q.shape[:-1], 8, 4)  # (R, nb, k-group, j)
    if qbits == 4:
        return nib
    if qbits == 5:
        plane = ((hi & 1) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=-2, dtype=np.uint8)  # (R, nb, 4)
    else:
        hi = hi.reshape(*q.shape[:-1], 2, 4, 4)  # (R, nb, p, i, j)
        plane = ((hi & 3) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=-2, dtype=np.uint8)
        plane = plane.reshape(*q.shape[:-1], 8)
    return np.concatenate([nib, plane], axis=-1)


K_PACK_ROWS = 1024  # rows packed per step: bounds the packer's temporaries (a few tens of bytes a weight)


def _rows(group: list[QTensor], r0: int, r1: int) -> list[QTensor]:
    """Rows r0..r1 of the group's matrices stacked, as views of the members' rows."""
    out, a = [], 0
    for t in group:
        lo, hi = max(r0, a), min(r1, a + t.rows)
        if lo < hi:
            out.append(QTensor(t.fmt, (hi - lo, t.cols), t.data[lo - a:hi - a]))
        a += t.rows
    return out


def _pack_k_stack(groups: list[list[QTensor]], fmts: set[str]) -> PackedBlocks:
    kind = k_kind(fmts)
    qbits, form = kernels.KQ_KINDS[kind]
    first = groups[0]
    L, R, cols = len(groups), sum(t.rows for t in first), first[0].cols
    nb, nsb = cols // BLOCK, cols // QK_K
    G = -(-R // RG)
    w = np.empty((L, G, nb, kernels.KQ_BYTES[qbits]), dtype=np.uint8)
    d = np.empty((L, G, nsb, RG if form == kernels.K_CENTER else 2 * RG), dtype=np.uint16)
    m = np.empty((L, G, nb, RG if form == kernels.K_GENERAL else 0), dtype=np.uint16)
    s = np.empty((L, G, nb, RG), dtype=np.int16)
    for li, g in enumerate(groups):
        for r0 in range(0, R, K_PACK_ROWS):  # K_PACK_ROWS is a multiple of 16: whole row groups
            r1 = min(R, r0 + K_PACK_ROWS)
            g0, g1 = r0 // RG, -(-r1 // RG)
            n = r1 - r0
            grouped = lambda a: _to_groups(a.reshape(n, a.shape[1], 1), g1 - g0, 1).reshape(  # noqa: E731
                g1 - g0, a.shape[1], RG)
            qs, ds, dmins, scs, mns = [], [], [], [], []
            for t in _rows(g, r0, r1):
                q, dd, dmin, sc, mn = _k_parts(t)
                if mn is None and form == kernels.K_GENERAL:  # a q6_k row with mins: dmin = 32 d (exact), mn = sc
                    with np.errstate(over="raise"):
                        dmin = (dd.view(np.float16) * np.float16(32)).view(np.uint16)
                    mn = sc
                qs.append(q)
                ds.append(dd)
                dmins.append(dmin)
                scs.append(sc)
                mns.append(mn)
            q = np.concatenate(qs)  # (n, nb, 32)
            w[li, g0:g1] = _to_groups(_k_planes(q, qbits), g1 - g0, 4).reshape(g1 - g0, nb, -1)
            sc = np.concatenate(scs)  # (n, nb, 2)
            if form == kernels.K_MIN:  # (sc, m): both halves share them
                pair = sc[..., 0].astype(np.uint16) | (np.concatenate(mns)[..., 0].astype(np.uint16) << 8)
            else:
                pair = (sc[..., 0].astype(np.uint16) & 0xFF) | ((sc[..., 1].astype(np.uint16) & 0xFF) << 8)
            s[li, g0:g1] = grouped(pair.view(np.int16))
            d[li, g0:g1, :, :RG] = grouped(np.concatenate(ds))
            if form != kernels.K_CENTER:
                d[li, g0:g1, :, RG:] = grouped(np.concatenate(dmins))
            if form == kernels.K_GENERAL:
                mn = np.concatenate(mns)
                m[li, g0:g1] = grouped((mn[..., 0].astype(np.uint16) & 0xFF) | ((mn[..., 1].astype(np.uint16) & 0xFF) << 8))
        for t in g:
            release(t.data)  # copied: its mmapped pages need not stay resident too
    return PackedBlocks(w, d, m, s, kind, R, cols)


@dataclass(frozen=True)
class PackedLayers:
    """Per-layer packed matrices whose K-quant kinds differ between layers (llama.cpp's Q4_K_M
    gives some layers' attn_v and ffn_down Q6_K), each in its own kind, in flat buffers: the
    decode kernel finds layer i through `table[i]` (kernels' `_at`); `layers[i]` is the same
    matrix as a PackedBlocks view, for the prefill. One stacked kind would widen every layer
    to the widest (measured at the 1.1B shape: ffn_down 215 MiB instead of 165)."""

    layers: tuple[PackedBlocks, ...]
    w: np.ndarray  # flat uint8
    d: np.ndarray  # flat uint16
    m: np.ndarray  # flat uint16
    s: np.ndarray  # flat int16
    table: np.ndarray  # (L, kernels.LAYER_FIELDS) int64

    @property
    def rows(self) -> int:
        return self.layers[0].rows

    @property
    def cols(self) -> int:
        return self.layers[0].cols

    @property
    def padded_rows(self) -> int:
        return self.layers[0].padded_rows

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.d.nbytes + self.m.nbytes + self.s.nbytes

    @property
    def kernel_args(self) -> tuple:
        return (self.w, self.d, self.m, self.s, self.table)

    def __getitem__(self, i: int) -> PackedBlocks:
        return self.layers[i]


def pack_layers(groups: list[list[QTensor]]) -> PackedBlocks | PackedLayers:
    """Pack L groups (one per layer) for the kernels: one stack when every layer packs to the same
    kind (`pack_stack`), else each layer in its own K-quant kind (`PackedLayers`)."""
    kinds = [k_kind({t.fmt for t in g}) if {t.fmt for t in g} <= set(K_QUANTS) else None for g in groups]
    if len(set(kinds)) == 1:
        return pack_stack(groups)
    if None in kinds:
        raise LlamacpuError("layers mix K-quant and other block formats in the same matrix")
    first = groups[0]
    R, cols = sum(t.rows for t in first), first[0].cols
    G, nb = -(-R // RG), cols // BLOCK
    table = np.zeros((len(groups), kernels.LAYER_FIELDS), dtype=np.int64)
    ends = [0, 0, 0, 0]
    for li, kind in enumerate(kinds):
        qbits, form = kernels.KQ_KINDS[kind]
        sizes = (G * nb * kernels.KQ_BYTES[qbits], G * (nb // 8) * (RG if form == kernels.K_CENTER else 2 * RG),
                 G * nb * (RG if form == kernels.K_GENERAL else 0), G * nb * RG)
        table[li, :7] = (kind, G, nb, kernels.KQ_BYTES[qbits], nb // 8, sizes[1] // (G * (nb // 8)),
                         RG if form == kernels.K_GENERAL else 0)
        table[li, 7:] = ends
        ends = [e + n for e, n in zip(ends, sizes)]
    flat = [np.empty(ends[0], np.uint8), np.empty(ends[1], np.uint16), np.empty(ends[2], np.uint16),
            np.empty(ends[3], np.int16)]
    layers = []
    for li, g in enumerate(groups):
        p = pack_stack([g])[0]
        views = []
        for a, buf, off in zip((p.w, p.d, p.m, p.s), flat, table[li, 7:]):
            v = buf[off:off + a.size].reshape(a.shape)
            v[...] = a
            views.append(v)
        layers.append(PackedBlocks(*views, p.bits, p.rows, p.cols))
    return PackedLayers(tuple(layers), *flat, table)


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
