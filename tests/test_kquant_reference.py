"""llama.cpp's own K-quant files run natively, and agree with llama.cpp.

The files and logits in tests/data/kquant/ were made by `tools/make_kquant_reference.py`:
tiny random llamas quantized by llama.cpp (its Q4_K_M, Q5_K_M and Q6_K mixtures, and, with
rows of 192, its Q5_0/Q5_1/Q8_0 fallbacks), and llama.cpp's logits (f32 KV cache) at every
position of a 40-token prompt. Every tensor must load as stored (nothing transcoded), and both
our prefill (the integer GEMM) and our token-by-token decode (the fused decode kernel) must

- equal the exact forward over the dequantized weights (`quant.dequantize`, bit-identical to
  gguf-py's) to our 15-bit activation rounding: measured KL 6e-8, top-1 100%;
- match llama.cpp's logits as closely as that exact forward does. llama.cpp rounds the
  activations to 8 bits per block (Q8_K per 256 for K-quant weights), which cannot be turned
  off: measured KL(llama.cpp || exact) 1.2e-3 to 2.0e-3 and top-1 agreement 85-97.5% on these
  flat random logits, and the same for ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llamacpu.checkpoint import load_checkpoint
from llamacpu.model import Model
from llamacpu.perplexity import kl_divergence, top1_agrees

from test_kernels import ref_forward

DATA = Path(__file__).parent / "data" / "kquant"
REF = json.loads((DATA / "REFERENCE.json").read_text())
FILES = sorted(REF["files"])


def load_reference() -> dict[str, np.ndarray]:
    """tokens (T,) and, per file, llama.cpp's logits (T, V)."""
    with np.load(DATA / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.mark.parametrize("name", FILES)
def test_kquant_file_runs_natively_and_matches_llama_cpp(name, reference):
    ckpt = load_checkpoint(DATA / name)
    assert ckpt.transcoded == {}  # every tensor runs as stored
    want = {t.lower(): n for t, n in REF["files"][name]["types"].items()}
    got: dict[str, int] = {}
    for t in ckpt.tensors.values():
        got[t.fmt] = got.get(t.fmt, 0) + 1
    assert got == want
    model = Model(ckpt.config, ckpt.tensors, threads=2, act_bits=16)  # 16: exact up to f32 rounding
    assert model.decode_weights is not None  # the fused decode kernel takes every matrix
    tokens = reference["tokens"]
    theirs = reference[name.removesuffix(".gguf")]  # (T, V) llama.cpp's logits
    exact = ref_forward(ckpt.config, {k: t.dequantize() for k, t in ckpt.tensors.items()}, tokens)  # (T, V) f64
    prefill = model.forward(tokens, model.new_cache(64), all_logits=True)  # (T, V)
    cache = model.new_cache(64)
    decode = np.stack([model.forward([t], cache) for t in tokens])  # (T, V), one token at a time
    kl_exact = kl_divergence(theirs, exact)
    assert kl_exact < 4e-3  # llama.cpp's own activation rounding (measured <= 2e-3)
    for ours in (prefill, decode):
        assert kl_divergence(exact, ours) < 1e-6 and top1_agrees(exact, ours).mean() == 1.0
        assert kl_divergence(theirs, ours) <= 1.2 * kl_exact + 1e-5
        assert top1_agrees(theirs, ours).mean() >= top1_agrees(theirs, exact).mean() - 0.05
    # 8-bit activations (the default where q4_k weights hold the most): llama.cpp's kind of error
    model8 = Model(ckpt.config, ckpt.tensors, threads=2, act_bits=8)
    ours8 = model8.forward(tokens, model8.new_cache(64), all_logits=True)
    assert kl_divergence(exact, ours8) < 4e-3 and top1_agrees(exact, ours8).mean() >= 0.8


def test_info_counts_tensors_per_type():
    """`info` shows how many tensors of each type a K-quant mixture holds (as gguf-py reads them)."""
    from llamacpu.info import describe
    for name in FILES:
        d = describe(DATA / name)
        assert d["types"] == {t.lower(): n for t, n in REF["files"][name]["types"].items()}
        assert sum(sum(c.values()) for c in d["formats"].values()) == sum(d["types"].values())
