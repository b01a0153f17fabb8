"""Perplexity and KL of each activation width on prose, beside each weight format's own error:
the measurement behind `llamacpu.model.ACT_BITS_BY_FORMAT`.

    .venv/bin/python tools/act_width_quality.py [--chunks 4]

The reference is the shipped SmolLM2 Q4_1 weights in f32 (`dequantize=True`); the Q8_0 and Q4_0
files of tools/make_bench_models.py are llama.cpp's requantizations of them. For each file, its
f32 path (the weight format's error alone) and the integer kernels at 16 and 8 bits score the
same 512-token chunks of tests/data/prose/botchan.txt: perplexity, mean KL(reference || file)
per token, and top-1 agreement with the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from llamacpu.perplexity import _chunk_logprobs, chunk_ids, kl_per_position, top1_agrees  # noqa: E402
from llamacpu.runtime import open_model  # noqa: E402
from llamacpu.threads import thread_limit  # noqa: E402

MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROSE = ROOT / "tests" / "data" / "prose" / "botchan.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=FILE",
                    help="also score this GGUF of the same model (e.g. one `llamacpu convert` wrote)")
    args = ap.parse_args()
    from make_bench_models import ensure
    files = {"Q4_1": args.model, **ensure("135m", model=args.model)}
    for spec in args.also:
        name, _, path = spec.partition("=")
        files[name] = Path(path)
    text = PROSE.read_text(encoding="utf-8")
    with thread_limit(args.threads):
        ref = open_model(args.model, dequantize=True, threads=args.threads)
        chunks = chunk_ids(ref, text, 512)[:args.chunks]
        refs = [_chunk_logprobs(ref, c) for c in chunks]
        del ref
        n = sum(len(c) - 1 for c in chunks)
        print(f"reference: {args.model.name} in f32, {len(chunks)} chunks, {n} scored tokens")
        print(f"{'file':<6}{'path':>8}{'ppl':>10}{'KL':>10}{'top-1':>8}")
        for name, path in files.items():
            for mode in ("f32", 16, 8):
                rt = (open_model(path, dequantize=True, threads=args.threads) if mode == "f32"
                      else open_model(path, act_bits=mode, threads=args.threads))
                nll = kl = agree = 0.0
                for c, r in zip(chunks, refs):
                    lp = _chunk_logprobs(rt, c)
                    nll -= float(lp[np.arange(len(c) - 1), c[1:]].sum())
                    kl += float(kl_per_position(r, lp).sum())
                    agree += int(top1_agrees(r, lp).sum())
                label = "f32" if mode == "f32" else f"act {mode}"
                print(f"{name:<6}{label:>8}{np.exp(nll / n):>10.3f}{kl / n:>10.5f}{agree / n:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
