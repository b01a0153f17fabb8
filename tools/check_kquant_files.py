#!/usr/bin/env python3
"""Run GGUF files (e.g. llama.cpp's K-quant mixtures) through llamacpu and llama.cpp, and compare.

    python tools/check_kquant_files.py FILE.gguf [...] [--tokens 64] [--text "..."]

For each file: its tensor types, whether llamacpu ran every tensor as stored (nothing
transcoded), and the KL divergence KL(llama.cpp || llamacpu) and top-1 agreement of the logits
at every position of one prompt, for llamacpu's prefill (one batch, the integer GEMM) and its
token-by-token decode (the fused decode kernel). llama.cpp evaluates the prompt as one batch
with an f32 KV cache. The prompt is the tokenized --text if the file has a tokenizer we read,
else seeded random token ids. Figures, not a test: `tests/test_kquant_reference.py` holds the
committed small-model check.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within "
        "fifty years, presses had spread to more than two hundred cities across Europe.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=64, help="prompt length (random ids, or the text cut to this)")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp
    from llamacpu.checkpoint import load_checkpoint
    from llamacpu.model import Model
    from llamacpu.perplexity import kl_per_position, log_softmax, top1_agrees
    for path in args.files:
        ckpt = load_checkpoint(path)
        types = Counter(t.fmt for t in ckpt.tensors.values())
        try:
            tokens = ckpt.tokenizer().encode(args.text)[:args.tokens]
        except Exception:  # no tokenizer we read: random ids
            tokens = []
        if len(tokens) < 8:
            tokens = [int(t) for t in np.random.default_rng(0).integers(3, ckpt.config.vocab_size, args.tokens)]
        model = Model(ckpt.config, ckpt.tensors, threads=args.threads)
        n = len(tokens)
        prefill = model.forward(tokens, model.new_cache(n + 1), all_logits=True)
        cache = model.new_cache(n + 1)
        decode = np.stack([model.forward([t], cache) for t in tokens])
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, n + 1), n_batch=max(64, n), n_ubatch=max(64, n),
                              n_threads=args.threads, logits_all=True, type_k=0, type_v=0, verbose=False)
        llm.eval(tokens)
        theirs = np.array(llm.scores[:n], dtype=np.float32)[:, :ckpt.config.vocab_size]
        print(f"{path.name}: {dict(sorted(types.items()))}; transcoded: {len(ckpt.transcoded)}; "
              f"fused decode kernel: {model.decode_weights is not None}; {n} tokens")
        for label, ours in (("prefill", prefill), ("decode", decode)):
            kl = kl_per_position(log_softmax(theirs), log_softmax(ours))
            top1 = top1_agrees(theirs, ours).mean()
            print(f"  {label:<8} KL(llama.cpp || llamacpu) mean {kl.mean():.2e} max {kl.max():.2e}, "
                  f"top-1 agreement {top1:.3f}")
        del llm


if __name__ == "__main__":
    main()
