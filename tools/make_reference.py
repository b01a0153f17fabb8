#!/usr/bin/env python3
"""Make the independent reference values ("goldens") that the test suite checks llamacpu against.

Everything here is computed by Hugging Face transformers (torch on the CPU, float32), never by
llamacpu itself, so the tests compare against an independent implementation.

It writes, under --out (default: tests/data):

* ``smollm2_reference.npz`` + ``smollm2_reference.json``: the real SmolLM2-135M-Instruct Q4_1
  GGUF model, loaded by transformers' GGUF support (dequantized to float32). For five ChatML
  prompts: the prompt token ids, the last-position logits, the first 32 greedy tokens (argmax with
  the KV cache, EOS not honoured) and, for prompt 0, the logits at every prompt position.
  The prompt ids come from llama.cpp's tokenizer (llama-cpp-python, ``vocab_only``) because
  transformers' GGUF tokenizer conversion drops SmolLM2's digit pre-split.
* ``tiny_llama/``: random LlamaForCausalLM, GQA, untied, bf16, sharded safetensors + index.
* ``tiny_llama3/``: random LlamaForCausalLM, tied embeddings, Llama-3 rope scaling, f32, one file.
* ``tiny_mistral/``: random MistralForCausalLM, GQA, untied, f16, one file.
  Each tiny folder holds ``config.json``, the weights, ``reference.npz`` (input ids, float32
  logits at every position computed from the very weights saved, a short greedy continuation)
  and ``REFERENCE.md``.

The configs are written in the classic layout that published checkpoints use (top-level
``rope_theta`` / ``rope_scaling`` / ``torch_dtype``), not transformers 5's ``rope_parameters``.

Run it (needs the ``reference`` and ``bench`` extras: torch, transformers, accelerate,
llama-cpp-python, and the model under .cache/models, i.e. ``make model``):

    make reference
    .venv/bin/python tools/make_reference.py                 # everything
    .venv/bin/python tools/make_reference.py --only tiny     # the tiny checkpoints only (no GGUF)
    .venv/bin/python tools/make_reference.py --only smollm2 --crosscheck-llamacpp

It is deterministic (fixed seeds, fixed prompts) and overwrites its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
from llamacpu.fetch import sha256_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO / "tests" / "data"

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "How do I reverse a list in Python?",
]
N_GREEDY = 32
N_GREEDY_TINY = 8
FULL_LOGITS_MAX_BYTES = 20 * 1024 * 1024


def _command() -> str:
    return "python tools/make_reference.py " + " ".join(sys.argv[1:])


def _versions() -> dict:
    import torch
    import transformers

    out = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import accelerate

        out["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------------------------
# Greedy decoding with the KV cache, shared by both parts.
# --------------------------------------------------------------------------------------------


def greedy_with_cache(model, prompt_ids: list[int], n_new: int):
    """Prefill the prompt, then take ``n_new`` argmax tokens, one forward step each, reusing
    the KV cache. EOS is not special. Returns (prompt logits [L, V], new ids, top1-top2 margins)."""
    import inspect

    import torch

    # transformers 5.x renames `past_key_values` to `cache` (the old name is deprecated).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def get_cache(out):
        return getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        prompt_logits = out.logits[0].float().numpy().copy()
        past = get_cache(out)
        nxt = out.logits[0, -1].float()
        ids, margins = [], []
        for step in range(n_new):
            top2 = torch.topk(nxt, 2)
            tok = int(top2.indices[0])
            ids.append(tok)
            margins.append(float(top2.values[0] - top2.values[1]))
            if step == n_new - 1:
                break
            out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{cache_kw: past})
            past = get_cache(out)
            nxt = out.logits[0, -1].float()
    return prompt_logits, ids, np.asarray(margins, dtype=np.float32)


def check_against_full_forward(model, prompt_ids, new_ids, margins, label):
    """A consistency check: one uncached forward over prompt + generated tokens must choose the
    same argmax at each step (unless the step was a near tie)."""
    import torch

    seq = list(prompt_ids) + list(new_ids[:-1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
    arg = logits[len(prompt_ids) - 1 :].argmax(-1).tolist()
    bad = [i for i, (a, b) in enumerate(zip(arg, new_ids)) if a != b]
    for i in bad:
        if margins[i] > 1e-3:
            raise SystemExit(f"{label}: cached and uncached greedy disagree at step {i} (margin {margins[i]})")
    if bad:
        print(f"  {label}: near-tie differences at steps {bad} (allowed)")


# --------------------------------------------------------------------------------------------
# Part a: SmolLM2 from the real GGUF.
# --------------------------------------------------------------------------------------------


def make_smollm2(model_path: Path, out_dir: Path, crosscheck: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - environment problem
        raise SystemExit(
            "llama-cpp-python is needed for the prompt token ids (pip install -e '.[bench]')"
        ) from e

    if not model_path.is_file():
        raise SystemExit(f"model not found: {model_path} (run `make model`)")
    folder, name = str(model_path.parent), model_path.name
    print(f"[smollm2] loading {model_path}")

    # The chat template rendering comes from the GGUF's own template (via transformers); the
    # token ids come from llama.cpp, whose tokenizer keeps the digit pre-split.
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lc = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)

    rendered, prompt_ids = [], []
    for p in PROMPTS:
        r = hf_tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = lc.tokenize(r.encode("utf-8"), add_bos=False, special=True)
        hf_ids = hf_tok(r, add_special_tokens=False)["input_ids"]
        if hf_ids != ids:
            print(f"  note: transformers' GGUF tokenizer differs from llama.cpp for {p!r} (using llama.cpp)")
        rendered.append(r)
        prompt_ids.append([int(i) for i in ids])

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    cfg = model.config
    print(f"[smollm2] model loaded in {time.time() - t0:.1f}s, attn={cfg._attn_implementation}")
    vocab = cfg.vocab_size

    last_logits = np.zeros((len(PROMPTS), vocab), dtype=np.float32)
    greedy = np.zeros((len(PROMPTS), N_GREEDY), dtype=np.int32)
    margins = np.zeros((len(PROMPTS), N_GREEDY), dtype=np.float32)
    prompt0_logits = None
    texts = []
    for i, ids in enumerate(prompt_ids):
        t0 = time.time()
        pl, new, mg = greedy_with_cache(model, ids, N_GREEDY)
        check_against_full_forward(model, ids, new, mg, f"prompt {i}")
        last_logits[i] = pl[-1]
        greedy[i] = new
        margins[i] = mg
        if i == 0:
            prompt0_logits = pl
        text = lc.detokenize(new, special=True).decode("utf-8", errors="replace")
        texts.append(text)
        print(f"  [{i}] {len(ids)} prompt tokens, {time.time() - t0:.1f}s: {PROMPTS[i]!r} -> {text!r}")

    if prompt0_logits.nbytes > FULL_LOGITS_MAX_BYTES:
        prompt0_logits = prompt0_logits[-4:]
    first_pos = len(prompt_ids[0]) - prompt0_logits.shape[0]

    n = len(PROMPTS)
    maxlen = max(len(x) for x in prompt_ids)
    padded = np.full((n, maxlen), -1, dtype=np.int32)
    for i, ids in enumerate(prompt_ids):
        padded[i, : len(ids)] = ids
    arrays = {
        "prompts": np.array(PROMPTS),
        "rendered": np.array(rendered),
        "prompt_ids": padded,
        "prompt_lengths": np.array([len(x) for x in prompt_ids], dtype=np.int32),
        "last_logits": last_logits,
        "greedy_ids": greedy,
        "greedy_margin": margins,
        "prompt0_logits": prompt0_logits.astype(np.float32),
        "prompt0_logits_first_pos": np.int32(first_pos),
    }
    for i, ids in enumerate(prompt_ids):
        arrays[f"prompt_ids_{i}"] = np.array(ids, dtype=np.int32)

    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "smollm2_reference.npz"
    np.savez_compressed(npz, **arrays)
    meta = {
        "command": _command(),
        "made_by": "tools/make_reference.py (transformers GGUF loader, torch CPU float32)",
        "versions": _versions(),
        "model_file": name,
        "model_sha256": sha256_of(model_path),
        "attn_implementation": cfg._attn_implementation,
        "tokenizer": "llama-cpp-python Llama(vocab_only=True).tokenize(rendered, add_bos=False, special=True)",
        "chat_template": "transformers apply_chat_template(add_generation_prompt=True) of the GGUF's template",
        "greedy": f"argmax with KV cache, {N_GREEDY} tokens, EOS not honoured, no penalties",
        "prompts": PROMPTS,
        "rendered": rendered,
        "prompt_ids": prompt_ids,
        "greedy_ids": greedy.tolist(),
        "greedy_texts": texts,
        "greedy_texts_note": "llama.cpp detokenize(special=True); generation runs past <|im_end|> on purpose",
        "npz_keys": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
    }
    (out_dir / "smollm2_reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"[smollm2] wrote {npz} ({npz.stat().st_size} bytes)")
    if crosscheck:
        # In a child process, after writing: a llama.cpp crash (e.g. SIGILL from a CPU build that
        # does not fit this machine) must neither lose the outputs nor fail the run.
        import multiprocessing as mp

        child = mp.get_context("spawn").Process(
            target=_crosscheck_llamacpp, args=(model_path, prompt_ids, last_logits, greedy)
        )
        child.start()
        child.join()
        if child.exitcode:
            print(f"  llama.cpp cross-check died (exit code {child.exitcode}); the outputs are kept")


def _crosscheck_llamacpp(model_path, prompt_ids, last_logits, greedy):
    """Optional sanity check against llama.cpp (not stored): top-1 agreement of last logits."""
    import llama_cpp

    lc = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_threads=2, logits_all=False, verbose=False)
    for i, ids in enumerate(prompt_ids):
        lc.reset()
        lc.eval(ids)
        ll = np.array(lc.scores[lc.n_tokens - 1], dtype=np.float32)
        d = np.abs(ll - last_logits[i])
        print(
            f"  llama.cpp vs transformers [{i}]: top1 {int(ll.argmax())}/{int(last_logits[i].argmax())} "
            f"max|diff| {d.max():.3f} mean|diff| {d.mean():.3f}"
        )
        toks = []
        for t in lc.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(t)
            if len(toks) == N_GREEDY:
                break
        same = next((k for k, (a, b) in enumerate(zip(toks, greedy[i])) if a != b), N_GREEDY)
        print(f"    greedy agrees for the first {same}/{N_GREEDY} tokens")


# --------------------------------------------------------------------------------------------
# Part b: tiny random checkpoints.
# --------------------------------------------------------------------------------------------

TINY = {
    "tiny_llama": dict(
        arch="llama",
        dtype="bfloat16",
        max_shard_size="100KB",
        seed=1234,
        n_ids=12,
        config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=192,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=10000.0,
        rope_scaling=None,
        about="LlamaForCausalLM, GQA (4 heads, 2 KV heads), untied lm_head, bf16, sharded safetensors with index.",
    ),
    "tiny_llama3": dict(
        arch="llama",
        dtype="float32",
        max_shard_size=None,
        seed=2345,
        n_ids=24,
        config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=256,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=10000.0,
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_type": "llama3",
        },
        about=(
            "LlamaForCausalLM, Llama-3 rope scaling (with head_dim 16 and theta 1e4 the 8 frequencies "
            "fall in all three bands: kept, smoothed, divided by 8), tied embeddings (no lm_head "
            "tensor), 2 heads / 1 KV head, explicit head_dim, f32, single model.safetensors."
        ),
    ),
    "tiny_mistral": dict(
        arch="mistral",
        dtype="float16",
        max_shard_size=None,
        seed=3456,
        n_ids=12,
        config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=160,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            sliding_window=None,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=1000000.0,
        rope_scaling=None,
        about="MistralForCausalLM, GQA (4 heads, 2 KV heads), no sliding window, untied, rope_theta 1e6, f16, single file.",
    ),
}


def _randomize(model, seed: int, hidden: int, tied: bool) -> None:
    """Weights with O(1) activations and well-spread logits (the default 0.02 init gives nearly
    flat logits, which would let many bugs pass); norm weights are random so a loader that skips
    or swaps them is caught."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed_tokens" in name:
                std = 2.0 / hidden**0.5 if tied else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / hidden**0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def _classic_config(path: Path, spec: dict) -> None:
    """Rewrite transformers 5's config.json into the layout of published checkpoints."""
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = spec["rope_theta"]
    cfg["rope_scaling"] = spec["rope_scaling"]
    if params.get("rope_theta") not in (None, spec["rope_theta"]):
        raise SystemExit(f"rope_theta mismatch: {params}")
    cfg["torch_dtype"] = cfg.pop("dtype", spec["dtype"])
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def make_tiny(name: str, spec: dict, out_root: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers import MistralConfig, MistralForCausalLM

    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    cfg_kwargs = dict(spec["config"])
    rope = {"rope_theta": spec["rope_theta"], "rope_type": "default"}
    if spec["rope_scaling"]:
        rope.update(spec["rope_scaling"])
    Config, Model = (LlamaConfig, LlamaForCausalLM) if spec["arch"] == "llama" else (MistralConfig, MistralForCausalLM)
    config = Config(rope_parameters=rope, **cfg_kwargs)

    torch.manual_seed(spec["seed"])
    model = Model(config).to(torch.float32)
    _randomize(model, spec["seed"], config.hidden_size, config.tie_word_embeddings)
    dtype = getattr(torch, spec["dtype"])
    model = model.to(dtype)
    save_kwargs = {}
    if spec["max_shard_size"]:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(out, **save_kwargs)
    _classic_config(out / "config.json", spec)

    # Reload what is on disk, in float32, and check it is exactly the rounded weights.
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref.eval()
    want = {k: v.float() for k, v in model.state_dict().items()}
    for k, v in ref.state_dict().items():
        if not torch.equal(v, want[k]):
            raise SystemExit(f"{name}: reloaded {k} differs from the saved weights")
    rp = getattr(ref.config, "rope_parameters", None)
    if spec["rope_scaling"] and (not rp or rp.get("rope_type") != "llama3" or rp.get("factor") != 8.0):
        raise SystemExit(f"{name}: rope scaling not picked up from the classic config: {rp}")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    keys = []
    for f in files:
        with safe_open(out / f, "pt") as sf:
            keys += list(sf.keys())
            for k in sf.keys():
                if sf.get_slice(k).get_dtype() not in ("BF16", "F16", "F32"):
                    raise SystemExit(f"{name}: unexpected dtype in {f}:{k}")
    if config.tie_word_embeddings and "lm_head.weight" in keys:
        raise SystemExit(f"{name}: tied model saved an lm_head tensor")
    if spec["max_shard_size"] and (len(files) < 2 or not (out / "model.safetensors.index.json").exists()):
        raise SystemExit(f"{name}: expected a sharded checkpoint, got {files}")

    rng = np.random.default_rng(spec["seed"])
    vocab = config.vocab_size
    ids = rng.integers(0, vocab, size=spec["n_ids"]).astype(np.int32)
    ids[0], ids[-1] = 1, vocab - 1  # a BOS-like id first, the largest id last
    logits, new, margins = greedy_with_cache(ref, ids.tolist(), N_GREEDY_TINY)
    check_against_full_forward(ref, ids.tolist(), new, margins, name)
    arrays = {
        "input_ids": ids,
        "logits": logits.astype(np.float32),
        "greedy_ids": np.array(new, dtype=np.int32),
        "greedy_margin": margins,
    }
    np.savez_compressed(out / "reference.npz", **arrays)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()

    weights = ", ".join(f"`{f}`" for f in files)
    shapes = "\n".join(f"- `{k}`: shape {list(v.shape)}, {v.dtype}" for k, v in arrays.items())
    (out / "REFERENCE.md").write_text(
        f"# {name}\n\n{spec['about']}\n\n"
        f"Random weights (seed {spec['seed']}), made by `{_command()}` "
        f"(transformers {_versions()['transformers']}, torch {_versions()['torch']}).\n"
        "The config is in the classic published layout (`rope_theta`, `rope_scaling`, `torch_dtype`).\n\n"
        f"Weights: {weights} ({spec['dtype']}).\n\n"
        "`reference.npz`: transformers' float32 forward pass of the checkpoint as saved (the stored "
        f"{spec['dtype']} weights upcast to float32):\n{shapes}\n\n"
        f"`logits[i]` are the logits after `input_ids[: i + 1]`. `greedy_ids` are {N_GREEDY_TINY} argmax tokens "
        "after the whole input (KV-cache decoding); `greedy_margin` is the top-1 minus top-2 logit gap at each step.\n"
    )
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"[{name}] {files}, {total} bytes; greedy {new}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["all", "smollm2", "tiny"], default="all", help="what to make (default: all)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the SmolLM2 Q4_1 GGUF file")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: tests/data)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument(
        "--crosscheck-llamacpp",
        action="store_true",
        help="also run the GGUF under llama.cpp and print how close it is (nothing is stored)",
    )
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except Exception:
        pass

    if args.only in ("all", "tiny"):
        for name, spec in TINY.items():
            make_tiny(name, spec, args.out)
    if args.only in ("all", "smollm2"):
        make_smollm2(args.model, args.out, args.crosscheck_llamacpp)


if __name__ == "__main__":
    main()
