"""Many generations on one model at once: a queue of jobs, a KV cache per running job, and one
batched forward per decode step.

One thread owns the model. A `Job` (prompt ids, sampling, limits, a `deliver` callback) waits
in a queue until a slot is free: an `api.Slot`, a KV cache that remembers the ids it holds.
The job takes the free slot whose ids share the longest prefix with its prompt, so only the
rest is prefilled. Then every step draws one token for each running job (`generate.Sequence`:
the same rules as `run`) and runs all the tokens that go on through one `Model.forward_batch`,
which reads each weight once for the whole batch; a lone job uses `Model.forward` (the fused
decode kernel, exactly what `run` computes). A job whose `cancelled` event is set is dropped
before the next step. A failing job gets an error event; the others carry on.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .api import LLM, PromptScorer, Sampling, Slot, TokenLogprob, token_text, top_logprobs
from .chat import common_prefix
from .errors import LlamacpuError
from .generate import GenerationStats, Sequence, TextStream
from .perplexity import log_softmax
from .sampling import make_sampler

PARALLEL = 4  # slots: jobs decoded together; more wait in the queue
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # stop reason -> OpenAI finish_reason


@dataclass
class Job:
    """One prompt to complete. `deliver(event)` is called from the scheduler thread with
    ("prompt", [TokenLogprob]) if `echo_logprobs`, ("token", id, text piece, TokenLogprob | None)
    per token (id None for held-back text released at the end), then ("done", finish reason,
    prompt tokens, completion tokens, prompt tokens found in the cache) or ("error", message, HTTP status)."""

    ids: list[int]
    sampling: Sampling
    max_tokens: int
    deliver: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n most likely
    echo_logprobs: bool = False  # also score the prompt's tokens
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Active:
    job: Job
    slot: Slot
    seq: Sequence
    text: TextStream
    cached: int  # prompt ids whose K/V were already in the slot
    out: list[int] = field(default_factory=list)


class Scheduler:
    """Runs jobs on `parallel` slots in one thread, decoding the active ones as a batch."""

    def __init__(self, llm: LLM, parallel: int = PARALLEL):
        if parallel < 1:
            raise LlamacpuError(f"parallel must be at least 1, got {parallel}")
        self.llm, self.model, self.tokenizer = llm, llm.runtime.model, llm.tokenizer
        # One pool of caches, so that any set of active jobs decodes in one fused kernel call.
        self.slots = [Slot(cache) for cache in self.model.new_caches(parallel, llm.ctx)]
        self.free = list(self.slots)
        self.active: list[_Active] = []
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llamacpu-scheduler", daemon=True)
        self.max_batch = 0  # the most sequences decoded in one step so far (for /health)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish: jobs still running are cancelled (the server drains its requests first)."""
        self._stopping.set()
        self.jobs.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _loop(self) -> None:
        # This thread runs every forward, so it sets the pools to the model's thread count, once
        # (Numba's count is per Python thread: the caller's limit does not reach this one, and
        # parallel regions of a bigger team than the kernels' chunks wait on idle threads).
        from .threads import thread_limit  # imports numba: here, so that the CLI can read PARALLEL without it

        with thread_limit(self.model.threads):
            while not self._stopping.is_set():
                self._admit(wait=not self.active)
                if self.active:
                    self._step()
        for a in list(self.active):
            a.job.cancelled.set()
            self._finish(a, "cancelled")

    def _admit(self, wait: bool) -> None:
        """Start queued jobs while slots are free; when idle, wait for one."""
        while self.free:
            try:
                job = self.jobs.get(timeout=0.5) if wait else self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                return
            wait = False
            if not job.cancelled.is_set():
                self._start(job)

    def _start(self, job: Job) -> None:
        # The free slot sharing the longest prefix (scoring the prompt needs every position's logits).
        slot = max(self.free, key=lambda s: 0 if job.echo_logprobs else common_prefix(s.ids, job.ids))
        self.free.remove(slot)
        try:
            if job.echo_logprobs:
                slot.cache.truncate(0)
                slot.ids, reused = [], 0
            else:
                reused = slot.reuse(job.ids)
            s = job.sampling
            seq = Sequence(job.ids[reused:], cache=slot.cache,
                           sampler=make_sampler(s.temperature, s.top_k, s.top_p, s.min_p),
                           rng=np.random.default_rng(s.seed), max_tokens=job.max_tokens,
                           stop_ids=self.tokenizer.stop_ids, repeat_penalty=s.repeat_penalty,
                           presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                           earlier_ids=job.ids[:reused], stats=GenerationStats())
            scorer = PromptScorer(self.tokenizer, job.ids, job.logprobs or 0) if job.echo_logprobs else None
            seq.prefill(self.model, on_logits=scorer)
        except Exception as e:  # noqa: BLE001  (a bad request must not stop the server)
            slot.cache.truncate(0)
            slot.ids = []
            self.free.append(slot)
            job.deliver(("error", *error_of(e)))
            return
        slot.record(job.ids)
        if scorer is not None:
            job.deliver(("prompt", scorer.entries))
        self.active.append(_Active(job, slot, seq, TextStream(self.tokenizer, job.stop), reused))

    def _step(self) -> None:
        """Draw a token for every active job, then run the ones that go on through the model."""
        going: list[tuple[_Active, int]] = []
        for a in list(self.active):
            if a.job.cancelled.is_set():
                self._finish(a, "cancelled")
                continue
            try:
                token = self._draw(a)
            except Exception as e:  # noqa: BLE001  (one job's failure ends that job only)
                self._finish(a, None, error=error_of(e))
                continue
            if token is not None:
                going.append((a, token))
        if not going:
            return
        self.max_batch = max(self.max_batch, len(going))
        try:
            if len(going) == 1:
                a, token = going[0]
                a.seq.advance(self.model.forward([token], a.slot.cache))
            else:
                logits = self.model.forward_batch([t for _, t in going], [a.slot.cache for a, _ in going])
                for (a, _), row in zip(going, logits):
                    a.seq.advance(row)
        except Exception as e:  # noqa: BLE001
            for a, _ in going:
                a.slot.cache.truncate(0)
                a.slot.ids = []
                self._finish(a, None, error=error_of(e))

    def _draw(self, a: _Active) -> int | None:
        """Draw a's next token and send it; the token if a goes on, None if it ended."""
        logits = a.seq.logits
        token = a.seq.next_token()
        if token is None:
            self._finish(a, a.seq.stats.stop_reason)
            return None
        a.out.append(token)
        entry = None
        if a.job.logprobs is not None:
            logp = log_softmax(logits)
            entry = TokenLogprob(token, token_text(self.tokenizer, token), float(logp[token]),
                                 top_logprobs(logp, a.job.logprobs))
        a.job.deliver(("token", token, a.text.push(token), entry))
        if a.text.stopped:
            self._finish(a, "stop")
        elif a.seq.finished:
            self._finish(a, a.seq.stats.stop_reason)
        else:
            return token
        return None

    def _finish(self, a: _Active, reason: str | None, error: tuple[str, int] | None = None) -> None:
        self.active.remove(a)
        if a.slot.ids:  # the cache holds the prompt and every token but the last
            a.slot.record(a.job.ids + a.out)
        self.free.append(a.slot)
        if error is not None:
            a.job.deliver(("error", *error))
            return
        if reason == "cancelled":
            return
        if not a.text.stopped:
            rest = a.text.flush()
            if rest:
                a.job.deliver(("token", None, rest, None))
        a.job.deliver(("done", FINISH.get(reason, "stop"), len(a.job.ids), len(a.out), a.cached))


def error_of(e: Exception) -> tuple[str, int]:
    """An exception as (message, HTTP status): bad input is the client's (400), anything else ours (500)."""
    if isinstance(e, LlamacpuError):
        return str(e), 400
    return f"generation failed: {type(e).__name__}: {e}", 500
