"""Write a checkpoint (HF folder or GGUF) as a standard GGUF v3 file in one tensor format, or in
one of llama.cpp's K-quant mixtures (q4_k_m, q5_k_m, q6_k).

The output is what llama.cpp's own tools write for a `llama` model: `general.*` and `llama.*`
metadata (with llama.cpp's `general.file_type` for the format or mixture), the tokenizer as
`tokenizer.ggml.*` keys (plus `llamacpu.tokenizer.*` for exact round trips of sentencepiece /
tokenizer.json sources), `tokenizer.chat_template`, and tensors under GGUF names, rows
unchanged (our Q/K row order is already llama.cpp's; see `checkpoint.py`).

Which format each tensor gets (`tensor_format`):
- 1-D tensors (norm gains, `rope_freqs`) stay f32, as llama.cpp keeps them.
- The output head (`output`, or the token embedding when the head is tied to it) is q8_0 when
  the requested format is 4-bit: every logit goes through it. llama.cpp does likewise: its
  Q4_0/Q4_1 give the head Q6_K, or Q8_0 when rows aren't a multiple of 256 (SmolLM2's 576:
  `llama_model_quantize` logs "token_embd.weight ... falling back to q8_0"). An untied token
  embedding is only gathered row by row and takes the requested format, as in llama.cpp.
- The K-quant mixtures choose per tensor exactly as llama.cpp's `llama_tensor_get_type` does
  (Q6_K for the head and, in some layers, for wv and w_down; fallbacks to Q5_0/Q5_1/Q8_0 for
  rows that aren't a multiple of 256): see `tensor_format`.
- A matrix whose row length isn't a multiple of 32 can't be blocked: it falls back to f16
  and is listed in `ConvertReport.fallback`.
Every format but q8_0 searches its scales (`quant.py`), weighting the error of input column j
by an estimate of E[h_j^2] for that matrix's input. By default that is measured on ~1k tokens
the model samples itself from its f32 weights (`calibrate.self_calibrate`, seeded, so
conversion is deterministic); with `calibrate=False`, or for a model too large to run in f32
here (over CALIBRATION_MAX_PARAMS), it is derived from the weights alone (`input_importance`).

Weights are produced one tensor at a time (a GGUF source is dequantized tensor by tensor
from its mmap; a tensor already in the target format is copied as is) and streamed to a
temporary file beside OUT, which replaces OUT only once complete: an interrupt, an error or
a full disk leaves OUT as it was and no temporary file. (HF sources are read by
`loaders/hf.py`, which returns every weight as f32 at once: bf16/f16 checkpoints are held
in memory in full while converting.)
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint
from .errors import LlamacpuError
from .loaders.gguf import SAMPLING_KEYS, to_gguf_name
from .quant import BLOCK_FORMATS, QTensor, quantize, storage_shape
from .sampling import INT_SETTINGS

QUANT_VERSION = 2  # ggml's current block-format version, stored as general.quantization_version

# What `convert --quant` writes: one tensor format throughout, or one of llama.cpp's K-quant
# mixtures (file types), named as llama.cpp's `llama-quantize` names them.
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k")
# What a model can be quantized to at load (`quantize_checkpoint`): the formats the kernels run.
LOAD_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
# A mixture's default tensor format (llama.cpp's llama_ftype_get_default_type).
K_MIXTURES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
# llama.cpp's tensor_type_fallback: a K-quant for a row length that isn't a multiple of 256.
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# Formats whose scales are searched with the column importance (Q8_0 keeps ggml's rule).
SEARCHED = tuple(f for f in BLOCK_FORMATS if f != "q8_0")


@dataclass
class ConvertReport:
    """What `convert_model` wrote."""

    out: Path
    quant: str
    n_tensors: int
    fallback: list[str] = field(default_factory=list)  # tensors kept f16: rows not a multiple of 32
    bytes_written: int = 0
    seconds: float = 0.0
    formats: dict[str, int] = field(default_factory=dict)  # tensor count per stored format
    importance: str | None = None  # column importance of the searches: "self-calibrated", "weights-only", None


def _discard(writer, tmp: Path) -> None:
    """Remove the temporary file, whatever state the writer is in. Signals that would cut this
    short are held until it is done, so a second Ctrl-C cannot leave the part file behind."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        if writer is not None:
            try:
                writer.close()
            except OSError:  # flushing into a full disk fails again; the file is closed anyway
                pass
        tmp.unlink(missing_ok=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def convert_model(src: str | Path, out: str | Path, quant: str = "q8_0",
                  progress: Callable[[int, int, str], None] | None = None, *,
                  calibrate: bool = True) -> ConvertReport:
    """Convert the HF folder or GGUF file `src` into a GGUF file `out` with weights in `quant`.

    quant: one of QUANTS: f32, f16, q8_0, q4_0, q4_1, or llama.cpp's mixtures q4_k_m, q5_k_m,
    q6_k (see `tensor_format`). progress(done, total, tensor_name) is called after each tensor
    is written. calibrate: weight every searched format's scale search by input statistics the
    model's own samples give (False: estimated from the weights alone).
    Raises LlamacpuError on bad input or a failed write.
    """
    import gguf

    t0 = time.perf_counter()
    if quant not in QUANTS:
        raise LlamacpuError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise LlamacpuError(f"{out} is a directory; give the output file's name")
    if not out.parent.is_dir():
        raise LlamacpuError(f"output folder {out.parent} does not exist")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise LlamacpuError("the output would overwrite the source")
    ckpt = load_checkpoint(src)
    if ckpt.transcoded:
        # The loader transcoded tensors it can't run (K-quants...) to q8_0; quantizing those again
        # would stack two roundings, so read every weight as f32 instead (in memory, not mmap).
        ckpt = load_checkpoint(src, dequantize=True)
    plan, importance = _plan(ckpt, quant, calibrate)
    meta = _metadata(ckpt, quant)

    # A unique hidden name beside OUT (same filesystem, so the final rename is atomic); the
    # writer creates it with the usual permissions, which mkstemp's 0600 would not give.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        for key, (value, vtype, sub_type) in meta.items():
            writer.add_key_value(key, value, vtype, sub_type)
        for p in plan:
            if p.fmt in BLOCK_FORMATS:
                writer.add_tensor_info(p.gguf_name, storage_shape(p.fmt, p.shape), np.dtype(np.uint8),
                                       p.nbytes, raw_dtype=gguf.GGMLQuantizationType[p.fmt.upper()])
            else:
                dtype = np.dtype(np.float32 if p.fmt == "f32" else np.float16)
                writer.add_tensor_info(p.gguf_name, p.shape, dtype, p.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(plan):
            data = p.make().data
            writer.write_tensor_data(np.ascontiguousarray(data))
            if progress is not None:
                progress(i + 1, len(plan), p.name)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:  # a full disk, Ctrl-C, SIGTERM (as an exception), any failure
        _discard(writer, tmp)
        if isinstance(e, OSError):  # e.g. ENOSPC, or EFBIG past RLIMIT_FSIZE
            raise LlamacpuError(f"could not write {out}: {e.strerror or e}") from None
        raise
    formats: dict[str, int] = {}
    for p in plan:
        formats[p.fmt] = formats.get(p.fmt, 0) + 1
    return ConvertReport(out=out, quant=quant, n_tensors=len(plan),
                         fallback=[p.name for p in plan if p.fallback],
                         bytes_written=out.stat().st_size, seconds=time.perf_counter() - t0,
                         formats=formats, importance=importance)


# ---- which tensors, in which format --------------------------------------------------------

@dataclass
class _Planned:
    name: str  # llamacpu name
    gguf_name: str
    shape: tuple[int, ...]
    fmt: str
    fallback: bool
    make: Callable[[], QTensor]  # produces the stored tensor when its turn to be written comes

    @property
    def nbytes(self) -> int:
        if self.fmt in BLOCK_FORMATS:
            rows, cols = storage_shape(self.fmt, self.shape)
            return rows * cols
        return int(np.prod(self.shape)) * (4 if self.fmt == "f32" else 2)


def tensor_format(name: str, shape: tuple[int, ...], quant: str, *, tied: bool, n_layers: int) -> tuple[str, bool]:
    """(stored format, fell back to f16?) for tensor `name` (llamacpu's name) when converting to
    `quant`, a model of `n_layers` layers.

    The K-quant mixtures follow llama.cpp's `llama_tensor_get_type` for a `llama` model with one
    expert (src/llama-quant.cpp), then its `tensor_type_fallback`:
    - the output head (`output`, or the token embedding when tied): q6_k, or q8_0 when its rows
      aren't a multiple of 256;
    - q4_k_m and q5_k_m: `wv` and `w_down` get q6_k in the "use more bits" layers (the first
      and last eighth, and every third layer between);
    - everything else: the mixture's K-quant (q4_k, q5_k, q6_k);
    - then a K-quant whose rows aren't a multiple of 256 falls back: q4_k → q5_0, q5_k → q5_1,
      q6_k → q8_0 (SmolLM2's 576-wide rows: every matrix but w_down).
    """
    if len(shape) == 1:
        return "f32", False
    if quant in ("f32", "f16"):
        return quant, False
    cols = shape[-1]
    is_head = name == "output" or (name == "embed" and tied)
    if quant in K_MIXTURES:
        fmt = K_MIXTURES[quant]
        if is_head:
            fmt = "q8_0" if cols % BLOCK_FORMATS[fmt].weights else "q6_k"
        elif quant != "q6_k" and name.endswith((".wv", ".w_down")) and _use_more_bits(_layer(name), n_layers):
            fmt = "q6_k"
        if cols % BLOCK_FORMATS[fmt].weights:
            fmt = K_FALLBACK.get(fmt, fmt)
    else:
        # q4_0/q4_1 give the head q8_0 (llama.cpp: q6_k, or q8_0 when rows aren't a multiple of
        # 256, as SmolLM2's 576 aren't): every logit goes through it.
        fmt = "q8_0" if is_head and quant in ("q4_0", "q4_1") else quant
    if cols % BLOCK_FORMATS[fmt].weights:
        return "f16", True
    return fmt, False


def _layer(name: str) -> int:
    """`layers.{i}.…` → i."""
    return int(name.split(".")[1])


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Self-calibration runs the model in f32 with every weight dequantized at once, about 1k tokens:
# ~12 s and 0.6 GB for SmolLM2's 135M parameters. Beyond this size (4 GB of f32 weights, minutes
# of compute) the weights-only estimate is used instead.
CALIBRATION_MAX_PARAMS = 1_000_000_000


def _plan(ckpt: Checkpoint, quant: str, calibrate: bool = True) -> tuple[list[_Planned], str | None]:
    """The tensors to write, in order, and which importance their searches use (None: no search)."""
    c = ckpt.config
    tensors = dict(ckpt.tensors)
    factors = c.rope_freqs()
    if factors is not None and "rope_freqs" not in tensors:
        # llama.cpp reads Llama-3 scaling from this tensor of per-frequency divisors (hd/2,), as
        # its convert_hf_to_gguf.py writes it; there is no metadata key for it.
        tensors["rope_freqs"] = QTensor("f32", factors.shape, factors)
    order = ["embed", "output", "norm", "rope_freqs"]
    names = [n for n in order if n in tensors] + [n for n in tensors if n not in order]
    formats = {n: tensor_format(n, tensors[n].shape, quant, tied=c.tie_word_embeddings, n_layers=c.num_hidden_layers)
               for n in names}
    # Importance only matters where a search will run (a same-format tensor is copied).
    searched = any(f in SEARCHED and tensors[n].fmt != f for n, (f, _) in formats.items())
    importance, how = {}, None
    if searched:
        n_params = sum(int(np.prod(t.shape)) for t in tensors.values())
        if calibrate and n_params <= CALIBRATION_MAX_PARAMS:
            importance, how = calibrated_importance(tensors, c), "self-calibrated"
        else:
            importance, how = input_importance(tensors, c), "weights-only"
    plan = []
    for name in names:
        src = tensors[name]
        fmt, fallback = formats[name]
        imp = importance.get(name) if fmt in SEARCHED else None
        plan.append(_Planned(name, to_gguf_name(name), src.shape, fmt, fallback,
                             make=lambda s=src, f=fmt, i=imp: _convert_tensor(s, f, i)))
    return plan, how


def quantize_checkpoint(ckpt: Checkpoint, quant: str, *, calibrate: bool = False) -> Checkpoint:
    """`ckpt` with every tensor in the format `convert_model` would write, held in memory.

    This is how an HF folder runs without converting it first (`open_model(..., quant=...)`).
    calibrate: as `convert_model`'s; off by default here, since it runs the model in f32 first.
    """
    if quant not in LOAD_QUANTS:
        hint = " (the K-quant mixtures are written by `llamacpu convert`)" if quant in QUANTS else ""
        raise LlamacpuError(f"unknown format {quant!r}; choose one of {', '.join(LOAD_QUANTS)}{hint}")
    plan, _ = _plan(ckpt, quant, calibrate)
    return replace(ckpt, tensors={p.name: p.make() for p in plan},
                   kept_f16=ckpt.kept_f16 + tuple(p.name for p in plan if p.fallback))


def _convert_tensor(src: QTensor, fmt: str, importance: np.ndarray | None) -> QTensor:
    if src.fmt == fmt:  # same format: the bytes are already right
        return src
    return quantize(src.dequantize(), fmt, importance)


def calibrated_importance(tensors: dict[str, QTensor], config) -> dict[str, np.ndarray]:
    """Column importance (cols,) of every layer matrix, each normalised to mean 1, from the
    model's own samples (`calibrate.self_calibrate`, seed 0, starting from BOS)."""
    from .calibrate import self_calibrate

    start = config.bos_token_id if config.bos_token_id is not None else 0
    _, moments, _ = self_calibrate(tensors, config, start=start)
    return _normalised(moments)


def _normalised(importance: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each importance vector scaled to mean 1, float32; degenerate ones (all zero, not finite) dropped."""
    return {name: (v / v.mean()).astype(np.float32) for name, v in importance.items()
            if np.isfinite(v).all() and v.mean() > 0}


# Column importance for the scale searches: E[h_j^2] for the input h of each y = W h, from the
# weights alone, by propagating second moments through the network (no calibration data).
# Channels are treated as independent; s (D,) tracks E[x_k^2] of the residual stream x:
#   start      s = mean over the vocabulary of embed[v, k]^2
#   wq wk wv   h = attn gain * x / rms(x)           E[h^2] = gain^2 * s / mean(s)
#   wo         h = attention's mix of value vectors  E[h_j^2] ≈ E[v_j^2] = (Wv^2 @ E[h_attn^2])_j,
#              column j of a query head reading the value head its group shares
#              then s += Wo^2 @ E[h]
#   w_gate w_up  h = mlp gain * x / rms(x)          E[h^2] = gain^2 * s / mean(s)
#   w_down     h = silu(g) * u                      E[h_j^2] ≈ E[silu(g_j)^2] E[u_j^2], g_j and u_j
#              Gaussian with variances from Wg^2, Wu^2;  then s += Wd^2 @ E[h]
# The s / mean(s) factor carries the residual stream's outlier channels, which make some input
# columns far more important than others. On SmolLM2 (4 × 512 tokens of prose) q4_0's KL from
# f32 went 0.298 → 0.233 nats against weighting by the norm gains alone (tools/check_llamacpp.py --quality);
# self-calibration (the default) takes it to about 0.17.

def input_importance(tensors: dict[str, QTensor], config) -> dict[str, np.ndarray]:
    """Column importance (cols,) of every layer matrix, each normalised to mean 1."""
    c = config

    def f64(name: str) -> np.ndarray:
        return tensors[name].dequantize().astype(np.float64)

    embed = tensors["embed"]
    s = np.zeros(c.hidden_size)  # (D,) E[x^2] of the residual stream
    for r in range(0, c.vocab_size, 4096):  # in row blocks: the embedding can be large
        rows = QTensor(embed.fmt, (min(4096, c.vocab_size - r), c.hidden_size), embed.data[r:r + 4096])
        s += (rows.dequantize().astype(np.float64) ** 2).sum(0)
    s /= c.vocab_size
    out: dict[str, np.ndarray] = {}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        h_attn = f64(p + "attn_norm") ** 2 * s / s.mean()  # (D,)
        out[p + "wq"] = out[p + "wk"] = out[p + "wv"] = h_attn
        wv = f64(p + "wv")
        v = ((wv * wv) @ h_attn).reshape(c.num_key_value_heads, 1, c.head_dim)  # (Hkv, 1, hd)
        out[p + "wo"] = np.broadcast_to(v, (c.num_key_value_heads, c.n_rep, c.head_dim)).reshape(-1)
        wo = f64(p + "wo")
        s = s + (wo * wo) @ out[p + "wo"]
        h_mlp = f64(p + "mlp_norm") ** 2 * s / s.mean()  # (D,)
        out[p + "w_gate"] = out[p + "w_up"] = h_mlp
        wg, wu = f64(p + "w_gate"), f64(p + "w_up")
        out[p + "w_down"] = _silu_second_moment((wg * wg) @ h_mlp) * ((wu * wu) @ h_mlp)  # (F,)
        wd = f64(p + "w_down")
        s = s + (wd * wd) @ out[p + "w_down"]
    return _normalised(out)


def _silu_second_moment(var: np.ndarray) -> np.ndarray:
    """E[silu(g)^2] for g ~ N(0, var), elementwise, by 32-point Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(32)  # ∫ f(z) exp(-z²/2) dz
    g = np.sqrt(var)[:, None] * nodes[None, :]  # (n, 32)
    silu = g / (1.0 + np.exp(-g))
    return (silu * silu) @ weights / np.sqrt(2 * np.pi)


# ---- metadata ------------------------------------------------------------------------------

def _metadata(ckpt: Checkpoint, quant: str) -> dict[str, tuple[Any, Any, Any]]:
    """key → (value, GGUFValueType, array sub-type) for every key the output carries."""
    import gguf

    T = gguf.GGUFValueType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
                 "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}[quant]
    meta: dict[str, tuple[Any, Any, Any]] = {}
    if ckpt.hf_dir is None:
        meta.update(_carried_gguf_metadata(ckpt.meta))
        name = ckpt.meta.get("general.name") or ckpt.source.stem
    else:
        tokenizer = ckpt.tokenizer()
        for key, value in tokenizer.gguf_metadata().items():
            typed = _typed(key, value)
            if typed is not None:
                meta[key] = typed
        template = ckpt.chat_template(tokenizer)
        if template is not None:
            meta["tokenizer.chat_template"] = (template.source, T.STRING, None)
        name = ckpt.hf_dir.name
    # A file name that is not UTF-8 carries surrogates; GGUF strings are UTF-8, so show those bytes as U+FFFD.
    name = os.fsencode(str(name)).decode("utf-8", "replace") if isinstance(name, str) else str(name)
    meta["general.name"] = (name, T.STRING, None)
    meta["general.file_type"] = (int(file_type), T.UINT32, None)
    meta["general.quantization_version"] = (QUANT_VERSION, T.UINT32, None)
    for key, value in ckpt.config.gguf_metadata().items():
        meta[key] = _typed(key, value)  # counts uint32, floats float32, rope.scaling.type a string
    # Recommended sampling (from generation_config.json or the source GGUF), typed as gguf-py writes it.
    for setting, value in ckpt.sampling.items():
        meta[SAMPLING_KEYS[setting]] = (value, T.INT32 if setting in INT_SETTINGS else T.FLOAT32, None)
    if "tokenizer.ggml.model" not in meta:
        raise LlamacpuError(f"{ckpt.source}: no tokenizer to write into the GGUF file")
    return meta


# Source keys that describe the file or its layout, not the model; we write our own.
_NOT_CARRIED = ("general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment", "split.")


def _carried_gguf_metadata(meta: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    """The `general.*`, `tokenizer.*` and `llamacpu.*` keys of a GGUF source, typed for the writer.
    Descriptive `general.*` keys we can't type (nested arrays...) are left out; GGUF has no
    empty arrays, so empty ones are too."""
    out = {}
    for key, value in meta.items():
        if not key.startswith(("general.", "tokenizer.", "llamacpu.")) or key.startswith(_NOT_CARRIED):
            continue
        try:
            typed = _typed(key, value)
        except LlamacpuError:
            if key.startswith("general."):
                continue
            raise
        if typed is not None:
            out[key] = typed
    return out


def _typed(key: str, value: Any) -> tuple[Any, Any, Any] | None:
    """GGUF type for a metadata value given as a plain Python / numpy value; None for an empty
    array (GGUF can't store one).

    Integers are uint32 (token ids and counts, as llama.cpp reads them; negative ones int32),
    floats float32; numeric arrays keep their dtype (token types int32, scores float32);
    bytes become a uint8 array."""
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, (list, tuple, bytes, bytearray, np.ndarray)) and len(value) == 0:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value), T.BOOL, None
    if isinstance(value, (int, np.integer)):
        return int(value), (T.UINT32 if value >= 0 else T.INT32), None
    if isinstance(value, (float, np.floating)):
        return float(value), T.FLOAT32, None
    if isinstance(value, str):
        return value, T.STRING, None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), T.ARRAY, T.UINT8
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value), T.ARRAY, T.STRING
    arr = np.asarray(value)
    if arr.ndim == 1 and len(arr):
        kinds = {"i": T.INT32, "u": T.UINT32, "f": T.FLOAT32, "b": T.BOOL}
        if arr.dtype.kind in kinds:
            sub = T.UINT8 if arr.dtype == np.uint8 else kinds[arr.dtype.kind]
            return arr.tolist(), T.ARRAY, sub
    raise LlamacpuError(f"cannot store metadata {key} ({type(value).__name__}) in GGUF")
