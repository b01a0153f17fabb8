"""GGUF files for `make bench`: the real SmolLM2-135M and random weights in the shapes people run.

    python tools/make_bench_models.py [--sizes 135m,1b,7b] [--model SmolLM2.gguf]

Every benchmark file is made by llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`)
and cached under .cache/models/bench/ as `<name>.<FMT>.gguf`. Q8_0 and Q4_0 are "pure": every
matrix in the target type, so that llamacpu and llama.cpp run the very same bytes (by default
llama.cpp would make `output.weight` Q6_K). The K-quant files (Q4_K_M, Q5_K_M, Q6_K) keep
llama.cpp's own mixture, as people download them (e.g. Q4_K_M: Q6_K for `output.weight` and
for `attn_v`/`ffn_down` of some layers, Q4_K elsewhere).

- 135m: SmolLM2-135M-Instruct, requantized from the shipped Q4_1 file (--model). Its rows of
        576 are not a multiple of 256, so its K-quant files mix in Q5_0/Q5_1/Q8_0.
- 1b:   TinyLlama-1.1B's shape (dim 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632).
- 7b:   Llama-2-7B's shape (dim 4096, 32 layers, 32 heads, FFN 11008).

The 1b and 7b weights are random (speed does not depend on the values): N(0, 0.02) matrices,
unit norms, written tensor by tensor with gguf-py. Their tokenizer is a real one, the 32000-token
SentencePiece model at .cache/models/tokenizer.model.v1 (Mistral v1's, the size of Llama 2's),
as `tokenizer.ggml.*` keys. The 1b source is F16 (2.2 GB). A 7B F16 would be 13.5 GB, so its
source is written directly as random Q8_0 blocks (7.2 GB; llama.cpp requantizes with
allow_requantize). Sources are deleted once quantized (--keep-source keeps them).
Every file is written to a temporary name and renamed, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_cpp_quantize import llama_cpp_quantize  # tools/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DIR = ROOT / ".cache" / "models" / "bench"
SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SPM = ROOT / ".cache" / "models" / "tokenizer.model.v1"


@dataclass(frozen=True)
class Shape:
    """A Llama architecture's sizes, as config.json names them, and how its random source is stored."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    source: str  # "F16" or "Q8_0": the type of the random source file llama.cpp quantizes from
    formats: tuple[str, ...]  # what the bench runs
    vocab_size: int = 32000  # the SentencePiece tokenizer's size
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


SHAPES = {
    "1b": Shape("tinyllama-1.1b-shape", 2048, 22, 32, 4, 5632, 2048, "F16",
                ("Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")),
    "7b": Shape("llama2-7b-shape", 4096, 32, 32, 32, 11008, 4096, "Q8_0", ("Q4_0",)),
}
REAL = {"135m": ("smollm2-135m", ("Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"))}
WEIGHT_STD = 0.02


def bench_path(name: str, fmt: str) -> Path:
    return BENCH_DIR / f"{name}.{fmt}.gguf"


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """GGUF tensor names and (rows, cols) shapes, in file order. The output head is untied."""
    D, F, V = s.hidden_size, s.intermediate_size, s.vocab_size
    hd = D // s.num_attention_heads
    kv = s.num_key_value_heads * hd
    out: list = [("token_embd.weight", (V, D))]
    for i in range(s.num_hidden_layers):
        out += [(f"blk.{i}.attn_norm.weight", (D,)), (f"blk.{i}.attn_q.weight", (D, D)),
                (f"blk.{i}.attn_k.weight", (kv, D)), (f"blk.{i}.attn_v.weight", (kv, D)),
                (f"blk.{i}.attn_output.weight", (D, D)), (f"blk.{i}.ffn_norm.weight", (D,)),
                (f"blk.{i}.ffn_gate.weight", (F, D)), (f"blk.{i}.ffn_up.weight", (F, D)),
                (f"blk.{i}.ffn_down.weight", (D, F))]
    return out + [("output_norm.weight", (D,)), ("output.weight", (V, D))]


def _tokenizer_keys(writer, spm_path: Path) -> None:
    """SentencePiece model → llama.cpp's `tokenizer.ggml.*` keys (model "llama")."""
    import gguf
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                     T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], source: str) -> np.ndarray:
    """Norms: ones (f32). Matrices: N(0, WEIGHT_STD) as F16, or Q8_0 blocks whose values have that spread."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rows, cols = shape
    if source == "F16":
        return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)
    # Q8_0: 34 bytes per 32 weights, f16 scale d then 32 int8 quants; uniform quants in
    # [-127, 127] with d = std·√3/127 have standard deviation WEIGHT_STD.
    nb = cols // 32
    blocks = np.empty((rows, nb, 34), dtype=np.uint8)
    blocks[..., 2:] = rng.integers(-127, 128, (rows, nb, 32), dtype=np.int8).view(np.uint8)
    blocks[..., :2] = np.array([WEIGHT_STD * 3 ** 0.5 / 127], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, nb * 34)


def write_random_source(s: Shape, out: Path, spm_path: Path, seed: int = 0) -> None:
    """A llama-architecture GGUF of shape `s` with random weights, written tensor by tensor."""
    import gguf
    from llamacpu.config import ModelConfig
    config = ModelConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                         num_key_value_heads=s.num_key_value_heads, vocab_size=s.vocab_size,
                         rms_norm_eps=s.rms_norm_eps, rope_theta=s.rope_theta, tie_word_embeddings=False,
                         max_position_embeddings=s.max_position_embeddings)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(f"{s.name} (random weights, for benchmarks)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if s.source == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in config.gguf_metadata().items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    _tokenizer_keys(w, spm_path)
    q8 = gguf.GGMLQuantizationType.Q8_0
    shapes = tensor_shapes(s)
    for name, shape in shapes:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        elif s.source == "F16":
            w.add_tensor_info(name, shape, np.dtype(np.float16), shape[0] * shape[1] * 2)
        else:
            byte_shape = (shape[0], shape[1] // 32 * 34)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=q8)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for name, shape in shapes:
            w.write_tensor_data(_random_tensor(rng, shape, s.source))
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


PURE = ("Q8_0", "Q4_0")  # formats made "pure"; the K-quant mixtures keep llama.cpp's per-tensor choices


def quantize(src: Path, out: Path, fmt: str) -> None:
    """llama.cpp's quantizer to `fmt` (pure for PURE formats, else llama.cpp's mixture), from
    F16/F32 or (requantizing) Q8_0/Q4_1."""
    llama_cpp_quantize(src, out, fmt, pure=fmt in PURE, requantize=True)


def ensure(size: str, *, model: Path = SMOLLM2, spm_path: Path = SPM, keep_source: bool = False,
           log=lambda msg: print(msg, file=sys.stderr)) -> dict[str, Path]:
    """The bench files of `size` ("135m", "1b", "7b"), made if missing: format → path."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if size in REAL:
        name, formats = REAL[size]
        paths = {fmt: bench_path(name, fmt) for fmt in formats}
        for fmt, path in paths.items():
            if not path.exists():
                log(f"quantizing {model.name} to {fmt} with llama.cpp → {path.name}")
                quantize(model, path, fmt)
        return paths
    s = SHAPES[size]
    paths = {fmt: bench_path(s.name, fmt) for fmt in s.formats}
    missing = [fmt for fmt, p in paths.items() if not p.exists()]
    if not missing:
        return paths
    source = bench_path(s.name, s.source)
    if not source.exists():
        t0 = time.perf_counter()
        log(f"writing random {s.source} weights → {source.name}")
        write_random_source(s, source, spm_path)
        log(f"  {source.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    for fmt in missing:
        if fmt != s.source:
            t0 = time.perf_counter()
            log(f"quantizing to {fmt} with llama.cpp → {paths[fmt].name}")
            quantize(source, paths[fmt], fmt)
            log(f"  {paths[fmt].stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    if s.source not in s.formats and not keep_source:
        source.unlink()
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="135m,1b,7b")
    ap.add_argument("--model", type=Path, default=SMOLLM2, help="the real SmolLM2 GGUF (135m)")
    ap.add_argument("--keep-source", action="store_true", help="keep the random F16/Q8_0 sources")
    args = ap.parse_args()
    for size in args.sizes.split(","):
        if size not in REAL and size not in SHAPES:
            sys.exit(f"unknown size {size!r} (choose from {', '.join([*REAL, *SHAPES])})")
    for size in args.sizes.split(","):
        for fmt, path in ensure(size, model=args.model, keep_source=args.keep_source).items():
            print(f"{size} {fmt} {path}")


if __name__ == "__main__":
    main()
