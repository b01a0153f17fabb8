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
zero), bit for bit, so files match llama.cpp's. The 4-bit formats search, per block, for the
scale (and, for Q4_1, the minimum) that minimises the *weighted* squared error
sum_i a_i (x_i - x̂_i)^2 instead of taking amax/-8 or min/max: with 16 levels, letting the
largest weight clip slightly buys finer steps for the other 31. The weights `a` are an
optional importance per element: the output error of y = W h is sum_j e_j h_j, so an error
in input column j costs in proportion to E[h_j^2]; `calibrate.self_calibrate` measures that on
text the model samples itself, `convert.input_importance` estimates it from the weights alone.
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


QUANTIZABLE = ("f32", "f16", "q8_0", "q4_0", "q4_1")  # formats `quantize` writes


def quantize(w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> QTensor:
    """Quantize a float matrix (or vector, for f32/f16) into `fmt`.

    importance: optional non-negative weights of each element's squared error, broadcastable
    to w's shape, e.g. (cols,) for one weight per input column. Only the 4-bit searches use
    it; Q8_0 keeps ggml's reference rounding, and f32/f16 are exact casts.
    """
    w = np.asarray(w, dtype=np.float32)
    if fmt in FLOAT_DTYPES:
        return QTensor(fmt, tuple(w.shape), np.ascontiguousarray(w.astype(FLOAT_DTYPES[fmt])))
    shape = tuple(w.shape)
    if fmt not in QUANTIZABLE:
        raise LlamacpuError(f"cannot quantize to {fmt}; llamacpu writes {', '.join(QUANTIZABLE)}")
    storage_shape(fmt, shape)  # validates
    if not np.isfinite(w).all():
        raise LlamacpuError(f"cannot quantize a tensor of shape {shape} holding NaN or infinity")
    rows, nb = shape[0], shape[1] // BLOCK
    x = w.reshape(rows * nb, BLOCK)  # (blocks, 32)
    a = None
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float32)
        if (imp < 0).any() or not np.isfinite(imp).all():
            raise LlamacpuError("quantization importance must be finite and non-negative")
        a = np.broadcast_to(imp, shape).reshape(rows * nb, BLOCK)
    out = np.empty((rows * nb, BLOCK_FORMATS[fmt].nbytes), dtype=np.uint8)  # (blocks, block_bytes)
    kernel = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q4_1": _quantize_q4_1}[fmt]
    for s in range(0, rows * nb, _CHUNK_BLOCKS):
        e = min(s + _CHUNK_BLOCKS, rows * nb)
        xa = None if a is None else np.ascontiguousarray(a[s:e])
        out[s:e] = np.concatenate(kernel(x[s:e], xa), axis=-1)
    return QTensor(fmt, shape, out.reshape(rows, nb * BLOCK_FORMATS[fmt].nbytes))


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
    """Per-block dot product: (n, 32), (n, 32) → (n,)."""
    return np.einsum("ij,ij->i", u, v)


# ---- Q8_0: ggml's reference rule --------------------------------------------------------

def _quantize_q8_0(x: np.ndarray, a: np.ndarray | None) -> list[np.ndarray]:
    d = np.abs(x).max(axis=-1) / np.float32(127)  # (n,)
    q = _round_half_away(x * _safe_inverse(d)[:, None]).clip(-127, 127).astype(np.int8)
    return [_f16_bytes(d), q.view(np.uint8)]


# ---- Q4_0: weighted search for the scale -------------------------------------------------

# Candidate values of x_max / d, where x_max is the block's signed extreme. Negative ones send the
# extreme to the -8 side (llama.cpp's choice is exactly -8), positive ones to the +7 side; magnitudes
# above 8 (resp. 7) clip it. Each candidate only proposes a rounding; its scale is then refitted.
_Q4_0_STEPS = np.concatenate([np.arange(-9.0, -6.49, 0.125), np.arange(6.0, 7.76, 0.125)]).astype(np.float32)


def _quantize_q4_0(x: np.ndarray, a: np.ndarray | None) -> list[np.ndarray]:
    """For each candidate rounding q = clip(rint(k · x / x_max)), the least-squares scale is
    d = Σ a x q / Σ a q², which lowers the weighted error by (Σ a x q)² / Σ a q²; the search
    (`_search_q4_0`) keeps the rounding that lowers it most. Then d is rounded to f16, q rounded
    against it, and d refitted once more where that helps."""
    a = np.ones_like(x) if a is None else a
    d = np.empty(len(x), dtype=np.float32)
    _search_kernels()[0](x, a, _Q4_0_STEPS, d)
    d = _refit_q4_0(x, a, _to_f16(d))
    q = np.clip(np.rint(x * _safe_inverse(d)[:, None]), -8, 7) + 8
    return [_f16_bytes(d), _pack_nibbles(q)]


def _refit_q4_0(x: np.ndarray, a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """One more least-squares fit of d to the rounding that the f16 scale gives; kept only where it
    lowers the weighted error after its own f16 rounding."""
    def err(dd):
        q = np.clip(np.rint(x * _safe_inverse(dd)[:, None]), -8, 7)
        r = x - dd[:, None] * q
        return _rowdot(a * r, r), q
    e0, q = err(d)
    d1 = _to_f16(_rowdot(a * x, q) * _safe_inverse(_rowdot(a * q, q)))
    e1, _ = err(d1)
    return np.where(e1 < e0, d1, d)


# ---- Q4_1: weighted search for scale and minimum -----------------------------------------

# Candidate step counts spanning [min, max]: 15 is ggml's min/max rule, more steps clip the ends.
_Q4_1_SPANS = np.array([15.0, 15.25, 15.5, 15.75, 16.0, 16.5, 17.0, 17.5, 18.0, 19.0], dtype=np.float32)


def _quantize_q4_1(x: np.ndarray, a: np.ndarray | None) -> list[np.ndarray]:
    """The search (`_search_q4_1`) tries ggml's min/max grid and wider-step grids centred on the
    block, refits (d, m) by weighted least squares to each rounding (twice), and keeps the least
    weighted error. Then d and m are rounded to f16; where that made the block worse than
    ggml's own min/max choice (possible for nearly constant blocks), the latter is kept, so a
    block already on a Q4_1 grid comes back exactly."""
    a = np.ones_like(x) if a is None else a
    d = np.empty(len(x), dtype=np.float32)
    m = np.empty(len(x), dtype=np.float32)
    _search_kernels()[1](x, a, _Q4_1_SPANS, d, m)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    best = (_to_f16(d), _to_f16(m))
    plain = (_to_f16((hi - lo) / 15), _to_f16(lo))
    err = [_q4_1_error(x, a, *c) for c in (best, plain)]
    keep = err[0] <= err[1]
    d, m = np.where(keep, best[0], plain[0]), np.where(keep, best[1], plain[1])
    q = np.clip(np.rint((x - m[:, None]) * _safe_inverse(d)[:, None]), 0, 15)
    return [_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)]


def _q4_1_error(x, a, d, m) -> np.ndarray:
    q = np.clip(np.rint((x - m[:, None]) * _safe_inverse(d)[:, None]), 0, 15)
    r = x - (d[:, None] * q + m[:, None])
    return _rowdot(a * r, r)


# ---- the search loops (Numba) ---------------------------------------------------------------
# Per block they run a few hundred candidate roundings over 32 weights: in numpy every candidate
# is a pass over the whole tensor, compiled they stay in registers (about 20x faster).

_KERNELS = None


def _search_kernels():
    """Compile (or load from Numba's cache) the two search loops on first use."""
    global _KERNELS
    if _KERNELS is None:
        from numba import njit

        # reassoc lets LLVM vectorize the block sums; the order of a 32-term sum doesn't matter here.
        kernel = njit(cache=True, fastmath={"reassoc", "contract"})
        _KERNELS = (kernel(_search_q4_0), kernel(_search_q4_1))
    return _KERNELS


def _search_q4_0(x, a, steps, d_out):
    """x, a (n, 32) f32; steps (k,) f32 → d_out (n,) the least-squares scale of the best rounding."""
    n, bs = x.shape
    for b in range(n):
        xmax = np.float32(0.0)
        for i in range(bs):
            if abs(x[b, i]) > abs(xmax):
                xmax = x[b, i]
        best_gain = np.float32(-1.0)
        best_d = np.float32(0.0)
        if xmax != 0:
            xb, ab = x[b], a[b]
            for k in steps:
                s = k / xmax
                sxq = np.float32(0.0)
                sqq = np.float32(0.0)
                for i in range(bs):  # branch-free, so LLVM vectorizes it
                    t = np.rint(xb[i] * s)
                    t = np.float32(-8.0) if t < -8 else t
                    t = np.float32(7.0) if t > 7 else t
                    at = ab[i] * t
                    sxq += at * xb[i]
                    sqq += at * t
                if sqq > 0 and sxq * sxq / sqq > best_gain:
                    best_gain = sxq * sxq / sqq
                    best_d = sxq / sqq
        d_out[b] = best_d


def _search_q4_1(x, a, spans, d_out, m_out):
    """x, a (n, 32) f32; spans (k,) f32 → d_out, m_out (n,): the affine grid of least weighted error."""
    n, bs = x.shape
    for b in range(n):
        lo = x[b, 0]
        hi = x[b, 0]
        for i in range(bs):
            lo = min(lo, x[b, i])
            hi = max(hi, x[b, i])
        best_err = np.inf
        best_d = np.float32(0.0)
        best_m = lo
        for steps in spans:
            d = (hi - lo) / steps
            m = lo + (hi - lo - 15 * d) / 2  # the 16 levels centred on [lo, hi]
            for _ in range(3):  # evaluate, then refit (d, m) to that rounding; twice
                inv = 1 / d if d != 0 else np.float32(0.0)
                sa = sq = sx = sqq = sqx = err = np.float32(0.0)
                for i in range(bs):
                    q = min(max(np.rint((x[b, i] - m) * inv), np.float32(0.0)), np.float32(15.0))
                    r = x[b, i] - (d * q + m)
                    w = a[b, i]
                    err += w * r * r
                    sa += w
                    sq += w * q
                    sx += w * x[b, i]
                    sqq += w * q * q
                    sqx += w * q * x[b, i]
                if err < best_err:
                    best_err, best_d, best_m = err, d, m
                det = sa * sqq - sq * sq
                if det <= 0:
                    break
                d = (sa * sqx - sq * sx) / det
                m = (sx - d * sq) / sa
        d_out[b] = best_d
        m_out[b] = best_m
