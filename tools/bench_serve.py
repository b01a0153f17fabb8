"""Aggregate decode throughput of `llamacpu serve` at 1, 2 and 4 concurrent streams.

Starts the server on a free port of 127.0.0.1, then for each concurrency N sends N streamed
completions at once (different counting prompts, so the model never stops early, each
`--tokens` long) and reports the generated tokens of all streams over the wall time, best of
`--repeat`. Prints one JSON line per N and the ratio to one stream.

    python tools/bench_serve.py --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

On a shared machine, compare within one run and prefer `--threads 1`: with 2 threads every
parallel region waits for a core that another process holds (see `llamacpu/threads.py`), which
swamps what batching changes. `--act-bits 8` runs the server with 8-bit activations.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["1, 2, 3, 4,", "10, 11, 12, 13,", "a, b, c, d,", "100, 200, 300, 400,"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--act-bits", type=int, default=None, help="the server's --act-bits (16 or 8)")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = (["--threads", str(args.threads)] if args.threads else []) + (
        ["--act-bits", str(args.act_bits)] if args.act_bits else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llamacpu.cli", "serve", args.model, "--port", str(port), *extra],
                            env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        one = None
        for n in (1, 2, 4):
            best = 0.0
            for _ in range(args.repeat + (1 if n == 1 else 0)):  # the first round also warms up
                best = max(best, _round(base, n, args.tokens))
            one = one or best
            print(json.dumps({"streams": n, "aggregate_tok_s": round(best, 1), "vs_one_stream": round(best / one, 2)}),
                  flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _round(base: str, n: int, tokens: int) -> float:
    counts = [0] * n

    def stream(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        counts[i] = usage["completion_tokens"]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
