"""Batch jobs on Ray: a JSONL file of requests → a JSONL file of result rows, resumable.

The driver (this process) reads IN, works out which lines OUT already holds, and hands the rest
to Ray Data's `map_batches` over a pool of stateful actors: each actor opens the model once
(an `api.LLM`) and runs `jobs.run_request` on its lines, exactly as `run --jsonl` does.
Ray streams the rows back in input order (`preserve_order`); the driver appends them to OUT.

Guarantees, and how they are kept:
- One row per non-blank input line, in input order, the row `run --jsonl` prints for that line
  (same `index`, same greedy text). Blank lines get no row, as in `run --jsonl`.
- Nothing twice: only the driver writes OUT, each row once, whole lines in order, appended with
  one write() per group and fsynced. Ray retries a killed actor's tasks on its restarted self
  (`max_restarts`, `max_task_retries`); a retried row is written when it first comes back.
- A crash leaves complete rows followed by at most one torn last line. Rerunning with the same
  OUT checks that its rows are those of IN's first lines (index and id), drops a torn last line,
  and computes only the rest; a complete OUT is not opened for writing at all.
- Ids: a line without "id" is known by its index. A line whose id appeared on an earlier line gets
  an error row ("duplicate id"), without generating: ids in OUT stay unique keys.

Libraries never print: progress goes to a callback; Ray's own logs go to the caller's temp dir.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import LlamacpuError
from .jobs import parse_request

MAX_TASK_RETRIES = 3  # a line that kills its worker 4 times fails the job instead of looping forever
ROWS_PER_TASK = 16  # the most lines one Ray task carries: the retry cost after a kill, and progress granularity
TASKS_IN_FLIGHT = 2  # per actor: one running, one queued, so an actor never waits for the driver


# ---- the plan: what IN asks, what OUT already has -----------------------------------------------

@dataclass
class Job:
    """The lines still to compute, and what OUT already holds."""

    total: int  # rows the finished OUT will hold (non-blank lines of IN)
    done: int  # rows OUT holds already
    done_errors: int  # of which error rows
    keep_bytes: int  # OUT's valid length (a torn last line beyond it is dropped)
    out_size: int  # OUT's length now
    # Lines to compute: {"index": line number, "line": text, "row": a row decided here ("" if none)}
    pending: list[dict] = field(default_factory=list)


def _id_key(value) -> str:
    # Ids compare as JSON text: 1 and 1.0 and true are different ids, as they are to most readers.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(index, line) for IN's non-blank lines; line is None when it is not UTF-8. Lines split as
    `run --jsonl` splits stdin (text mode, universal newlines), so indexes agree."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                yield index, None
                continue
            yield index, line


def plan_job(in_path: str | Path, out_path: str | Path) -> Job:
    """Read IN and OUT, check that OUT is a prefix of IN's rows, and list the lines to compute.
    LlamacpuError when IN cannot be read or OUT is not the output of IN."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise LlamacpuError(f"{in_path}: no such file")
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise LlamacpuError("-o must not be the input file")
    lines: list[tuple[int, str | None, dict | None]] = []  # (index, line, request or None if unparsable)
    try:
        for index, line in _read_lines(in_path):
            req = None
            if line is not None:
                try:
                    req = parse_request(line, index)
                except LlamacpuError:
                    pass
            lines.append((index, line, req))
    except OSError as e:
        raise LlamacpuError(f"cannot read {in_path}: {e.strerror or e}") from None

    done_rows, keep, size = _read_done(out_path)
    if len(done_rows) > len(lines):
        raise LlamacpuError(f"{out_path} has {len(done_rows)} rows but {in_path} only {len(lines)} requests: "
                            "it is the output of another input; give another -o")
    for k, row in enumerate(done_rows):
        index, _, req = lines[k]
        want_id = req is not None and "id" in req
        if row.get("index") != index or ("id" in row) != want_id or (
                want_id and _id_key(row["id"]) != _id_key(req["id"])):
            raise LlamacpuError(f"{out_path} row {k + 1} is not the result of line {index + 1} of {in_path}: "
                                "it is the output of another input; give another -o")

    job = Job(total=len(lines), done=len(done_rows), done_errors=sum("error" in r for r in done_rows),
              keep_bytes=keep, out_size=size)
    seen: dict[str, int] = {}
    for k, (index, line, req) in enumerate(lines):
        row = ""
        if line is None:
            row = json.dumps({"index": index, "error": f"line {index + 1} is not UTF-8"})
        elif req is not None and "id" in req:
            key = _id_key(req["id"])
            if key in seen:
                row = json.dumps({"index": index, "id": req["id"],
                                  "error": f"duplicate id {key}: line {seen[key] + 1} has it already"},
                                 ensure_ascii=False)
            else:
                seen[key] = index
        if k >= job.done:
            job.pending.append({"index": index, "line": line or "", "row": row})
    return job


def _read_done(out_path: Path) -> tuple[list[dict], int, int]:
    """OUT's complete rows, the byte length they span, and OUT's size. A last line without a
    newline is a torn write (not counted); any other line that is not a row is an error."""
    if not out_path.exists():
        return [], 0, 0
    try:
        data = out_path.read_bytes()
    except OSError as e:
        raise LlamacpuError(f"cannot read {out_path}: {e.strerror or e}") from None
    rows, pos = [], 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # torn last line
        try:
            row = json.loads(data[pos:end])
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise LlamacpuError(f"{out_path} line {len(rows) + 1} is not a result row: "
                                "it is not the output of a batch job; give another -o")
        rows.append(row)
        pos = end + 1
    return rows, pos, len(data)


# ---- the output file ------------------------------------------------------------------------

class RowWriter:
    """Appends whole rows to OUT and fsyncs them, after cutting a torn last line."""

    def __init__(self, path: Path, keep_bytes: int, size: int):
        new = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if size > keep_bytes:
            os.ftruncate(self._fd, keep_bytes)
        if new:  # make the new name itself durable, not only the bytes
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def write(self, rows: list[str]) -> None:
        data = "".join(r + "\n" for r in rows).encode("utf-8")
        while data:  # one write() normally; loop on a short write so no row is ever cut
            n = os.write(self._fd, data)
            data = data[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


# ---- the Ray side -----------------------------------------------------------------------------

class Worker:
    """A Ray actor: the model, opened once; `__call__` runs a batch of lines (Ray Data numpy columns)."""

    def __init__(self, model_path: str, threads: int, quant: str | None, defaults: dict, ctx: int,
                 model_spec: str | None = None):
        from .api import LLM
        from .jobs import model_defaults
        from .runtime import open_model
        # Sampling settings the job leaves None come from the model, as in `run` (`model_spec`: the
        # name or path the user gave, for a known model's card).
        self.llm = LLM(open_model(model_path, quant=quant, threads=threads), ctx=ctx, spec=model_spec)
        self.defaults = model_defaults(self.llm, defaults)

    def __call__(self, batch: dict) -> dict:
        from .jobs import run_request
        rows, tokens, errors = [], [], []
        for index, line, decided in zip(batch["index"], batch["line"], batch["row"]):
            if decided:
                text, result = str(decided), json.loads(str(decided))
            else:
                result = run_request(self.llm, str(line), int(index), self.defaults)
                text = json.dumps(result, ensure_ascii=False)
            rows.append(text)
            tokens.append(int(result.get("completion_tokens", 0)))
            errors.append("error" in result)
        return {"index": batch["index"], "row": rows, "tokens": tokens, "error": errors}


@contextmanager
def ray_cluster(address: str | None, num_cpus: int | None, temp_dir: Path) -> Iterator[None]:
    """Connect to the Ray cluster at `address`, or start a quiet local one with `num_cpus` CPUs
    (no dashboard, no usage stats, its session and logs in `temp_dir`, a short path: Ray puts
    Unix sockets there). Ray is shut down on leaving; `temp_dir` is the caller's to remove."""
    # Read by ray.init and Ray Data when they start (set them to see more): no reporting home, and
    # Ray Data's own notices ("progress bars disabled", "execution finished") kept out of our stderr.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        # A small object store: it holds the pending lines and the rows in flight, not tensors.
        kwargs.update(num_cpus=num_cpus, _temp_dir=str(temp_dir), object_store_memory=256 * 2 ** 20)
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            hint = (" (a cluster with token authentication also needs RAY_AUTH_MODE=token here)"
                    if address and os.environ.get("RAY_AUTH_MODE") is None else "")
            raise LlamacpuError(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: "
                                f"{' '.join(str(e).split())}{hint}") from None
        yield
    finally:
        ray.shutdown()


@dataclass
class Progress:
    """How far a batch job is; rates over the computing time of this run."""

    total: int  # rows the finished OUT holds
    resumed: int  # rows OUT held before this run
    computed: int = 0  # rows written by this run
    errors: int = 0  # error rows written by this run
    tokens: int = 0  # completion tokens of this run's rows
    seconds: float = 0.0  # since the workers were asked to start

    @property
    def done(self) -> int:
        return self.resumed + self.computed

    @property
    def rows_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        left = self.total - self.done
        if left == 0:
            return 0.0
        return left / self.rows_per_s if self.rows_per_s > 0 else None


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster."""
    import ray
    return int(ray.cluster_resources().get("CPU", 0))


def run_batch(job: Job, out_path: str | Path, *, model_path: str | Path, workers: int, threads: int = 1,
              quant: str | None = None, defaults: dict, ctx: int, model_spec: str | None = None,
              progress: Callable[[Progress], None] | None = None) -> Progress:
    """Compute `job.pending` on `workers` Ray actors (the caller has connected Ray, see
    `ray_cluster`) and append the rows to OUT in order. Returns the final Progress."""
    import ray.data

    out_path = Path(out_path)
    state = Progress(total=job.total, resumed=job.done)
    if not job.pending:
        return state
    have = cluster_cpus()
    if workers * threads > have:
        raise LlamacpuError(f"{workers} workers × {threads} threads need {workers * threads} CPUs; "
                            f"the Ray cluster has {have}")
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours is on the caller's side
    data_ctx.print_on_execution_start = False
    data_ctx.execution_options.preserve_order = True  # rows come back in input order

    # Blocks of at most ROWS_PER_TASK lines, and enough of them to keep every worker busy.
    per_task = max(1, min(ROWS_PER_TASK, math.ceil(len(job.pending) / (4 * workers))))
    ds = ray.data.from_items(job.pending, override_num_blocks=math.ceil(len(job.pending) / per_task))
    with warnings.catch_warnings():
        # Ray Data 2.60 has no named parameter for the retry settings yet (hence the `ray<2.64` pin).
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            Worker, batch_size=None, batch_format="numpy",
            fn_constructor_kwargs=dict(model_path=str(model_path), threads=threads, quant=quant,
                                       defaults=defaults, ctx=ctx, model_spec=model_spec),
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
            num_cpus=threads,  # the actor's kernel threads: Ray places it where that many CPUs are free
            max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)

    writer = None  # opened at the first rows: a job that fails to start leaves no new file
    t0 = time.perf_counter()
    if progress is not None:
        progress(state)  # 0 rows: the workers are starting
    expected = iter(p["index"] for p in job.pending)
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for index in block["index"]:  # guard the order promise, cheaply, before writing
                if int(index) != next(expected):
                    raise RuntimeError(f"rows came back out of order at line {int(index) + 1}")
            if writer is None:
                writer = RowWriter(out_path, job.keep_bytes, job.out_size)
            writer.write([str(r) for r in block["row"]])
            state.computed += len(block["row"])
            state.errors += int(sum(bool(e) for e in block["error"]))
            state.tokens += int(sum(int(t) for t in block["tokens"]))
            state.seconds = time.perf_counter() - t0
            if progress is not None:
                progress(state)
        missing = next(expected, None)
        if missing is not None:
            raise RuntimeError(f"Ray Data ended without the row of line {missing + 1}")
    except Exception as e:
        cause = _user_error(e)
        if cause is not None:
            raise cause from None
        raise
    finally:
        if writer is not None:
            writer.close()
    state.seconds = time.perf_counter() - t0
    return state


def _user_error(e: BaseException) -> LlamacpuError | None:
    """The LlamacpuError a worker raised (e.g. the model would not open), found in Ray's wrapping:
    an exception chain, or only the text of a remote traceback (an actor that died starting)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, LlamacpuError):
            return LlamacpuError(str(e))
        marker = f"{LlamacpuError.__module__}.{LlamacpuError.__name__}: "
        lines = [line for line in str(e).splitlines() if line.startswith(marker)]
        if lines:
            return LlamacpuError(f"a worker could not start: {lines[-1][len(marker):]}")
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def check_model(path: str | Path) -> None:
    """Open the model's file and metadata (mmap, no repacking): LlamacpuError if it is not one."""
    from .checkpoint import load_checkpoint
    load_checkpoint(path)
