"""Benchmark llamacpu against llama.cpp (llama-cpp-python) at the sizes people run.

    python tools/bench_peers.py [--sizes 135m,1b,7b] [--repeats 3] [--rounds 1] [--threads 2] [--transformers]

Sizes (files from tools/make_bench_models.py, made on first use under .cache/models/bench/,
every one quantized by llama.cpp's own quantizer, so both engines run the very same bytes):

    135m  SmolLM2-135M (real weights)   Q8_0, Q4_0   512-token prefill, 128-token decode
    1b    TinyLlama-1.1B shape (random) Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K
                                                     512-token prefill,  64-token decode
    7b    Llama-2-7B shape (random)     Q4_0         decode and memory: 16-token prompt, 64-token decode

Each engine runs each file in its own subprocess (so that its peak RSS is its own), with the
same thread count, prompt (seeded random ids) and greedy decode: one untimed warm-up, then
--repeats timed runs; the best run counts (a shared machine's noise only slows runs down),
and the spread (sample sd) is printed beside it. --rounds K runs each engine K times, alternating,
and pools the runs, so that a slow spell of a shared machine is less likely to hit one engine only. llama.cpp is timed around its `eval` calls.
The 1b and 7b rows also check llamacpu's peak RSS against file + KV cache + 300 MB.
--formats limits the run to some formats (e.g. --sizes 1b --formats Q4_K_M).
transformers fp32 (135m only, --transformers) is a third, slow reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# size → (formats, prompt tokens, decode tokens)
PLAN = {"135m": (("Q8_0", "Q4_0"), 512, 128), "1b": (("Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"), 512, 64),
        "7b": (("Q4_0",), 16, 64)}
RSS_MARGIN_MB = 300  # the 1b/7b target: peak RSS <= file + KV cache + this
RSS_SIZES = ("1b", "7b")


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _summary(prefill: list[float], decode: list[float]) -> dict:
    """tok/s runs → best, mean and sample sd of each."""
    out = {"prefill_runs": prefill, "decode_runs": decode}
    for kind, runs in (("prefill", prefill), ("decode", decode)):
        out[kind] = max(runs)
        out[f"{kind}_mean"] = statistics.fmean(runs)
        out[f"{kind}_sd"] = statistics.stdev(runs) if len(runs) > 1 else 0.0
    return out


# ---- workers: one engine, one file, in a fresh process; JSON on stdout ------------------------

def work_llamacpu(path: Path, args) -> dict:
    from llamacpu.bench import run_bench
    from llamacpu.runtime import open_model
    rt = open_model(path, threads=args.threads, act_bits=args.act_bits)
    r = run_bench(rt, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repeats=args.repeats)
    c = rt.config
    kv_mb = 2 * c.num_hidden_layers * (args.prompt_tokens + args.gen_tokens) * c.kv_dim * 4 / 2**20  # f32 K and V
    return {**_summary(list(r.prefill_runs), list(r.decode_runs)), "load": r.load_seconds,
            "first": r.first_token_seconds, "rss_mb": r.peak_rss_mb, "kv_mb": kv_mb, "act_bits": r.act_bits}


def work_llama_cpp(path: Path, args) -> dict:
    import llama_cpp
    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=n_ctx, n_batch=args.prompt_tokens, n_ubatch=args.prompt_tokens, verbose=False)
    load = time.perf_counter() - t0
    vocab = llm.n_vocab()
    prompt = prompt_ids(vocab, args.prompt_tokens)

    def one_run() -> tuple[float, float]:
        llm.reset()  # n_tokens = 0: the next eval drops every cached position first
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            llm.eval([int(np.argmax(logits))])
        return args.prompt_tokens / prefill, args.gen_tokens / (time.perf_counter() - t0)

    one_run()  # warm-up, as llama-bench does
    runs = [one_run() for _ in range(args.repeats)]
    return {**_summary([p for p, _ in runs], [d for _, d in runs]), "load": load, "rss_mb": peak_rss_mb()}


def work_transformers(path: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - t0
    prompt = torch.tensor([prompt_ids(model.config.vocab_size, args.prompt_tokens)])
    runs = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill = time.perf_counter() - t0
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.gen_tokens):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            runs.append((args.prompt_tokens / prefill, args.gen_tokens / (time.perf_counter() - t0)))
    return {**_summary([p for p, _ in runs], [d for _, d in runs]), "load": load, "rss_mb": peak_rss_mb()}


WORKERS = {"llamacpu": work_llamacpu, "llama.cpp": work_llama_cpp, "transformers": work_transformers}


def merge_rounds(rounds: list[dict]) -> dict:
    """One engine's rounds on one file → one row: the runs pooled (best, mean, sd over all of them),
    the highest peak RSS and the fastest load."""
    out = {**rounds[0], **_summary([p for r in rounds for p in r["prefill_runs"]],
                                   [d for r in rounds for d in r["decode_runs"]])}
    out["rss_mb"] = max(r["rss_mb"] for r in rounds)
    out["load"] = min(r["load"] for r in rounds)
    return out


def run_worker(engine: str, path: Path, prompt: int, gen: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--file", str(path), "--prompt-tokens", str(prompt),
           "--gen-tokens", str(gen), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.act_bits is not None:
        cmd += ["--act-bits", str(args.act_bits)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"{engine} on {path.name} failed (exit {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the machine and the peer, written beside every figure ------------------------------------

def cpu_line() -> str:
    from llama_cpp_build import cpu_flags, cpu_name
    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores ({', '.join(shown) or 'no AVX2'})"


def blas_line() -> str:
    core = os.environ.get("OPENBLAS_CORETYPE")
    return ("numpy's BLAS runs OpenBLAS's "
            + (f"OPENBLAS_CORETYPE={core} kernels (set in the environment)" if core else
               "auto-detected kernels (OPENBLAS_CORETYPE is not set)")
            + "; llamacpu uses it only for float (f32/f16) weights, not for these block-quantized files")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="the real SmolLM2 GGUF the 135m files are made from")
    ap.add_argument("--sizes", default="135m,1b,7b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engines this many times each, alternating, and pool the runs: on a noisy "
                         "machine, a slow spell then hits both engines rather than one")
    ap.add_argument("--skip", default="", help="comma list of engines to skip: llamacpu,llama.cpp")
    ap.add_argument("--formats", default="", help="comma list of formats to run (default: every one of a size)")
    ap.add_argument("--transformers", action="store_true", help="also run transformers fp32 (135m only; slow)")
    ap.add_argument("--json", type=Path, help="also write every row to this JSON file")
    ap.add_argument("--act-bits", type=int, choices=(8, 16),
                    help="llamacpu's activation width (default: its choice per weight format)")
    # worker mode (internal): one engine on one file
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gen-tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.file, args)))
        return

    import llama_cpp
    from llama_cpp_build import describe
    from make_bench_models import ensure
    sizes = args.sizes.split(",")
    for size in sizes:
        if size not in PLAN:
            sys.exit(f"unknown size {size!r} (choose from {', '.join(PLAN)})")
    skip = set(filter(None, args.skip.split(",")))
    engines = [e for e in ("llamacpu", "llama.cpp") if e not in skip]

    rows = []
    for size in sizes:
        formats, prompt, gen = PLAN[size]
        files = ensure(size, model=args.model)
        wanted = set(filter(None, args.formats.split(",")))
        for fmt in [f for f in formats if not wanted or f in wanted]:
            rounds = {e: [] for e in engines}
            for _ in range(args.rounds):
                for engine in engines:
                    rounds[engine].append(run_worker(engine, files[fmt], prompt, gen, args))
            for engine in engines:
                r = merge_rounds(rounds[engine])
                r.update(size=size, fmt=fmt, engine=engine, prompt=prompt, gen=gen,
                         file_mb=files[fmt].stat().st_size / 2**20)
                rows.append(r)
                print(f"{size} {fmt} {engine}: {json.dumps({k: round(v, 2) for k, v in r.items() if isinstance(v, float)})}",
                      file=sys.stderr, flush=True)
        if size == "135m" and args.transformers:
            r = run_worker("transformers", files[formats[0]], prompt, 32, args)
            rows.append({**r, "size": size, "fmt": "f32", "engine": "transformers", "prompt": prompt, "gen": 32,
                         "file_mb": 0.0})

    print()
    print(cpu_line())
    print(describe() + "; " + llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip())
    print(blas_line())
    runs = f"{args.repeats} runs" if args.rounds == 1 else \
        f"{args.rounds} alternating rounds of {args.repeats} runs"
    print(f"{args.threads} threads, best of {runs} after a warm-up each (± sample sd of the runs); "
          f"ratios are llamacpu / llama.cpp on the same file; aN: llamacpu's N-bit activations")
    head = (f"{'size':<5}{'format':<8}{'engine':<13}{'prompt':>7}{'prefill t/s':>17}{'decode t/s':>16}"
            f"{'pre ratio':>10}{'dec ratio':>10}{'peak RSS MB':>12}{'file MB':>9}{'load s':>8}")
    print(head)
    print("-" * len(head))
    peer = {(r["size"], r["fmt"]): r for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        p = peer.get((r["size"], r["fmt"]))
        ratio = (lambda k: f"{r[k] / p[k]:.2f}x") if p and r["engine"] != "llama.cpp" else (lambda k: "")
        has_prefill = r["prompt"] >= 64
        pre = f"{r['prefill']:.1f} ±{r['prefill_sd']:.1f}" if has_prefill else "-"
        dec = f"{r['decode']:.1f} ±{r['decode_sd']:.1f}"
        engine = r["engine"] + (f" a{r['act_bits']}" if "act_bits" in r else "")
        print(f"{r['size']:<5}{r['fmt']:<8}{engine:<13}{r['prompt']:>7}{pre:>17}{dec:>16}"
              f"{ratio('prefill') if has_prefill else '':>10}{ratio('decode'):>10}"
              f"{r['rss_mb']:>12.0f}{r['file_mb']:>9.0f}{r['load']:>8.2f}")
    for r in rows:
        if r["engine"] == "llamacpu" and r["size"] in RSS_SIZES:
            budget = r["file_mb"] + r["kv_mb"] + RSS_MARGIN_MB
            verdict = "within" if r["rss_mb"] <= budget else "OVER"
            print(f"llamacpu {r['size']} {r['fmt']}: peak RSS {r['rss_mb']:.0f} MB {verdict} file {r['file_mb']:.0f} "
                  f"+ KV {r['kv_mb']:.0f} + {RSS_MARGIN_MB} = {budget:.0f} MB")
    print("(prefill is not reported for prompts under 64 tokens: the 7b row measures decode and memory)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "peer": describe(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
