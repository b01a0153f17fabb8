"""Check llamacpu's converter against llama.cpp (llama-cpp-python, a bench extra).

Default mode: convert SmolLM2 to q8_0 with `llamacpu.convert`, load the result in llama.cpp,
run the same chat prompt (the same token ids) greedily in both, and compare the tokens.
Exit code 0 when they agree, 1 when they differ. Both engines round activations to 8 bits
(differently), so a greedy choice between two tokens whose logits either engine sees within
NEAR_TIE can go either way: a first difference there is reported, with both gaps, and not
counted as a failure. Any other difference is.

    .venv/bin/python tools/check_llamacpp.py [--model M] [--tokens 32] [--prompt TEXT]

--quality: convert to f32, q8_0, q4_0 and q4_1 with our quantizers (q4_0 twice: self-calibrated,
the default, and with the weights-only importance of `convert_model(..., calibrate=False)`), let
llama.cpp make its own Q4_0 from our f32 file (`llama_model_quantize`), and compare them all by
perplexity on the prose in tests/data/prose, every file run through llamacpu's model and
tokenizer, with KL and top-1 agreement against the f32 file. The prose is used for evaluation
only: self-calibration samples its own text from the model.

    .venv/bin/python tools/check_llamacpp.py --quality [--chunks 4] [--ctx 512]

`make` builds the llama.cpp peer natively (GGML_NATIVE=ON), leaving out AMX where the CPU reports
it (tile instructions raise SIGILL in this sandbox; see tools/llama_cpp_build.py), so the default
repacking is safe. Only for a build that kept AMX, --no-extra-bufts switches off llama.cpp's
weight repacking ("extra buffer types"); repacking changes speed, not results.
"""

from __future__ import annotations

import argparse
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

PROMPT = "Explain in three sentences why the sky is blue."
PROSE = ROOT / "tests" / "data" / "prose" / "botchan.txt"


def load_llama_cpp(path: Path, *, n_ctx: int, extra_bufts: bool):
    import llama_cpp
    import llama_cpp.llama_cpp as C

    default_params = C.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = extra_bufts
        return p

    C.llama_model_default_params = params  # Llama() reads its model params from this function
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False)
    finally:
        C.llama_model_default_params = default_params


NEAR_TIE = 0.1  # logits: a top-2 gap this small can flip under either engine's 8-bit activation rounding


def greedy_llamacpu(runtime, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens from llamacpu's cached decode, with the logits each was picked from."""
    model = runtime.model
    cache = model.new_cache(len(ids) + n)
    logits = model.forward(np.asarray(ids), cache)
    out, seen = [], []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        seen.append(logits)
        if t in runtime.tokenizer.stop_ids:
            break
        logits = model.forward(np.asarray([t]), cache)
    return out, seen


def greedy_llama_cpp(llm, ids: list[int], n: int, stop_ids) -> tuple[list[int], list[np.ndarray]]:
    llm.reset()
    llm.eval(ids)
    out, seen = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        t = int(np.argmax(logits))
        out.append(t)
        seen.append(logits)
        if t in stop_ids:
            break
        llm.eval([t])
    return out, seen


def check_tokens(args) -> int:
    out = args.workdir / "smollm2.q8_0.gguf"
    report = convert_model(args.model, out, "q8_0")
    print(f"converted {args.model.name} → {out} ({report.bytes_written / 1e6:.1f} MB, {report.seconds:.1f} s)")
    rt = open_model(out)
    prompt = rt.template.render([{"role": "user", "content": args.prompt}])
    ids = rt.tokenizer.encode(prompt)
    llm = load_llama_cpp(out, n_ctx=len(ids) + args.tokens, extra_bufts=not args.no_extra_bufts)
    theirs_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=rt.tokenizer.add_bos, special=True)
    print(f"prompt: {len(ids)} tokens; llama.cpp tokenizes it {'identically' if theirs_ids == ids else 'DIFFERENTLY'}")
    ours, ours_logits = greedy_llamacpu(rt, ids, args.tokens)
    theirs, theirs_logits = greedy_llama_cpp(llm, ids, args.tokens, rt.tokenizer.stop_ids)
    print(f"llamacpu : {ours}\n           {rt.tokenizer.decode(ours, continuation=True)!r}")
    print(f"llama.cpp: {theirs}\n           {rt.tokenizer.decode(theirs, continuation=True)!r}")
    if ours == theirs:
        print(f"OK: {len(ours)} greedy tokens identical")
        return 0
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    if i == min(len(ours), len(theirs)):
        print(f"MISMATCH: one engine stopped after {i} tokens")
        return 1
    a, b = ours[i], theirs[i]
    gap_ours = float(ours_logits[i][a] - ours_logits[i][b])
    gap_theirs = float(theirs_logits[i][b] - theirs_logits[i][a])
    print(f"first difference at generated token {i}: llamacpu {a} (leads by {gap_ours:.3f} logits), "
          f"llama.cpp {b} (leads by {gap_theirs:.3f})")
    if min(gap_ours, gap_theirs) < NEAR_TIE:
        print(f"OK: identical up to a near-tie (a gap < {NEAR_TIE} logits), where rounding decides")
        return 0
    print("MISMATCH")
    return 1


def check_quality(args) -> int:
    import llama_cpp  # noqa: F401  (fail before converting when the bench extra is missing)

    text = PROSE.read_text(encoding="utf-8")
    files = {}
    for quant, name, calibrate in [("f32", "f32 (llamacpu)", True), ("q8_0", "q8_0 (llamacpu)", True),
                                   ("q4_0", "q4_0 (llamacpu)", True), ("q4_0", "q4_0 (no calib)", False),
                                   ("q4_1", "q4_1 (llamacpu)", True)]:
        path = args.workdir / f"smollm2.{quant}{'' if calibrate else '.nocalib'}.gguf"
        r = convert_model(args.model, path, quant, calibrate=calibrate)
        how = f", importance {r.importance}" if r.importance else ""
        print(f"convert {name}: {r.seconds:.1f} s, {r.bytes_written / 1e6:.1f} MB{how}", flush=True)
        files[name] = path
    theirs = args.workdir / "smollm2.q4_0.llama-cpp.gguf"
    seconds = llama_cpp_quantize(files["f32 (llamacpu)"], theirs, "Q4_0", threads=1)
    print(f"llama.cpp quantize q4_0: {seconds:.1f} s", flush=True)
    files["q4_0 (llama.cpp)"] = theirs
    rows = ["f32 (llamacpu)", "q8_0 (llamacpu)", "q4_0 (llamacpu)", "q4_0 (no calib)", "q4_0 (llama.cpp)",
            "q4_1 (llamacpu)"]

    reference = _Memo(open_model(files["f32 (llamacpu)"], dequantize=True))
    print(f"\nperplexity on {PROSE.name}, every file through llamacpu; KL and top-1 against the f32 file")
    print(f"{'model':18s} {'ppl':>8s} {'vs f32':>8s} {'KL':>8s} {'top-1':>7s}  tensor formats")
    results = {}
    for name in rows[1:]:
        rt = open_model(files[name])
        results[name] = (perplexity(rt, text, ctx=args.ctx, chunks=args.chunks, reference=reference), rt)
    first = next(iter(results.values()))[0]
    base = first.reference_ppl
    f32_rt = reference.runtime
    print(f"{rows[0]:18s} {base:8.3f} {0:+7.2f}% {'':>8s} {'':>7s}  {_formats(f32_rt)}")
    for name, (r, rt) in results.items():
        print(f"{name:18s} {r.ppl:8.3f} {100 * (r.ppl / base - 1):+7.2f}% {r.kl:8.4f} {r.top1:7.3f}  {_formats(rt)}")
    print(f"({first.chunks} chunks of {first.ctx} tokens, {first.tokens} scored positions)")
    return 0


def _formats(rt) -> str:
    counts = {}
    for t in rt.checkpoint.tensors.values():
        counts[t.fmt] = counts.get(t.fmt, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) + f", embed {rt.checkpoint.tensors['embed'].fmt}"


class _Memo:
    """A runtime whose forward passes are remembered by their tokens, so the f32 reference runs
    once per chunk rather than once per compared file."""

    def __init__(self, runtime):
        self.runtime, self.tokenizer, self.config = runtime, runtime.tokenizer, runtime.config
        self.model = self
        self._logits = {}

    def new_cache(self, max_seq=None):
        return self.runtime.model.new_cache(max_seq)

    def forward(self, tokens, cache, *, all_logits=False):
        key = (np.asarray(tokens).tobytes(), all_logits)
        if key not in self._logits:
            self._logits[key] = self.runtime.model.forward(tokens, cache, all_logits=all_logits).astype(np.float32)
        return self._logits[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="source model (default: the pinned SmolLM2)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "check_llamacpp")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    ap.add_argument("--prompt", default=PROMPT, help="the user message of the chat prompt")
    ap.add_argument("--quality", action="store_true", help="compare perplexity of our quantizers and llama.cpp's")
    ap.add_argument("--chunks", type=int, default=4, help="perplexity chunks (--quality)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity chunk length (--quality)")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="stop llama.cpp repacking weights (for a native build with AMX)")
    args = ap.parse_args()
    if args.model is None:
        args.model = fetch(SMOLLM2, ROOT / ".cache" / "models")
    args.workdir.mkdir(parents=True, exist_ok=True)
    return check_quality(args) if args.quality else check_tokens(args)


if __name__ == "__main__":
    raise SystemExit(main())
