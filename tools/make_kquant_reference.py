#!/usr/bin/env python3
"""Make llama.cpp's K-quant files of two tiny random llamas, and llama.cpp's logits on them.

    python tools/make_kquant_reference.py [--out tests/data/kquant]

`tests/test_kquant_reference.py` checks llamacpu's logits (prefill and token-by-token decode)
against these, so the K-quant kernels are held to an independent implementation on the very
bytes llama.cpp writes. The models are random (seeded), small enough to commit (~3 MB in all):

- `k256`: hidden 256, FFN 256, 2 layers, 4 heads of 64, 2 KV heads, vocab 512: every row is a
  multiple of 256, so llama.cpp's Q4_K_M / Q5_K_M / Q6_K mixtures appear as in a real model
  (Q6_K for `output.weight`, and for `attn_v`/`ffn_down` of the last layer, fused here with
  Q4_K/Q5_K rows).
- `k192`: hidden 192 (3 heads of 64, 1 KV head), FFN 256, vocab 512: rows of 192 are not a
  multiple of 256, so llama.cpp falls back to Q5_0/Q5_1/Q8_0 for them (as for SmolLM2's 576),
  while `ffn_down` (rows of 256) stays a K-quant. Q4_K_M and Q5_K_M.

The f32 source is written with gguf-py (with a toy tokenizer; llama.cpp is fed token ids), then
quantized by `llama_cpp.llama_model_quantize` with llama.cpp's default mixture. The logits come
from `llama_cpp.Llama` (logits for every position of one batch) for a seeded random prompt.
Outputs: `<model>.<TYPE>.gguf`, `reference.npz` (tokens, logits per file) and `REFERENCE.json`
(the command, llama-cpp-python's version, each file's tensor types and sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from llama_cpp_quantize import llama_cpp_quantize  # tools/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name → (hidden, ffn, heads, kv heads, llama.cpp types)
    "k256": (256, 256, 4, 2, ("Q4_K_M", "Q5_K_M", "Q6_K")),
    "k192": (192, 256, 3, 1, ("Q4_K_M", "Q5_K_M")),
}
VOCAB, LAYERS, N_TOKENS, SEED = 512, 2, 40, 0


def write_source(path: Path, hidden: int, ffn: int, heads: int, kv_heads: int, seed: int) -> None:
    """A random llama as f32 GGUF (gguf-py's writer): matrices N(0, 1/cols), the output head
    N(0, 4/cols) so that the logits are peaked enough for top-1 to mean something."""
    import gguf
    from llamacpu.config import ModelConfig
    c = ModelConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=LAYERS,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in c.gguf_metadata().items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["t 1"])  # llama.cpp wants at least one merge (never used: we feed ids)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    hd = hidden // heads
    shapes = [("token_embd.weight", (VOCAB, hidden))]
    for i in range(LAYERS):
        shapes += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                   (f"blk.{i}.attn_k.weight", (kv_heads * hd, hidden)), (f"blk.{i}.attn_v.weight", (kv_heads * hd, hidden)),
                   (f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                   (f"blk.{i}.ffn_gate.weight", (ffn, hidden)), (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
                   (f"blk.{i}.ffn_down.weight", (hidden, ffn))]
    shapes += [("output_norm.weight", (hidden,)), ("output.weight", (VOCAB, hidden))]
    for name, shape in shapes:
        if len(shape) == 1:
            t = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            t = rng.standard_normal(shape) / np.sqrt(shape[1]) * (2.0 if name == "output.weight" else 1.0)
        w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, V) at every position of `tokens`, evaluated as one batch, with an
    f32 KV cache (its default f16 cache would add its own rounding; the activations' 8-bit
    blocks, Q8_K/Q8_0/Q8_1, remain: they cannot be turned off)."""
    import llama_cpp
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                          logits_all=True, type_k=f32, type_v=f32, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def tensor_types(path: Path) -> dict[str, int]:
    import gguf
    r = gguf.GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in r.tensors).items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "kquant")
    args = ap.parse_args()
    import llama_cpp
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = [int(t) for t in np.random.default_rng(SEED).integers(3, VOCAB, N_TOKENS)]
    arrays: dict[str, np.ndarray] = {"tokens": np.array(tokens, dtype=np.int32)}
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, (hidden, ffn, heads, kv, ftypes)) in enumerate(MODELS.items()):
            src = Path(tmp) / f"{name}.F32.gguf"
            write_source(src, hidden, ffn, heads, kv, seed)
            for ftype in ftypes:
                out = args.out / f"{name}.{ftype}.gguf"
                llama_cpp_quantize(src, out, ftype)
                arrays[f"{name}.{ftype}"] = llama_cpp_logits(out, tokens)
                files[out.name] = {"types": tensor_types(out), "bytes": out.stat().st_size,
                                   "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
                print(f"{out.name}: {files[out.name]['types']}", file=sys.stderr)
    tmp_npz = args.out / "reference.tmp.npz"
    np.savez_compressed(tmp_npz, **arrays)
    os.replace(tmp_npz, args.out / "reference.npz")
    info = {"command": "python tools/make_kquant_reference.py " + " ".join(sys.argv[1:]),
            "made_by": f"llama-cpp-python {llama_cpp.__version__} (llama_model_quantize, Llama.eval with logits_all)",
            "tokens": N_TOKENS, "vocab": VOCAB, "layers": LAYERS, "files": files}
    (args.out / "REFERENCE.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
