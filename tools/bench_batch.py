"""Rows per second of `run --jsonl` (one process) and `batch` on a local Ray with 1 and 2 workers.

    python tools/bench_batch.py --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf --rows 48 --max-tokens 32

Every run gets the same greedy requests; wall time is measured around the whole command, so it
includes Python start, Ray start and model loads. The outputs are checked to agree row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_cpp_build import cpu_name  # tools/ is on the path when run as a script

PROMPTS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Say hello politely.",
           "Name a fruit and describe it.", "What is the sun?", "Count to ten.", "Name a planet and a moon."]


def llamacpu() -> list[str]:
    exe = Path(sys.executable).with_name("llamacpu")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llamacpu.cli"]


def timed(cmd: list[str], stdin: str | None = None) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return seconds, r.stdout, r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    lines = [json.dumps({"id": i, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                         "temperature": 0}) for i in range(args.rows)]
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in.jsonl"
        inp.write_text(text)
        results = []
        seconds, out, _ = timed(llamacpu() + ["run", args.model, "--jsonl"], stdin=text)
        reference = [json.loads(x)["token_ids"] for x in out.splitlines()]
        results.append(("run --jsonl (1 process, 2 threads)", seconds, sum(map(len, reference))))
        for workers in (1, 2):
            out_path = Path(tmp) / f"out{workers}.jsonl"
            seconds, _, err = timed(llamacpu() + ["batch", str(inp), "-o", str(out_path), "--model", args.model,
                                                  "--workers", str(workers), "--threads", "1"])
            got = [json.loads(x)["token_ids"] for x in out_path.read_text().splitlines()]
            assert got == reference, f"batch --workers {workers} differs from run --jsonl"
            results.append((f"batch --workers {workers} --threads 1", seconds, sum(map(len, got))))
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; {args.rows} rows × up to {args.max_tokens} tokens, greedy")
    print(f"{'command':40} {'seconds':>8} {'rows/s':>7} {'tok/s':>7}")
    for name, seconds, tokens in results:
        print(f"{name:40} {seconds:8.1f} {args.rows / seconds:7.2f} {tokens / seconds:7.1f}")


if __name__ == "__main__":
    main()
