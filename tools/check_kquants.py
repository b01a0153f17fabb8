"""Check llamacpu's K-quant files against llama.cpp's (llama-cpp-python, a bench extra).

Default mode (--quality): from one f32 file, made by `llamacpu convert --quant f32` from the
pinned SmolLM2 (whose shipped weights are Q4_1: their exact dequantization *is* this f32
model), write q4_k_m, q5_k_m, q6_k and q4_0 twice, with llamacpu's converter and with
llama.cpp's `llama_model_quantize`, and score every file by perplexity on the prose in
tests/data/prose (chunks of --ctx tokens, each from a fresh context, chunked by
`llamacpu.perplexity`): through llama.cpp (the same tokens, llama.cpp's own logits), and our
files also through llamacpu's f32 path (every weight dequantized), so the two engines' scores
of the same file can be compared. Also prints sizes, and which tensors' formats differ
between our file and llama.cpp's of the same mixture (there should be none).

    .venv/bin/python tools/check_kquants.py [--chunks 4] [--ctx 512] [--no-calibrate]

--mixtures: write tests/data/kquant_mixtures.json, the tensor types llama.cpp's quantizer picks
for q4_k_m / q5_k_m / q6_k on SmolLM2 (rows of 576: fallbacks) and on the bench model at the
TinyLlama-1.1B shape (rows of 2048, an untied output head), which tests/test_convert.py
compares `convert.tensor_format` against.

    .venv/bin/python tools/check_kquants.py --mixtures
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamacpu.convert import convert_model  # noqa: E402
from llamacpu.fetch import SMOLLM2, fetch  # noqa: E402
from llamacpu.perplexity import perplexity  # noqa: E402
from llamacpu.runtime import open_model  # noqa: E402
from llama_cpp_quantize import llama_cpp_quantize  # noqa: E402  (tools/ is on the path when run as a script)

PROSE = ROOT / "tests" / "data" / "prose" / "botchan.txt"
MIXTURES = ROOT / "tests" / "data" / "kquant_mixtures.json"
BENCH_1B = ROOT / ".cache" / "models" / "bench" / "tinyllama-1.1b-shape.Q4_0.gguf"
QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q4_0")  # llama.cpp's names, lower case


def tensor_types(path: Path) -> dict[str, tuple[str, list[int]]]:
    """GGUF tensor name → (ggml type name, lower case; shape, fastest dim first), read by gguf-py."""
    import gguf

    return {t.name: (t.tensor_type.name.lower(), [int(n) for n in t.shape]) for t in gguf.GGUFReader(str(path)).tensors}


class LlamaCppRuntime:
    """Enough of a llamacpu Runtime for `perplexity`: our tokenizer and config, llama.cpp's logits."""

    def __init__(self, path: Path, like):
        import llama_cpp

        self.tokenizer, self.config = like.tokenizer, like.config
        self.model = self
        self.llm = llama_cpp.Llama(str(path), n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False)

    def new_cache(self, max_seq=None):
        self.llm.reset()
        return None

    def forward(self, tokens, cache, *, all_logits=False):
        self.llm.eval([int(t) for t in tokens])
        scores = np.array(self.llm.scores[:self.llm.n_tokens], dtype=np.float32)
        return scores if all_logits else scores[-1]


def check_quality(args) -> int:
    text = PROSE.read_text(encoding="utf-8")
    work = args.workdir
    f32 = work / "smollm2.f32.gguf"
    if not f32.exists():
        convert_model(args.model, f32, "f32")
    ref = open_model(f32, dequantize=True)
    files = {}
    for quant in QUANTS:
        ours = work / f"smollm2.{quant}.llamacpu{'' if args.calibrate else '.nocalib'}.gguf"
        r = convert_model(f32, ours, quant, calibrate=args.calibrate)
        print(f"llamacpu  {quant:7s} {r.seconds:6.1f} s  {r.bytes_written:>11,d} B  importance {r.importance}  "
              f"{r.formats}", flush=True)
        theirs = work / f"smollm2.{quant}.llama-cpp.gguf"
        s = llama_cpp_quantize(f32, theirs, quant) if args.redo or not theirs.exists() else 0.0
        print(f"llama.cpp {quant:7s} {s:6.1f} s  {theirs.stat().st_size:>11,d} B", flush=True)
        if quant != "q4_0":
            a, b = tensor_types(ours), tensor_types(theirs)
            diff = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b.get(n, ("?",))[0]}
            print(f"          tensor types differing from llama.cpp's: {diff or 'none'}", flush=True)
        files[quant] = (ours, theirs)

    def score(rt):
        return perplexity(rt, text, ctx=args.ctx, chunks=args.chunks)

    base_ours = score(ref)
    base_cpp = score(LlamaCppRuntime(f32, ref))
    print(f"\nperplexity on {PROSE.name}, {base_ours.chunks} chunks of {base_ours.ctx} tokens "
          f"({base_ours.tokens} scored); f32 = SmolLM2's shipped Q4_1 weights dequantized")
    print(f"{'file':26s} {'bytes':>12s} {'ppl (llama.cpp)':>16s} {'vs f32':>8s} {'ppl (llamacpu f32 path)':>24s} "
          f"{'vs f32':>8s}")
    print(f"{'f32':26s} {f32.stat().st_size:>12,d} {base_cpp.ppl:16.3f} {0:+7.2f}% {base_ours.ppl:24.3f} {0:+7.2f}%")
    for quant, (ours, theirs) in files.items():
        cpp_ours = score(LlamaCppRuntime(ours, ref))
        ours_ours = score(open_model(ours, dequantize=True))
        cpp_theirs = score(LlamaCppRuntime(theirs, ref))
        ours_theirs = score(open_model(theirs, dequantize=True))
        for name, path, cpp, f32_path in ((f"{quant} (llamacpu)", ours, cpp_ours, ours_ours),
                                          (f"{quant} (llama.cpp)", theirs, cpp_theirs, ours_theirs)):
            print(f"{name:26s} {path.stat().st_size:>12,d} {cpp.ppl:16.3f} {100 * (cpp.ppl / base_cpp.ppl - 1):+7.2f}% "
                  f"{f32_path.ppl:24.3f} {100 * (f32_path.ppl / base_ours.ppl - 1):+7.2f}%", flush=True)
    return 0


def write_mixtures(args) -> int:
    work = args.workdir
    f32 = work / "smollm2.f32.gguf"
    if not f32.exists():
        convert_model(args.model, f32, "f32")
    sources = {"smollm2-135m": (f32, False), "tinyllama-1.1b-shape": (BENCH_1B, True)}
    data = {"command": "tools/check_kquants.py --mixtures",
            "source": "llama.cpp's llama_model_quantize (llama-cpp-python " + _version() + "), default params",
            "models": {}}
    for name, (src, requantize) in sources.items():
        entry = {"types": {}}
        for quant in ("q4_k_m", "q5_k_m", "q6_k"):
            out = work / f"{name}.{quant}.mixture.gguf"
            llama_cpp_quantize(src, out, quant, requantize=requantize)
            types = tensor_types(out)
            entry["shapes"] = {n: s for n, (_, s) in types.items()}
            entry["types"][quant] = {n: t for n, (t, _) in types.items()}
            out.unlink()
            print(f"{name} {quant}: {sorted(set(entry['types'][quant].values()))}", flush=True)
        data["models"][name] = entry
    MIXTURES.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {MIXTURES}")
    return 0


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="source model (default: the pinned SmolLM2)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "check_kquants")
    ap.add_argument("--chunks", type=int, default=4, help="perplexity chunks")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity chunk length")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="our files with the weights-only importance instead of self-calibration")
    ap.add_argument("--mixtures", action="store_true", help="write tests/data/kquant_mixtures.json")
    ap.add_argument("--redo", action="store_true", help="remake llama.cpp's files even if they exist in --workdir")
    args = ap.parse_args()
    if args.model is None:
        args.model = fetch(SMOLLM2, ROOT / ".cache" / "models")
    args.workdir.mkdir(parents=True, exist_ok=True)
    return write_mixtures(args) if args.mixtures else check_quality(args)


if __name__ == "__main__":
    raise SystemExit(main())
