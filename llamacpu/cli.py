"""The `llamacpu` command: parse, call the library, render. The only module that prints.

Rendering rules: generated text goes to stdout as plain text, flushed per token. People get
rich output (tables, progress, colour) on a terminal; pipes get plain text or JSON. Notices
and stats go to stderr. NO_COLOR is honoured (by rich). Bad input is one line,
`error: <message>`, on stderr with exit code 2; a failure while generating exits 1; Ctrl-C 130.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LlamacpuError

EXIT_OK, EXIT_GENERATION, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130

app = typer.Typer(
    name="llamacpu", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Run LLaMA-family language models fast on a CPU, with quantized weights.",
)

# ---- options shared by several commands: each default is written here, once ------------------

ModelArg = Annotated[Optional[str], typer.Argument(
    help="A GGUF file or a Hugging Face folder. Omitted: SmolLM2-135M-Instruct (fetched and "
         "converted to q8_0 on first use).", show_default=False)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 keeps all.")]
TopP = Annotated[float, typer.Option("--top-p", help="Keep the most likely tokens up to this probability mass, in (0, 1].")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than min-p times the top one, in [0, 1].")]
RepeatPenalty = Annotated[float, typer.Option(help="Penalise the last 64 tokens; 1 is off.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same text. Default: random.",
                                             show_default=False)]
System = Annotated[Optional[str], typer.Option(help="A system prompt.", show_default=False)]
Ctx = Annotated[int, typer.Option(help="Context size in tokens (capped at the model's).")]
Quant = Annotated[Optional[str], typer.Option(
    help="Quantize at load: q8_0, q4_0, q4_1, f16 or f32 (HF folders default to q8_0).", show_default=False)]
Threads = Annotated[Optional[int], typer.Option(help="Compute threads. Default: all cores.", show_default=False)]
AdaptiveThreadsOpt = Annotated[bool, typer.Option(
    "--adaptive-threads", help="Time decode steps and drop to 1 thread when that is faster (a busy machine).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Notices and speed on stderr (always on a terminal).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

TEMPERATURE, TOP_K, TOP_P, MIN_P, REPEAT_PENALTY = 0.8, 40, 0.95, 0.05, 1.0  # llama.cpp's defaults
CTX = 4096


# ---- plumbing -----------------------------------------------------------------------------------

def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def _info_line(message: str) -> None:
    """Stats for people: dim on a terminal, one plain line when stderr is a pipe."""
    if sys.stderr.isatty():
        _err_console().print(f"[dim]{message}[/]", markup=True, soft_wrap=True)
    else:
        _say(message)


def _say(message: str) -> None:
    """A notice on stderr (plain, one line)."""
    print(message, file=sys.stderr, flush=True)


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _fail(message: str, code: int = EXIT_USAGE):
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _guarded(fn: Callable) -> Callable:
    """Map exceptions to the CLI's exit codes, so commands behave the same under `main()` and
    under typer's own runner: LlamacpuError → 2, Ctrl-C → 130, anything else → 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _thread_limit(kwargs.get("threads")):
                return fn(*args, **kwargs)
        except LlamacpuError as e:
            _fail(str(e), EXIT_USAGE)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPT) from None
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise
        except Exception as e:  # a bug or a numerical failure: say what, keep the traceback for LLAMACPU_DEBUG
            if os.environ.get("LLAMACPU_DEBUG"):
                raise
            _fail(f"{type(e).__name__}: {e}", EXIT_GENERATION)
    return wrapper


def _thread_limit(threads: int | None):
    """--threads sets Numba's and the BLAS's pools once for the whole command (restored after).
    Out-of-range counts are left for `_open` to refuse with a clear message."""
    import numba
    from .threads import thread_limit
    if threads is None or not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        return contextlib.nullcontext()
    return thread_limit(threads)


def _open(model: str | None, *, quant: str | None = None, threads: int | None = None, dequantize: bool = False,
          adaptive_threads: bool = False):
    """Open MODEL, or the default model (telling the user if it must be fetched first)."""
    from .default_model import default_model
    from .runtime import open_model
    if threads is not None and threads < 1:
        raise LlamacpuError(f"--threads must be at least 1, got {threads}")
    if model is None:
        progress = _convert_progress_callback()
        try:
            path = default_model(notify=_say, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    else:
        path = Path(model)
    rt = open_model(path, quant=quant, threads=threads, dequantize=dequantize)
    if adaptive_threads:
        from .threads import AdaptiveThreads
        rt.model = AdaptiveThreads(rt.model)
    return rt


def _looks_like_model(arg: str) -> bool:
    """With one positional argument to `run`, is it MODEL (else PROMPT)?"""
    return Path(arg).exists() or arg.endswith(".gguf") or (os.sep in arg and not any(c.isspace() for c in arg))


def _read_stdin() -> str | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.read()


def _render_mapping(title: str, data: dict, as_json: bool) -> None:
    """A flat (or one-level nested) dict: JSON, a rich table on a terminal, or `key: value` lines."""
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
        return
    rows = [(k, _fmt(v)) for k, v in data.items()]
    if sys.stdout.isatty():
        table = Table(title=title, show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        Console(highlight=False).print(table)
    else:
        for k, v in rows:
            print(f"{k}: {v}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) or "-"
    return "-" if v is None else str(v)


def _speed_line(stats) -> str:
    return (f"{stats.completion_tokens} tokens ({stats.stop_reason}) · decode {stats.decode_tok_s:.1f} tok/s · "
            f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tok_s:.1f} tok/s")


def _context_size(rt, ctx: int) -> int:
    if ctx < 1:
        raise LlamacpuError(f"--ctx must be at least 1, got {ctx}")
    return min(ctx, rt.config.max_position_embeddings)


# ---- run ----------------------------------------------------------------------------------------

# Per-request settings a --jsonl line may carry, with their types.
REQUEST_KEYS = {
    "prompt": str, "system": str, "raw": bool, "max_tokens": int, "temperature": float, "top_k": int,
    "top_p": float, "min_p": float, "repeat_penalty": float, "seed": int, "stop": list, "id": object,
}


@app.command(epilog="Examples:\n\n"
                    "echo 'What is 12 times 7?' | llamacpu run --temperature 0\n\n"
                    "cat notes.txt | llamacpu run model.gguf 'Summarise this:' --max-tokens 200\n\n"
                    "llamacpu run --jsonl < requests.jsonl > results.jsonl")
@_guarded
def run(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Argument(
        help="The prompt. Piped stdin is appended after a blank line. With one argument that is "
             "not a path (or *.gguf), it is the prompt.", show_default=False)] = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = TEMPERATURE,
    top_k: TopK = TOP_K,
    top_p: TopP = TOP_P,
    min_p: MinP = MIN_P,
    repeat_penalty: RepeatPenalty = REPEAT_PENALTY,
    seed: Seed = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        help="Stop before this text (repeatable); it is not printed.", show_default=False)] = None,
    system: System = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    as_json: AsJson = False,
    jsonl: Annotated[bool, typer.Option(
        "--jsonl", help='Batch: each stdin line is {"prompt": ..., optional settings}; one result line each, in order.')] = False,
    ctx: Ctx = CTX,
    quant: Quant = None,
    threads: Threads = None,
    adaptive_threads: AdaptiveThreadsOpt = False,
    verbose: Verbose = False,
) -> None:
    """Generate text for one prompt (or a batch), for shells and scripts."""
    from .chat import encode_prompt
    from .sampling import check_repeat_penalty, make_sampler

    if prompt is None and model is not None and not _looks_like_model(model):
        model, prompt = None, model
    defaults = dict(system=system, raw=raw, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop or [])
    # Check settings before the (slow) model load, so a typo fails at once.
    make_sampler(temperature, top_k, top_p, min_p)
    check_repeat_penalty(repeat_penalty)
    if max_tokens < 0:
        raise LlamacpuError(f"--max-tokens must be >= 0, got {max_tokens}")
    if as_json and jsonl:
        raise LlamacpuError("--json and --jsonl cannot be combined")
    show_info = verbose or sys.stderr.isatty()

    if jsonl:
        if prompt is not None:
            raise LlamacpuError("--jsonl reads its prompts from stdin; give no PROMPT argument")
        if sys.stdin.isatty():
            raise LlamacpuError("--jsonl reads requests from stdin, which is a terminal")
        rt = _open(model, quant=quant, threads=threads, adaptive_threads=adaptive_threads)
        _notices(rt, show_info)
        for index, line in enumerate(sys.stdin):
            if not line.strip():
                continue
            print(json.dumps(_run_request(rt, line, index, defaults, ctx), ensure_ascii=False), flush=True)
        return

    piped = _read_stdin()
    if piped is not None and piped.strip():
        # `echo` and files end with a line break that is not part of the question: drop it, so that
        # `echo "x" | llamacpu run` and `llamacpu run "x"` send the same tokens.
        piped = piped.rstrip("\r\n")
        prompt = piped if prompt is None else f"{prompt}\n\n{piped}"
    if prompt is None:
        raise LlamacpuError("no prompt: give one as an argument or pipe it on stdin")
    if not prompt.strip():
        raise LlamacpuError("the prompt is empty")

    rt = _open(model, quant=quant, threads=threads, adaptive_threads=adaptive_threads)
    _notices(rt, show_info)
    ids = encode_prompt(rt.tokenizer, rt.template, prompt, system=system, raw=raw or rt.template is None)
    seed = seed if seed is not None else random.SystemRandom().randrange(2 ** 32)
    completion, pieces = _start(rt, ids, {**defaults, "seed": seed}, ctx)
    if as_json:
        for _ in pieces:
            pass
        print(json.dumps({**completion.to_dict(), "seed": seed, "load_seconds": round(rt.load_seconds, 3)},
                         ensure_ascii=False), flush=True)
    else:
        out = sys.stdout
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
        finally:
            # Whatever stopped us (even Ctrl-C), end the streamed text with a newline so it stays a clean line.
            if completion.text and not completion.text.endswith("\n"):
                out.write("\n")
            out.flush()
    if show_info:
        _info_line(f"{_speed_line(completion.stats)} · load {rt.load_seconds:.1f} s")


def _notices(rt, show: bool) -> None:
    if not show:
        return
    for n in rt.checkpoint.notices:
        _say(f"note: {n}")
    if rt.template is None:
        # A base model: wrapping the prompt is impossible, and sending it as is is what the user means.
        _say("note: the model has no chat template; prompts are sent as is (--raw)")


def _start(rt, ids: list[int], s: dict, ctx: int):
    """A Completion and the generator of its text pieces, for prompt `ids` and settings `s`."""
    import numpy as np

    from .generate import Completion, complete
    from .sampling import make_sampler
    sampler = make_sampler(s["temperature"], s["top_k"], s["top_p"], s["min_p"])
    # Size the cache to this request: the prompt plus its answer, within --ctx.
    limit = _context_size(rt, ctx)
    if len(ids) >= limit:
        raise LlamacpuError(f"the prompt has {len(ids)} tokens; the context holds {limit}")
    cache = rt.model.new_cache(min(limit, len(ids) + max(1, s["max_tokens"])))
    completion = Completion()
    pieces = complete(rt.model, rt.tokenizer, ids, cache=cache, sampler=sampler,
                      rng=np.random.default_rng(s["seed"]), max_tokens=s["max_tokens"], stop=s["stop"],
                      repeat_penalty=s["repeat_penalty"], result=completion)
    return completion, pieces


def _run_request(rt, line: str, index: int, defaults: dict, ctx: int) -> dict:
    """One --jsonl line → its result object, or an error object (the batch goes on)."""
    from .chat import encode_prompt
    head: dict[str, Any] = {"index": index}
    try:
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamacpuError(f"line {index + 1} is not JSON ({e.msg})") from None
        if not isinstance(req, dict):
            raise LlamacpuError(f"line {index + 1} is not a JSON object")
        if "id" in req:
            head["id"] = req["id"]
        s = _request_settings(req, defaults)
        ids = encode_prompt(rt.tokenizer, rt.template, s["prompt"], system=s["system"],
                            raw=s["raw"] or rt.template is None)
        if s["seed"] is None:
            # Unseeded requests still differ from each other; a seeded one is reproducible anywhere in a batch.
            s["seed"] = random.SystemRandom().randrange(2 ** 32)
        completion, pieces = _start(rt, ids, s, ctx)
        for _ in pieces:
            pass
        return {**head, **completion.to_dict(), "seed": s["seed"]}
    except LlamacpuError as e:
        return {**head, "error": _one_line(str(e))}
    except (ValueError, TypeError, ArithmeticError) as e:
        return {**head, "error": f"generation failed: {type(e).__name__}: {_one_line(str(e))}"}


def _request_settings(req: dict, defaults: dict) -> dict:
    from .sampling import check_repeat_penalty, check_settings
    unknown = sorted(set(req) - set(REQUEST_KEYS))
    if unknown:
        raise LlamacpuError(f"unknown request key {unknown[0]!r}; known: {', '.join(REQUEST_KEYS)}")
    if not isinstance(req.get("prompt"), str) or not req["prompt"].strip():
        raise LlamacpuError('a request needs a non-empty "prompt" string')
    s = {**defaults, **{k: v for k, v in req.items() if k != "id"}}
    if isinstance(s["stop"], str):
        s["stop"] = [s["stop"]]
    for key, kind in REQUEST_KEYS.items():
        v = s.get(key)
        if v is None or kind is object:
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


# ---- chat ---------------------------------------------------------------------------------------

CHAT_HELP = "/reset · /system TEXT · /save FILE · /load FILE · /stats · /exit (Ctrl-D)"


@app.command(epilog="Examples:\n\n"
                    "llamacpu chat\n\n"
                    "llamacpu chat model.gguf --system 'Answer briefly.'\n\n"
                    "printf 'I have a dog named Rex.\\nWhat is his name?\\n' | llamacpu chat --temperature 0")
@_guarded
def chat(
    model: ModelArg = None,
    system: System = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = TEMPERATURE,
    top_k: TopK = TOP_K,
    top_p: TopP = TOP_P,
    min_p: MinP = MIN_P,
    repeat_penalty: RepeatPenalty = REPEAT_PENALTY,
    seed: Seed = None,
    ctx: Ctx = CTX,
    quant: Quant = None,
    threads: Threads = None,
    adaptive_threads: AdaptiveThreadsOpt = False,
    verbose: Verbose = False,
) -> None:
    """Talk with a model over many turns; the KV cache is kept between turns.

    On a terminal: live answers and commands (/reset, /system, /save, /load, /stats, /exit).
    With stdin piped: one user turn per line, plain answers on stdout, one per line.
    """
    import numpy as np

    from .chat import ChatSession
    from .sampling import check_repeat_penalty, make_sampler
    sampler = make_sampler(temperature, top_k, top_p, min_p)
    check_repeat_penalty(repeat_penalty)
    if max_tokens < 1:
        raise LlamacpuError(f"--max-tokens must be >= 1, got {max_tokens}")
    interactive = sys.stdin.isatty()
    rt = _open(model, quant=quant, threads=threads, adaptive_threads=adaptive_threads)
    session = ChatSession(rt.model, rt.tokenizer, rt.template, sampler=sampler,
                          rng=np.random.default_rng(seed), max_seq=_context_size(rt, ctx),
                          max_tokens=max_tokens, system=system, repeat_penalty=repeat_penalty)
    _notices(rt, verbose or interactive)
    if interactive:
        _chat_terminal(session, rt)
    elif not _chat_pipe(session, verbose):
        raise typer.Exit(EXIT_USAGE)


def _chat_command(session, name: str, arg: str, show: Callable[[str], None], show_stats: Callable[[dict], None]) -> bool:
    """Run one /command; False means exit."""
    if name in ("exit", "quit", "bye"):
        return False
    if name == "reset":
        session.reset()
        show("conversation reset (system prompt kept)")
    elif name == "system":
        session.set_system(arg)
        show("system prompt set" if arg else "system prompt removed")
    elif name in ("save", "load"):
        if not arg:
            raise LlamacpuError(f"/{name} needs a FILE")
        getattr(session, name)(arg)
        show(f"{'saved to' if name == 'save' else 'loaded'} {arg}")
    elif name == "stats":
        show_stats(session.stats())
    elif name == "help":
        show(CHAT_HELP)
    else:
        raise LlamacpuError(f"unknown command /{name}; commands: {CHAT_HELP}")
    return True


def _chat_pipe(session, verbose: bool) -> bool:
    """Scripted chat: a line per user turn, a line per answer. Returns False if any line failed."""
    from .chat import Notice, parse_command
    ok = True
    for line in sys.stdin:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            command = parse_command(text)
            if command is not None:
                if not _chat_command(session, *command, show=_say,
                                     show_stats=lambda d: print(json.dumps(d), flush=True)):
                    break
                continue
            answer = ""
            for piece in session.say(text):
                if isinstance(piece, Notice):
                    _say(f"note: {piece.message}")
                    continue
                answer += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n" if not answer.endswith("\n") else "")
            sys.stdout.flush()
            if verbose:
                _info_line(_speed_line(session.last.generation))
        except LlamacpuError as e:
            print(f"error: {_one_line(str(e))}", file=sys.stderr, flush=True)
            ok = False
    return ok


def _chat_terminal(session, rt) -> None:
    from .chat import Notice, parse_command
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console(highlight=False)
    name = rt.checkpoint.source.name
    console.print(f"[bold]llamacpu chat[/] · {name} · context {session.cache.max_seq} · [dim]{CHAT_HELP}[/]")
    while True:
        try:
            text = console.input("[bold green]> [/]")
        except EOFError:  # Ctrl-D
            console.print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves
            console.print()
            raise
        if not text.strip():
            continue
        try:
            command = parse_command(text)
            if command is not None:
                if not _chat_command(session, *command, show=lambda m: console.print(f"[dim]{m}[/]"),
                                     show_stats=lambda d: _stats_table(console, d)):
                    return
                continue
            try:
                for piece in session.say(text):
                    if isinstance(piece, Notice):
                        console.print(f"[yellow]{piece.message}[/]")
                    else:
                        console.print(piece, end="", markup=False, soft_wrap=True)
            except KeyboardInterrupt:  # Ctrl-C during an answer: stop it, keep the session
                console.print("\n[yellow]stopped[/]", end="")
            console.print()
            console.print(f"[dim]{_speed_line(session.last.generation)}[/]")
        except LlamacpuError as e:
            console.print(f"[red]error:[/] {_one_line(str(e))}", markup=True)


def _stats_table(console: Console, stats: dict) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in stats.items():
        table.add_row(k.replace("_", " "), _fmt(v))
    console.print(table)


# ---- info, convert, bench, perplexity -----------------------------------------------------------

@app.command(epilog="Examples:\n\nllamacpu info model.gguf\n\nllamacpu info ./hf-folder --json")
@_guarded
def info(
    model: Annotated[str, typer.Argument(help="A GGUF file or a Hugging Face folder.")],
    as_json: AsJson = False,
) -> None:
    """Describe a model: architecture, sizes, formats per tensor kind, bits per weight, tokenizer."""
    from .info import describe
    _render_mapping(model, describe(model), as_json)


@app.command(epilog="Example:\n\nllamacpu convert ./SmolLM2-135M-Instruct -o smollm2.q4_0.gguf --quant q4_0")
@_guarded
def convert(
    src: Annotated[str, typer.Argument(help="A GGUF file or a Hugging Face folder.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The GGUF file to write.")],
    quant: Annotated[str, typer.Option(help="Target format: q8_0, q4_0, q4_1, f16 or f32.")] = "q8_0",
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate",
        help="q4_0/q4_1: weight the scale search by statistics of text the model samples itself "
             "(seeded); --no-calibrate estimates them from the weights alone (faster).")] = True,
    as_json: AsJson = False,
) -> None:
    """Write a model as a packed GGUF file in one quantized format."""
    from .convert import convert_model
    progress = _convert_progress_callback()
    try:
        report = convert_model(Path(src), Path(out), quant=quant, progress=progress, calibrate=calibrate)
    finally:
        if progress is not None:
            progress.close()
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(report).items()}
    _render_mapping(f"converted to {quant}", data, as_json)


class _ConvertProgress:
    """A rich progress bar on stderr for `convert_model`'s progress(done, total, name) calls."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=_err_console(), transient=True)
        self._task = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("converting", total=total)
        self._progress.update(self._task, completed=done, total=total, description=f"converting {name}")

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


def _convert_progress_callback():
    return _ConvertProgress() if sys.stderr.isatty() else None


@app.command(epilog="Example:\n\nllamacpu bench model.gguf --prompt-tokens 512 --gen-tokens 128 -r 5 --threads 2 --json")
@_guarded
def bench(
    model: ModelArg = None,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens to prefill.")] = 512,
    gen_tokens: Annotated[int, typer.Option(help="Tokens to decode.")] = 128,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Timed runs, after one warm-up.")] = 5,
    threads: Threads = None,
    quant: Quant = None,
    as_json: AsJson = False,
) -> None:
    """Measure prefill and decode speed (tokens per second, mean ± sd over the runs)."""
    from .bench import run_bench
    rt = _open(model, quant=quant, threads=threads)
    result = run_bench(rt, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats)
    data = result.to_dict()
    if not as_json:  # people read mean ± sd; JSON keeps every figure apart
        data = {"prefill tok/s": f"{result.prefill_tok_s:.2f} ± {result.prefill_tok_s_sd:.2f}",
                "decode tok/s": f"{result.decode_tok_s:.2f} ± {result.decode_tok_s_sd:.2f}",
                **{k: v for k, v in data.items() if not k.startswith(("prefill_tok_s", "decode_tok_s"))}}
    _render_mapping(f"bench {rt.checkpoint.source.name}", data, as_json)


@app.command(epilog="Example:\n\nllamacpu perplexity model.q4_0.gguf wiki.txt --ctx 512 --chunks 8 --reference model-f32.gguf")
@_guarded
def perplexity(
    model: Annotated[str, typer.Argument(help="A GGUF file or a Hugging Face folder.")],
    textfile: Annotated[Path, typer.Argument(help="A UTF-8 text file.", show_default=False)],
    ctx: Annotated[int, typer.Option(help="Tokens per chunk.")] = 512,
    chunks: Annotated[Optional[int], typer.Option(help="Use at most this many chunks. Default: all.",
                                                  show_default=False)] = None,
    reference: Annotated[Optional[str], typer.Option(
        help="A reference model (e.g. f32) for KL divergence and top-1 agreement.", show_default=False)] = None,
    quant: Quant = None,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Perplexity on a text, over non-overlapping chunks of --ctx tokens."""
    from .perplexity import perplexity as compute
    try:
        text = textfile.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlamacpuError(f"cannot read {textfile}: {getattr(e, 'strerror', None) or e}") from None
    rt = _open(model, quant=quant, threads=threads)
    # The reference runs the plain f32 path: it is the yardstick the quantized model is measured by.
    ref = _open(reference, threads=threads, dequantize=True) if reference else None
    bar = _ChunkProgress() if sys.stderr.isatty() else None
    try:
        result = compute(rt, text, ctx=ctx, chunks=chunks, reference=ref, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    _render_mapping(f"perplexity of {rt.checkpoint.source.name}", result.to_dict(), as_json)


class _ChunkProgress:
    """A rich progress bar on stderr for perplexity's progress(done, total) calls."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
        self._progress = Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  console=_err_console(), transient=True)
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("chunks", total=total)
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()


# ---- entry point --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The console script: run the app, map usage errors to one line and exit code 2."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="llamacpu", standalone_mode=False)
    except typer.TyperException as e:  # typer's (vendored click's) usage errors
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `llamacpu`: the help is the message
            print(message, file=sys.stderr)
            return EXIT_USAGE
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        print(f"error: {_one_line(message)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # The reader of our stdout went away (`| head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
