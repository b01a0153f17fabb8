"""Tiny random LLaMA checkpoints built by the tests themselves (GGUF files and HF folders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llamacpu.checkpoint import expected_shapes
from llamacpu.config import ModelConfig

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def random_tensors(c: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """f32 weights by llamacpu name, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(c).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return out


def write_gguf(path: Path, c: ModelConfig, tensors: dict[str, np.ndarray], *, arch: str = "llama",
               skip: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write f32 weights as a GGUF with gguf.GGUFWriter (an independent writer), plus a toy tokenizer."""
    import gguf
    from llamacpu.loaders.gguf import to_gguf_name
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in c.gguf_metadata().items():
        key = key.replace("llama.", f"{arch}.", 1)
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in tensors.items():
        if name not in skip:
            w.add_tensor(to_gguf_name(name), t)
    for gname, t in (extra or {}).items():
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf(folder: Path, c: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=np.float32,
             shards: int = 1, arch: str = "LlamaForCausalLM") -> Path:
    """Write an HF folder (config.json + safetensors), undoing llamacpu's Q/K row order."""
    from safetensors.numpy import save_file
    from llamacpu.loaders.hf import NAMES, pairs_to_rotate_half
    folder.mkdir(parents=True, exist_ok=True)
    reverse = {ours: theirs for theirs, ours in NAMES.items()}
    hf = {}
    for name, t in tensors.items():
        if name.startswith("layers."):
            _, i, leaf = name.split(".", 2)
            key = reverse[f"layers.{{i}}.{leaf}"].format(i=i)
        else:
            key = reverse[name]
        if name.endswith(".wq"):
            t = pairs_to_rotate_half(t, c.num_attention_heads)
        elif name.endswith(".wk"):
            t = pairs_to_rotate_half(t, c.num_key_value_heads)
        hf[key] = np.ascontiguousarray(t.astype(dtype))
    keys = sorted(hf)
    if shards == 1:
        save_file(hf, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = {k: hf[k] for k in keys[s::shards]}
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / fname))
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = {
        "architectures": [arch], "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings, "max_position_embeddings": c.max_position_embeddings,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
