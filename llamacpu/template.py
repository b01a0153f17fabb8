"""Chat templates: a model's Jinja template turning messages into one prompt string.

Rendered the way Hugging Face transformers' `apply_chat_template(..., tokenize=False)` does:
a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the loop-control extension,
a `{% generation %}` block tag, `raise_exception`, `strftime_now`, a non-escaping `tojson`, and
`bos_token`/`eos_token` as variables. The rendered prompt keeps special tokens as text; encode
it with `Tokenizer.encode(prompt, add_bos=False, parse_special=True)`.
"""

from __future__ import annotations

import functools
import json
import re
import resource
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.runtime
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LlamacpuError, reason
from .tokenizer import read_text_file


class HostileTemplateError(LlamacpuError):
    """A template refused for what it would cost (depth, time, memory), not for a mistake in it."""


class ChatTemplate:
    """A compiled chat template. `source` is the Jinja text (for writing into a GGUF)."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self._special = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise LlamacpuError(f"malformed chat template (line {e.lineno}: {_one_line(e.message)})") from None
        except (RecursionError, MemoryError):  # e.g. 20000 nested parentheses
            raise HostileTemplateError("chat template refused: nested too deeply to compile") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tokenizer) -> "ChatTemplate | None":
        """The template in GGUF key `tokenizer.chat_template`, or None if the file has none."""
        source = meta.get("tokenizer.chat_template")
        if not source:
            return None
        return cls(str(source), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    @classmethod
    def from_hf_dir(cls, path: str | Path, tokenizer) -> "ChatTemplate | None":
        """The template of an HF model directory: `chat_template.jinja`, else `chat_template` in
        `tokenizer_config.json` (a string, or a list of named templates: the one named "default").
        None if the directory has no template."""
        source = _hf_template_source(Path(path))
        if source is None:
            return None
        return cls(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}, ...]); with
        add_generation_prompt, ending with the header of the assistant's turn.

        A template is a program from a downloaded file: rendering is bounded in output size,
        in the size of any string or list it builds, and in the number of template lines run.
        """
        budget = _Budget(_input_size(messages))
        try:
            with budget:
                out = []
                size = 0
                for chunk in self._template.generate(
                        messages=messages, tools=None, documents=None,
                        add_generation_prompt=add_generation_prompt, **self._special):
                    size += len(chunk)
                    if size > budget.max_chars:
                        raise _TooBig(f"its output exceeds {budget.max_chars} characters")
                    out.append(chunk)
                return "".join(out)
        except _TooBig as e:
            raise HostileTemplateError(f"chat template refused: {e}") from None
        except jinja2.TemplateError as e:  # raise_exception(...), sandbox violations, bad filters
            raise LlamacpuError(f"chat template error: {_one_line(e.message) or 'invalid template'}") from None
        except RecursionError:
            raise HostileTemplateError("chat template refused: it recurses too deeply") from None
        except MemoryError:
            raise HostileTemplateError("chat template refused: it needs too much memory") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
            # a template tripping on data
            raise LlamacpuError(f"chat template error: {reason(e)}") from None


# Limits on one rendering. Real chat templates render a conversation in a few thousand template
# lines and produce little more text than the messages hold; these bounds are far above that.
MAX_TEMPLATE_LINES = 2_000_000  # template lines executed (bounds nested loops: ~1 s of work)
MAX_TEMPLATE_CHARS = 1 << 20  # characters of output or of any built string, beyond the input's own size
MAX_TEMPLATE_MEMORY = 512 << 20  # growth of the process's peak memory while rendering, bytes


class _TooBig(Exception):
    pass


def _one_line(text) -> str:
    return " ".join(str(text or "").split())


def _input_size(value, depth: int = 0) -> int:
    """Characters in the messages (strings in nested dicts/lists), which the output may repeat."""
    if isinstance(value, str):
        return len(value)
    if depth > 20:
        return 0
    if isinstance(value, dict):
        return sum(_input_size(k, depth + 1) + _input_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_input_size(v, depth + 1) for v in value)
    return 0


class _Budget:
    """Counts the template's own lines as they run (a trace function on the compiled template's
    frames only) and stops the rendering when it runs too long; `check` bounds built values."""

    _local = threading.local()  # the budget of the rendering running in this thread, if any

    def __init__(self, input_chars: int):
        self.max_chars = MAX_TEMPLATE_CHARS + 4 * input_chars
        self.lines = 0
        self.peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def __enter__(self):
        self._previous = sys.gettrace()
        self._outer = _Budget.active()
        _Budget._local.active = self
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)
        _Budget._local.active = self._outer
        return False

    def _call(self, frame, event, arg):
        # Only frames of compiled templates ("<template>") are traced line by line.
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines > MAX_TEMPLATE_LINES:
                raise _TooBig(f"it runs more than {MAX_TEMPLATE_LINES} template steps")
            # Many values each under the size limit can still add up: watch the process's peak memory.
            if self.lines % 64 == 0:
                grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.peak_kb  # KiB on Linux
                if grown > MAX_TEMPLATE_MEMORY >> 10:
                    raise _TooBig(f"it holds more than {MAX_TEMPLATE_MEMORY >> 20} MB")
        return self._line

    @staticmethod
    def active() -> "_Budget | None":
        return getattr(_Budget._local, "active", None)

    @staticmethod
    def limit() -> int:
        budget = _Budget.active()
        return budget.max_chars if budget is not None else MAX_TEMPLATE_CHARS

    @staticmethod
    def check(value):
        if isinstance(value, (str, list, tuple, dict, range)) and len(value) > _Budget.limit():
            raise _TooBig(f"it builds a value of more than {_Budget.limit()} items")
        return value


# Filters and str methods whose arguments size their result (a width, a count, a format).
_SIZED = frozenset({"do_center", "do_indent", "do_wordwrap", "do_format", "do_replace", "center", "ljust",
                    "rjust", "zfill", "expandtabs", "format", "format_map", "replace"})
_WIDTH = re.compile(r"\d{7,}")  # a width or precision of millions in a format string


def _check_sized_call(name: str, args, kwargs) -> None:
    """Refuse, before the call, a sizing argument that would build a huge value at once."""
    if name not in _SIZED:
        return
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _Budget.limit():
            raise _TooBig(f"it asks for a size of {v}")
    if name in ("do_format", "format", "format_map") and args and isinstance(args[0], str) and _WIDTH.search(args[0]):
        raise _TooBig("it formats with a width of millions")
    if name in ("do_replace", "replace") and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        text, old, new = args[:3]  # each occurrence of `old` grows the text by len(new) - len(old)
        if old and len(text) + text.count(old) * max(0, len(new) - len(old)) > _Budget.limit():
            raise _TooBig("a replace would build a huge string")


def _bounded(fn):
    """A filter whose sizing arguments and result are checked."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # pass_environment/pass_context filters get that object first; the value comes next.
        plain = [a for a in args if not isinstance(a, (jinja2.Environment, jinja2.runtime.Context,
                                                          jinja2.nodes.EvalContext))]
        _check_sized_call(fn.__name__, plain, kwargs)
        return _Budget.check(fn(*args, **kwargs))
    return wrapper


class _Environment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with `*`, `**` and `~` checked so one step cannot build a huge value."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        # Methods of strings and lists (`'x'.ljust(n)`, `'{:>n}'.format(...)`) size their result
        # from their arguments: check those first, then the result.
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list, tuple, dict)):
            _check_sized_call(getattr(__obj, "__name__", ""), (owner, *args), kwargs)
        return _Budget.check(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _WIDTH.search(value.__self__):
            def refuse(*args, **kwargs):
                raise _TooBig("it formats with a width of millions")
            return refuse
        return wrapped

    def call_binop(self, context, operator, left, right):
        if _Budget.active() is None:  # compile-time constant folding: leave it to the (bounded) render
            raise jinja2.nodes.Impossible()
        if operator == "%" and isinstance(left, str) and _WIDTH.search(left):
            raise _TooBig("it formats with a width of millions")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _Budget.check(range(max(0, len(seq) * n)))
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 4096:
            raise _TooBig("it raises a number to a power above 4096")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _Budget.check(range(len(left) + len(right)))
        return _Budget.check(super().call_binop(context, operator, left, right))


class _CheckedCodeGenerator(jinja2.compiler.CodeGenerator):
    """`a ~ b` compiles to a join that no sandbox hook sees: route its result through the size check."""

    def visit_Concat(self, node, frame):
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it;
    for rendering it is a no-op wrapper around its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from downloaded files: the sandbox keeps them from touching Python internals.
    env = _Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.code_generator_class = _CheckedCodeGenerator
    env.checked = _Budget.check
    for name, fn in list(env.filters.items()):
        env.filters[name] = _bounded(fn)
    env.filters["tojson"] = _bounded(_tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _hf_template_source(path: Path) -> str | None:
    if not path.is_dir():
        raise LlamacpuError(f"{path}: not a directory")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return read_text_file(jinja_file)
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(read_text_file(config_file))
    except (json.JSONDecodeError, RecursionError) as e:
        raise LlamacpuError(f"{config_file}: invalid JSON ({_one_line(e) or 'nested too deeply'})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise LlamacpuError(f"{config_file}: chat_template list has no 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise LlamacpuError(f"{config_file}: chat_template is neither a string nor a list of named templates")
    return template or None
