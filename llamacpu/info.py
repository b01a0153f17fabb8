"""What a model file or folder holds, as a plain dict (for `llamacpu info`).

It reads metadata and tensor headers only, never the weights, so it is quick on any size of
model and describes tensors as stored (a K-quant shows as such, not as what we transcode it to).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import LlamacpuError, reason

# llamacpu tensor name (last part) → the kind `info` groups formats by.
KINDS = {
    "embed": "embedding", "output": "output", "norm": "norm", "rope_freqs": "rope",
    "attn_norm": "norm", "mlp_norm": "norm",
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "w_gate": "ffn", "w_up": "ffn", "w_down": "ffn",
}
HF_DTYPE_BITS = {"F32": 32, "F16": 16, "BF16": 16}


def _rope_scaling(config, has_rope_freqs: bool) -> dict[str, Any] | None:
    rs = config.rope_scaling
    if rs is not None:
        return {"type": rs.rope_type, "factor": rs.factor}
    return {"type": "freq_factors", "factor": None} if has_rope_freqs else None


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of the GGUF file or HF folder at `path`.

    Keys: path, format, name, architecture, parameters, layers, hidden_size, intermediate_size,
    heads, kv_heads, head_dim, vocab_size, context_length, rope_theta, rope_scaling (None, or
    {type, factor}; type "freq_factors" for a GGUF's rope_freqs tensor), sliding_window, tied_embeddings,
    formats ({kind: {format: tensor count}}), types ({format: tensor count}, every kind together),
    bits_per_weight, file_size, tokenizer, chat_template,
    sampling (the file's recommended settings, {} if none).
    """
    from .checkpoint import check_input_path
    path = Path(path)
    check_input_path(path)
    try:
        if path.is_dir():
            from .loaders.hf import read_generation_config
            config, tensors, size, name, tokenizer, template = _hf(path)
            fmt, sampling = "hf", read_generation_config(path)
        else:
            from .loaders.gguf import read_metadata, sampling_from_gguf
            config, tensors, size, name, tokenizer, template = _gguf(path)
            fmt, sampling = "gguf", sampling_from_gguf(read_metadata(path), path.name)
    except LlamacpuError:
        raise
    except (Exception, MemoryError) as e:  # whatever the readers did not foresee is still a bad file
        raise LlamacpuError(f"{path}: cannot read the model ({reason(e)})") from None
    formats: dict[str, Counter] = {}
    types: Counter = Counter()
    n_params = n_bits = 0
    for ours, (kind_fmt, n_elements, bits) in tensors.items():
        kind = KINDS.get(ours.rsplit(".", 1)[-1], "other")
        formats.setdefault(kind, Counter())[kind_fmt] += 1
        types[kind_fmt] += 1
        n_params += n_elements
        n_bits += bits
    return {
        "path": str(path), "format": fmt, "name": name,
        "architecture": config.architecture if fmt == "hf" else "llama",
        "parameters": n_params,
        "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling(config, "rope_freqs" in tensors),
        "sliding_window": config.sliding_window,
        "tied_embeddings": config.tie_word_embeddings,
        "formats": {kind: dict(sorted(c.items())) for kind, c in sorted(formats.items())},
        "types": dict(sorted(types.items())),
        "bits_per_weight": round(n_bits / n_params, 3) if n_params else None,
        "file_size": size,
        "tokenizer": tokenizer,
        "chat_template": template,
        "sampling": sampling,
    }


def _gguf(path: Path):
    import gguf

    from .loaders.gguf import GGUFFile, to_llamacpu_name
    f = GGUFFile(path)
    meta = f.meta
    tensors = {}
    for t in f.tensors:
        ours = to_llamacpu_name(t.name) or t.name
        n = 1
        for d in t.shape:
            n *= d
        tensors[ours] = (gguf.GGMLQuantizationType(t.ggml_type).name.lower(), n, 8 * t.n_bytes)
    config = ModelConfig.from_gguf(meta, tied="output" not in tensors)
    tokenizer, template = _text_side(lambda: _gguf_tokenizer(meta), meta=meta)
    name = meta.get("general.name")
    return config, tensors, path.stat().st_size, str(name) if name else None, tokenizer, template


def _gguf_tokenizer(meta):
    from .tokenizer import Tokenizer
    return Tokenizer.from_gguf_metadata(meta)


def _hf(folder: Path):
    from .loaders.hf import SafetensorsFile, shard_files, read_config, to_llamacpu_name
    config = ModelConfig.from_hf(read_config(folder))
    tensors, size = {}, 0
    for f in shard_files(folder):
        st = SafetensorsFile(f)
        size += st.size
        for key, info in st.header.items():
            n = 1
            for d in info["shape"]:
                n *= int(d)
            ours = to_llamacpu_name(key) or key
            tensors[ours] = (info["dtype"].lower(), n, HF_DTYPE_BITS.get(info["dtype"], 0) * n)

    # A tokenizer or template that is broken shows as null/false; a file that cannot be read, or a
    # text file that is not UTF-8, is an error.
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        path = folder / name
        try:
            if not path.is_file():
                continue
            if name == "tokenizer.model":
                open(path, "rb").close()
            else:
                path.read_text(encoding="utf-8")
        except OSError as e:
            raise LlamacpuError(f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise LlamacpuError(f"{path}: not valid UTF-8 (at byte {e.start})") from None

    def tokenizer():
        from .tokenizer import Tokenizer
        return Tokenizer.from_hf_dir(folder)

    tok, template = _text_side(tokenizer, hf_dir=folder)
    return config, tensors, size, folder.name, tok, template


def _text_side(make_tokenizer, *, meta=None, hf_dir=None) -> tuple[dict | None, bool]:
    """(tokenizer summary or None if there is no usable tokenizer, whether a chat template is present)."""
    from .template import ChatTemplate, HostileTemplateError
    from .tokenizer import CorruptTokenizerError
    try:
        tok = make_tokenizer()
    except CorruptTokenizerError:
        raise  # corrupt data, not merely a tokenizer llamacpu does not support
    except LlamacpuError:
        tok = None
    summary = None if tok is None else {
        "kind": tok.kind, "pre": tok.pre, "vocab_size": tok.vocab_size,
        "bos": tok.bos_token, "eos": tok.eos_token, "add_bos": tok.add_bos,
    }
    try:
        if meta is not None:
            template = ChatTemplate.from_gguf_metadata(meta, tok or _NoTokens)
        else:
            template = ChatTemplate.from_hf_dir(hf_dir, tok or _NoTokens)
    except HostileTemplateError:
        raise  # built to exhaust the reader: that is a bad file, not a missing template
    except LlamacpuError:
        template = None  # present but unusable counts as absent: chat would refuse it
    return summary, template is not None


class _NoTokens:
    bos_token = eos_token = None
