"""Chat templates: a model's Jinja template turning messages into one prompt string.

Rendered the way Hugging Face transformers' `apply_chat_template(..., tokenize=False)` does:
a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the loop-control extension,
a `{% generation %}` block tag, `raise_exception`, `strftime_now`, a non-escaping `tojson`, and
`bos_token`/`eos_token` as variables. The rendered prompt keeps special tokens as text; encode
it with `Tokenizer.encode(prompt, add_bos=False, parse_special=True)`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LlamacpuError


class ChatTemplate:
    """A compiled chat template. `source` is the Jinja text (for writing into a GGUF)."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self._special = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise LlamacpuError(f"malformed chat template (line {e.lineno}: {e.message})") from None

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
        add_generation_prompt, ending with the header of the assistant's turn."""
        try:
            return self._template.render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self._special)
        except jinja2.TemplateError as e:  # raise_exception(...), sandbox violations, bad filters
            raise LlamacpuError(f"chat template error: {e.message or type(e).__name__}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # a template tripping on data
            raise LlamacpuError(f"chat template error: {type(e).__name__}: {e}") from None


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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _hf_template_source(path: Path) -> str | None:
    if not path.is_dir():
        raise LlamacpuError(f"{path}: not a directory")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamacpuError(f"{config_file}: invalid JSON ({e})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise LlamacpuError(f"{config_file}: chat_template list has no 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise LlamacpuError(f"{config_file}: chat_template is neither a string nor a list of named templates")
    return template or None
