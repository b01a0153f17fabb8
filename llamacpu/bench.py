"""Throughput benchmark of an opened model: prefill and decode tokens per second, load time,
first-token latency and peak RSS. The CLI (`llamacpu bench`) and `tools/bench_peers.py` render it.

The prompt is seeded random token ids (speed does not depend on the text), the decode is
greedy from the prompt's last logits, and the first-token latency is a short prompt on a
fresh cache, which is what a user waits for after loading.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .errors import LlamacpuError

FIRST_TOKEN_PROMPT = 8  # tokens of the "short prompt" behind first_token_seconds


@dataclass(frozen=True)
class BenchResult:
    prefill_tok_s: float  # prompt tokens per second, one forward over the whole prompt
    decode_tok_s: float  # generated tokens per second, one forward per token after the prompt
    load_seconds: float  # open_model: mmap, checks, repacking
    first_token_seconds: float  # a FIRST_TOKEN_PROMPT-token prompt on a fresh cache → logits
    peak_rss_mb: float  # peak resident memory of this process so far
    prompt_tokens: int
    gen_tokens: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


def run_bench(runtime, *, prompt_tokens: int = 512, gen_tokens: int = 128, repeats: int = 1,
              seed: int = 0) -> BenchResult:
    """Time `runtime.model` (a `llamacpu.runtime.Runtime`); the best of `repeats` runs each."""
    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise LlamacpuError("bench needs at least one prompt token, one generated token and one run")
    model = runtime.model
    c = model.config
    if prompt_tokens + gen_tokens > c.context_length:
        raise LlamacpuError(f"{prompt_tokens} + {gen_tokens} tokens exceed the model's context "
                            f"of {c.context_length}")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, c.vocab_size, prompt_tokens)
    short = prompt[:FIRST_TOKEN_PROMPT]

    t0 = time.perf_counter()
    model.forward(short, model.new_cache(len(short) + 1))  # the first call also loads cached kernels
    first = time.perf_counter() - t0

    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(prompt_tokens + gen_tokens)
        t0 = time.perf_counter()
        logits = model.forward(prompt, cache)
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = model.forward([int(np.argmax(logits))], cache)
        best_decode = min(best_decode, time.perf_counter() - t0)
    return BenchResult(
        prefill_tok_s=prompt_tokens / best_prefill,
        decode_tok_s=gen_tokens / best_decode,
        load_seconds=float(runtime.load_seconds),
        first_token_seconds=first,
        peak_rss_mb=peak_rss_mb(),
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        threads=int(getattr(model, "threads", 1)),
    )
