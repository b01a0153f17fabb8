"""Chat: messages → prompt ids through the model's template, and a session that keeps its KV cache.

Special tokens in user text. A chat template puts control tokens (`<|im_start|>`, ...) around
the messages, and they must be parsed as special when the prompt is encoded. Text that people
type, though, is data: someone writing "<|im_end|>" in a message (or in a file piped to `run`)
must not end the turn or forge a system turn. So `encode_messages` cuts the rendered prompt at
the message contents and encodes those with `parse_special=False`. That is done only when a
content actually holds a special-token string; otherwise the whole prompt is encoded in one
piece, which gives exactly the ids of the model's own tokenizer. The same rule applies to
`run` prompts and chat messages alike; `--raw` prompts are encoded with `parse_special=False`.

The session reuses its LLM's cache across turns: each turn renders the whole conversation, keeps
the cached positions that match its ids (the longest common prefix) and prefills only the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import LlamacpuError
from .generate import Completion, GenerationStats

# Private-use characters: no tokenizer merges them with neighbouring text, and no user types them.
_MARK = "\ue000{}\ue001"


def encode_messages(tokenizer, template, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for `messages` rendered by `template`, with message contents never parsed as
    special tokens (see the module docstring)."""
    if template is None:
        raise LlamacpuError("this model has no chat template: use --raw")
    rendered = template.render(messages, add_generation_prompt=add_generation_prompt)
    contents = [m["content"] for m in messages]
    if not any(tokenizer.encode(c, add_bos=False, parse_special=True)
               != tokenizer.encode(c, add_bos=False, parse_special=False) for c in contents if c):
        return tokenizer.encode(rendered, add_bos=False, parse_special=True)
    # Render again with placeholders, then encode template text and contents separately.
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    text = template.render(marked, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    for i, content in enumerate(contents):
        mark = _MARK.format(i)
        before, found, text = text.partition(mark)
        if not found:
            # The template rewrote the content (trim, upper...): we cannot keep it apart safely.
            raise LlamacpuError("a message holds special-token text and this chat template alters "
                                "message text, so it cannot be encoded safely")
        if before:
            ids += tokenizer.encode(before, add_bos=False, parse_special=True)
        if content:
            ids += tokenizer.encode(content, add_bos=False, parse_special=False)
    if text:
        ids += tokenizer.encode(text, add_bos=False, parse_special=True)
    return ids


def encode_prompt(tokenizer, template, prompt: str, *, system: str | None = None, raw: bool = False) -> list[int]:
    """Ids for a one-shot prompt: wrapped as a user turn (after an optional system turn) in the
    chat template; or with `raw`, the system text (if any), a blank line and the prompt, encoded
    as plain text (no special tokens) with the tokenizer's own BOS rule."""
    if not prompt.strip():
        raise LlamacpuError("the prompt is empty")
    if raw:
        text = prompt if system is None else f"{system}\n\n{prompt}"
        return tokenizer.encode(text, parse_special=False)
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    return encode_messages(tokenizer, template, messages + [{"role": "user", "content": prompt}])


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


@dataclass
class Notice:
    """Something the user should be told during a turn (e.g. old turns dropped)."""

    message: str


@dataclass
class TurnStats:
    """What the last turn cost: how much of its prompt came from the cache."""

    prompt_tokens: int = 0  # the whole rendered conversation
    reused_tokens: int = 0  # found in the cache
    generation: GenerationStats = field(default_factory=GenerationStats)

    @property
    def prefilled_tokens(self) -> int:
        return self.generation.prompt_tokens


class ChatSession:
    """A multi-turn conversation over an `api.LLM` (made by `LLM.session`), using its KV cache.

    `messages` holds the transcript (system turn first, if any). `say(text)` yields the answer's
    text pieces (and `Notice`s) through `LLM.complete`; when it ends, however it ends (EOS, max
    tokens, Ctrl-C), the user turn and the answer so far are in `messages` and the cache matches
    `cached_ids`. `sampling` (an `api.Sampling`), `rng` (one random stream for the whole
    conversation, seeded by `sampling.seed`) and `max_tokens` may be changed between turns.
    """

    def __init__(self, llm, *, sampling, max_tokens: int, system: str | None = None):
        if llm.template is None:
            raise LlamacpuError("this model has no chat template, so it cannot chat")
        self.llm, self.tokenizer, self.template = llm, llm.tokenizer, llm.template
        self.sampling = sampling.check()
        self.rng = np.random.default_rng(sampling.seed)
        self.max_tokens = max_tokens
        self.messages: list[dict] = []
        self.last = TurnStats()
        self.turns = 0
        self.totals = {"prefilled_tokens": 0, "reused_tokens": 0, "completion_tokens": 0}
        if system is not None:
            self.set_system(system)

    @property
    def cache(self):
        """The LLM's KV cache: (layers, ctx, Hkv, hd), `pos` positions in use."""
        return self.llm.slot.cache

    @property
    def cached_ids(self) -> list[int]:
        """The ids whose K/V are in cache[:cache.pos]."""
        return self.llm.slot.ids

    # ---- conversation state ---------------------------------------------------------------

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str) -> None:
        """Set (or with "" remove) the system prompt; the rest of the transcript stays."""
        rest = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + rest

    def reset(self) -> None:
        """Forget every turn but the system prompt. The cache is kept: its system-prompt
        prefix is reused by the next turn."""
        self.messages = self.messages[:1] if self.system is not None else []

    def save(self, path: str | Path) -> None:
        """Write the transcript as JSON: {"messages": [{"role", "content"}, ...]}."""
        path = Path(path)
        # Written beside PATH and renamed over it: a failed write leaves any old transcript whole.
        tmp = path.parent / f".{path.name}.{os.getpid()}.part"
        try:
            tmp.write_text(json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2) + "\n",
                           encoding="utf-8")
            os.replace(tmp, path)
        except (OSError, UnicodeEncodeError) as e:
            tmp.unlink(missing_ok=True)
            raise LlamacpuError(f"cannot write {path}: {getattr(e, 'strerror', None) or 'not valid UTF-8'}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load(self, path: str | Path) -> None:
        """Replace the transcript with one written by `save`; the cache is rebuilt on the next turn
        (only as far as it differs)."""
        from .checkpoint import check_input_path
        if Path(path).exists():
            check_input_path(Path(path), folder_ok=False)  # a FIFO would block the session
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise LlamacpuError(f"cannot read {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise LlamacpuError(f"{path}: not a JSON transcript ({str(e) or 'nested too deeply'})") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise LlamacpuError(f"{path}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        if any(m["role"] == "system" for m in messages[1:]):
            raise LlamacpuError(f"{path}: a system message may only come first")
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def stats(self) -> dict:
        """Figures for `/stats`: context use, and what the last turn prefilled versus reused."""
        g = self.last.generation
        return {
            "turns": self.turns, "messages": len(self.messages),
            "context_tokens": self.cache.pos, "context_size": self.llm.ctx,
            "last_prompt_tokens": self.last.prompt_tokens, "last_reused_tokens": self.last.reused_tokens,
            "last_prefilled_tokens": self.last.prefilled_tokens,
            "last_completion_tokens": g.completion_tokens, "last_stop_reason": g.stop_reason,
            "last_prefill_tok_s": round(g.prefill_tok_s, 2),
            # an interrupted answer's rate would count the wait for Ctrl-C: there is none
            "last_decode_tok_s": None if g.stop_reason == "interrupted" else round(g.decode_tok_s, 2),
            **{f"total_{k}": v for k, v in self.totals.items()},
        }

    # ---- one turn ---------------------------------------------------------------------------

    def say(self, text: str) -> Iterator[str | Notice]:
        """Add a user turn and yield the answer as text pieces (with `Notice`s first, if any)."""
        if not text.strip():
            raise LlamacpuError("the message is empty")
        ids, kept = self._fit(self.messages + [{"role": "user", "content": text}])
        dropped = len(self.messages) + 1 - len(kept)
        if dropped:
            yield Notice(f"the context is full: dropped the {dropped} oldest message"
                         f"{'s' if dropped > 1 else ''} and rebuilt the cache")
        self.messages = kept
        result = Completion()
        self.last = TurnStats(prompt_tokens=len(ids), generation=result.stats)
        self.turns += 1
        # The cached prefix (system turn and earlier turns) is kept; the penalty window spans
        # the conversation.
        pieces = self.llm.complete(ids, self.sampling, max_tokens=self.max_tokens, rng=self.rng, result=result)
        try:
            yield from pieces
        except (KeyboardInterrupt, GeneratorExit):
            self.last.generation.stop_reason = "interrupted"
            raise
        finally:
            pieces.close()
            # However the turn ended (even by Ctrl-C), keep the answer so far (the LLM has
            # recorded what its cache holds).
            self.last.reused_tokens = result.cached_tokens
            self.messages.append({"role": "assistant",
                                  "content": self.tokenizer.decode(result.token_ids, continuation=True)})
            self.totals["prefilled_tokens"] += self.last.prefilled_tokens
            self.totals["reused_tokens"] += result.cached_tokens
            self.totals["completion_tokens"] += self.last.generation.completion_tokens

    def _fit(self, history: list[dict]) -> tuple[list[int], list[dict]]:
        """Ids of `history` after dropping the fewest oldest non-system messages that leaves
        room for an answer. Returns (ids, the messages kept)."""
        # Room for a full answer, but never more than half the context (a long --max-tokens
        # must not make every conversation drop its history).
        ctx = self.llm.ctx
        room = min(self.max_tokens, ctx // 2)
        first = 1 if history[0]["role"] == "system" else 0
        kept = history
        while True:
            ids = encode_messages(self.tokenizer, self.template, kept)
            if len(ids) + room <= ctx:
                return ids, kept
            if len(kept) - first <= 1:  # only the new message is left
                if len(ids) < ctx:
                    return ids, kept  # answer in what room there is
                raise LlamacpuError(f"the message needs {len(ids)} tokens with its template, more than "
                                    f"the context of {ctx}")
            # Drop a whole exchange (user + assistant) so that the transcript still alternates.
            n = 2 if kept[first]["role"] == "user" and len(kept) - first > 2 else 1
            kept = kept[:first] + kept[first + n:]


# ---- the REPL's input: commands and multi-line messages (rendering is the CLI's) ----------------

# Command → (its argument, what it does), in the order /help lists them.
COMMANDS = {
    "help": ("", "list these commands"),
    "show": ("", "the model, the system prompt and the settings"),
    "set": ("NAME VALUE", "change a setting: temperature, top-k, top-p, min-p, repeat-penalty, "
                          "max-tokens, seed (or `/set system TEXT`)"),
    "system": ("[TEXT]", "set the system prompt; with no TEXT, show it"),
    "unset": ("system", "remove the system prompt"),
    "reset": ("", "forget the conversation, keep the system prompt (also /clear)"),
    "save": ("FILE", "write the transcript as JSON"),
    "load": ("FILE", "replace the transcript with one written by /save"),
    "stats": ("", "context use, and what the last turn prefilled and reused"),
    "exit": ("", "leave (also /quit, /bye, Ctrl-D)"),
}
ALIASES = {"quit": "exit", "bye": "exit", "clear": "reset", "?": "help"}
BLOCK = '"""'  # starts and ends a multi-line message (ollama's convention)


def parse_command(line: str, *, known_only: bool = False) -> tuple[str, str] | None:
    """`/name arg` → ("name", "arg"), aliases resolved; None for a plain message.

    known_only: a line whose /word is not a command is a message (`/usr/bin holds what?`), as
    piped chat wants; otherwise an unknown /word comes back as is, for the caller to refuse."""
    if not line.startswith("/"):
        return None
    name, _, arg = line[1:].partition(" ")
    name = name.strip().lower()
    name = ALIASES.get(name, name)
    if known_only and name not in COMMANDS:
        return None
    return name, arg.strip()


def starts_block(line: str) -> bool:
    """Does this input line open a multi-line message?"""
    return line.lstrip().startswith(BLOCK)


def read_block(first: str, next_line: Callable[[], str]) -> str:
    """The message of a block opened by line `first`: everything after the opening triple quote,
    up to a line that ends with one, lines joined by newlines (line breaks around it dropped).
    `next_line()` gives the following line without its line break and raises EOFError when
    input ends (an unclosed block is an error then: nothing is sent)."""
    body = first.lstrip()[len(BLOCK):]
    lines = []
    while not body.rstrip().endswith(BLOCK):
        lines.append(body)
        try:
            body = next_line()
        except EOFError:
            raise LlamacpuError(f"the input ended inside a {BLOCK} block; close it with {BLOCK}") from None
    lines.append(body.rstrip()[:-len(BLOCK)])
    return "\n".join(lines).strip("\r\n")
