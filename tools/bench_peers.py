"""Benchmark llamacpu against llama.cpp (llama-cpp-python) and transformers fp32, one after the other.

    python tools/bench_peers.py --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

For each format (default q8_0 and q4_0) the same GGUF file is run by llamacpu and by
llama.cpp, with the same thread count, prompt (seeded random ids) and greedy decode;
transformers runs once in fp32 (it dequantizes any GGUF). The GGUFs are made from --model
by `llamacpu.convert.convert_model` (or, if that is missing, llama.cpp's own quantizer) and
kept under .cache/models/bench/. Each engine runs --repeats times; the best run counts,
because this machine is shared and noisy. Needs the `bench` and `reference` extras.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".cache" / "models" / "bench"


def make_gguf(src: Path, fmt: str) -> Path:
    """A `fmt` copy of `src` under BENCH_DIR, made once."""
    out = BENCH_DIR / f"{src.stem.split('.')[0]}.{fmt}.gguf"
    if out.exists():
        return out
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    try:
        from llamacpu.convert import convert_model
    except ImportError:
        convert_model = None
    if convert_model is not None:
        convert_model(src, out, fmt)
        return out
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
                    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[fmt]
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {src} to {fmt}")
    return out


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def bench_llamacpu(path: Path, args) -> dict:
    from llamacpu.bench import run_bench
    from llamacpu.runtime import open_model
    rt = open_model(path, threads=args.threads)
    r = run_bench(rt, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repeats=args.repeats)
    out = {"prefill": r.prefill_tok_s, "decode": r.decode_tok_s, "load": r.load_seconds,
           "first": r.first_token_seconds, "rss": r.peak_rss_mb}
    del rt
    gc.collect()
    return out


def _llama_cpp_without_amx():
    """llama.cpp built natively here enables its AMX int8 path (the CPUID advertises AMX), but
    the VM does not grant AMX tile state and `tilezero` dies with SIGILL. Turning off ggml's
    "extra buffer types" (AMX, and also its weight repacking) avoids that; rebuilding with
    -DGGML_AMX_INT8=OFF would keep the repacking."""
    import llama_cpp
    import llama_cpp.llama as llama_module
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params


def bench_llama_cpp(path: Path, args) -> dict:
    import llama_cpp
    if args.no_llama_cpp_extra_bufts:
        _llama_cpp_without_amx()
    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=n_ctx, n_batch=args.prompt_tokens, n_ubatch=args.prompt_tokens, verbose=False)
    load = time.perf_counter() - t0
    vocab = llm.n_vocab()
    prompt = prompt_ids(vocab, args.prompt_tokens)
    best_p = best_d = float("inf")
    for _ in range(args.repeats):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_p = min(best_p, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            llm.eval([int(np.argmax(logits))])
        best_d = min(best_d, time.perf_counter() - t0)
    del llm
    gc.collect()
    return {"prefill": args.prompt_tokens / best_p, "decode": args.gen_tokens / best_d, "load": load}


def bench_transformers(path: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - t0
    prompt = torch.tensor([prompt_ids(model.config.vocab_size, args.prompt_tokens)])
    gen = args.hf_gen_tokens
    best_p = best_d = float("inf")
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            best_p = min(best_p, time.perf_counter() - t0)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(gen):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            best_d = min(best_d, time.perf_counter() - t0)
    del model
    gc.collect()
    return {"prefill": args.prompt_tokens / best_p, "decode": gen / best_d, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="source GGUF (or HF folder) to convert")
    ap.add_argument("--formats", default="q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--hf-gen-tokens", type=int, default=32, help="transformers decodes fewer (it is slow)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-llama-cpp-extra-bufts", action="store_true",
                    help="switch off llama.cpp's repack buffers: only for a native build that "
                         "enabled AMX, which SIGILLs here (`make` builds the peer without AMX)")
    ap.add_argument("--skip", default="", help="comma list of engines to skip: llamacpu,llama.cpp,transformers")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    formats = args.formats.split(",")
    files = {fmt: make_gguf(args.model, fmt) for fmt in formats}

    rows: list[tuple[str, str, dict]] = []
    for fmt in formats:
        if "llamacpu" not in skip:
            rows.append(("llamacpu", fmt, bench_llamacpu(files[fmt], args)))
            print(f"llamacpu {fmt}: {rows[-1][2]}", file=sys.stderr)
        if "llama.cpp" not in skip:
            rows.append(("llama.cpp", fmt, bench_llama_cpp(files[fmt], args)))
            print(f"llama.cpp {fmt}: {rows[-1][2]}", file=sys.stderr)
    hf = None
    if "transformers" not in skip:
        hf = bench_transformers(files[formats[0]], args)
        rows.append(("transformers", "fp32", hf))

    peer = {fmt: r for name, fmt, r in rows if name == "llama.cpp"}
    print(f"\nSmolLM2 bench: {args.threads} threads, prefill {args.prompt_tokens} tokens, "
          f"decode {args.gen_tokens} tokens (transformers {args.hf_gen_tokens}), best of {args.repeats}")
    head = f"{'engine':<13}{'format':<7}{'prefill t/s':>12}{'decode t/s':>11}{'pre/llama.cpp':>14}" \
           f"{'dec/llama.cpp':>14}{'pre/hf':>8}{'dec/hf':>8}{'load s':>8}"
    print(head)
    print("-" * len(head))
    for name, fmt, r in rows:
        p = peer.get(fmt)
        ratio = (lambda k: f"{r[k] / p[k]:.2f}x") if p else (lambda k: "-")
        hfr = (lambda k: f"{r[k] / hf[k]:.2f}x") if hf else (lambda k: "-")
        print(f"{name:<13}{fmt:<7}{r['prefill']:>12.1f}{r['decode']:>11.1f}{ratio('prefill'):>14}"
              f"{ratio('decode'):>14}{hfr('prefill'):>8}{hfr('decode'):>8}{r['load']:>8.2f}")
    for name, fmt, r in rows:
        if name == "llamacpu":
            print(f"llamacpu {fmt}: first token {r['first']:.2f} s after a {r['load']:.2f} s load, "
                  f"peak RSS {r['rss']:.0f} MB")


if __name__ == "__main__":
    main()
