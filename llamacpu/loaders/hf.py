"""Read Hugging Face checkpoint folders: config.json plus one or many *.safetensors files.

Weights may be bf16, f16 or f32; all come out as f32 QTensors (quantization is the
caller's choice). Q and K rows are reordered from HF's rotate-half layout to llamacpu's
adjacent-pair layout (see `checkpoint.py`).

The safetensors header is read directly (8-byte length, then JSON) and tensors are
mapped with numpy, because the `safetensors` numpy API has no bfloat16.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint, check_tensors
from ..config import ModelConfig
from ..errors import LlamacpuError
from ..quant import QTensor

# HF name → llamacpu name. `{i}` is the layer index.
NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "output",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.wq",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.wk",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.wv",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.wo",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.w_gate",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.w_up",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.w_down",
}
# Buffers some exporters save that carry nothing we need.
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def to_llamacpu_name(hf_name: str) -> str | None:
    m = _LAYER_NAME.match(hf_name)
    if m:
        ours = NAMES.get(f"model.layers.{{i}}.{m.group(2)}")
        return ours.format(i=m.group(1)) if ours else None
    return NAMES.get(hf_name)


def rotate_half_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows of a Q or K projection (n_heads * head_dim, dim) so that, within each head,
    row r of the first half goes to 2r and row r of the second half to 2r + 1."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def pairs_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `rotate_half_to_pairs`."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class SafetensorsFile:
    """A memory-mapped .safetensors file: its header, and tensors as numpy views.

    The header is checked whole on open (safetensors' own rules): every entry has a dtype, a
    shape of non-negative ints and a [start, end) byte range after the header whose length is
    the shape's; ranges lie inside the file and do not overlap.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError("header length exceeds the file")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise LlamacpuError(f"{path}: not a safetensors file ({_first_line(e)})") from None
        header.pop("__metadata__", None)
        self.header = header
        self.base = 8 + n
        self.size = size
        self._check_header()

    def _check_header(self) -> None:
        spans = []
        for name, info in self.header.items():
            where = f"{self.path}: tensor {name}"
            if not isinstance(info, dict):
                raise LlamacpuError(f"{where}: header entry is not an object")
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dtype, str):
                raise LlamacpuError(f"{where}: missing or invalid dtype")
            if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
                raise LlamacpuError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise LlamacpuError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, "
                                    f"got {offsets!r}")
            start, end = offsets
            if self.base + end > self.size:
                raise LlamacpuError(f"{where}: data_offsets {offsets} lie past the end of the file (truncated?)")
            bits = HF_DTYPE_BITS.get(dtype)
            if bits is not None:
                count = 1
                for d in shape:
                    count *= d
                if (end - start) * 8 != count * bits:
                    raise LlamacpuError(f"{where}: data_offsets {offsets} hold {end - start} bytes; "
                                        f"shape {shape} in {dtype} needs {count * bits // 8}")
            if end > start:
                spans.append((start, end, name))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise LlamacpuError(f"{self.path}: tensors {a} and {b} overlap in the file")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_f32(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise LlamacpuError(f"{self.path}: tensor {name} has dtype {info['dtype']}; "
                                f"expected one of {', '.join(DTYPES)}")
        start, _ = info["data_offsets"]  # checked against the shape and the file in _check_header
        shape = tuple(info["shape"])
        raw = np.memmap(self.path, dtype=dtype, mode="r", offset=self.base + start, shape=shape)
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32)


# Bits per element of safetensors dtypes (their spec's list), to check byte ranges against shapes.
HF_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16, "F16": 16,
                 "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0] or "unreadable"


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise LlamacpuError(f"{index}: unreadable index ({_first_line(e)})") from None
        except OSError as e:
            raise LlamacpuError(f"cannot read {index}: {e.strerror or e}") from None
        files = []
        for name in sorted(set(weight_map.values())):
            # A shard is a plain file name inside the folder: no "../", no absolute path, no subfolder.
            if not name or Path(name).name != name or name in (".", ".."):
                raise LlamacpuError(f"{index} names a shard outside the model folder: {name!r}")
            f = folder / name
            if not f.is_file():
                raise LlamacpuError(f"{index} names a missing shard {name}")
            files.append(f)
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if not files:
        raise LlamacpuError(f"{folder}: no *.safetensors weights")
    return files


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise LlamacpuError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LlamacpuError(f"{cfg_path}: invalid JSON ({_first_line(e)})") from None
    except OSError as e:
        raise LlamacpuError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    if not isinstance(cfg, dict):
        raise LlamacpuError(f"{cfg_path}: not a JSON object")
    return cfg


# generation_config.json keys → llamacpu sampling setting names (transformers' GenerationConfig).
GENERATION_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repeat_penalty": "repetition_penalty"}


def read_generation_config(folder: Path) -> dict[str, float]:
    """The folder's recommended sampling settings from generation_config.json ({} without one).

    `"do_sample": false` is transformers' greedy decoding, i.e. temperature 0; without
    `do_sample` only the settings the file names are taken."""
    from ..sampling import recommended
    path = Path(folder) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LlamacpuError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(gen, dict):
        raise LlamacpuError(f"{path}: expected a JSON object")
    values = {ours: gen.get(key) for ours, key in GENERATION_KEYS.items()}
    if gen.get("do_sample") is False:
        values["temperature"] = 0.0
    return recommended(values, path.name)


def load_hf(folder: Path) -> Checkpoint:
    """Load every weight of a HF folder as f32 QTensors, validated against config.json."""
    folder = Path(folder)
    config = ModelConfig.from_hf(read_config(folder))
    where: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in shard_files(folder):
        st = SafetensorsFile(f)
        for key in st.keys():
            if IGNORED.match(key):
                continue
            ours = to_llamacpu_name(key)
            if ours is None:
                raise LlamacpuError(f"{f}: unexpected tensor {key}")
            where[ours] = (st, key)
    if config.tie_word_embeddings:
        where.pop("output", None)  # some exporters save the tied copy too
    check_tensors(config, where, lambda v: v[0].shape(v[1]), str(folder))
    tensors = {}
    for name, (st, key) in where.items():
        w = st.get_f32(key)
        if name.endswith(".wq"):
            w = rotate_half_to_pairs(w, config.num_attention_heads)
        elif name.endswith(".wk"):
            w = rotate_half_to_pairs(w, config.num_key_value_heads)
        tensors[name] = QTensor("f32", tuple(w.shape), np.ascontiguousarray(w, dtype=np.float32))
    sampling = read_generation_config(folder)
    return Checkpoint(config=config, tensors=tensors, source=folder, hf_dir=folder, sampling=sampling,
                      sampling_source="generation_config.json" if sampling else None)
