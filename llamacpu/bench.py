"""Throughput benchmark of an opened model: prefill and decode tokens per second, load time,
first-token latency and peak RSS. The CLI (`llamacpu bench`) and `tools/bench_peers.py` render it.

The prompt is seeded random token ids (speed does not depend on the text), the decode is
greedy from the prompt's last logits, and the first-token latency is a short prompt on a
fresh cache, which is what a user waits for after loading. As llama-bench does, one untimed
warm-up run comes first, then `repeats` timed runs, reported as mean ± sample standard
deviation of tokens per second (and the best run, which a shared machine's noise only lowers).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from .errors import LlamacpuError
from .threads import thread_limit

FIRST_TOKEN_PROMPT = 8  # tokens of the "short prompt" behind first_token_seconds


@dataclass(frozen=True)
class BenchResult:
    prefill_runs: tuple[float, ...]  # prompt tokens per second of each timed run (one forward over the prompt)
    decode_runs: tuple[float, ...]  # generated tokens per second of each run (one forward per token)
    load_seconds: float  # open_model: mmap, checks, repacking
    first_token_seconds: float  # a FIRST_TOKEN_PROMPT-token prompt on a fresh cache → logits
    peak_rss_mb: float  # peak resident memory of this process so far
    prompt_tokens: int
    gen_tokens: int
    threads: int
    act_bits: int  # activation width of the integer kernels (16 for float weights, which do not use them)

    @property
    def prefill_tok_s(self) -> float:
        return statistics.fmean(self.prefill_runs)

    @property
    def decode_tok_s(self) -> float:
        return statistics.fmean(self.decode_runs)

    @property
    def prefill_tok_s_sd(self) -> float:
        return _sd(self.prefill_runs)

    @property
    def decode_tok_s_sd(self) -> float:
        return _sd(self.decode_runs)

    def to_dict(self) -> dict:
        """Flat JSON-ready figures: means, standard deviations, best runs and every run."""
        return {
            "prefill_tok_s": self.prefill_tok_s, "prefill_tok_s_sd": self.prefill_tok_s_sd,
            "prefill_tok_s_best": max(self.prefill_runs),
            "decode_tok_s": self.decode_tok_s, "decode_tok_s_sd": self.decode_tok_s_sd,
            "decode_tok_s_best": max(self.decode_runs),
            "prefill_tok_s_runs": list(self.prefill_runs), "decode_tok_s_runs": list(self.decode_runs),
            "repeats": len(self.prefill_runs), "load_seconds": self.load_seconds,
            "first_token_seconds": self.first_token_seconds, "peak_rss_mb": self.peak_rss_mb,
            "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens, "threads": self.threads,
            "act_bits": self.act_bits,
        }


def _sd(runs: tuple[float, ...]) -> float:
    """Sample standard deviation (n - 1), as llama-bench reports; 0 for a single run."""
    return statistics.stdev(runs) if len(runs) > 1 else 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


def run_bench(runtime, *, prompt_tokens: int = 512, gen_tokens: int = 128, repeats: int = 1,
              seed: int = 0) -> BenchResult:
    """Time `runtime.model` (a `llamacpu.runtime.Runtime`): a warm-up, then `repeats` runs."""
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
    with thread_limit(model.threads):
        model.forward(short, model.new_cache(len(short) + 1))  # the first call also loads cached kernels
    first = time.perf_counter() - t0

    def one_run() -> tuple[float, float]:
        cache = model.new_cache(prompt_tokens + gen_tokens)  # only what the run needs
        t0 = time.perf_counter()
        logits = model.forward(prompt, cache)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = model.forward([int(np.argmax(logits))], cache)
        return prompt_tokens / prefill, gen_tokens / (time.perf_counter() - t0)

    with thread_limit(model.threads):  # the pools at the count the result reports
        one_run()  # warm-up: kernels for this prompt length, caches, page faults
        runs = [one_run() for _ in range(repeats)]
    return BenchResult(
        prefill_runs=tuple(p for p, _ in runs),
        decode_runs=tuple(d for _, d in runs),
        load_seconds=float(runtime.load_seconds),
        first_token_seconds=first,
        peak_rss_mb=peak_rss_mb(),
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        threads=int(getattr(model, "threads", 1)),
        act_bits=int(getattr(model, "act_bits", 16)),
    )
