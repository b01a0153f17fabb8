"""Job lines: one JSON request → one result row. Shared by `run --jsonl` and `batch` (on Ray).

A request line is a JSON object: `{"id": any, "prompt": str}` or `{"id": any, "messages":
[{"role": ..., "content": ...}, ...]}`, plus optional settings (`REQUEST_KEYS`); settings it does
not give come from the caller's `defaults` (the command's flags). The row is `{"index", "id"?,
**Completion.to_dict(), "seed"}`, or `{"index", "id"?, "error"}` when the line is bad: a bad line
never stops the job. `index` is the 0-based line number in the input, blank lines included.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .errors import LlamacpuError, reason

# Per-request settings a line may carry, with their types.
REQUEST_KEYS = {
    "prompt": str, "messages": list, "system": str, "raw": bool, "max_tokens": int, "temperature": float,
    "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float, "seed": int, "stop": list, "id": object,
}
ROLES = ("system", "user", "assistant")
# The sampling settings a line may carry, whose defaults come from the model.
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


def one_line(message: str) -> str:
    """A message squeezed onto one line (rows and errors are one line each)."""
    return " ".join(str(message).split()) or "unknown error"


SEED_RANDOM = -1  # llama.cpp's "pick a random seed"


def resolve_seed(seed: int | None, what: str = "--seed") -> int:
    """A concrete seed: the one given, or a random one for None / -1 (llama.cpp's convention)."""
    if seed is None or seed == SEED_RANDOM:
        return random.SystemRandom().randrange(2 ** 32)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LlamacpuError(f"{what} must be a non-negative integer, or -1 for a random seed; got {seed}")
    return seed


def model_defaults(llm, defaults: dict) -> dict:
    """`defaults` with each sampling setting it leaves None taken from the model (`llm.defaults`:
    its file's keys, or a known model's card, else `sampling.DEFAULTS`): what `run` uses."""
    return {**defaults, **{k: getattr(llm.defaults, k) if defaults.get(k) is None else defaults[k]
                           for k in SAMPLING_KEYS}}


def parse_request(line: str, index: int) -> dict:
    """The JSON object on input line `index` (0-based), or LlamacpuError."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise LlamacpuError(f"line {index + 1} is not JSON ({e.msg})") from None
    except RecursionError:  # `[[[[...` nested deeper than the parser's stack
        raise LlamacpuError(f"line {index + 1} is nested too deeply") from None
    if not isinstance(req, dict):
        raise LlamacpuError(f"line {index + 1} is not a JSON object")
    return req


def run_request(llm, line: str, index: int, defaults: dict) -> dict:
    """One request line → its result row, or an error row (the job goes on). `llm` is an
    `api.LLM`; `defaults` hold every setting (see `model_defaults`)."""
    from .generate import Completion
    head: dict[str, Any] = {"index": index}
    try:
        req = parse_request(line, index)
        if "id" in req:
            head["id"] = req["id"]
        s = request_settings(req, defaults)
        if s.get("messages") is not None:
            ids = llm.encode_chat(s["messages"])
        else:
            ids = llm.encode_prompt(s["prompt"], system=s["system"], raw=s["raw"])
        # Unseeded requests still differ from each other; a seeded one is reproducible anywhere in
        # a job: each row is prefilled whole (no reuse of the row before's cache).
        s["seed"] = resolve_seed(s["seed"], '"seed"')
        completion = Completion()
        for _ in llm.generate(ids, max_tokens=s["max_tokens"], stop=s["stop"], result=completion, reuse=False,
                              seed=s["seed"], **{k: s[k] for k in SAMPLING_KEYS}):
            pass
        return {**head, **completion.to_dict(), "seed": s["seed"]}
    except LlamacpuError as e:
        return {**head, "error": one_line(str(e))}
    except (Exception, MemoryError) as e:  # this line failed; the job goes on
        return {**head, "error": f"generation failed: {one_line(reason(e))}"}


def request_settings(req: dict, defaults: dict) -> dict:
    """`req`'s settings over `defaults`, type-checked and range-checked (LlamacpuError if not)."""
    from .sampling import check_repeat_penalty, check_settings
    unknown = sorted(set(req) - set(REQUEST_KEYS))
    if unknown:
        raise LlamacpuError(f"unknown request key {unknown[0]!r}; known: {', '.join(REQUEST_KEYS)}")
    if ("prompt" in req) == ("messages" in req):
        raise LlamacpuError('a request needs either a "prompt" or a "messages" list (not both)')
    if "prompt" in req and (not isinstance(req["prompt"], str) or not req["prompt"].strip()):
        raise LlamacpuError('a request needs a non-empty "prompt" string')
    if "messages" in req:
        _check_messages(req["messages"])
        for key in ("system", "raw"):
            if req.get(key) is not None:
                raise LlamacpuError(f'"{key}" goes with "prompt"; with "messages", put a system turn in the list')
    s = {**defaults, **{k: v for k, v in req.items() if k != "id"}}
    if isinstance(s["stop"], str):
        s["stop"] = [s["stop"]]
    for key, kind in REQUEST_KEYS.items():
        v = s.get(key)
        if v is None or kind is object or key == "messages":
            continue
        ok = (isinstance(v, bool) if kind is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
              isinstance(v, int) and not isinstance(v, bool) if kind is int else
              isinstance(v, list) and all(isinstance(x, str) for x in v) if kind is list else isinstance(v, kind))
        if not ok:
            raise LlamacpuError(f'"{key}" must be {"a list of strings" if kind is list else kind.__name__}')
    check_settings(s["temperature"], s["top_k"], s["top_p"], s["min_p"])
    check_repeat_penalty(s["repeat_penalty"])
    if s["max_tokens"] < 0:
        raise LlamacpuError(f'"max_tokens" must be >= 0, got {s["max_tokens"]}')
    return s


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise LlamacpuError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES
                or not isinstance(m["content"], str)):
            raise LlamacpuError(f'messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}}')
    if messages[-1]["role"] == "assistant":
        raise LlamacpuError('the last message must not be the assistant\'s: its answer is what is generated')
