"""Perplexity of a model on a text, optionally with KL divergence and top-1 agreement against a
reference run of the same tokens (normally the f32 model), to measure what quantization costs.

The text is tokenized once and cut into non-overlapping chunks of `ctx` tokens (the last,
shorter remainder is dropped, as llama.cpp's perplexity tool does). Each chunk runs from an
empty cache, starting with BOS if the tokenizer adds one, and every position after the first
is scored: a chunk contributes ctx - 1 predictions. Log-softmax is computed in float64 after
subtracting the row maximum.

    ppl  = exp(mean over scored positions of -log p(next token))
    kl   = mean over scored positions of KL(p_ref || p_model), in nats
    top1 = fraction of scored positions where argmax p_model == argmax p_ref
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import LlamacpuError


@dataclass
class PerplexityResult:
    """ppl over `tokens` scored positions in `chunks` chunks; kl/top1 are None without a reference."""

    ppl: float
    tokens: int
    chunks: int
    ctx: int
    nll: float  # mean negative log-likelihood per scored position, nats
    kl: float | None
    top1: float | None
    seconds: float
    reference_ppl: float | None = None  # the reference's own perplexity on the same positions

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) logits → (..., V) float64 log-probabilities, stable against large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_position(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """(T, V) log-probabilities of the reference and of ours → (T,) KL(p_ref || p) in nats:
    Σ_v p_ref (log p_ref - log p) at each position."""
    return (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(p_ref || p) in nats, from (T, V) logits (softmaxed in float64)."""
    return float(kl_per_position(log_softmax(ref_logits), log_softmax(logits)).mean())


def top1_agrees(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """(T, V) logits or log-probabilities → (T,) bool: the two argmaxes are the same token."""
    return ref.argmax(-1) == ours.argmax(-1)


def compare_logits(ref: np.ndarray, ours: np.ndarray) -> dict:
    """(T, V) logits against the reference's: max |logit error|, mean KL(ref || ours) per
    position (nats) and the fraction of positions whose top-1 token agrees."""
    return {"max_err": float(np.abs(ref - ours).max()), "kl": kl_divergence(ref, ours),
            "top1": float(top1_agrees(ref, ours).mean())}


def chunk_ids(runtime, text: str, ctx: int) -> np.ndarray:
    """(n_chunks, ctx) token ids: the text's tokens cut into whole chunks. When the tokenizer adds
    BOS, each chunk's first token is replaced by BOS (as llama.cpp's perplexity tool does): every
    chunk starts a fresh context, and that first position is never scored anyway."""
    ids = np.asarray(runtime.tokenizer.encode(text, add_bos=False, parse_special=False), dtype=np.int64)
    n = len(ids) // ctx
    if n == 0:
        raise LlamacpuError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    chunks = ids[:n * ctx].reshape(n, ctx).copy()
    if runtime.tokenizer.add_bos:
        chunks[:, 0] = runtime.tokenizer.bos_id
    return chunks


def perplexity(runtime, text: str, *, ctx: int = 512, chunks: int | None = None,
               reference=None, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of `runtime` (from `llamacpu.runtime.open_model`) on `text`.

    ctx: tokens per chunk (≥ 2). chunks: use at most this many chunks (None: all that fit).
    reference: another Runtime (same vocabulary) run on the same tokens for KL and top-1.
    progress: called as progress(done_chunks, total_chunks) after each chunk.
    Raises LlamacpuError if the text is shorter than one chunk or the settings are invalid.
    """
    if ctx < 2:
        raise LlamacpuError(f"perplexity needs a context of at least 2 tokens, got {ctx}")
    if ctx > runtime.config.context_length:
        raise LlamacpuError(f"context {ctx} exceeds the model's {runtime.config.context_length} positions")
    if chunks is not None and chunks < 1:
        raise LlamacpuError(f"chunks must be at least 1, got {chunks}")
    if reference is not None and reference.config.vocab_size != runtime.config.vocab_size:
        raise LlamacpuError("the reference model has a different vocabulary size")
    t0 = time.perf_counter()
    all_chunks = chunk_ids(runtime, text, ctx)  # (available, ctx)
    n_chunks = len(all_chunks) if chunks is None else min(chunks, len(all_chunks))

    nll_sum, ref_nll_sum, kl_sum, agree, scored = 0.0, 0.0, 0.0, 0, 0
    for c in range(n_chunks):
        chunk = all_chunks[c]  # (ctx,)
        targets = chunk[1:]  # (ctx-1,) the token each position predicts
        logp = _chunk_logprobs(runtime, chunk)  # (ctx-1, V)
        nll_sum -= float(logp[np.arange(ctx - 1), targets].sum())
        if reference is not None:
            ref = _chunk_logprobs(reference, chunk)
            ref_nll_sum -= float(ref[np.arange(ctx - 1), targets].sum())
            kl_sum += float(kl_per_position(ref, logp).sum())
            agree += int(top1_agrees(ref, logp).sum())
        scored += ctx - 1
        if progress is not None:
            progress(c + 1, n_chunks)

    nll = nll_sum / scored
    return PerplexityResult(
        ppl=float(np.exp(nll)), tokens=scored, chunks=n_chunks, ctx=ctx, nll=nll,
        kl=kl_sum / scored if reference is not None else None,
        top1=agree / scored if reference is not None else None,
        seconds=time.perf_counter() - t0,
        reference_ppl=float(np.exp(ref_nll_sum / scored)) if reference is not None else None,
    )


def _chunk_logprobs(runtime, chunk: np.ndarray) -> np.ndarray:
    """Log-probabilities (len-1, V) float64 for positions 0..len-2 of `chunk`, from a fresh cache."""
    model = runtime.model
    cache = model.new_cache(len(chunk))
    logits = model.forward(chunk, cache, all_logits=True)  # (len, V)
    return log_softmax(logits[:-1])
