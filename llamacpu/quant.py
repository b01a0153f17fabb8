"""Quantized tensors: ggml's block formats as a small value type, with quantize and dequantize.

Every format stores a matrix row by row; a quantized row is a run of blocks, byte-identical to
ggml (`ggml-common.h`), so a GGUF tensor is used straight from the mmap. `BLOCK_FORMATS` is the
one description of each layout: weights per block, bytes, sub-blocks, and where every field
lives. Dequantizing, the kernels' packer (`linear`), and the converter's size planner read it.

    Q8_0    34 bytes / 32:  f16 d, int8 qs[32]                            w = d q
    Q4_0    18 bytes / 32:  f16 d, qs[16] nibbles                         w = d (q - 8)
    Q4_1    20 bytes / 32:  f16 d, f16 m, qs[16]                          w = d q + m
    Q5_0    22 bytes / 32:  f16 d, qh[4] fifth bits, qs[16]               w = d (q - 16)
    Q5_1    24 bytes / 32:  f16 d, f16 m, qh[4], qs[16]                   w = d q + m
    Q4_K   144 bytes / 256: f16 d, f16 dmin, scales[12], qs[128]          w = d sc_j q - dmin m_j
    Q5_K   176 bytes / 256: f16 d, f16 dmin, scales[12], qh[32], qs[128]  w = d sc_j q - dmin m_j
    Q6_K   210 bytes / 256: ql[128], qh[64], int8 scales[16], f16 d       w = d sc_j (q - 32)

Bit order, the only place it is written down:
- Q4_0/Q4_1/Q5_0/Q5_1: byte j of qs holds element j in its low nibble and element j + 16 in its
  high nibble; the fifth bit of element i is bit i of qh read as a little-endian uint32.
- Q4_K/Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes: for j < 4,
  sc_j = scales[j] & 63 and m_j = scales[j+4] & 63; for j >= 4, the low 4 bits come from
  scales[j+4] (sc low nibble, m high nibble) and the top 2 from bits 6-7 of scales[j-4]
  (sc) and scales[j] (m). qs is 4 runs of 32 bytes: run c holds sub-block 2c in its low
  nibbles and sub-block 2c+1 in its high nibbles. Q5_K's fifth bit of element l of
  sub-block j is bit j of qh[l].
- Q6_K: 16 sub-blocks of 16, one int8 scale each. Each half (128 weights) takes 64 bytes of ql
  and 32 of qh; its four quarters of 32 are the low nibbles of ql[0:32], of ql[32:64], then the
  high nibbles of ql[0:32], of ql[32:64], and quarter k's top two bits are bits 2k, 2k+1 of
  qh[l].

How scales are chosen. Q8_0 uses ggml's reference rule (d = amax/127, round half away from
zero), bit for bit, so files match llama.cpp's. Every other format searches, per block, for the
scale (and minimum) that minimises the *weighted* squared error sum_i a_i (x_i - x̂_i)^2 instead
of taking amax/-8 or min/max: with 16 or 32 levels, letting the largest weight clip slightly
buys finer steps for the others. The K-quants also search their integer sub-block scales and
f16 super-block scales jointly (`qsearch.py`). The weights `a` are an optional importance per
element: the output error of y = W h is sum_j e_j h_j, so an error in input column j costs in
proportion to E[h_j^2]; `calibrate.self_calibrate` measures that on text the model samples
itself, `convert.input_importance` estimates it from the weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import LlamacpuError


@dataclass(frozen=True)
class BlockFormat:
    """One ggml block format. Every field is (byte offset, byte length) within a block."""

    name: str
    weights: int  # weights per block: 32, or QK_K = 256 for the K-quants
    nbytes: int  # bytes per block
    sub: int  # weights per scale (a sub-block); == weights for the 32-weight formats
    bits: int  # bits per quant
    center: int  # stored quants are unsigned q; the value is q - center (0 for formats with a min)
    fields: tuple[tuple[str, int, int], ...]  # (name, offset, length), in storage order

    def __post_init__(self) -> None:
        end = 0
        for _, offset, length in self.fields:  # contiguous, in order, filling the block
            assert offset == end, self
            end = offset + length
        assert end == self.nbytes and self.weights % self.sub == 0, self

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.weights

    @property
    def n_sub(self) -> int:
        return self.weights // self.sub

    @property
    def has_min(self) -> bool:
        return any(name in ("m", "dmin") for name, _, _ in self.fields)

    def field(self, blocks: np.ndarray, name: str) -> np.ndarray:
        """(..., nbytes) uint8 blocks → the bytes of field `name`, (..., length) (a view)."""
        for fname, offset, length in self.fields:
            if fname == name:
                return blocks[..., offset:offset + length]
        raise KeyError(f"{self.name} has no field {name!r}")


QK_K = 256
BLOCK_FORMATS = {f.name: f for f in (
    BlockFormat("q8_0", 32, 34, 32, 8, 0, (("d", 0, 2), ("qs", 2, 32))),
    BlockFormat("q4_0", 32, 18, 32, 4, 8, (("d", 0, 2), ("qs", 2, 16))),
    BlockFormat("q4_1", 32, 20, 32, 4, 0, (("d", 0, 2), ("m", 2, 2), ("qs", 4, 16))),
    BlockFormat("q5_0", 32, 22, 32, 5, 16, (("d", 0, 2), ("qh", 2, 4), ("qs", 6, 16))),
    BlockFormat("q5_1", 32, 24, 32, 5, 0, (("d", 0, 2), ("m", 2, 2), ("qh", 4, 4), ("qs", 8, 16))),
    BlockFormat("q4_k", QK_K, 144, 32, 4, 0, (("d", 0, 2), ("dmin", 2, 2), ("scales", 4, 12), ("qs", 16, 128))),
    BlockFormat("q5_k", QK_K, 176, 32, 5, 0,
                (("d", 0, 2), ("dmin", 2, 2), ("scales", 4, 12), ("qh", 16, 32), ("qs", 48, 128))),
    BlockFormat("q6_k", QK_K, 210, 16, 6, 32, (("ql", 0, 128), ("qh", 128, 64), ("scales", 192, 16), ("d", 208, 2))),
)}
F16_MAX = 65504.0  # the largest finite float16
BLOCK = 32  # weights per block of the 32-weight formats, and per row unit of every format here
FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16}
FORMATS = ("f32", "f16", *BLOCK_FORMATS)
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, **{n: f.bits_per_weight for n, f in BLOCK_FORMATS.items()}}

# Blocks quantized per step: keeps each (chunk, 32) temporary near L2-cache size.
_CHUNK_BLOCKS = 4096


@dataclass(frozen=True)
class QTensor:
    """A 1-D or 2-D weight in one of FORMATS.

    data: for f32/f16, an array of that dtype with the logical shape;
          for block formats, uint8 of shape (rows, cols // 32 * block_bytes).
    shape: the logical shape, (rows, cols) for a matrix: y = W @ x has len(y) = rows.
    """

    fmt: str
    shape: tuple[int, ...]
    data: np.ndarray

    def __post_init__(self) -> None:
        expected = storage_shape(self.fmt, self.shape)
        dtype = np.dtype(FLOAT_DTYPES.get(self.fmt, np.uint8))
        if self.data.shape != expected or self.data.dtype != dtype:
            raise LlamacpuError(
                f"{self.fmt} tensor of shape {self.shape} needs {dtype} storage {expected}, "
                f"got {self.data.dtype} {self.data.shape}")

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def dequantize(self) -> np.ndarray:
        """The weights as float32, with the logical shape."""
        return dequantize(self.fmt, self.data, self.shape)


def storage_shape(fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `QTensor.data` for a logical `shape` in `fmt`; raises on impossible ones."""
    if fmt in FLOAT_DTYPES:
        return tuple(shape)
    if fmt not in BLOCK_FORMATS:
        raise LlamacpuError(f"unknown tensor format {fmt!r}; known: {', '.join(FORMATS)}")
    bf = BLOCK_FORMATS[fmt]
    if len(shape) != 2 or shape[1] % bf.weights:
        raise LlamacpuError(f"{fmt} needs a matrix whose rows are a multiple of {bf.weights}, got {shape}")
    return (shape[0], shape[1] // bf.weights * bf.nbytes)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per entry (last axis) → float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., 16) uint8 → (..., 32) uint8 in element order (low nibbles first, then high)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values 0..15 → (..., 16) uint8: element j low, element j + 16 high."""
    q = q.astype(np.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 packed bytes (..., 12) → 6-bit (sc, m), each (..., 8) uint8."""
    lo, mid, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


class Unpacked(NamedTuple):
    """Blocks in element order: w = scale q + offset, per sub-block.

    q: (n, weights) int8 (q - center, for formats without a min) or uint8 (formats with one);
    scale: (n, n_sub) f32, exact (an f16 times a small integer); offset: (n, n_sub) f32 or None."""

    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None


def unpack(fmt: str, blocks: np.ndarray) -> Unpacked:
    """(n, nbytes) uint8 blocks of `fmt` → their quants, scales and offsets (`Unpacked`)."""
    bf = BLOCK_FORMATS[fmt]
    n = blocks.shape[0]
    get = lambda name: bf.field(blocks, name)  # noqa: E731
    if bf.weights == BLOCK:  # the 32-weight formats: one scale (and min) per block
        q = get("qs").view(np.int8) if fmt == "q8_0" else _unpack_nibbles(get("qs"))
        if bf.bits == 5:
            q = q | (np.unpackbits(get("qh"), axis=-1, bitorder="little") << 4)
        scale = _f16(get("d"))[:, None]
        offset = _f16(get("m"))[:, None] if bf.has_min else None
    elif fmt in ("q4_k", "q5_k"):
        qs = get("qs").reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]  # (n, run, lo/hi, 32)
        q = (qs & 0x0F).reshape(n, 8, 32)
        if fmt == "q5_k":
            q = q | (((get("qh")[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
        sc, m = k_scales_mins(get("scales"))
        scale = _f16(get("d"))[:, None] * sc.astype(np.float32)
        offset = -(_f16(get("dmin"))[:, None] * m.astype(np.float32))
    else:  # q6_k
        ql = get("ql").reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]  # (n, half, lo/hi, 64)
        ql = (ql & 0x0F).reshape(n, 2, 4, 32)
        qh = (get("qh").reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        q = ql | (qh << 4)
        scale = _f16(get("d"))[:, None] * get("scales").view(np.int8).astype(np.float32)
        offset = None
    q = q.reshape(n, bf.weights)
    if bf.center:
        q = (q.astype(np.int16) - bf.center).astype(np.int8)
    return Unpacked(q, scale, offset)


def dequantize(fmt: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Raw storage of a tensor in `fmt` → float32 array of the logical `shape`."""
    if fmt in FLOAT_DTYPES:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    bf = BLOCK_FORMATS[fmt]
    u = unpack(fmt, np.asarray(data).reshape(-1, bf.nbytes))
    w = u.scale[..., None] * u.q.reshape(len(u.q), bf.n_sub, bf.sub).astype(np.float32)  # (n, n_sub, sub)
    if u.offset is not None:
        w = w + u.offset[..., None]
    return w.reshape(shape)


QUANTIZABLE = FORMATS  # formats `quantize` writes: all of them


def quantize(w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> QTensor:
    """Quantize a float matrix (or vector, for f32/f16) into `fmt`.

    importance: optional non-negative weights of each element's squared error, broadcastable
    to w's shape, e.g. (cols,) for one weight per input column. Every block format but Q8_0
    searches its scales (and mins) for the least weighted error; Q8_0 keeps ggml's reference
    rounding, and f32/f16 are exact casts.
    """
    w = np.asarray(w, dtype=np.float32)
    shape = tuple(w.shape)
    if fmt not in QUANTIZABLE:
        raise LlamacpuError(f"cannot quantize to {fmt}; llamacpu writes {', '.join(QUANTIZABLE)}")
    if fmt != "f32" and w.size and np.abs(w).max() > F16_MAX:
        # Every format but f32 stores values or scales as f16: beyond its range they become inf.
        raise LlamacpuError(f"cannot store weights of magnitude {np.abs(w).max():g} in {fmt}: "
                            f"its f16 values or scales stop at {F16_MAX:g}")
    if fmt in FLOAT_DTYPES:
        return QTensor(fmt, shape, np.ascontiguousarray(w.astype(FLOAT_DTYPES[fmt])))
    storage_shape(fmt, shape)  # validates
    if not np.isfinite(w).all():
        raise LlamacpuError(f"cannot quantize a tensor of shape {shape} holding NaN or infinity")
    bf = BLOCK_FORMATS[fmt]
    rows, nb = shape[0], shape[1] // bf.weights
    x = w.reshape(rows * nb, bf.weights)  # (blocks, weights per block)
    a = None
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float32)
        if (imp < 0).any() or not np.isfinite(imp).all():
            raise LlamacpuError("quantization importance must be finite and non-negative")
        a = np.broadcast_to(imp, shape).reshape(rows * nb, bf.weights)
    out = np.zeros((rows * nb, bf.nbytes), dtype=np.uint8)  # (blocks, block_bytes)
    kernel = _QUANTIZERS[fmt]
    step = max(1, _CHUNK_BLOCKS * BLOCK // bf.weights)
    for s in range(0, rows * nb, step):
        e = min(s + step, rows * nb)
        xs = np.ascontiguousarray(x[s:e])
        xa = np.ones_like(xs) if a is None else np.ascontiguousarray(a[s:e])
        for name, value in kernel(xs, xa).items():
            bf.field(out[s:e], name)[:] = value
    return QTensor(fmt, shape, out.reshape(rows, nb * bf.nbytes))


# ---- helpers ------------------------------------------------------------------------------

def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) floats → (n, 2) uint8, rounded to f16."""
    return v.astype(np.float16)[..., None].view(np.uint8)


def _to_f16(v: np.ndarray) -> np.ndarray:
    """Round to f16 and back: the value a block will actually store."""
    return v.astype(np.float16).astype(np.float32)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(1.0, d, out=out, where=d != 0)
    return out


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (np.rint would round them to even)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v)


def _rowdot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-block dot product: (n, k), (n, k) → (n,)."""
    return np.einsum("ij,ij->i", u, v)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..31 → Q5_0/Q5_1's qh (n, 4): bit i of the little-endian uint32 is q_i's bit 4."""
    return np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little")


# ---- Q8_0: ggml's reference rule --------------------------------------------------------

def _quantize_q8_0(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d = np.abs(x).max(axis=-1) / np.float32(127)  # (n,)
    q = _round_half_away(x * _safe_inverse(d)[:, None]).clip(-127, 127).astype(np.int8)
    return {"d": _f16_bytes(d), "qs": q.view(np.uint8)}


# ---- Q4_0 / Q5_0: weighted search for the scale -------------------------------------------

def _symmetric_steps(lo: int, hi: int) -> np.ndarray:
    """Candidate values of x_max / d, where x_max is the block's signed extreme. Negative ones send
    the extreme to the lo side (llama.cpp's choice is exactly lo), positive ones to the hi side;
    magnitudes above |lo| (resp. hi) clip it. Each candidate only proposes a rounding; its scale
    is then refitted. Q4_0: -9 .. -6.5 and 6 .. 7.75 in steps of 1/8."""
    return np.concatenate([lo * np.linspace(1.125, 0.8125, 2 * -lo + 5),
                           hi * np.linspace(6 / 7, 7.75 / 7, 2 * hi + 1)]).astype(np.float32)


def _quantize_symmetric(x: np.ndarray, a: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate rounding q = clip(rint(k · x / x_max)), the least-squares scale is
    d = Σ a x q / Σ a q², which lowers the weighted error by (Σ a x q)² / Σ a q²; the search
    (`qsearch.search_symmetric`) keeps the rounding that lowers it most. Then d is rounded to
    f16, q rounded against it, and d refitted once more where that helps. Returns d (n,) and
    q (n, k) in [lo, hi]."""
    from . import qsearch

    d = np.empty(len(x), dtype=np.float32)
    qsearch.search_symmetric(x, a, np.float32(lo), np.float32(hi), _symmetric_steps(lo, hi), d)
    d = _refit_symmetric(x, a, _to_f16(d), lo, hi)
    return d, np.clip(np.rint(x * _safe_inverse(d)[:, None]), lo, hi)


def _refit_symmetric(x: np.ndarray, a: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """One more least-squares fit of d to the rounding that the f16 scale gives; kept only where it
    lowers the weighted error after its own f16 rounding."""
    def err(dd):
        q = np.clip(np.rint(x * _safe_inverse(dd)[:, None]), lo, hi)
        r = x - dd[:, None] * q
        return _rowdot(a * r, r), q
    e0, q = err(d)
    d1 = _to_f16(_rowdot(a * x, q) * _safe_inverse(_rowdot(a * q, q)))
    e1, _ = err(d1)
    return np.where(e1 < e0, d1, d)


def _quantize_q4_0(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d, q = _quantize_symmetric(x, a, -8, 7)
    return {"d": _f16_bytes(d), "qs": _pack_nibbles(q + 8)}


def _quantize_q5_0(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d, q = _quantize_symmetric(x, a, -16, 15)
    q = (q + 16).astype(np.uint8)
    return {"d": _f16_bytes(d), "qh": _fifth_bits(q), "qs": _pack_nibbles(q & 0x0F)}


# ---- Q4_1 / Q5_1: weighted search for scale and minimum -----------------------------------

# Candidate step counts spanning [min, max], per level: 1 is ggml's min/max rule, more clip the ends.
_AFFINE_SPANS = np.array([15.0, 15.25, 15.5, 15.75, 16.0, 16.5, 17.0, 17.5, 18.0, 19.0], dtype=np.float32) / 15


def _quantize_affine(x: np.ndarray, a: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The search (`qsearch.search_affine`) tries ggml's min/max grid and wider-step grids centred
    on the block, refits (d, m) by weighted least squares to each rounding (twice), and keeps the
    least weighted error. Then d and m are rounded to f16; where that made the block worse than
    ggml's own min/max choice (possible for nearly constant blocks), the latter is kept, so a
    block already on the grid comes back exactly. Returns d, m (n,) and q (n, k) in [0, nmax]."""
    from . import qsearch

    d = np.empty(len(x), dtype=np.float32)
    m = np.empty(len(x), dtype=np.float32)
    qsearch.search_affine(x, a, np.float32(nmax), _AFFINE_SPANS * nmax, d, m)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    best = (_to_f16(d), _to_f16(m))
    plain = (_to_f16((hi - lo) / nmax), _to_f16(lo))
    err = [_affine_error(x, a, *c, nmax) for c in (best, plain)]
    keep = err[0] <= err[1]
    d, m = np.where(keep, best[0], plain[0]), np.where(keep, best[1], plain[1])
    q = np.clip(np.rint((x - m[:, None]) * _safe_inverse(d)[:, None]), 0, nmax).astype(np.uint8)
    return d, m, q


def _affine_error(x, a, d, m, nmax) -> np.ndarray:
    q = np.clip(np.rint((x - m[:, None]) * _safe_inverse(d)[:, None]), 0, nmax)
    r = x - (d[:, None] * q + m[:, None])
    return _rowdot(a * r, r)


def _quantize_q4_1(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d, m, q = _quantize_affine(x, a, 15)
    return {"d": _f16_bytes(d), "m": _f16_bytes(m), "qs": _pack_nibbles(q)}


def _quantize_q5_1(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d, m, q = _quantize_affine(x, a, 31)
    return {"d": _f16_bytes(d), "m": _f16_bytes(m), "qh": _fifth_bits(q), "qs": _pack_nibbles(q & 0x0F)}


# ---- K-quants: super-blocks of 256 with integer sub-block scales ----------------------------

def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit (sc, m), each (n, 8) → Q4_K/Q5_K's 12 bytes (n, 12); the inverse of `k_scales_mins`."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=-1)


def _quantize_k_affine(x: np.ndarray, a: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K's joint search (`qsearch.search_k_affine`) → d, dmin (n,), sc, m (n, 8), q (n, 8, 32)."""
    from . import qsearch

    n = len(x)
    q = np.empty((n, QK_K), np.uint8)
    sc = np.empty((n, 8), np.uint8)
    m = np.empty((n, 8), np.uint8)
    d = np.empty(n, np.float32)
    dmin = np.empty(n, np.float32)
    qsearch.search_k_affine(x, a, np.float32(nmax), _AFFINE_SPANS * nmax, 32, q, sc, m, d, dmin)
    return d, dmin, sc, m, q.reshape(n, 8, 32)


def _quantize_q4_k(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d, dmin, sc, m, q = _quantize_k_affine(x, a, 15)
    qs = q[:, 0::2] | (q[:, 1::2] << 4)  # (n, run, 32): sub-block 2c low, 2c+1 high
    return {"d": _f16_bytes(d), "dmin": _f16_bytes(dmin), "scales": _pack_k_scales(sc, m),
            "qs": qs.reshape(len(x), 128)}


def _quantize_q5_k(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    d, dmin, sc, m, q = _quantize_k_affine(x, a, 31)
    low = q & 0x0F
    qs = low[:, 0::2] | (low[:, 1::2] << 4)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)  # bit j of qh[l]
    return {"d": _f16_bytes(d), "dmin": _f16_bytes(dmin), "scales": _pack_k_scales(sc, m), "qh": qh,
            "qs": qs.reshape(len(x), 128)}


def _quantize_q6_k(x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    from . import qsearch

    n = len(x)
    q = np.empty((n, QK_K), np.int8)
    sc = np.empty((n, 16), np.int8)
    d = np.empty(n, np.float32)
    qsearch.search_q6_k(x, a, _symmetric_steps(-32, 31), 16, q, sc, d)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # (n, half, quarter, 32)
    low = u & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = ((u >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    return {"ql": ql.reshape(n, 128), "qh": qh.reshape(n, 64), "scales": sc.view(np.uint8), "d": _f16_bytes(d)}


_QUANTIZERS = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q4_1": _quantize_q4_1, "q5_0": _quantize_q5_0,
               "q5_1": _quantize_q5_1, "q4_k": _quantize_q4_k, "q5_k": _quantize_q5_k, "q6_k": _quantize_q6_k}
