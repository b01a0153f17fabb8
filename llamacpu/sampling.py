"""Choosing the next token from logits: pure functions plus an explicit seeded `numpy.random.Generator`.

`make_sampler(temperature, top_k, top_p, min_p)` returns one composed function
`(logits (V,), rng) -> token id`. The filters run in llama.cpp's order (top-k → top-p → min-p,
each on the temperature-1 distribution), then temperature scales what is left and one draw
is made. Temperature 0 is greedy (argmax) and never touches the rng.

The repeat penalty is a separate logits processor over recent ids, with llama.cpp's
semantics: a seen token's positive logit is divided by the penalty, a negative one multiplied.
The presence and frequency penalties are OpenAI's: subtracted from the logits of generated ids.
References: Holtzman et al. 2019 (top-p), Nguyen et al. 2024 (min-p), Keskar et al. 2019 (repeat penalty).

Where the settings come from: what the user gives; else what the model file recommends
(GGUF `general.sampling.*`, HF `generation_config.json`, read by the loaders into
`Checkpoint.sampling`); else a known model's card (`registry.py`); else `DEFAULTS`, once, here.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .errors import LlamacpuError

Sampler = Callable[[np.ndarray, np.random.Generator], int]

# The fallback when neither the user nor the model says: llama.cpp's defaults (common/common.h).
DEFAULTS: dict[str, float] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
DEFAULTS_SOURCE = "llamacpu default"
INT_SETTINGS = ("top_k",)


def recommended(values: dict, source: str) -> dict:
    """A model's recommended settings (`{setting: value}`, None = not given), typed and checked;
    a bad value is refused with a message naming `source` rather than silently replaced."""
    out = {}
    for key, v in values.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (key in INT_SETTINGS and v != int(v)):
            raise LlamacpuError(f"{source}: {key} must be a number, got {v!r}")
        out[key] = int(v) if key in INT_SETTINGS else float(v)
    try:
        merged = {**DEFAULTS, **out}
        check_settings(merged["temperature"], merged["top_k"], merged["top_p"], merged["min_p"])
        check_repeat_penalty(merged["repeat_penalty"])
    except LlamacpuError as e:
        raise LlamacpuError(f"{source}: {e}") from None
    return out


def pick_settings(given: dict, *layers: tuple[str, dict]) -> tuple[dict, dict]:
    """Each setting of `DEFAULTS` from the first place that has it: `given` (None means not
    given), then each `(source, values)` layer in order, then `DEFAULTS`.
    Returns (settings, {setting: where it came from}); the settings are checked."""
    settings, sources = {}, {}
    for key, fallback in DEFAULTS.items():
        if given.get(key) is not None:
            settings[key], sources[key] = given[key], "given"
            continue
        for source, values in layers:
            if values.get(key) is not None:
                settings[key], sources[key] = values[key], source
                break
        else:
            settings[key], sources[key] = fallback, DEFAULTS_SOURCE
    check_settings(settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"])
    check_repeat_penalty(settings["repeat_penalty"])
    return settings, sources


def check_settings(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """Raise LlamacpuError naming the first setting out of its range."""
    if not np.isfinite(temperature) or temperature < 0:
        raise LlamacpuError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise LlamacpuError(f"top-k must be >= 0 (0 turns it off), got {top_k}")
    if not 0 < top_p <= 1:
        raise LlamacpuError(f"top-p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise LlamacpuError(f"min-p must be in [0, 1], got {min_p}")


def check_repeat_penalty(penalty: float) -> None:
    if not np.isfinite(penalty) or penalty <= 0:
        raise LlamacpuError(f"repeat penalty must be > 0 (1 turns it off), got {penalty}")


def check_presence_frequency(presence: float, frequency: float) -> None:
    for name, value in (("presence", presence), ("frequency", frequency)):
        if not np.isfinite(value) or not -2 <= value <= 2:
            raise LlamacpuError(f"{name} penalty must be in [-2, 2] (0 turns it off), got {value}")


def greedy(logits: np.ndarray, rng: np.random.Generator | None = None) -> int:
    """The highest logit's id (the lowest id on ties)."""
    return int(np.argmax(logits))


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Sampler:
    """One function (logits (V,), rng) -> id that applies the given filters, then draws.

    top_k=0, top_p=1 and min_p=0 each switch their filter off; temperature=0 is greedy.
    """
    check_settings(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return greedy

    def sample(logits: np.ndarray, rng: np.random.Generator) -> int:
        ids, z = candidates(np.asarray(logits, dtype=np.float32), top_k, top_p, min_p)
        z = (z.astype(np.float64) - z.max()) / temperature  # max-subtracted: exp never overflows
        cdf = np.cumsum(np.exp(z))
        # One uniform draw per token keeps a seeded run reproducible whatever the filters keep.
        i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        return i if ids is None else int(ids[i])

    return sample


def candidates(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """The ids that survive top-k, then top-p, then min-p (each on the temperature-1 distribution of
    what the previous filter kept), and their logits: (ids (n,) sorted by logit, highest first,
    logits[ids]); n >= 1. With every filter off: (None, logits), i.e. all ids in vocabulary order.

    Only what a filter needs is sorted: sorting the whole vocabulary costs more than a decode step.
    """
    V = logits.shape[0]
    m = float(logits.max())
    ids = None
    if 0 < top_k < V:
        ids = _by_logit(np.argpartition(logits, V - top_k)[V - top_k:], logits)  # O(V) + sorting k
    if top_p < 1:
        if ids is None:
            total = float(np.exp(logits.astype(np.float64) - m).sum())
            ids = _head_with_mass(logits, m, top_p * total)
        else:
            total = float(np.exp(logits[ids].astype(np.float64) - m).sum())  # top-k renormalises
        cum = np.cumsum(np.exp(logits[ids].astype(np.float64) - m))
        # the shortest head whose mass reaches top_p (at least one token)
        ids = ids[:min(len(ids), int(np.searchsorted(cum, top_p * total, side="left")) + 1)]
    if min_p > 0:
        # p >= min_p * p_max  <=>  logit >= max + log(min_p); the max survives every filter
        threshold = m + np.log(min_p)
        if ids is None:
            ids = _by_logit(np.flatnonzero(logits >= threshold), logits)
        else:
            ids = ids[logits[ids] >= threshold]  # ids are sorted, so this keeps a head
    return (None, logits) if ids is None else (ids, logits[ids])


def _by_logit(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """`ids` sorted by logit, highest first, ties by lower id (as a stable sort of everything)."""
    return ids[np.lexsort((ids, -logits[ids]))]


def _head_with_mass(logits: np.ndarray, m: float, mass: float) -> np.ndarray:
    """The highest-logit ids, sorted, enough of them to hold `mass` (of exp(logit - m)).

    The top-p set is a head of the sorted vocabulary, so grow a partitioned head until it holds
    the mass instead of sorting everything; a peaked distribution needs one small partition.
    """
    V = logits.shape[0]
    k = 64
    while k < V:
        head = np.argpartition(logits, V - k)[V - k:]
        if np.exp(logits[head].astype(np.float64) - m).sum() >= mass:
            return _by_logit(head, logits)
        k *= 4
    return np.argsort(-logits, kind="stable")


def apply_repeat_penalty(logits: np.ndarray, recent_ids: Iterable[int], penalty: float) -> np.ndarray:
    """A copy of `logits` (V,) with each distinct id in `recent_ids` penalised once:
    positive logits divided by `penalty`, negative ones multiplied (llama.cpp's rule)."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.fromiter(recent_ids, dtype=np.int64))
    if ids.size == 0:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_presence_frequency(logits: np.ndarray, counts: dict[int, int], presence: float,
                             frequency: float) -> np.ndarray:
    """A copy of `logits` (V,) with OpenAI's penalties over the ids generated so far:
    logit[j] -= count[j] * frequency + (count[j] > 0) * presence."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = np.array(logits, dtype=np.float32, copy=True)
    out[ids] -= n * np.float32(frequency) + np.float32(presence)
    return out
