"""Read GGUF files (llama.cpp's format) with the `gguf` package, into llamacpu names.

Tensors stay in the file's mmap: a tensor of a type the kernels run (`NATIVE`: F32, F16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) becomes a QTensor over the mapped bytes, so
opening a model reads only what the forward pass touches. Other ggml types (Q2_K, Q3_K, IQ…)
are dequantized by `gguf.quants` and re-quantized to q8_0 once, at load, with a notice. GGUF lists dims fastest-first; we reverse them to (rows, cols).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, check_tensors
from ..config import ModelConfig
from ..errors import LlamacpuError
from ..pages import release
from ..quant import BLOCK, QTensor, quantize

# GGUF name → llamacpu name. `{i}` is the block index.
NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "output",
    "rope_freqs.weight": "rope_freqs",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm",
    "blk.{i}.attn_q.weight": "layers.{i}.wq",
    "blk.{i}.attn_k.weight": "layers.{i}.wk",
    "blk.{i}.attn_v.weight": "layers.{i}.wv",
    "blk.{i}.attn_output.weight": "layers.{i}.wo",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm",
    "blk.{i}.ffn_gate.weight": "layers.{i}.w_gate",
    "blk.{i}.ffn_up.weight": "layers.{i}.w_up",
    "blk.{i}.ffn_down.weight": "layers.{i}.w_down",
}
# Recommended sampling settings (gguf-py's Keys.General.SAMPLING_*) → llamacpu setting names.
SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repeat_penalty": "general.sampling.penalty_repeat",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
NATIVE = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0",
          "Q5_1": "q5_1", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}  # run as stored


def to_llamacpu_name(gguf_name: str) -> str | None:
    m = _BLOCK_NAME.match(gguf_name)
    if m:
        ours = NAMES.get(f"blk.{{i}}.{m.group(2)}")
        return ours.format(i=m.group(1)) if ours else None
    return NAMES.get(gguf_name)


def to_gguf_name(name: str) -> str:
    """llamacpu name → GGUF name (used by the writer)."""
    for theirs, ours in NAMES.items():
        if "{i}" in ours:
            prefix, suffix = ours.split("{i}")
            if name.startswith(prefix) and name.endswith(suffix):
                i = name[len(prefix):len(name) - len(suffix)]
                if i.isdigit():
                    return theirs.format(i=i)
        elif name == ours:
            return theirs
    raise LlamacpuError(f"no GGUF name for tensor {name}")


# GGUF metadata value types (GGUF spec): code → (numpy dtype) for scalars and numeric arrays.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # logical (rows, cols): GGUF's fastest-first dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """A parsed GGUF header (metadata and tensor directory) over a read-only mmap.

    We parse the header ourselves instead of using `gguf.GGUFReader`, which builds a numpy
    view per metadata item and spends ~5 s of CPU on SmolLM2's 98k tokenizer strings;
    this parser takes a few tens of milliseconds. The `gguf` package still supplies the
    type tables, the writer and the dequantizers.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        except (ValueError, OSError) as e:
            raise LlamacpuError(f"{path}: cannot map file ({e})") from None
        self.pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError) as e:
            raise LlamacpuError(f"{path}: not a readable GGUF file ({e or 'truncated header'})") from None

    # Primitive readers; every read is bounds-checked against the file size.
    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("truncated header")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def _scalar(self, fmt: str):
        (v,) = struct.unpack(fmt, self._take(struct.calcsize(fmt)))
        return v

    def _string(self) -> str:
        return bytes(self._take(self._scalar("<Q"))).decode("utf-8")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("<I"), self._scalar("<Q")
            if count > len(self.buf):
                raise ValueError("array length exceeds the file")
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype not in _SCALARS:
                raise ValueError(f"unsupported array element type {etype}")
            dt = np.dtype(_SCALARS[etype])
            arr = np.frombuffer(self._take(count * dt.itemsize), dtype=dt).copy()
            return arr.astype(bool) if etype == _BOOL else arr
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        v = np.frombuffer(self._take(np.dtype(_SCALARS[vtype]).itemsize), dtype=_SCALARS[vtype])[0]
        return bool(v) if vtype == _BOOL else v.item()

    def _parse(self) -> None:
        import gguf
        if bytes(self._take(4)) != b"GGUF":
            raise ValueError("bad magic; not a GGUF file")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.meta:  # the spec forbids it; silently letting the last one win loads the wrong model
                raise ValueError(f"metadata key {key} appears twice")
            self.meta[key] = self._value(self._scalar("<I"))
        raw = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            if n_dims > 4:
                raise ValueError(f"tensor {name} has {n_dims} dims")
            dims = [self._scalar("<Q") for _ in range(n_dims)]
            raw.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        blob = self.meta.get("llamacpu.tokenizer.model")
        if isinstance(blob, np.ndarray):  # stored as a uint8 array: the original sentencepiece file
            self.meta["llamacpu.tokenizer.model"] = blob.astype(np.uint8).tobytes()
        # The spec: general.alignment is a uint32, a non-zero multiple of 8 (llama.cpp also wants a
        # power of two); every tensor offset is a multiple of it, and data starts at the next multiple.
        align = self.meta.get("general.alignment", 32)
        if type(align) is not int or align < 8 or align % 8 or align & (align - 1):
            raise ValueError(f"general.alignment must be a power of two that is a multiple of 8, got {align!r}")
        data_start = (self.pos + align - 1) // align * align
        self.tensors: list[TensorInfo] = []
        seen: set[str] = set()
        for name, dims, ggml_type, offset in raw:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            if offset % align:
                raise ValueError(f"tensor {name} offset {offset} is not a multiple of the alignment {align}")
            if any(d == 0 for d in dims) or not dims:
                raise ValueError(f"tensor {name} has shape {dims}")
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown ggml type {ggml_type}") from None
            if qtype not in gguf.GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name} has ggml type {qtype.name}, which has no known size")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = 1
            for d in dims:  # Python ints: no silent int64 overflow on hostile dims
                n *= d
            if n > len(self.buf) * block:
                raise ValueError(f"tensor {name} with dims {dims} cannot fit in the file")
            if dims[0] % block:
                raise ValueError(f"tensor {name}: row length {dims[0]} is not a multiple of {block}")
            n_bytes = n // block * type_size
            self.tensors.append(TensorInfo(name, tuple(reversed(dims)), ggml_type, data_start + offset, n_bytes))

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a uint8 view of the mmap (no copy)."""
        return self.buf[t.offset:t.offset + t.n_bytes]


def sampling_from_gguf(meta: dict[str, Any], source: str) -> dict[str, float]:
    """The file's recommended sampling settings, in llamacpu names ({} when it has none)."""
    from ..sampling import recommended
    values = {ours: meta.get(key) for ours, key in SAMPLING_KEYS.items()}
    # Stored as float32: 0.2 comes back as 0.2000000029...; keep float32's 7 significant digits.
    values = {k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in values.items()}
    return recommended(values, f"{source} (general.sampling.*)")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF metadata as plain values: str, int, float, bool, list[str], numpy arrays for numeric arrays.

    `llamacpu.tokenizer.model` (a byte array) comes back as `bytes`.
    """
    return GGUFFile(Path(path)).meta


def _tensor(f: GGUFFile, t: TensorInfo, name: str, transcoded: dict[str, tuple[str, str]],
            dequantize: bool) -> QTensor:
    import gguf
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    shape = t.shape
    raw = f.tensor_bytes(t)
    fmt = NATIVE.get(qtype.name)
    if fmt in ("f32", "f16") and not dequantize:
        return QTensor(fmt, shape, raw.view(np.float32 if fmt == "f32" else np.float16).reshape(shape))
    if fmt is not None and not dequantize:
        return QTensor(fmt, shape, raw.reshape(shape[0], -1))
    # Not natively runnable (or an f32 copy was asked for): dequantize with gguf.quants.
    if qtype.name == "F32":
        w = raw.view(np.float32).reshape(shape)
    elif qtype.name == "F16":
        w = raw.view(np.float16).reshape(shape)
    else:
        try:
            # Hostile scales overflow to inf: keep numpy quiet here; quantize() refuses non-finite weights.
            with np.errstate(all="ignore"):
                w = gguf.quants.dequantize(np.asarray(raw).reshape(shape[0] if len(shape) > 1 else 1, -1), qtype)
        except NotImplementedError:  # e.g. Q8_1, I8, I32, F64: not weight formats of a llama model
            raise LlamacpuError(f"{f.path}: tensor {t.name} has type {qtype.name}, which llamacpu cannot read") from None
    w = np.asarray(w, dtype=np.float32).reshape(shape)
    if not np.may_share_memory(w, raw):  # copied to f32: the file's pages need not stay resident
        release(raw)
    if dequantize or len(shape) == 1:
        return QTensor("f32", shape, np.ascontiguousarray(w))
    target = "q8_0" if shape[-1] % BLOCK == 0 else "f16"
    transcoded[name] = (qtype.name, target)
    return quantize(w, target)


def load_gguf(path: Path, *, dequantize: bool = False) -> Checkpoint:
    """Open `path` (mmap) and check every tensor against the config before anything uses it."""
    path = Path(path)
    f = GGUFFile(path)
    infos: dict[str, TensorInfo] = {}
    for t in f.tensors:
        ours = to_llamacpu_name(t.name)
        if ours is None:
            raise LlamacpuError(f"{path}: unexpected tensor {t.name}")
        if t.offset + t.n_bytes > len(f.buf):
            raise LlamacpuError(f"{path}: tensor {t.name} lies past the end of the file (truncated?)")
        infos[ours] = t
    config = ModelConfig.from_gguf(f.meta, tied="output" not in infos)
    check_tensors(config, infos, lambda t: t.shape, str(path))
    transcoded: dict[str, tuple[str, str]] = {}
    tensors = {name: _tensor(f, t, name, transcoded, dequantize) for name, t in infos.items()}
    sampling = sampling_from_gguf(f.meta, path.name)
    return Checkpoint(config=config, tensors=tensors, source=path, meta=f.meta, transcoded=transcoded,
                      sampling=sampling, sampling_source=f"{path.name} (general.sampling.*)" if sampling else None)
