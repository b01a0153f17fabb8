"""The LLaMA decoder: embedding → N × (RMSNorm → attention → residual → RMSNorm → SwiGLU → residual)
→ RMSNorm → logits, with an explicit KV cache.

References: Touvron et al. 2023 (LLaMA), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA),
Shazeer 2020 (SwiGLU). RoPE rotates adjacent pairs (x[2i], x[2i+1]); see `checkpoint.py`.

Shapes: T new tokens, S cached positions, D model width, H query heads, Hkv key/value
heads, hd head_dim, F SwiGLU width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import LlamacpuError
from .quant import QTensor, dequantize


class KVCache:
    """Keys and values of every layer, preallocated: (layers, max_seq, Hkv, hd), plus a position counter.

    K/V heads are stored once (not repeated per query head). `pos` positions are filled.
    """

    def __init__(self, config: ModelConfig, max_seq: int, dtype=np.float32):
        if max_seq <= 0:
            raise LlamacpuError("the KV cache needs at least one position")
        shape = (config.num_hidden_layers, max_seq, config.num_key_value_heads, config.head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.max_seq = max_seq
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Forget every position from `n` on (kept positions stay valid)."""
        if not 0 <= n <= self.pos:
            raise LlamacpuError(f"cannot truncate a cache of {self.pos} positions to {n}")
        self.pos = n


@dataclass
class Layer:
    attn_norm: np.ndarray  # (D,)
    wq: QTensor  # (H*hd, D)
    wk: QTensor  # (Hkv*hd, D)
    wv: QTensor  # (Hkv*hd, D)
    wo: QTensor  # (D, H*hd)
    mlp_norm: np.ndarray  # (D,)
    w_gate: QTensor  # (F, D)
    w_up: QTensor  # (F, D)
    w_down: QTensor  # (D, F)


def linear(x: np.ndarray, w: QTensor) -> np.ndarray:
    """y = x @ W.T: x (T, in) → (T, out)."""
    if w.fmt == "f32":
        return x @ w.data.T
    return x @ w.dequantize().T


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, D) scaled to unit root-mean-square, then by `weight` (D,)."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs of x (T, heads, hd) by angle position * inv_freq[i] (hd/2,)."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (T, hd/2)
    cos = np.cos(angles).astype(np.float32)[:, None, :]  # (T, 1, hd/2)
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]  # (T, heads, hd/2)
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention.

    q (T, H, hd) for positions start..start+T-1; k, v (S, Hkv, hd) for positions 0..S-1
    with S = start + T. Each group of H/Hkv query heads reads one K/V head, unrepeated.
    Returns (T, H, hd).
    """
    T, H, hd = q.shape
    S, Hkv, _ = k.shape
    rep = H // Hkv
    qg = q.reshape(T, Hkv, rep, hd).transpose(1, 2, 0, 3)  # (Hkv, rep, T, hd)
    kt = k.transpose(1, 2, 0)  # (Hkv, hd, S)
    scores = (qg @ kt[:, None]) / np.sqrt(hd)  # (Hkv, rep, T, S)
    visible = np.arange(S)[None, :] <= (start + np.arange(T))[:, None]  # (T, S)
    scores = np.where(visible, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)  # stable softmax
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v.transpose(1, 0, 2)[:, None]  # (Hkv, rep, T, hd)
    return out.transpose(2, 0, 1, 3).reshape(T, H, hd)


class Model:
    """A LLaMA-family decoder over QTensor weights (llamacpu names, see `checkpoint.py`)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, QTensor]):
        self.config = config
        c = config
        self.embed = tensors["embed"]  # (V, D)
        self.norm = tensors["norm"].dequantize()  # (D,)
        self.output = tensors["embed"] if c.tie_word_embeddings else tensors["output"]  # (V, D)
        freqs = tensors.get("rope_freqs")
        self.inv_freq = c.rope_inv_freq(None if freqs is None else freqs.dequantize())  # (hd/2,)
        self.layers = []
        for i in range(c.num_hidden_layers):
            t = {name: tensors[f"layers.{i}.{name}"] for name in Layer.__dataclass_fields__}
            t["attn_norm"] = t["attn_norm"].dequantize()
            t["mlp_norm"] = t["mlp_norm"].dequantize()
            self.layers.append(Layer(**t))

    def new_cache(self, max_seq: int | None = None, dtype=np.float32) -> KVCache:
        return KVCache(self.config, max_seq or self.config.max_position_embeddings, dtype)

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T,) → (T, D), dequantizing only the rows used."""
        e = self.embed
        rows = np.asarray(e.data[tokens])
        return dequantize(e.fmt, rows, (len(tokens), e.cols))

    def forward(self, tokens, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` (T,) at positions cache.pos.., append their K/V to `cache`.

        Returns logits (T, V) if `all_logits`, else (V,) for the last token only.
        """
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = len(tokens)
        if T == 0:
            raise LlamacpuError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise LlamacpuError(f"token id out of range [0, {c.vocab_size})")
        start = cache.pos
        if start + T > cache.max_seq:
            raise LlamacpuError(f"context is full: {start} + {T} tokens exceed {cache.max_seq}")
        positions = np.arange(start, start + T)
        x = self.embed_tokens(tokens)  # (T, D)
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_norm_eps)  # (T, D)
            q = linear(h, layer.wq).reshape(T, c.num_attention_heads, c.head_dim)  # (T, H, hd)
            k = linear(h, layer.wk).reshape(T, c.num_key_value_heads, c.head_dim)  # (T, Hkv, hd)
            v = linear(h, layer.wv).reshape(T, c.num_key_value_heads, c.head_dim)  # (T, Hkv, hd)
            q = rope(q, positions, self.inv_freq)
            k = rope(k, positions, self.inv_freq)
            cache.k[li, start:start + T] = k
            cache.v[li, start:start + T] = v
            ks = cache.k[li, :start + T].astype(np.float32, copy=False)  # (S, Hkv, hd)
            vs = cache.v[li, :start + T].astype(np.float32, copy=False)
            a = attention(q, ks, vs, start).reshape(T, c.q_dim)  # (T, H*hd)
            x = x + linear(a, layer.wo)  # (T, D)
            h = rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
            g = linear(h, layer.w_gate)  # (T, F)
            u = linear(h, layer.w_up)  # (T, F)
            x = x + linear(g / (1.0 + np.exp(-g)) * u, layer.w_down)  # SwiGLU: silu(g) * u
        cache.pos = start + T
        if not all_logits:
            x = x[-1:]
        logits = linear(rms_norm(x, self.norm, c.rms_norm_eps), self.output)  # (T, V)
        return logits if all_logits else logits[0]
