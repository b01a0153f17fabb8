"""A loaded checkpoint in llamacpu's own tensor names, and the table of shapes it must have.

Loaders (`loaders/gguf.py`, `loaders/hf.py`) are the only modules that know foreign names;
they translate into the names below and are checked against `expected_shapes`.

RoPE convention. llamacpu rotates *adjacent pairs* (x[2i], x[2i+1]) of each head, as
llama.cpp's `llama` architecture does, so GGUF tensors are used as stored. Hugging Face
checkpoints rotate *halves* (x[i] with x[i + head_dim/2]); `loaders/hf.py` reorders the
rows of wq and wk within each head, [first half | second half] → interleaved, which is
exactly what llama.cpp's converter does. The GGUF writer therefore writes rows unchanged.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import LlamacpuError, reason
from .quant import QTensor

# Per-layer tensors, with shapes as functions of the config: y = W @ x has len(y) = rows.
LAYER_TENSORS = {
    "attn_norm": lambda c: (c.hidden_size,),
    "wq": lambda c: (c.q_dim, c.hidden_size),
    "wk": lambda c: (c.kv_dim, c.hidden_size),
    "wv": lambda c: (c.kv_dim, c.hidden_size),
    "wo": lambda c: (c.hidden_size, c.q_dim),
    "mlp_norm": lambda c: (c.hidden_size,),
    "w_gate": lambda c: (c.intermediate_size, c.hidden_size),
    "w_up": lambda c: (c.intermediate_size, c.hidden_size),
    "w_down": lambda c: (c.hidden_size, c.intermediate_size),
}


def expected_shapes(c: ModelConfig, *, with_rope_freqs: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of config `c` has, by llamacpu name."""
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (c.vocab_size, c.hidden_size),
        "norm": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["output"] = (c.vocab_size, c.hidden_size)
    if with_rope_freqs:
        shapes["rope_freqs"] = (c.head_dim // 2,)
    for i in range(c.num_hidden_layers):
        for name, shape in LAYER_TENSORS.items():
            shapes[f"layers.{i}.{name}"] = shape(c)
    return shapes


def check_tensors(c: ModelConfig, tensors: dict[str, Any], shape_of, source: str) -> None:
    """Fail, naming the tensor, on any missing, unexpected or wrongly shaped tensor."""
    # A config may claim 10^9 layers over a file holding 2: compare the count with what the
    # file holds before building a table whose size the config alone would set.
    if c.num_hidden_layers > len(tensors) // len(LAYER_TENSORS):
        present = next(i for i in range(len(tensors) + 1)
                       if any(f"layers.{i}.{n}" not in tensors for n in LAYER_TENSORS))
        name = next(n for n in LAYER_TENSORS if f"layers.{present}.{n}" not in tensors)
        raise LlamacpuError(f"{source}: missing tensor layers.{present}.{name} (the config says "
                            f"{c.num_hidden_layers} layers; the file holds tensors for at most {present})")
    expected = expected_shapes(c, with_rope_freqs="rope_freqs" in tensors)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise LlamacpuError(f"{source}: missing tensor {missing[0]}" +
                            (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise LlamacpuError(f"{source}: unexpected tensor {unexpected[0]}")
    for name, shape in expected.items():
        got = tuple(shape_of(tensors[name]))
        if got != shape:
            raise LlamacpuError(f"{source}: tensor {name} has shape {got}, expected {shape}")


@dataclass
class Checkpoint:
    """Config, weights (by llamacpu name) and the raw metadata a tokenizer/template needs.

    `meta` holds GGUF metadata (key → plain value) for GGUF sources; `hf_dir` is set for
    Hugging Face folders, whose tokenizer and template files are read from there.
    """

    config: ModelConfig
    tensors: dict[str, QTensor]
    source: Path
    meta: dict[str, Any] = field(default_factory=dict)
    hf_dir: Path | None = None
    sampling: dict[str, float] = field(default_factory=dict)  # the file's recommended sampling settings
    sampling_source: str | None = None  # where they were read, for people
    # What was changed at load, by tensor name. transcoded: (the file's ggml type, the format
    # it runs in) for tensors re-quantized because no kernel runs them as stored (K-quants...);
    # kept_f16: matrices quantize_checkpoint left f16 because their rows can't be blocked.
    transcoded: dict[str, tuple[str, str]] = field(default_factory=dict)
    kept_f16: tuple[str, ...] = ()

    @property
    def notices(self) -> list[str]:
        """One line per thing a person should know about how this checkpoint runs (for the CLI)."""
        out = []
        if self.transcoded:  # one line for the whole file, e.g. "transcoded at load: 168 × Q6_K→q8_0"
            kinds = [f"{a}→{b}" for a, b in self.transcoded.values()]
            counts = {k: kinds.count(k) for k in sorted(set(kinds))}
            out.append("transcoded at load (the kernels run Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K natively; "
                       "`llamacpu convert` "
                       "does it once): " + ", ".join(f"{n} × {k}" for k, n in counts.items()))
        from .quant import BLOCK
        out += [f"{name}: row length {self.tensors[name].shape[-1]} is not a multiple of {BLOCK}; kept as f16"
                for name in self.kept_f16]
        return out

    def tokenizer(self):
        from .tokenizer import Tokenizer
        if self.hf_dir is not None:
            return Tokenizer.from_hf_dir(self.hf_dir)
        return Tokenizer.from_gguf_metadata(self.meta)

    def chat_template(self, tokenizer):
        from .template import ChatTemplate
        if self.hf_dir is not None:
            return ChatTemplate.from_hf_dir(self.hf_dir, tokenizer)
        return ChatTemplate.from_gguf_metadata(self.meta, tokenizer)


def check_input_path(path: Path, *, folder_ok: bool = True) -> None:
    """Refuse, in one line, a path that is missing, unreadable, or neither a regular file nor a
    folder: opening a FIFO blocks forever, and /dev/zero never ends."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LlamacpuError(f"no such file or folder: {path}") from None
    except OSError as e:
        raise LlamacpuError(f"cannot open {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode) and not folder_ok:
        raise LlamacpuError(f"{path} is a folder; expected a file")
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
        raise LlamacpuError(f"{path} is not a regular file{' or folder' if folder_ok else ''} "
                            "(a pipe or device cannot be read as a model or text)")
    if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
        raise LlamacpuError(f"cannot read {path}: permission denied")


def load_checkpoint(path: str | Path, *, dequantize: bool = False) -> Checkpoint:
    """Open a GGUF file or a Hugging Face folder. `dequantize`: all weights as f32."""
    path = Path(path)
    check_input_path(path)
    try:
        if path.is_dir():
            from .loaders.hf import load_hf
            return load_hf(path)  # HF weights are float: always f32
        from .loaders.gguf import load_gguf
        return load_gguf(path, dequantize=dequantize)
    except LlamacpuError:
        raise
    except (Exception, MemoryError) as e:  # whatever the loaders did not foresee is still a bad file
        raise LlamacpuError(f"{path}: cannot read the model ({reason(e)})") from None
