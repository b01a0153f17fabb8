"""Kernels against plain-numpy twins, and the fast decoder against a numpy reference model.

The numpy functions here are the references (they are not in the package): each kernel in
`llamacpu/kernels.py` is compared with its twin on random data, including odd sizes,
GQA ratios and positions. Then the whole `Model` (packed block weights, fused decode step)
is compared with `reference_forward`, a direct transcription of the math.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from llamacpu import kernels, linear
from llamacpu.checkpoint import load_checkpoint
from llamacpu.errors import LlamacpuError
from llamacpu.linear import Linear, PackedBlocks, pack, pack_stack
from llamacpu.model import Model
from llamacpu.quant import QTensor, quantize

from tiny import random_tensors, tiny_config

# ---------------------------------------------------------------------------
# numpy twins


def ref_rms_norm(x, weight, eps):
    """x (T, D) scaled to unit root-mean-square, then by weight (D,)."""
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def ref_rope(x, positions, inv_freq):
    """Rotate adjacent pairs of x (T, heads, hd) by angle position * inv_freq (hd/2,)."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (T, hd/2)
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def ref_attention(q, k, v, start):
    """Causal GQA: q (T, H, hd) at positions start.., k/v (S, Hkv, hd) → (T, H, hd), in f64."""
    T, H, hd = q.shape
    S, Hkv, _ = k.shape
    out = np.empty((T, H, hd))
    for t in range(T):
        for h in range(H):
            g = h // (H // Hkv)
            n = start + t + 1
            s = k[:n, g].astype(np.float64) @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:n, g].astype(np.float64)
    return out.astype(np.float32)


def ref_quantize_act(x, dtype=np.int8):
    """x (C,) → int8 (int16) blocks of 32 with amax/127 (amax/32767) scales: (xq, xd, xs)."""
    b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1) / np.float32(np.iinfo(dtype).max)
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(dtype)
    return q.reshape(-1), d.astype(np.float32), (d * q.astype(np.int32).sum(axis=1)).astype(np.float32)


def ref_forward(c, t, tokens):
    """The whole decoder, no cache, f64 math: t maps llamacpu names to f32 arrays. → (T, V)."""
    T = len(tokens)
    x = t["embed"][tokens].astype(np.float64)
    pos = np.arange(T)
    inv = c.rope_inv_freq()
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps) * w

    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        h = norm(x, t[p + "attn_norm"])
        q = ref_rope((h @ t[p + "wq"].T).reshape(T, H, hd), pos, inv)
        k = ref_rope((h @ t[p + "wk"].T).reshape(T, Hkv, hd), pos, inv)
        v = (h @ t[p + "wv"].T).reshape(T, Hkv, hd)
        x = x + ref_attention(q, k, v, 0).reshape(T, -1).astype(np.float64) @ t[p + "wo"].T
        h = norm(x, t[p + "mlp_norm"])
        g, u = h @ t[p + "w_gate"].T, h @ t[p + "w_up"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "w_down"].T
    out = t["embed"] if c.tie_word_embeddings else t["output"]
    return norm(x, t["norm"]) @ out.T


# ---------------------------------------------------------------------------
# Kernels


RNG = np.random.default_rng(7)


def test_f16_conversions_match_numpy():
    x = np.concatenate([RNG.standard_normal(1000) * 10.0 ** RNG.integers(-9, 6, 1000),
                        [0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 2.9e-8, 3e-8, np.inf, -np.inf]]
                       ).astype(np.float32)
    bits = np.empty(len(x), np.uint16)
    kernels.f32_to_f16(x, bits)
    with np.errstate(over="ignore"):  # the large values overflow to inf on purpose
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    back = np.empty(len(x), np.float32)
    kernels.f16_to_f32(bits, back)
    np.testing.assert_array_equal(back, bits.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("n", [32, 96, 576])
def test_quantize_act(n, dtype):
    x = (RNG.standard_normal(n) * 3).astype(np.float32)
    x[:32] = 0.0  # an all-zero block must give zeros, not NaN
    xq, xd, xs = np.empty(n, dtype), np.empty(n // 32, np.float32), np.empty(n // 32, np.float32)
    kernels.quantize_act(x, xq, xd, xs)
    rq, rd, rs = ref_quantize_act(x, dtype)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_allclose(xd, rd, rtol=1e-6)
    np.testing.assert_allclose(xs, rs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", [np.int8, np.int16])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("rows,cols,nt", [(1, 32, 1), (37, 96, 2), (130, 576, 2), (5, 64, 3)])
def test_matvec_matches_dequantized_dot(fmt, rows, cols, nt, act):
    """The integer kernel equals the exact dot of the dequantized weights with the quantized x."""
    qt = quantize(RNG.standard_normal((rows, cols)).astype(np.float32), fmt)
    p = pack(qt)
    x = RNG.standard_normal(cols).astype(np.float32)
    x[:32] *= 100  # an outlier block: int16 must not overflow its int32 sums
    xq, xd, xs = np.empty(cols, act), np.empty(cols // 32, np.float32), np.empty(cols // 32, np.float32)
    y = np.full(rows, np.nan, np.float32)
    kernels.matvec_blocks(p.w, p.d, p.m, p.bits, x, xq, xd, xs, y, nt)
    rq, rd, _ = ref_quantize_act(x, act)
    x_deq = (rq.reshape(-1, 32) * rd[:, None]).reshape(-1).astype(np.float64)
    ref = qt.dequantize().astype(np.float64) @ x_deq
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and it approximates the f32 product to the activation rounding error: per element at most
    # half a step, amax/254 (int8) or amax/65534 (int16); measured at most 0.3 of the bound
    exact = qt.dequantize().astype(np.float64) @ x.astype(np.float64)
    step = np.abs(x).max() / np.iinfo(act).max
    assert np.abs(y - exact).max() < 0.5 * step * np.abs(qt.dequantize()).sum(axis=1).max() + 1e-4 * np.abs(exact).max()


@pytest.mark.parametrize("fmts", [("q8_0",), ("q4_0",), ("q4_1",), ("q4_0", "q4_1"), ("q4_0", "q8_0", "q4_1")])
def test_pack_and_dequantize_blocks(fmts):
    """Packing (fused, stacked, widened to 8-bit when formats mix) is lossless."""
    layers = [[quantize(RNG.standard_normal((r, 64)).astype(np.float32), f) for r, f in zip((32, 8, 16), fmts)]
              for _ in range(2)]
    stack = pack_stack(layers)
    assert stack.bits == (4 if "q8_0" not in fmts else 8)
    assert stack.m.shape[-1] == (0 if set(fmts) <= {"q8_0", "q4_0"} and len(set(fmts)) == 1 else 2)
    for li, group in enumerate(layers):
        ref = np.concatenate([t.dequantize() for t in group])
        out = np.empty_like(ref)
        s = stack[li]
        kernels.dequantize_blocks(s.w, s.d, s.m, s.bits, out, 2)
        np.testing.assert_array_equal(out, ref)


def test_packed_blocks_validates_shapes():
    p = pack(quantize(RNG.standard_normal((4, 64)).astype(np.float32), "q4_0"))
    with pytest.raises(LlamacpuError):
        PackedBlocks(p.w, p.d[:, :1], p.m, p.bits, p.cols)
    with pytest.raises(LlamacpuError):
        PackedBlocks(p.w, p.d, p.m, 8, p.cols)
    with pytest.raises(LlamacpuError):
        Linear(p)(np.zeros((1, 32), np.float32))


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0", "q4_1"])
def test_linear_prefill_equals_dequantized_matmul(fmt, monkeypatch):
    monkeypatch.setattr(linear, "INT8_ROWS", 1)  # the dequantize + BLAS path
    w = RNG.standard_normal((40, 96)).astype(np.float32)
    qt = quantize(w, fmt)
    x = RNG.standard_normal((5, 96)).astype(np.float32)
    np.testing.assert_allclose(Linear(qt)(x), x @ qt.dequantize().T, rtol=1e-5, atol=1e-4)


def test_rms_norm():
    x = RNG.standard_normal((3, 96)).astype(np.float32) * 5
    w = RNG.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    kernels.rms_norm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ref_rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos0", [0, 7, 1000])
def test_rope(pos0):
    from llamacpu.model import rope_tables
    hd, T = 16, 3
    inv = 1.0 / 10000.0 ** (np.arange(hd // 2) * 2 / hd)
    cos, sin = rope_tables(inv, 1100)
    x = RNG.standard_normal((T, 5, hd)).astype(np.float32)
    ref = ref_rope(x, np.arange(pos0, pos0 + T), inv)
    kernels.rope(x, cos, sin, pos0)
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)


def test_swiglu():
    g, u = RNG.standard_normal(77).astype(np.float32) * 4, RNG.standard_normal(77).astype(np.float32)
    out = np.empty_like(g)
    kernels.swiglu(g, u, out)
    np.testing.assert_allclose(out, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("H,Hkv,S,dtype", [(4, 4, 1, np.float32), (9, 3, 37, np.float32), (8, 2, 200, np.float16),
                                           (6, 1, 5, np.float16)])
def test_attention_decode(H, Hkv, S, dtype):
    hd, max_seq = 64, 256
    q = RNG.standard_normal((H, hd)).astype(np.float32) * 3  # large scores test the stable softmax
    k = (RNG.standard_normal((max_seq, Hkv, hd)) * 3).astype(dtype)
    v = RNG.standard_normal((max_seq, Hkv, hd)).astype(dtype)
    k[S:] = np.nan  # positions past S must never be read
    out = np.empty((H, hd), np.float32)
    kv = (k.view(np.uint16), v.view(np.uint16)) if dtype == np.float16 else (k, v)
    kernels.attention_decode(q, kv[0], kv[1], S, out, 2)
    ref = ref_attention(q[None], k[:S].astype(np.float32), v[:S].astype(np.float32), S - 1)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_store_kv_f16_rounds_like_numpy():
    k, v = RNG.standard_normal((3, 8)).astype(np.float32), RNG.standard_normal((3, 8)).astype(np.float32)
    ck, cv = np.zeros((4, 3, 8), np.float16), np.zeros((4, 3, 8), np.float16)
    kernels.store_kv(ck.view(np.uint16), cv.view(np.uint16), 2, k, v)
    np.testing.assert_array_equal(ck[2], k.astype(np.float16))
    np.testing.assert_array_equal(cv[2], v.astype(np.float16))
    assert not ck[[0, 1, 3]].any()


# ---------------------------------------------------------------------------
# The model on tiny random configs


def _tiny(fmt, seed=0, **cfg):
    c = tiny_config(**cfg)
    f32 = random_tensors(c, seed)
    tensors = {n: quantize(w, fmt if w.ndim == 2 else "f32") for n, w in f32.items()}
    deq = {n: t.dequantize() for n, t in tensors.items()}  # what the quantized model computes with
    return c, tensors, deq


TOKENS = np.array([3, 17, 99, 5, 64, 2, 127, 8, 40, 41, 42])


@pytest.mark.parametrize("cfg", [{}, dict(num_attention_heads=4, num_key_value_heads=1),
                                 dict(tie_word_embeddings=True, num_key_value_heads=4)])
def test_f32_model_equals_reference_and_cache(cfg):
    """Dense f32 weights: full forward = numpy reference; cached decode = full forward (1e-4)."""
    c, tensors, deq = _tiny("f32", **cfg)
    model = Model(c, tensors, threads=2)
    ref = ref_forward(c, deq, TOKENS)
    full = model.forward(TOKENS, model.new_cache(32), all_logits=True)
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=1e-4)
    cache = model.new_cache(32)
    model.forward(TOKENS[:4], cache)
    steps = [model.forward(TOKENS[i:i + 1], cache) for i in range(4, len(TOKENS))]
    np.testing.assert_allclose(np.stack(steps), full[4:], atol=1e-4, rtol=1e-4)
    assert cache.pos == len(TOKENS)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_fast_decode_matches_reference(fmt, kv_dtype, monkeypatch):
    """Block weights: prefill (BLAS on the dequantized weights) equals the reference of the
    dequantized weights; the fused decode step (16-bit activations) follows within their error."""
    c, tensors, deq = _tiny(fmt, num_attention_heads=4, num_key_value_heads=2)
    model = Model(c, tensors, threads=2)
    assert model.decode_weights is not None
    ref = ref_forward(c, deq, TOKENS)
    monkeypatch.setattr(linear, "INT8_ROWS", 1)  # force the dequantize + BLAS prefill
    full = model.forward(TOKENS, model.new_cache(32, kv_dtype), all_logits=True)
    monkeypatch.undo()
    tol = 1e-4 if kv_dtype == np.float32 else 2e-2
    np.testing.assert_allclose(full, ref, atol=tol, rtol=tol)
    cache = model.new_cache(32, kv_dtype)
    model.forward(TOKENS[:3], cache)
    steps = np.stack([model.forward(TOKENS[i:i + 1], cache) for i in range(3, len(TOKENS))])
    # 16-bit activations: measured 6e-5-8e-5 of the logit scale (f32 cache), 2e-4-4e-4 (f16
    # cache); 8-bit ones: 1.4e-2-2e-2, and top-1 may then differ
    scale = np.abs(ref[3:]).max()
    assert np.abs(steps - ref[3:]).max() < (1e-3 if kv_dtype == np.float32 else 2e-3) * scale
    assert (steps.argmax(-1) == ref[3:].argmax(-1)).all()
    # and the decode is a function of the cache: truncate and replay gives the same logits
    cache.truncate(5)
    again = model.forward(TOKENS[5:6], cache)
    np.testing.assert_allclose(again, steps[2], rtol=1e-6, atol=1e-6)
    # a short prefill (integer activations, weights read once) computes what the decode steps do;
    # with an f16 cache, 2e-6 differences in K (rope order of operations) can flip an f16
    # rounding: 1 ulp in K moved these logits by up to 0.3% of their scale.
    cache.truncate(3)
    short = model.forward(TOKENS[3:], cache, all_logits=True)
    np.testing.assert_allclose(short, steps, rtol=1e-4, atol=(1e-4 if kv_dtype == np.float32 else 1e-2) * scale)


def test_int8_rows_threshold_switches_path(monkeypatch):
    """Linear: up to INT8_ROWS rows the integer kernel (activation rounding error), above it BLAS (exact)."""
    qt = quantize(RNG.standard_normal((48, 96)).astype(np.float32), "q4_1")
    lin = Linear(qt, threads=2)
    x = RNG.standard_normal((3, 96)).astype(np.float32)
    exact = x @ qt.dequantize().T
    y_int8 = lin(x)
    one_by_one = np.concatenate([lin(x[t:t + 1]) for t in range(3)])
    np.testing.assert_allclose(y_int8, one_by_one, rtol=1e-6, atol=1e-6)
    assert 0 < np.abs(y_int8 - exact).max() < 0.05 * np.abs(exact).max()
    monkeypatch.setattr(linear, "INT8_ROWS", 2)
    np.testing.assert_allclose(lin(x), exact, rtol=1e-5, atol=1e-5)


def test_mixed_formats_and_threads():
    """q4_0 attention with q8_0 MLP and an f32 head... any mix runs; 1 and 2 threads agree."""
    c = tiny_config()
    f32 = random_tensors(c, 3)
    fmt = {"wq": "q4_0", "wk": "q8_0", "wv": "q4_1", "wo": "q4_0", "w_gate": "q8_0", "w_up": "q4_0",
           "w_down": "q4_1"}
    tensors = {n: quantize(w, fmt.get(n.split(".")[-1], "q8_0") if w.ndim == 2 else "f32") for n, w in f32.items()}
    a, b = Model(c, tensors, threads=1), Model(c, tensors, threads=2)
    ca, cb = a.new_cache(16), b.new_cache(16)
    for tok in TOKENS[:5]:
        la, lb = a.forward([tok], ca), b.forward([tok], cb)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)


def test_forward_rejects_bad_input():
    c, tensors, _ = _tiny("q8_0")
    model = Model(c, tensors, threads=1)
    cache = model.new_cache(4)
    with pytest.raises(LlamacpuError):
        model.forward([c.vocab_size], cache)
    with pytest.raises(LlamacpuError):
        model.forward([], cache)
    with pytest.raises(LlamacpuError):
        model.forward([1, 2, 3, 4, 5], cache)
    with pytest.raises(LlamacpuError):
        model.new_cache(4, np.int8)
    with pytest.raises(LlamacpuError):
        Model(c, tensors, threads=0)
    other = Model(tiny_config(num_hidden_layers=3), _tiny("q8_0", num_hidden_layers=3)[1], threads=1)
    with pytest.raises(LlamacpuError):
        model.forward([1], other.new_cache(4))


# ---------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="module")
def smollm2_models(smollm2_path):
    """The f32 reference path of SmolLM2's Q4_1 weights (`dequantize=True`, numpy BLAS), and a
    loader of the fast path (packed weights, integer kernels) for a given activation width."""
    ref_ckpt = load_checkpoint(smollm2_path, dequantize=True)
    ref_model = Model(ref_ckpt.config, ref_ckpt.tensors, threads=2)
    assert ref_model.decode_weights is None
    ckpt = load_checkpoint(smollm2_path)
    return ref_model, lambda act_bits: Model(ckpt.config, ckpt.tensors, threads=2, act_bits=act_bits)


def _log_softmax(z):
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# Bounds per activation width, from tools/decode_quality.py (5 prompts x 32 tokens, teacher
# forced): int8 (ggml's choice) max logit error 0.9-1.1, KL 1e-3-3e-3 per token, top-1 96%;
# int16 max error 0.004-0.005, KL < 1e-5, top-1 100%. Logits span ~30.
TOLERANCE = {8: dict(err=0.1, near_tie=0.5, kl=0.05), 16: dict(err=0.002, near_tie=0.0, kl=1e-4)}


@pytest.mark.parametrize("act_bits", [16, 8])
def test_smollm2_fast_path_close_to_f32_reference(smollm2_models, act_bits, monkeypatch):
    """Fast path (Q4_1 weights packed, integer activations) vs the f32 reference path of the same
    weights. 8-bit activations: the logit error is ~1 (the same order as llama.cpp's own) and
    top-1 may differ at near-ties; 16-bit: the f32 logits within 0.002 of their scale."""
    tol = TOLERANCE[act_bits]
    tokens = np.array([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 198])
    ref_model, fast = smollm2_models
    ref = ref_model.forward(tokens, ref_model.new_cache(32), all_logits=True)
    model = fast(act_bits)
    assert model.decode_weights is not None and model.decode_weights.qkv.bits == 4
    cache = model.new_cache(32)
    monkeypatch.setattr(linear, "INT8_ROWS", 1)  # force the dequantize + BLAS prefill
    prefill = model.forward(tokens[:6], cache, all_logits=True)
    monkeypatch.undo()
    # prefill dequantizes exactly the same weights and runs BLAS: f32 rounding only
    np.testing.assert_allclose(prefill, ref[:6], atol=2e-3 * np.abs(ref).max())
    steps = np.stack([model.forward(tokens[i:i + 1], cache) for i in range(6, len(tokens))])
    r = ref[6:]
    err = np.abs(steps - r).max(axis=-1)
    assert (err < tol["err"] * np.abs(r).max(axis=-1)).all(), err
    # top-1 may differ only at near-ties of the reference (8-bit, measured: one position, gap 0.08)
    top2 = np.sort(r, axis=-1)[:, -2:]
    near_tie = top2[:, 1] - top2[:, 0] < tol["near_tie"]
    assert ((steps.argmax(-1) == r.argmax(-1)) | near_tie).all()
    kl = (np.exp(_log_softmax(r)) * (_log_softmax(r) - _log_softmax(steps))).sum(axis=-1)  # KL(ref || fast)
    assert kl.max() < tol["kl"], kl


def test_smollm2_fast_greedy_equals_transformers(smollm2_models, data_dir):
    """"What is the capital of France?": the fast path's greedy tokens are transformers' for all
    32 reference tokens. The smallest top-1 margin among them is 0.08 (the first token), 16x the
    fast path's measured logit error (0.005); 8-bit activations (error ~1) lose this prompt at
    its first token, as llama.cpp does."""
    ref = np.load(data_dir / "smollm2_reference.npz")
    prompt, expected = ref["prompt_ids_0"].astype(np.int64), ref["greedy_ids"][0].tolist()
    model = smollm2_models[1](16)
    cache = model.new_cache(len(prompt) + len(expected))
    logits = model.forward(prompt, cache)
    got = []
    for _ in expected:
        got.append(int(np.argmax(logits)))
        logits = model.forward([got[-1]], cache)
    assert got == expected


def test_portable_row_dots_match_simd():
    """The non-AVX2 fallbacks compute the same as the kernels this machine uses."""
    nb = 5
    w8 = RNG.integers(0, 256, nb * 32, dtype=np.uint8)
    w4 = RNG.integers(0, 256, nb * 16, dtype=np.uint8)
    d = RNG.random(nb).astype(np.float16).view(np.uint16)
    m = RNG.standard_normal(nb).astype(np.float16).view(np.uint16)
    xd, xs = RNG.random(nb, dtype=np.float32), RNG.standard_normal(nb).astype(np.float32)
    for act in (np.int8, np.int16):
        top = np.iinfo(act).max
        xq = RNG.integers(-top, top + 1, nb * 32, dtype=act)
        xq[:32] = top  # the largest sums
        np.testing.assert_allclose(kernels._dot_row_q8_portable(w8, d, xq, xd, nb),
                                   _call_dot8(w8, d, xq, xd, nb), rtol=1e-5)
        np.testing.assert_allclose(kernels._dot_row_q4_1_portable(w4, d, m, xq, xd, xs, nb),
                                   _call_dot41(w4, d, m, xq, xd, xs, nb), rtol=1e-5)
        np.testing.assert_allclose(kernels._dot_row_q4_0_portable(w4, d, xq, xd, xs, nb),
                                   _call_dot40(w4, d, xq, xd, xs, nb), rtol=1e-5)


@njit
def _call_dot8(w, d, xq, xd, nb):
    return kernels.dot_row_q8(w, d, xq, xd, nb)


@njit
def _call_dot41(w, d, m, xq, xd, xs, nb):
    return kernels.dot_row_q4_1(w, d, m, xq, xd, xs, nb)


@njit
def _call_dot40(w, d, xq, xd, xs, nb):
    return kernels.dot_row_q4_0(w, d, xq, xd, xs, nb)


@njit
def _exp_neg_all(x, out):
    for i in range(x.shape[0]):
        out[i] = kernels.exp_neg(x[i])


def test_exp_neg_matches_numpy():
    x = np.concatenate([-np.abs(RNG.standard_normal(5000)) * 10.0 ** RNG.integers(-8, 2, 5000),
                        [0.0, -1e-30, -0.34657, -0.34658, -20.0, -86.9]]).astype(np.float32)
    out = np.empty_like(x)
    _exp_neg_all(x, out)
    np.testing.assert_allclose(out, np.exp(x.astype(np.float64)), rtol=5e-7, atol=0)
    tiny = np.empty(2, np.float32)
    _exp_neg_all(np.array([-100.0, -np.inf], np.float32), tiny)
    assert (tiny >= 0).all() and (tiny < 2e-38).all()


def test_forward_leaves_the_thread_pools_alone_and_thread_limit_restores_them():
    """Thread counts are process state: a forward pass (prefill through BLAS, or the fused decode
    step) reads them and never sets them; `thread_limit` sets both pools for a block, then restores."""
    import numba
    from threadpoolctl import threadpool_info

    from llamacpu.threads import thread_limit

    def blas():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    c, tensors, _ = _tiny("q8_0")
    model = Model(c, tensors, threads=1)
    before = numba.get_num_threads(), blas()
    prompt = np.resize(TOKENS, 40)  # more rows than the integer-kernel path takes: BLAS prefill
    cache = model.new_cache(len(prompt) + 2)
    logits = model.forward(prompt, cache)
    model.forward([int(np.argmax(logits))], cache)
    assert (numba.get_num_threads(), blas()) == before
    with thread_limit(1):
        assert numba.get_num_threads() == 1 and set(blas()) <= {1}
        model.forward([1], cache)
    assert (numba.get_num_threads(), blas()) == before


def test_rope_tables_grow_past_their_start(monkeypatch):
    """Positions beyond the tables built at load still rotate correctly (tables grow on demand)."""
    import llamacpu.model as model_module
    monkeypatch.setattr(model_module, "ROPE_TABLE_START", 4)
    c, tensors, deq = _tiny("f32")
    model = Model(c, tensors, threads=1)
    assert len(model.cos) == 4
    logits = model.forward(TOKENS[:9], model.new_cache(16), all_logits=True)
    np.testing.assert_allclose(logits, ref_forward(c, deq, TOKENS[:9]), atol=1e-4, rtol=1e-4)
