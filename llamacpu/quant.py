"""Quantized tensors: ggml's block formats as a small value type, with quantize and dequantize.

Every format stores a matrix row by row; a quantized row is a run of 32-weight blocks,
byte-identical to ggml (`ggml-common.h`), so a GGUF tensor is used straight from the mmap:

    Q8_0  34 bytes: f16 d, 32 x int8 q                   w = d * q
    Q4_0  18 bytes: f16 d, 16 bytes of nibbles            w = d * (q - 8)
    Q4_1  20 bytes: f16 d, f16 m, 16 bytes of nibbles     w = d * q + m

Nibble order (Q4_0, Q4_1): byte j of a block holds element j in its low nibble and
element j + 16 in its high nibble. This is the only place that order is written down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import LlamacpuError

BLOCK = 32  # weights per block, for every quantized format here
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16}
FORMATS = ("f32", "f16", *BLOCK_BYTES)
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, **{f: 8.0 * b / BLOCK for f, b in BLOCK_BYTES.items()}}


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
    if fmt not in BLOCK_BYTES:
        raise LlamacpuError(f"unknown tensor format {fmt!r}; known: {', '.join(FORMATS)}")
    if len(shape) != 2 or shape[1] % BLOCK:
        raise LlamacpuError(f"{fmt} needs a matrix whose rows are a multiple of {BLOCK}, got {shape}")
    return (shape[0], shape[1] // BLOCK * BLOCK_BYTES[fmt])


def _blocks(data: np.ndarray, fmt: str) -> np.ndarray:
    """View raw rows as (rows, n_blocks, block_bytes)."""
    rows = data.shape[0]
    return data.reshape(rows, -1, BLOCK_BYTES[fmt])


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


def dequantize(fmt: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if fmt in FLOAT_DTYPES:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    b = _blocks(data, fmt)  # (rows, nb, bytes)
    if fmt == "q8_0":
        d = _f16(b[..., 0:2])
        q = b[..., 2:].view(np.int8).astype(np.float32)
        w = d[..., None] * q
    elif fmt == "q4_0":
        d = _f16(b[..., 0:2])
        q = _unpack_nibbles(b[..., 2:]).astype(np.float32) - 8.0
        w = d[..., None] * q
    else:  # q4_1
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        q = _unpack_nibbles(b[..., 4:]).astype(np.float32)
        w = d[..., None] * q + m[..., None]
    return w.reshape(shape)


def quantize(w: np.ndarray, fmt: str) -> QTensor:
    """Quantize a float matrix (or vector, for f32/f16) into `fmt`."""
    w = np.asarray(w, dtype=np.float32)
    if fmt in FLOAT_DTYPES:
        return QTensor(fmt, tuple(w.shape), np.ascontiguousarray(w.astype(FLOAT_DTYPES[fmt])))
    shape = tuple(w.shape)
    storage_shape(fmt, shape)  # validates
    x = w.reshape(shape[0], -1, BLOCK)  # (rows, nb, 32)
    if fmt == "q8_0":
        parts = _quantize_q8_0(x)
    elif fmt == "q4_0":
        parts = _quantize_q4_0(x)
    else:
        parts = _quantize_q4_1(x)
    raw = np.concatenate(parts, axis=-1)  # (rows, nb, block_bytes)
    return QTensor(fmt, shape, np.ascontiguousarray(raw.reshape(shape[0], -1)))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)[..., None].view(np.uint8)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(1.0, d, out=out, where=d != 0)
    return out


def _quantize_q8_0(x: np.ndarray) -> list[np.ndarray]:
    d = np.abs(x).max(axis=-1) / 127.0
    q = np.rint(x * _safe_inverse(d)[..., None]).clip(-127, 127).astype(np.int8)
    return [_f16_bytes(d), q.view(np.uint8)]


def _quantize_q4_0(x: np.ndarray) -> list[np.ndarray]:
    """Scale search per block: try scales around llama.cpp's amax/-8 and keep the one with
    the least squared error of the reconstructed block (evaluated with the f16-rounded scale)."""
    idx = np.abs(x).argmax(axis=-1)
    signed_max = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]  # (rows, nb)
    best_err = np.full(signed_max.shape, np.inf, dtype=np.float32)
    best_d = np.zeros_like(signed_max)
    # Divisors from -8 (llama.cpp's choice: the extreme hits code 0 exactly) towards -7.
    for div in (-8.0, -7.75, -7.5, -7.25, -7.0, 7.0, 7.25, 7.5, 7.75):
        d = (signed_max / div).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(x * _safe_inverse(d)[..., None]) + 8, 0, 15)
        err = ((d[..., None] * (q - 8) - x) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
    q = np.clip(np.rint(x * _safe_inverse(best_d)[..., None]) + 8, 0, 15)
    return [_f16_bytes(best_d), _pack_nibbles(q)]


def _quantize_q4_1(x: np.ndarray) -> list[np.ndarray]:
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = ((hi - lo) / 15.0).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((x - m[..., None]) * _safe_inverse(d)[..., None]), 0, 15)
    return [_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)]
