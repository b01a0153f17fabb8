"""The generation loop: prefill a prompt into a KV cache, then sample one token at a time.

Two layers, kept apart:
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
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import LlamacpuError
from .sampling import Sampler, apply_repeat_penalty, check_repeat_penalty

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the (T, S) attention scores and (T, F) activations


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


def generate(model, prompt_ids: list[int], *, cache, sampler: Sampler, rng: np.random.Generator,
             max_tokens: int, stop_ids: Iterable[int] = (), repeat_penalty: float = 1.0,
             repeat_last_n: int = 64, stats: GenerationStats | None = None,
             cached_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids after prefilling `prompt_ids` at `cache.pos`.

    A stop id ends generation and is not yielded. The last yielded token is not fed to the
    model (its logits are never needed), so afterwards `cache.pos` covers the prompt and all
    yielded ids but the last. `repeat_penalty` applies to the last `repeat_last_n` ids of the
    whole sequence: `cached_ids` (the ids already in the cache, e.g. a chat's earlier turns;
    only their tail is read), the prompt and the output, so sampling does not depend on how
    much of the sequence the cache happened to hold. Generation also ends, with reason
    "length", when the cache is full.
    """
    if max_tokens < 0:
        raise LlamacpuError(f"max tokens must be >= 0, got {max_tokens}")
    check_repeat_penalty(repeat_penalty)
    if not prompt_ids:
        raise LlamacpuError("the prompt is empty (no tokens)")
    if cache.pos + len(prompt_ids) > cache.max_seq:
        raise LlamacpuError(
            f"the prompt ({len(prompt_ids)} tokens after {cache.pos} cached) does not fit "
            f"the context of {cache.max_seq} tokens")
    stats = stats if stats is not None else GenerationStats()
    stop_ids = frozenset(stop_ids)
    recent = (list(cached_ids[-repeat_last_n:]) + list(prompt_ids))[-repeat_last_n:] if repeat_last_n > 0 else []

    t0 = time.perf_counter()
    for i in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits = model.forward(prompt_ids[i:i + PREFILL_CHUNK], cache)  # (V,) for the chunk's last token
        stats.prompt_tokens += len(prompt_ids[i:i + PREFILL_CHUNK])
    t1 = time.perf_counter()
    stats.prefill_seconds = t1 - t0
    try:
        while stats.completion_tokens < max_tokens:
            if repeat_penalty != 1.0 and recent:
                logits = apply_repeat_penalty(logits, recent, repeat_penalty)
            token = sampler(logits, rng)
            if token in stop_ids:
                stats.stop_reason = "eos"
                return
            stats.completion_tokens += 1
            # The last token's logits would be unused (max_tokens) or could not be computed (full cache).
            last = stats.completion_tokens >= max_tokens or cache.pos >= cache.max_seq
            if last:
                stats.stop_reason = "length"
            yield token
            if last:
                return
            if repeat_last_n > 0:
                recent.append(token)
                del recent[:-repeat_last_n]
            logits = model.forward([token], cache)
            stats.decode_steps += 1
        stats.stop_reason = "length"  # max_tokens == 0
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
        raise
    finally:
        # Also runs when the consumer closes us early; it then sets the stop reason itself.
        stats.decode_seconds = time.perf_counter() - t1


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

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids), **self.stats.to_dict()}


def complete(model, tokenizer, prompt_ids: list[int], *, cache, sampler: Sampler, rng: np.random.Generator,
             max_tokens: int, stop: Iterable[str] = (), repeat_penalty: float = 1.0,
             result: Completion | None = None) -> Iterator[str]:
    """Generate for `prompt_ids` and yield text pieces as they become final, stopping at the
    tokenizer's stop ids, `max_tokens`, or a `stop` string (which is not yielded).

    `result` (if given) is filled in as generation goes, so it is valid after an interrupt.
    """
    result = result if result is not None else Completion()
    text = TextStream(tokenizer, stop)
    tokens = generate(model, prompt_ids, cache=cache, sampler=sampler, rng=rng, max_tokens=max_tokens,
                      stop_ids=tokenizer.stop_ids, repeat_penalty=repeat_penalty, stats=result.stats)
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
