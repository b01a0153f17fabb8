"""Self-calibration: the input second moments E[h_j^2] of every layer matrix, measured on text the
model samples itself, as column importance for the 4-bit scale search (no calibration data).

An error e in column j of W changes y = W h by e h_j, so its cost is proportional to E[h_j^2]
over the inputs the matrix will see (the diagonal of the activation Hessian that llama.cpp's
imatrix and GPTQ estimate from a calibration corpus). Here the corpus is the model's own: a
few sequences are sampled from the f32 weights at temperature 1 with a seeded generator,
starting from BOS, and the inputs of wq/wk/wv (one shared input), wo, w_gate/w_up and w_down
are recorded on the way. Position 0 counts too: like every perplexity chunk and every prompt,
each sequence starts fresh there, and the first position's outsized activations in a few
channels (the attention sink) are what later tokens attend to. On SmolLM2, q4_0's KL from f32
was 0.17 with position 0 counted and 0.20 without (weights-only estimate: 0.23).

The forward pass below is a plain numpy LLaMA decoder (the same math as `model.py`, checked
against it in tests) that runs B sequences side by side with its own small KV cache, so each
step is one (B, D) @ (D, n) product per matrix: 16 × 64 tokens of SmolLM2 take ~12 s on one
core, bound by reading the f32 weights once per step. BLAS sums may differ between builds, so
the samples are reproducible on one installation, not promised across machines.

Shapes: B sequences, S positions so far, D model width, H query heads, Hkv key/value heads,
hd head_dim, F SwiGLU width, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from .quant import QTensor


def self_calibrate(tensors: dict[str, QTensor], config, *, start: int, sequences: int = 16,
                   length: int = 64, seed: int = 0, temperature: float = 1.0,
                   capture_logits: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """Sample `sequences` × `length` tokens from the model, starting each from token `start`,
    and average every matrix's squared input per column over all of them. `length` is capped
    at the model's context.

    Returns tokens (B, length) (the start token first), E[h^2] by layer matrix name (cols,) f64,
    and, with `capture_logits`, the logits (B, length, V) each step computed.
    """
    c = config
    rng = np.random.default_rng(seed)
    L, D, H, Hkv, hd = c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    B, rep = sequences, c.n_rep
    length = min(length, c.context_length)

    def f32(name):
        return tensors[name].dequantize().astype(np.float32)

    layers = []
    for i in range(L):
        p = f"layers.{i}."
        layers.append({"attn_norm": f32(p + "attn_norm"), "mlp_norm": f32(p + "mlp_norm"),
                       "qkv": np.ascontiguousarray(np.concatenate([f32(p + n) for n in ("wq", "wk", "wv")]).T),
                       "wo": np.ascontiguousarray(f32(p + "wo").T),
                       "gate_up": np.ascontiguousarray(np.concatenate([f32(p + "w_gate"), f32(p + "w_up")]).T),
                       "w_down": np.ascontiguousarray(f32(p + "w_down").T)})  # each (in, out)
    embed = tensors["embed"]
    head = f32("embed" if c.tie_word_embeddings else "output")  # (V, D)
    norm = f32("norm")
    freqs = tensors.get("rope_freqs")
    inv_freq = c.rope_inv_freq(None if freqs is None else freqs.dequantize())  # (hd/2,)
    F = c.intermediate_size

    def rms(x, g):  # (B, D) → (B, D)
        x64 = x.astype(np.float64)
        return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + c.rms_norm_eps)).astype(np.float32) * g

    def rope(x, pos):  # (B, heads, hd), adjacent pairs rotated in place
        ang = pos * inv_freq  # (hd/2,) in f64
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        e, o = x[..., 0::2].copy(), x[..., 1::2].copy()
        x[..., 0::2] = e * cos - o * sin
        x[..., 1::2] = e * sin + o * cos

    k_cache = np.zeros((L, B, length, Hkv, hd), np.float32)
    v_cache = np.zeros((L, B, length, Hkv, hd), np.float32)
    sums = {f"layers.{i}.{n}": 0.0 for i in range(L) for n in ("wq", "wo", "w_gate", "w_down")}
    tokens = np.empty((B, length), np.int64)
    tokens[:, 0] = start
    all_logits = np.empty((B, length, c.vocab_size), np.float32) if capture_logits else None
    scale = np.float32(1.0 / np.sqrt(hd))
    for t in range(length):
        rows = np.asarray(embed.data[tokens[:, t]])
        x = QTensor(embed.fmt, (B, D), rows).dequantize().astype(np.float32)  # (B, D)
        for i, w in enumerate(layers):
            p = f"layers.{i}."
            h = rms(x, w["attn_norm"])  # (B, D)
            qkv = h @ w["qkv"]  # (B, H*hd + 2*Hkv*hd)
            q = qkv[:, :H * hd].reshape(B, H, hd).copy()
            k = qkv[:, H * hd:(H + Hkv) * hd].reshape(B, Hkv, hd).copy()
            rope(q, t)
            rope(k, t)
            k_cache[i, :, t] = k
            v_cache[i, :, t] = qkv[:, (H + Hkv) * hd:].reshape(B, Hkv, hd)
            ks, vs = k_cache[i, :, :t + 1], v_cache[i, :, :t + 1]  # (B, S, Hkv, hd)
            scores = np.einsum("bgrd,bsgd->bgrs", q.reshape(B, Hkv, rep, hd), ks) * scale  # (B, Hkv, rep, S)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            a = np.einsum("bgrs,bsgd->bgrd", scores, vs).reshape(B, H * hd)  # (B, H*hd)
            x = x + a @ w["wo"]
            h2 = rms(x, w["mlp_norm"])  # (B, D)
            gu = h2 @ w["gate_up"]  # (B, 2F)
            g, u = gu[:, :F], gu[:, F:]
            m = g / (1.0 + np.exp(-g)) * u  # (B, F) SwiGLU
            x = x + m @ w["w_down"]
            for name, v in (("wq", h), ("wo", a), ("w_gate", h2), ("w_down", m)):
                sums[p + name] = sums[p + name] + (v.astype(np.float64) ** 2).sum(0)
        logits = rms(x, norm) @ head.T  # (B, V)
        if all_logits is not None:
            all_logits[:, t] = logits
        if t + 1 < length:
            z = logits.astype(np.float64) / temperature
            prob = np.exp(z - z.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            cdf = np.cumsum(prob, -1)
            u01 = rng.random((B, 1)) * cdf[:, -1:]
            tokens[:, t + 1] = np.minimum((cdf < u01).sum(-1), c.vocab_size - 1)
    n = B * length
    moments = {}
    for i in range(L):
        p = f"layers.{i}."
        moments[p + "wq"] = moments[p + "wk"] = moments[p + "wv"] = sums[p + "wq"] / n
        moments[p + "wo"] = sums[p + "wo"] / n
        moments[p + "w_gate"] = moments[p + "w_up"] = sums[p + "w_gate"] / n
        moments[p + "w_down"] = sums[p + "w_down"] / n
    return tokens, moments, all_logits
