"""The LLaMA decoder: embedding → N × (RMSNorm → attention → residual → RMSNorm → SwiGLU → residual)
→ RMSNorm → logits, with an explicit KV cache.

References: Touvron et al. 2023 (LLaMA), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA),
Shazeer 2020 (SwiGLU). RoPE rotates adjacent pairs (x[2i], x[2i+1]); see `checkpoint.py`.

Two paths compute the same math:
- decode (one new token per sequence, block-quantized weights): `kernels.decode_step` runs every
  layer and the output head in one Numba call, so Python costs one dispatch per step, for one
  sequence (`forward`) or for a batch whose caches share a pool (`forward_batch`);
- everything else (prefill of T tokens, f32/f16 weights): the layer loop below, with the
  matrix products in `linear.py` (the integer GEMM for block weights, BLAS for dense ones)
  and attention, norm, RoPE and SwiGLU in kernels.

Shapes: T new tokens, S cached positions, D model width, H query heads, Hkv key/value
heads, hd head_dim, F SwiGLU width, V vocab, L layers.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from . import kernels
from .config import ModelConfig
from .errors import LlamacpuError
from .linear import (ACT_PLANES, Linear, PackedBlocks, PackedLayers, fusable, pack, pack_layers, pack_stack,
                     stackable)
from .quant import QTensor, dequantize
from .threads import default_threads, start_pools

KV_DTYPES = (np.float32, np.float16)
# Activations of the integer kernels: 16 (the 15-bit two-plane split) keeps the logits near the
# f32 path's (SmolLM2, Q8_0/Q4_0/Q4_1: max error <= 0.02, KL < 1e-5, top-1 100%); 8 is ggml's Q8
# activation, with llama.cpp's fidelity (error up to ~1.6 logits, KL ~3e-3, top-1 96%, greedy
# near-ties flipped) and half the integer work. tools/decode_quality.py.
ACT_BITS = tuple(ACT_PLANES)
# The width used when the caller does not choose one (act_bits=None), per weight format: 8 where
# the format's own rounding dwarfs that of 8-bit activations, 16 elsewhere. Measured on SmolLM2
# (tools/act_width_quality.py: 4 x 512 tokens of prose, KL per token against the shipped Q4_1
# weights in f32; Q8_0 ... Q6_K are llama.cpp's requantizations of them, ours.* `llamacpu convert`'s):
#     file          f32 path: KL   ppl     act 16: KL   ppl     act 8: KL   ppl
#     Q4_1          0        36.400   0.00000 36.401   0.00311 36.539
#     Q8_0          0.00124  36.491   0.00124 36.492   0.00439 36.709
#     Q6_K          0.00565  36.866   0.00565 36.866   0.00874 36.910
#     Q4_0          0.42257  50.662   0.42256 50.659   0.42752 51.067
#     Q4_K_M        0.04895  38.673   0.04896 38.674   0.05265 38.677
#     Q5_K_M        0.07918  40.580   0.07918 40.580   0.08297 40.650
#     ours.Q4_K_M   0.02305  36.987   0.02306 36.988   0.02645 37.137
#     ours.Q5_K_M   0.01308  36.678   0.01308 36.678   0.01648 36.859
# 8-bit activations add about 0.0035 nats per token to any file: 1% of q4_0's own error, 7-15% of
# q4_k's (perplexity +0.01% to +0.4%), 26% of a calibrated q5_k's, 55% of q6_k's and 250% of q8_0's.
# So q4_0 and q4_k get 8, the rest 16. A file mixing formats (a K-quant mixture always does: Q4_K_M
# puts q6_k in the head, some attn_v and ffn_down, and q5_0 where rows are not multiples of 256)
# gets the width of the format that holds most of its matrix weights. A prompt and its decode share
# the width: the prompt's K/V carry the prefill's activation error into every later token.
ACT_BITS_BY_FORMAT = {"q4_0": 8, "q4_k": 8}
# Prompt rows per pass through the layers. A pass's activations ((T, 2F) gate|up, their int8
# planes, (T, H, hd) attention) then stay in L2 while each weight panel is read, and the
# transient memory is bounded: at the 1.1B shape, 128 rows prefill 5-15% faster than 512 and
# peak RSS falls by 75 MB (Zen 5, 2 threads).
PREFILL_ROWS = 128
ROPE_TABLE_START = 4096  # positions of the cos/sin tables built at load
# An observer of the linear layers' inputs, e.g. for calibration: the layer loop calls
# observe(layer, group, h) with the input h (T, in) f32 of each fused matrix group, before the
# product. A view that is reused afterwards: copy what you keep. The groups, each packed and run
# as one matrix per layer:
LINEAR_GROUPS = {"qkv": ("wq", "wk", "wv"), "wo": ("wo",), "gate_up": ("w_gate", "w_up"), "w_down": ("w_down",)}
Observer = Callable[[int, str, np.ndarray], None]


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros whose memory becomes resident only where written, one 4 KiB page at a time.

    np.zeros would do, but numpy asks the kernel for 2 MiB transparent huge pages on large
    arrays (madvise), so the first position a layer writes would make 2 MiB of its cache
    resident: the whole cache, for a small model's full context (measured: +84 MB on the
    TinyLlama-1.1B shape's 88 MB cache after a 16-token prompt). An anonymous mapping with
    huge pages declined costs only the pages the positions in use touch."""
    count = int(np.prod(shape))
    size = max(1, count * np.dtype(dtype).itemsize)
    # Private: reading a page never written maps the shared zero page (a shared mapping would
    # allocate it). Windows has no flags and small pages.
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if hasattr(mmap, "MAP_PRIVATE") else mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere pages are small anyway
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class KVCache:
    """Keys and values of every layer, preallocated: (layers, max_seq, Hkv, hd), plus a position counter.

    K/V heads are stored once (not repeated per query head). `pos` positions are filled.
    `dtype` is float32 or float16 (half the memory; attention still computes in f32).
    `k`, `v` are slice `index` of a pool `k_all`, `v_all` (N, layers, max_seq, Hkv, hd): a pool
    of one, or one of N caches made together by `pooled`, which the batched decode kernel
    reaches through one array (see `Model.forward_batch`).
    """

    def __init__(self, config: ModelConfig, max_seq: int, dtype=np.float32, *, _pool=None):
        if max_seq <= 0:
            raise LlamacpuError("the KV cache needs at least one position")
        config.check_context(max_seq)  # sliding-window models run only within their window
        if np.dtype(dtype) not in [np.dtype(t) for t in KV_DTYPES]:
            raise LlamacpuError(f"KV cache dtype must be float32 or float16, got {np.dtype(dtype)}")
        shape = (config.num_hidden_layers, max_seq, config.num_key_value_heads, config.head_dim)
        if _pool is None:
            _pool = lazy_zeros((1, *shape), dtype), lazy_zeros((1, *shape), dtype), 0
        self.k_all, self.v_all, self.index = _pool  # (N, layers, max_seq, Hkv, hd); this cache is [index]
        self.k = self.k_all[self.index]  # (layers, max_seq, Hkv, hd)
        self.v = self.v_all[self.index]
        self.max_seq = max_seq
        self.pos = 0

    @classmethod
    def pooled(cls, config: ModelConfig, n: int, max_seq: int, dtype=np.float32) -> list["KVCache"]:
        """`n` caches whose K/V live in one pool (lazily resident, as a lone cache's do)."""
        if n < 1:
            raise LlamacpuError("a pool needs at least one cache")
        first = cls(config, max_seq, dtype)  # checks the arguments before the pool is mapped
        shape = (n, *first.k.shape)
        k_all, v_all = lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)
        return [cls(config, max_seq, dtype, _pool=(k_all, v_all, i)) for i in range(n)]

    def truncate(self, n: int) -> None:
        """Forget every position from `n` on (kept positions stay valid)."""
        if not 0 <= n <= self.pos:
            raise LlamacpuError(f"cannot truncate a cache of {self.pos} positions to {n}")
        self.pos = n

    def kernel_views(self) -> tuple[np.ndarray, np.ndarray]:
        """k, v as the kernels take them: f32 as is, f16 as its uint16 bits."""
        if self.k.dtype == np.float16:
            return self.k.view(np.uint16), self.v.view(np.uint16)
        return self.k, self.v

    def pool_views(self) -> tuple[np.ndarray, np.ndarray]:
        """k_all, v_all (N, layers, max_seq, Hkv, hd) as the kernels take them (see `kernel_views`)."""
        if self.k_all.dtype == np.float16:
            return self.k_all.view(np.uint16), self.v_all.view(np.uint16)
        return self.k_all, self.v_all


@dataclass
class Layer:
    attn_norm: np.ndarray  # (D,)
    qkv: Linear  # [Wq|Wk|Wv] fused (H*hd + 2*Hkv*hd, D)
    wo: Linear  # (D, H*hd)
    mlp_norm: np.ndarray  # (D,)
    gate_up: Linear  # [Wgate|Wup] fused (2F, D)
    w_down: Linear  # (D, F)


@dataclass
class DecodeWeights:
    """Every layer's block weights stacked (L, row groups, ...) for `kernels.decode_step`."""

    # one stack (L, ...), or PackedLayers when the layers' K-quant kinds differ
    qkv: PackedBlocks | PackedLayers  # (L, H*hd + 2*Hkv*hd rows, D)
    wo: PackedBlocks | PackedLayers  # (L, D rows, H*hd)
    gate_up: PackedBlocks | PackedLayers  # (L, 2F rows, D)
    w_down: PackedBlocks | PackedLayers  # (L, D rows, F)
    head: PackedBlocks  # (V rows, D)
    attn_norm: np.ndarray  # (L, D)
    mlp_norm: np.ndarray  # (L, D)


def rope_tables(inv_freq: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_pos, hd/2) f32 of angle position * inv_freq, computed in f64."""
    angles = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def default_act_bits(weights: dict[str, int]) -> int:
    """The activation width for matrices holding weights[fmt] weights of each format: the one
    ACT_BITS_BY_FORMAT gives the format that holds the most (16 for a format not listed; 16 on
    a tie, as for a model with no block-quantized matrix)."""
    if not weights:
        return 16
    most = max(weights.values())
    return max(ACT_BITS_BY_FORMAT.get(f, 16) for f, n in weights.items() if n == most)


class Model:
    """A LLaMA-family decoder over QTensor weights (llamacpu names, see `checkpoint.py`).

    Block-quantized matrices (`linear.PACKABLE`: q8_0, q4_0/1, q5_0/1, q4_k, q5_k, q6_k) are
    packed once here for the kernels;
    `threads` (default: the available cores) is the kernels' parallelism; the forward pass
    does not set the thread pools (process state): run it inside `threads.thread_limit(model.threads)`
    so that Numba's other parallel regions and the BLAS use as many. The integer kernels
    take activations quantized to `act_bits` (16, or 8 as ggml: faster, less exact) per block;
    None picks by weight format (`default_act_bits`), and `self.act_bits` says which.
    wq|wk|wv and w_gate|w_up are fused into one matrix each, whatever their format.
    """

    def __init__(self, config: ModelConfig, tensors: dict[str, QTensor], *, threads: int | None = None,
                 act_bits: int | None = None):
        self.config = c = config
        max_threads = numba.config.NUMBA_NUM_THREADS
        if threads is not None and not 1 <= threads <= max_threads:
            raise LlamacpuError(f"threads must be between 1 and {max_threads}, got {threads}")
        if act_bits is not None and act_bits not in ACT_BITS:
            raise LlamacpuError(f"act_bits must be 8 or 16, got {act_bits}")
        self.threads = threads or default_threads()
        start_pools()  # the kernels' worker threads, started once per process (see threads.py)
        self.embed = tensors["embed"]  # (V, D)
        self.norm = tensors["norm"].dequantize()  # (D,)
        output = tensors["embed"] if c.tie_word_embeddings else tensors["output"]  # (V, D)
        freqs = tensors.get("rope_freqs")
        self.inv_freq = c.rope_inv_freq(None if freqs is None else freqs.dequantize())  # (hd/2,)
        # (P, hd/2) tables; grown on demand (a 128k-context model's full table would be ~64 MB)
        self.cos, self.sin = rope_tables(self.inv_freq, min(c.max_position_embeddings, ROPE_TABLE_START))

        layer_t = [{n: tensors[f"layers.{i}.{n}"] for n in
                    ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")}
                   for i in range(c.num_hidden_layers)]
        matrices = [t[n] for t in layer_t for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
        weights: dict[str, int] = {}  # matrix weights per format: what decides the default width
        for m in matrices + [output]:
            weights[m.fmt] = weights.get(m.fmt, 0) + int(np.prod(m.shape))
        self.act_bits = act_bits or default_act_bits(weights)
        self.decode_weights: DecodeWeights | None = None
        if fusable([output]) and all(stackable([[t[n] for n in names] for t in layer_t]) for names in LINEAR_GROUPS.values()):
            self._build_packed(layer_t, output)
        else:  # some dense (f32/f16) weights: the layer loop for every token
            self.output = self._linear([output])
            self.layers = [Layer(attn_norm=t["attn_norm"].dequantize(),
                                 qkv=self._linear([t["wq"], t["wk"], t["wv"]]),
                                 wo=self._linear([t["wo"]]),
                                 mlp_norm=t["mlp_norm"].dequantize(),
                                 gate_up=self._linear([t["w_gate"], t["w_up"]]),
                                 w_down=self._linear([t["w_down"]])) for t in layer_t]

    def _linear(self, group: list[QTensor]) -> Linear:
        """One Linear for matrices of the same input, rows concatenated: packed if they are all
        block-quantized, else dense (f16 if they all are, else f32; block members dequantized)."""
        if fusable(group):
            return Linear(pack_stack([group])[0], self.threads, self.act_bits)
        if len(group) == 1:
            return Linear(group[0], self.threads, self.act_bits)
        f16 = all(t.fmt == "f16" for t in group)
        w = np.concatenate([t.data if f16 else t.dequantize() for t in group])  # (sum of rows, in)
        return Linear(w.astype(np.float16 if f16 else np.float32, copy=False), self.threads, self.act_bits)

    def _build_packed(self, layer_t: list[dict[str, QTensor]], output: QTensor) -> None:
        stacks = {
            "qkv": pack_layers([[t["wq"], t["wk"], t["wv"]] for t in layer_t]),
            "wo": pack_layers([[t["wo"]] for t in layer_t]),
            "gate_up": pack_layers([[t["w_gate"], t["w_up"]] for t in layer_t]),
            "w_down": pack_layers([[t["w_down"]] for t in layer_t]),
        }
        attn_norm = np.stack([t["attn_norm"].dequantize() for t in layer_t]).astype(np.float32)
        mlp_norm = np.stack([t["mlp_norm"].dequantize() for t in layer_t]).astype(np.float32)
        head = pack(output)
        self.decode_weights = DecodeWeights(**stacks, head=head, attn_norm=attn_norm, mlp_norm=mlp_norm)
        act = self.act_bits
        self.output = Linear(head, self.threads, act)
        self.layers = [Layer(attn_norm=attn_norm[i], qkv=Linear(stacks["qkv"][i], self.threads, act),
                             wo=Linear(stacks["wo"][i], self.threads, act), mlp_norm=mlp_norm[i],
                             gate_up=Linear(stacks["gate_up"][i], self.threads, act),
                             w_down=Linear(stacks["w_down"][i], self.threads, act))
                       for i in range(len(layer_t))]

    def new_cache(self, max_seq: int | None = None, dtype=np.float32) -> KVCache:
        return KVCache(self.config, max_seq or self.config.context_length, dtype)

    def new_caches(self, n: int, max_seq: int | None = None, dtype=np.float32) -> list[KVCache]:
        """`n` caches in one pool, which `forward_batch` decodes together in one kernel call."""
        return KVCache.pooled(self.config, n, max_seq or self.config.context_length, dtype)

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T,) → (T, D) f32, dequantizing only the rows used."""
        e = self.embed
        rows = np.asarray(e.data[tokens])
        return np.ascontiguousarray(dequantize(e.fmt, rows, (len(tokens), e.cols)), dtype=np.float32)

    def _check(self, tokens, cache: KVCache) -> np.ndarray:
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise LlamacpuError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise LlamacpuError(f"token id out of range [0, {c.vocab_size})")
        expected = (c.num_hidden_layers, cache.max_seq, c.num_key_value_heads, c.head_dim)
        if cache.k.shape != expected or cache.v.shape != expected or cache.k.dtype != cache.v.dtype:
            raise LlamacpuError("the KV cache was made for another model")
        if cache.pos + len(tokens) > cache.max_seq:
            raise LlamacpuError(f"context is full: {cache.pos} + {len(tokens)} tokens exceed {cache.max_seq}")
        if cache.pos + len(tokens) > len(self.cos):  # the kernels index cos/sin by position
            self.cos, self.sin = rope_tables(self.inv_freq, max(cache.max_seq, 2 * len(self.cos)))
        return tokens

    def forward(self, tokens, cache: KVCache, *, all_logits: bool = False,
                observe: Observer | None = None) -> np.ndarray:
        """Run `tokens` (T,) at positions cache.pos.., append their K/V to `cache`.

        Returns logits (T, V) if `all_logits`, else (V,) for the last token only. A long prompt
        runs PREFILL_ROWS at a time, which gives the same rows as one pass (see `_prefill`).
        observe: called with every linear group's input (see `Observer`); it runs the layer
        loop even for one token (the fused decode kernel has no such hook).
        """
        tokens = self._check(tokens, cache)
        if len(tokens) == 1 and self.decode_weights is not None and observe is None:
            logits = self._decode(tokens, [cache])  # (1, V)
            return logits if all_logits else logits[0]
        parts = []
        for i in range(0, len(tokens), PREFILL_ROWS):  # each part continues the cache where the last left it
            part = tokens[i:i + PREFILL_ROWS]
            parts.append(self._prefill(part, [(cache, 0, len(part))], all_logits, observe))
        if not all_logits:
            return parts[-1][0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def forward_batch(self, tokens, caches: list[KVCache], *, observe: Observer | None = None) -> np.ndarray:
        """One new token for each of B sequences, each at its own cache's position: tokens (B,)
        and B distinct caches → logits (B, V); each token's K/V is appended to its cache.

        The B rows go through the layers together, so every matrix product is one GEMM of B rows
        and reads each weight once per step for all the sequences; only attention runs per
        sequence, over its own cache. Caches from one `new_caches` pool (a server's slots) run
        in one call of the fused decode kernel, `forward`'s for a lone token; others (or dense
        weights) take the layer loop. Either way a row does not depend on its batch mates.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) != len(caches) or len({id(cache) for cache in caches}) != len(caches):
            raise LlamacpuError(f"forward_batch takes one distinct cache per token: "
                                f"{len(tokens)} tokens, {len(caches)} caches")
        for token, cache in zip(tokens, caches):
            self._check([token], cache)
        if (self.decode_weights is not None and observe is None and all(cache.k_all is caches[0].k_all for cache in caches)
                and len({cache.index for cache in caches}) == len(caches)):
            return self._decode(tokens, caches)
        spans = [(cache, b, b + 1) for b, cache in enumerate(caches)]
        return self._prefill(tokens, spans, False, observe)

    def _decode(self, tokens: np.ndarray, caches: list[KVCache]) -> np.ndarray:
        """tokens (B,), each the next of its cache's sequence, through the fused kernel → logits
        (B, V). The caches are distinct, checked, and share one pool."""
        c, w = self.config, self.decode_weights
        x = self.embed_tokens(tokens)  # (B, D)
        logits = np.empty((len(tokens), w.head.padded_rows), dtype=np.float32)  # (B, V rounded up to 16)
        pos = np.array([cache.pos for cache in caches], dtype=np.int64)  # (B,)
        slot = np.array([cache.index for cache in caches], dtype=np.int64)  # (B,) indices into the pool
        k, v = caches[0].pool_views()  # (N, L, max_seq, Hkv, hd)
        kernels.decode_step(
            x, pos, slot, w.attn_norm, w.mlp_norm, self.norm,
            w.qkv.kernel_args, w.wo.kernel_args, w.gate_up.kernel_args, w.w_down.kernel_args,
            w.head.kernel_args, k, v, self.cos, self.sin, c.num_attention_heads, c.num_key_value_heads,
            float(c.rms_norm_eps), ACT_PLANES[self.act_bits], self.threads, logits)
        for cache in caches:
            cache.pos += 1
        return logits[:, :c.vocab_size]

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """RMSNorm of x (T, D) by weight (D,)."""
        out = np.empty_like(x)
        kernels.rms_norm(x, weight, float(self.config.rms_norm_eps), out)
        return out

    def _prefill(self, tokens: np.ndarray, spans: list[tuple[KVCache, int, int]], all_logits: bool,
                 observe: Observer | None = None) -> np.ndarray:
        """The layer loop over T rows. Rows r0:r1 of each span (cache, r0, r1) continue that cache
        from its position: a prefill is one span of T rows, a batched decode B spans of one row.
        Returns logits (T, V) if `all_logits`, else (spans, V) for each span's last row."""
        c = self.config
        T, H, Hkv, hd, F = len(tokens), c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
        x = self.embed_tokens(tokens)  # (T, D)
        for li, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm)  # (T, D)
            if observe is not None:
                observe(li, "qkv", h)
            qkv = layer.qkv(h)  # (T, H*hd + 2*Hkv*hd)
            q = np.ascontiguousarray(qkv[:, :c.q_dim].reshape(T, H, hd))  # (T, H, hd)
            k = np.ascontiguousarray(qkv[:, c.q_dim:c.q_dim + c.kv_dim].reshape(T, Hkv, hd))  # (T, Hkv, hd)
            v = qkv[:, c.q_dim + c.kv_dim:].reshape(T, Hkv, hd)  # (T, Hkv, hd)
            a = np.empty((T, H, hd), dtype=np.float32)  # (T, H, hd)
            for cache, r0, r1 in spans:
                start, S = cache.pos, cache.pos + r1 - r0
                kernels.rope(q[r0:r1], self.cos, self.sin, start)
                kernels.rope(k[r0:r1], self.cos, self.sin, start)
                cache.k[li, start:S] = k[r0:r1]
                cache.v[li, start:S] = v[r0:r1]
                ck, cv = cache.kernel_views()  # (L, max_seq, Hkv, hd) f32, or f16 bits
                kernels.attention_prefill(q[r0:r1], ck[li], cv[li], start, a[r0:r1], self.threads)
            if observe is not None:
                observe(li, "wo", a.reshape(T, c.q_dim))
            x += layer.wo(a.reshape(T, c.q_dim))  # (T, D)
            h = self._norm(x, layer.mlp_norm)
            if observe is not None:
                observe(li, "gate_up", h)
            gu = layer.gate_up(h)  # (T, 2F): gate | up
            act = np.empty((T, F), dtype=np.float32)
            kernels.swiglu_rows(gu, act, self.threads)  # SwiGLU: silu(gate) * up
            if observe is not None:
                observe(li, "w_down", act)
            x += layer.w_down(act)
        for cache, r0, r1 in spans:
            cache.pos += r1 - r0
        if not all_logits:
            x = x[[r1 - 1 for _, _, r1 in spans]]  # (spans, D)
        return self.output(self._norm(np.ascontiguousarray(x), self.norm))  # (T or spans, V)
