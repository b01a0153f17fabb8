"""The generation loop: prefill a prompt into a KV cache, then sample one token at a time.

Two layers, kept apart:
- `Sequence`: one generation's per-token rules, stepped by whoever runs the model (`generate`
  below, or the server's batched decode).
- `generate(...)`: a Python generator over token ids. It ends at a stop id (EOS, end of turn)
  or after `max_tokens`, and records counts, timings and the stop reason in a `GenerationStats`
  the caller passes in, so they are there even if the caller stops early (Ctrl-C).
- `TextStream`: turns those ids into text for display, applying `--stop` strings. Text that
  could still become a stop string is held back, and a stop string is never emitted.

`complete(...)` joins both for one prompt and returns a `Completion` (what `run --json` prints).
The loop does not print; the caller renders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import LlamacpuError
from .sampling import (Sampler, apply_presence_frequency, apply_repeat_penalty, check_presence_frequency,
                       check_repeat_penalty)

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the (T, S) attention scores and (T, F) activations
# The default context (KV cache) size in tokens, capped at the model's: for `llamacpu.load` and every
# command. Here, where the CLI can import it without numba (this module needs only numpy).
CTX = 4096


@dataclass
class GenerationStats:
    """Counts and timings of one `generate` call, filled in as it runs."""

    prompt_tokens: int = 0  # tokens prefilled by this call (the cache may have held more)
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # wall time from the first token to the last, consumer included
    decode_steps: int = 0  # forward passes of one token
    stop_reason: str | None = None  # "eos" | "length" | "stop" | "interrupted"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "stop_reason": self.stop_reason,
            "prefill_seconds": round(self.prefill_seconds, 4), "decode_seconds": round(self.decode_seconds, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
        }


class Sequence:
    """One generation between forward passes, for loops that run the model themselves.

    `prefill(model)` runs the prompt into `cache`; then `next_token()` draws from `logits`
    (or returns None when generation is over, with `stats.stop_reason` set), and unless
    `finished`, the caller runs the model on that token and hands back its logits with
    `advance(logits)`: `generate` below calls `model.forward` for one sequence, the server
    one `model.forward_batch` for all its sequences. The per-token rules live here, once:
    penalties, stop ids, `max_tokens`, and a full cache. The last token drawn is never fed to
    the model (its logits would be unused, or could not be computed in a full cache).

    `repeat_penalty` (llama.cpp's rule) applies to the last `repeat_last_n` ids of prompt and
    output, the prompt counting from `earlier_ids` (what the cache held before `prompt_ids`, when
    a cached prefix is reused); `presence_penalty` / `frequency_penalty` (OpenAI's rule) apply
    to the ids generated so far.
    """

    def __init__(self, prompt_ids: list[int], *, cache, sampler: Sampler, rng: np.random.Generator | None,
                 max_tokens: int, stop_ids: Iterable[int] = (), repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 earlier_ids: list[int] = (), stats: GenerationStats | None = None):
        if max_tokens < 0:
            raise LlamacpuError(f"max tokens must be >= 0, got {max_tokens}")
        check_repeat_penalty(repeat_penalty)
        check_presence_frequency(presence_penalty, frequency_penalty)
        if not prompt_ids:
            raise LlamacpuError("the prompt is empty (no tokens)")
        if cache.pos + len(prompt_ids) > cache.max_seq:
            raise LlamacpuError(
                f"the prompt ({len(prompt_ids)} tokens after {cache.pos} cached) does not fit "
                f"the context of {cache.max_seq} tokens")
        self.prompt_ids, self.cache, self.sampler, self.rng = list(prompt_ids), cache, sampler, rng
        self.max_tokens, self.stop_ids = max_tokens, frozenset(stop_ids)
        self.repeat_penalty, self.repeat_last_n = repeat_penalty, repeat_last_n
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.stats = stats if stats is not None else GenerationStats()
        self.recent = (list(earlier_ids[-repeat_last_n:]) + list(prompt_ids))[-repeat_last_n:] if repeat_last_n > 0 else []
        self.counts: dict[int, int] = {}  # generated id -> times, for the OpenAI penalties
        self.logits: np.ndarray | None = None  # (V,) the model's logits for the next token
        self.finished = False

    def prefill(self, model, on_logits: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Run the prompt into the cache in chunks. With `on_logits`, every prompt position's
        logits are computed and passed on as `on_logits(offset in the prompt, logits (T, V))`."""
        t0 = time.perf_counter()
        ids = self.prompt_ids
        for i in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[i:i + PREFILL_CHUNK]
            if on_logits is None:
                self.logits = model.forward(chunk, self.cache)  # (V,) for the chunk's last token
            else:
                logits = model.forward(chunk, self.cache, all_logits=True)  # (T, V)
                on_logits(i, logits)
                self.logits = logits[-1]
            self.stats.prompt_tokens += len(chunk)
        self.stats.prefill_seconds = time.perf_counter() - t0

    def next_token(self) -> int | None:
        """The next token drawn from `logits`, or None when generation is over."""
        stats = self.stats
        if self.finished:
            return None
        if stats.completion_tokens >= self.max_tokens:  # max_tokens == 0
            stats.stop_reason, self.finished = "length", True
            return None
        logits = self.logits
        if self.repeat_penalty != 1.0 and self.recent:
            logits = apply_repeat_penalty(logits, self.recent, self.repeat_penalty)
        if self.counts and (self.presence_penalty or self.frequency_penalty):
            logits = apply_presence_frequency(logits, self.counts, self.presence_penalty, self.frequency_penalty)
        token = self.sampler(logits, self.rng)
        if token in self.stop_ids:
            stats.stop_reason, self.finished = "eos", True
            return None
        stats.completion_tokens += 1
        if stats.completion_tokens >= self.max_tokens or self.cache.pos >= self.cache.max_seq:
            stats.stop_reason, self.finished = "length", True
        if self.repeat_last_n > 0:
            self.recent.append(token)
            del self.recent[:-self.repeat_last_n]
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def advance(self, logits: np.ndarray) -> None:
        """Hand back the logits (V,) of the token `next_token` returned, after the model ran it."""
        self.logits = logits
        self.stats.decode_steps += 1


def generate(model, prompt_ids: list[int], *, cache, sampler: Sampler, rng: np.random.Generator,
             max_tokens: int, stop_ids: Iterable[int] = (), repeat_penalty: float = 1.0,
             repeat_last_n: int = 64, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             earlier_ids: list[int] = (), stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield generated token ids after prefilling `prompt_ids` at `cache.pos`.

    A stop id ends generation and is not yielded. The last yielded token is not fed to the
    model (its logits are never needed), so afterwards `cache.pos` covers the prompt and all
    yielded ids but the last. Generation also ends, with reason "length", when the cache is
    full. Penalties: see `Sequence`.
    """
    seq = Sequence(prompt_ids, cache=cache, sampler=sampler, rng=rng, max_tokens=max_tokens, stop_ids=stop_ids,
                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, earlier_ids=earlier_ids, stats=stats)
    seq.prefill(model)
    t1 = time.perf_counter()
    try:
        while (token := seq.next_token()) is not None:
            yield token
            if seq.finished:
                return
            seq.advance(model.forward([token], cache))
    except KeyboardInterrupt:
        seq.stats.stop_reason = "interrupted"
        raise
    finally:
        # Also runs when the consumer closes us early; it then sets the stop reason itself.
        seq.stats.decode_seconds = time.perf_counter() - t1


class TextStream:
    """Generated ids → text, cut at the first of `stop` strings.

    `push(id)` returns the text that is final (neither an incomplete UTF-8 character nor
    a possible start of a stop string); `stopped` turns True when a stop string appears,
    after which `text` ends right before it. `flush()` returns what is held back at the end.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.stop = [s for s in stop if s]
        self._decoder = tokenizer.stream_decoder(continuation=True)
        self._pending = ""  # decoded, not yet emitted
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
        elif final:
            out, self._pending = self._pending, ""
        else:
            keep = _held_back(self._pending, self.stop)
            out = self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(out):]
        self.text += out
        return out


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing chars of `text` could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class Completion:
    """The result of one prompt, as `run --json` reports it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids (stop id excluded)
    stats: GenerationStats = field(default_factory=GenerationStats)
    # Prompt ids whose K/V the cache already held, so not prefilled (not in stats.prompt_tokens).
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids), **self.stats.to_dict()}


def complete(model, tokenizer, prompt_ids: list[int], *, cache, sampler: Sampler, rng: np.random.Generator,
             max_tokens: int, stop: Iterable[str] = (), repeat_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, earlier_ids: list[int] = (),
             result: Completion | None = None) -> Iterator[str]:
    """Generate for `prompt_ids` and yield text pieces as they become final, stopping at the
    tokenizer's stop ids, `max_tokens`, or a `stop` string (which is not yielded).

    `result` (if given) is filled in as generation goes, so it is valid after an interrupt.
    """
    result = result if result is not None else Completion()
    text = TextStream(tokenizer, stop)
    tokens = generate(model, prompt_ids, cache=cache, sampler=sampler, rng=rng, max_tokens=max_tokens,
                      stop_ids=tokenizer.stop_ids, repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                      frequency_penalty=frequency_penalty, earlier_ids=earlier_ids, stats=result.stats)
    try:
        for token in tokens:
            result.token_ids.append(token)
            piece = text.push(token)
            if piece:
                result.text = text.text
                yield piece
            if text.stopped:
                break
    finally:
        tokens.close()  # records the decode time even if our own consumer broke off
    if not text.stopped:
        piece = text.flush()
        if piece:
            yield piece
    else:
        result.stats.stop_reason = "stop"
    result.text = text.text
