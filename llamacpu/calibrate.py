"""Self-calibration: the input second moments E[h_j^2] of every layer matrix, measured on text the
model samples itself, as column importance for the scale searches (no calibration data).

An error e in column j of W changes y = W h by e h_j, so its cost is proportional to E[h_j^2]
over the inputs the matrix will see (the diagonal of the activation Hessian that llama.cpp's
imatrix and GPTQ estimate from a calibration corpus). Here the corpus is the model's own: a
few sequences are sampled from the f32 weights at temperature 1 with a seeded generator,
starting from BOS, and the inputs of wq/wk/wv (one shared input), wo, w_gate/w_up and w_down
are recorded on the way by the model's own forward pass (`Model.forward_batch` with an
observer: there is no second copy of the math here). Position 0 counts too: like every
perplexity chunk and every prompt, each sequence starts fresh there, and the first position's
outsized activations in a few channels (the attention sink) are what later tokens attend to.
On SmolLM2, q4_0's KL from f32 was 0.17 with position 0 counted and 0.20 without
(weights-only estimate: 0.23).

The B sequences step together, one token each per step, so each matrix product is one (B, D)
GEMM reading the f32 weights once per step, on one thread. BLAS sums may differ between builds,
so the samples are reproducible on one installation, not promised across machines.

Shapes: B sequences, D model width, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from .model import LINEAR_GROUPS, Model
from .quant import QTensor
from .threads import thread_limit


def self_calibrate(tensors: dict[str, QTensor], config, *, start: int, sequences: int = 16,
                   length: int = 64, seed: int = 0, temperature: float = 1.0,
                   capture_logits: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """Sample `sequences` × `length` tokens from the model (every weight as f32), starting each
    from token `start`, and average every matrix's squared input per column over all of them.
    `length` is capped at the model's context.

    Returns tokens (B, length) (the start token first), E[h^2] by layer matrix name (cols,) f64
    (the matrices of one group share one array), and, with `capture_logits`, the logits
    (B, length, V) each step computed.
    """
    c = config
    rng = np.random.default_rng(seed)
    B, length = sequences, min(length, c.context_length)
    f32 = {name: t if t.fmt == "f32" or len(t.shape) == 1 else QTensor("f32", t.shape, t.dequantize())
           for name, t in tensors.items()}
    # One thread: a few seconds of work either way, and the BLAS sums then don't depend on the
    # machine's core count (nor does a busy machine stall Numba's parallel regions).
    model = Model(c, f32, threads=1)
    caches = [model.new_cache(length) for _ in range(B)]
    sums: dict[tuple[int, str], np.ndarray] = {}

    def observe(layer: int, group: str, h: np.ndarray) -> None:  # h (B, in)
        key = (layer, group)
        sums[key] = sums.get(key, 0.0) + (h.astype(np.float64) ** 2).sum(0)

    tokens = np.empty((B, length), np.int64)
    tokens[:, 0] = start
    all_logits = np.empty((B, length, c.vocab_size), np.float32) if capture_logits else None
    with thread_limit(model.threads):
        for t in range(length):
            logits = model.forward_batch(tokens[:, t], caches, observe=observe)  # (B, V)
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
    for (layer, group), total in sums.items():
        mean = total / n
        for name in LINEAR_GROUPS[group]:
            moments[f"layers.{layer}.{name}"] = mean
    return tokens, moments, all_logits
