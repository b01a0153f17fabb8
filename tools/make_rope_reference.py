#!/usr/bin/env python3
"""Make tiny real checkpoints with each RoPE type llamacpu runs, in both config layouts, and
store transformers' logits beside them (the reference the tests match).

For each RoPE type (default, linear, llama3) and each layout it writes
``tests/data/rope_<layout>_<type>/``:

* ``v5``: the folder exactly as transformers 5.24's ``save_pretrained`` writes it
  (``rope_parameters: {rope_theta, rope_type, ...}``).
* ``legacy``: the same weights, with config.json rewritten into the layout that checkpoints
  saved before transformers 5 carry (top-level ``rope_theta``, ``rope_scaling`` with ``type``
  for linear and ``rope_type`` for llama3, ``torch_dtype``); the tool checks that transformers
  reads it back as the same RoPE parameters.

Each folder also holds a small byte-level BPE tokenizer (saved by transformers'
``PreTrainedTokenizerFast.save_pretrained``, so that ``llamacpu convert`` can write a complete
GGUF), ``reference.npz`` (input ids, and transformers' float32 logits at the listed positions,
computed from the model reloaded from that very folder) and ``REFERENCE.md``.

Weights are random (bf16) and sized so the RoPE scaling matters: head_dim 16 gives 8 frequencies,
and the llama3 parameters put them in all three of its bands. The tool prints how far the
logits move when the scaling is ignored, which a loader that drops it would show.

    .venv/bin/python tools/make_rope_reference.py                 # writes tests/data/rope_*
    .venv/bin/python tools/make_rope_reference.py --check-llamacpp
        # also converts each folder with `llamacpu convert` (f32) and runs it under llama.cpp
        # (llama-cpp-python), printing its logits' distance from transformers' (nothing stored)

Needs the ``reference`` extra (torch, transformers); --check-llamacpp also needs ``bench``.
It is deterministic (fixed seeds) and overwrites its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data"
N_IDS = 48
POSITIONS = list(range(0, N_IDS, 4)) + [N_IDS - 1]  # logits stored at these positions
TEXT = ("The quick brown fox jumps over the lazy dog. Rotary position embeddings rotate pairs of "
        "query and key channels by an angle that grows with the position. ") * 4

# RoPE parameters by type, as transformers 5 writes them in rope_parameters.
ROPE = {
    # A theta other than transformers' default: a loader that misses it runs theta 10000 (issue 7).
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # wavelengths 2*pi*500000^(i/8): 6.3 (kept), 33 and 169 (the smoothed band 32..256), then divided by 8.
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 8.0, "original_max_position_embeddings": 256},
}
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2)
TIED = {"default": False, "linear": False, "llama3": True}
SEED = {"default": 11, "linear": 12, "llama3": 13}


def _command() -> str:
    return " ".join(["python tools/make_rope_reference.py", *sys.argv[1:]])


def make_tokenizer(folder: Path):
    """A byte-level BPE trained on TEXT, saved by transformers; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def legacy_config(path: Path) -> dict:
    """Rewrite transformers 5's config.json into the pre-5 layout; returns the RoPE dict it wrote."""
    cfg = json.loads(path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    if kind == "default":
        cfg["rope_scaling"] = None
    elif kind == "linear":  # Llama-2-era checkpoints spell it "type"
        cfg["rope_scaling"] = {"type": "linear", **params}
    else:  # Llama 3.1 checkpoints spell it "rope_type"
        cfg["rope_scaling"] = {**params, "rope_type": kind}
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    return cfg["rope_scaling"]


def logits_of(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def make_one(kind: str, layout: str, out_root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from make_reference import _randomize, _versions

    out = out_root / f"rope_{layout}_{kind}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = make_tokenizer(out)
    config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=TIED[kind], rope_parameters=dict(ROPE[kind]),
                         **SHAPE)
    torch.manual_seed(SEED[kind])
    model = LlamaForCausalLM(config).to(torch.float32)
    _randomize(model, SEED[kind], config.hidden_size, config.tie_word_embeddings)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    if layout == "legacy":
        legacy_config(out / "config.json")

    # Reload what is on disk, in float32: transformers' own reading of this folder is the reference.
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = {k: v for k, v in ref.config.rope_parameters.items()}
    want = dict(ROPE[kind])
    if kind == "llama3":
        want["original_max_position_embeddings"] = ROPE[kind]["original_max_position_embeddings"]
    if any(got.get(k) != v for k, v in want.items()):
        raise SystemExit(f"{out.name}: transformers read rope parameters {got}, expected {want}")
    for k, v in ref.state_dict().items():
        if not torch.equal(v, model.state_dict()[k].float()):
            raise SystemExit(f"{out.name}: reloaded {k} differs from the saved weights")

    rng = np.random.default_rng(SEED[kind])
    ids = rng.integers(3, len(tok), size=N_IDS).astype(np.int32)
    ids[0] = tok.bos_token_id
    logits = logits_of(ref, ids.tolist())
    # How much the RoPE parameters matter here: the same weights run as a loader that ignores them
    # would (the scaling dropped; for "default", the theta read as transformers' default 1e4).
    theta = ROPE[kind]["rope_theta"] if kind != "default" else 10000.0
    plain = LlamaConfig(**{**ref.config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
    bare = LlamaForCausalLM(plain).eval()
    bare.load_state_dict(ref.state_dict(), strict=False)
    moved = float(np.abs(logits_of(bare, ids.tolist()) - logits)[POSITIONS].max())
    if moved < 0.5:
        raise SystemExit(f"{out.name}: ignoring the RoPE parameters moves the logits by only {moved:.3f}")
    np.savez_compressed(out / "reference.npz", input_ids=ids, positions=np.array(POSITIONS, dtype=np.int32),
                        logits=logits[POSITIONS].astype(np.float32))

    versions = _versions()
    layout_text = {
        "v5": "config.json as transformers 5.24's `save_pretrained` wrote it (`rope_parameters`).",
        "legacy": "config.json rewritten into the pre-transformers-5 layout (top-level `rope_theta`, "
                  "`rope_scaling`, `torch_dtype`); transformers reads it back as the same RoPE parameters.",
    }[layout]
    files = sorted(p.name for p in out.iterdir()) + ["REFERENCE.md"]
    (out / "REFERENCE.md").write_text(
        f"# rope_{layout}_{kind}\n\n"
        f"Random LlamaForCausalLM (seed {SEED[kind]}, bf16 weights, {'tied' if TIED[kind] else 'untied'} "
        f"embeddings, head_dim 16, 2 heads / 1 KV head, 2 layers) with `{kind}` RoPE: "
        f"`{json.dumps(ROPE[kind])}`.\n\n{layout_text}\n\n"
        f"Made by `{_command()}` (transformers {versions['transformers']}, torch {versions['torch']}).\n\n"
        "`reference.npz`: `input_ids` (int32, length "
        f"{N_IDS}), `positions` and `logits` (float32, [{len(POSITIONS)}, vocab]): transformers' float32 "
        "forward pass of the model reloaded from this folder; `logits[j]` follows `input_ids[: positions[j] + 1]`.\n"
        f"Run by a loader that ignores the RoPE parameters ({'theta read as 1e4' if kind == 'default' else 'scaling dropped'}), "
        f"the logits move by up to {moved:.2f}.\n\n"
        f"Files: {', '.join(f'`{f}`' for f in files)}.\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"[{out.name}] {size} bytes; ignoring the RoPE parameters moves the logits by {moved:.2f}")
    return out


def check_llamacpp(folder: Path) -> None:
    """Convert `folder` with llamacpu (f32) and compare llama.cpp's logits with transformers'."""
    import llama_cpp
    from llamacpu.convert import convert_model

    ref = np.load(folder / "reference.npz")
    ids, positions, want = ref["input_ids"].tolist(), ref["positions"], ref["logits"]
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / f"{folder.name}.f32.gguf"
        convert_model(folder, gguf_path, "f32")
        lc = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                               type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32), not f16
        lc.eval(ids)
        got = np.array(lc.scores[: len(ids)], dtype=np.float32)[positions]
    d = np.abs(got - want)
    print(f"  llama.cpp on `llamacpu convert` of {folder.name}: max|diff| {d.max():.2e}, "
          f"mean|diff| {d.mean():.2e}, argmax agrees at {int((got.argmax(-1) == want.argmax(-1)).sum())}"
          f"/{len(positions)} positions")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: tests/data)")
    ap.add_argument("--check-llamacpp", action="store_true",
                    help="also run each folder, converted by llamacpu, under llama.cpp (nothing stored)")
    ap.add_argument("--check-only", action="store_true", help="only the llama.cpp check of existing folders")
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    folders = []
    for kind in ROPE:
        for layout in ("legacy", "v5"):
            folders.append(args.out / f"rope_{layout}_{kind}" if args.check_only else make_one(kind, layout, args.out))
    if args.check_llamacpp or args.check_only:
        import multiprocessing as mp

        for folder in folders:  # in a child: a llama.cpp crash must not lose the outputs
            child = mp.get_context("spawn").Process(target=check_llamacpp, args=(folder,))
            child.start()
            child.join()
            if child.exitcode:
                print(f"  llama.cpp check of {folder.name} died (exit code {child.exitcode})")


if __name__ == "__main__":
    main()
