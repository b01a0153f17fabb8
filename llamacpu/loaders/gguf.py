"""Read GGUF files (llama.cpp's format) with the `gguf` package, into llamacpu names.

Tensors stay in the file's mmap: a Q8_0/Q4_0/Q4_1 tensor becomes a QTensor over the
mapped bytes, so opening a model reads only what the forward pass touches. Other ggml
types (K-quants, IQ…) are dequantized by `gguf.quants` and re-quantized to q8_0 once, at
load, with a notice. GGUF lists dims fastest-first; we reverse them to (rows, cols).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, check_tensors
from ..config import ModelConfig
from ..errors import LlamacpuError
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
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
NATIVE = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


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


def open_reader(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlamacpuError(f"{path}: not a readable GGUF file ({reason})") from None


def read_metadata(path_or_reader) -> dict[str, Any]:
    """GGUF metadata as plain values: str, int, float, bool, list[str], numpy arrays for numeric arrays."""
    reader = path_or_reader if not isinstance(path_or_reader, (str, Path)) else open_reader(Path(path_or_reader))
    import gguf
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] != gguf.GGUFValueType.STRING:
                meta[key] = np.asarray(f.contents())
            else:
                meta[key] = f.contents()
        except Exception:
            raise LlamacpuError(f"GGUF metadata key {key} is unreadable") from None
    if isinstance(meta.get("llamacpu.tokenizer.model"), np.ndarray):
        meta["llamacpu.tokenizer.model"] = meta["llamacpu.tokenizer.model"].astype(np.uint8).tobytes()
    return meta


def _tensor(t, name: str, path: Path, notices: list[str], dequantize: bool) -> QTensor:
    import gguf
    shape = _logical_shape(t)  # (rows, cols)
    kind = t.tensor_type.name
    block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    n_elements = int(np.prod(shape))
    if n_elements % block_size or int(t.n_bytes) != n_elements // block_size * type_size:
        raise LlamacpuError(f"{path}: tensor {name} ({kind}) byte size does not match its shape {shape}")
    fmt = NATIVE.get(kind)
    if fmt is not None and not dequantize:
        data = t.data.reshape(shape) if fmt in ("f32", "f16") else t.data.reshape(shape[0], -1)
        return QTensor(fmt, shape, data)
    # Not natively runnable (or an f32 copy was asked for): dequantize with gguf.quants.
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
    if dequantize or len(shape) == 1:
        return QTensor("f32", shape, np.ascontiguousarray(w))
    target = "q8_0" if shape[-1] % BLOCK == 0 else "f16"
    notices.append(f"{name}: {kind} transcoded to {target} at load")
    return quantize(w, target)


def load_gguf(path: Path, *, dequantize: bool = False) -> Checkpoint:
    """Open `path` (mmap) and check every tensor against the config before anything uses it."""
    path = Path(path)
    size = path.stat().st_size
    reader = open_reader(path)
    meta = read_metadata(reader)
    infos = {}
    for t in reader.tensors:
        ours = to_llamacpu_name(t.name)
        if ours is None:
            raise LlamacpuError(f"{path}: unexpected tensor {t.name}")
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise LlamacpuError(f"{path}: tensor {t.name} lies past the end of the file (truncated?)")
        infos[ours] = t
    config = ModelConfig.from_gguf(meta, tied="output" not in infos)
    check_tensors(config, infos, lambda t: _logical_shape(t), str(path))
    notices: list[str] = []
    tensors = {name: _tensor(t, name, path, notices, dequantize) for name, t in infos.items()}
    return Checkpoint(config=config, tensors=tensors, source=path, meta=meta, notices=notices)


def _logical_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))
