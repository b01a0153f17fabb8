"""The model configuration: one frozen dataclass, built from HF `config.json` or GGUF metadata.

Field names follow Hugging Face's `config.json` (as mlx-lm does), so `from_hf` is a
plain mapping. Derived sizes are properties, never stored twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import LlamacpuError

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3"); the only kind we run."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int  # model width, "dim"
    intermediate_size: int  # SwiGLU hidden width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means grouped-query attention
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False  # output head reuses the embedding matrix
    max_position_embeddings: int = 2048  # context length the model was trained for
    head_dim_: int | None = None  # explicit head_dim (Mistral configs carry one)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        sizes = {
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise LlamacpuError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlamacpuError(
                f"config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads")
        if self.head_dim_ is None and self.hidden_size % self.num_attention_heads:
            raise LlamacpuError("config: hidden_size is not a multiple of num_attention_heads")
        if self.head_dim % 2:
            raise LlamacpuError(f"config: head_dim {self.head_dim} must be even for RoPE")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise LlamacpuError("config: rms_norm_eps and rope_theta must be positive")

    # Derived sizes.
    @property
    def head_dim(self) -> int:
        return self.head_dim_ if self.head_dim_ is not None else self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def rope_inv_freq(self, freq_factors: np.ndarray | None = None) -> np.ndarray:
        """Inverse frequencies (head_dim/2,) float64, with Llama-3 scaling or explicit divisors applied.

        `freq_factors` are llama.cpp's `rope_freqs` divisors, as a GGUF may carry instead of
        `rope_scaling`; they take precedence.
        """
        half = self.head_dim // 2
        inv = 1.0 / self.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / self.head_dim)
        if freq_factors is not None:
            return inv / np.asarray(freq_factors, dtype=np.float64)
        if self.rope_scaling is not None:
            inv = inv / llama3_freq_factors(inv, self.rope_scaling)
        return inv

    # Construction.
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a HF `config.json` dict. Unknown keys are ignored; unsupported models refused."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch not in SUPPORTED_HF_ARCHITECTURES:
            raise LlamacpuError(
                f"unsupported architecture {arch!r}: llamacpu runs {', '.join(SUPPORTED_HF_ARCHITECTURES)}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise LlamacpuError(f"config.json lacks {', '.join(missing)}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling_from_hf(cfg.get("rope_scaling")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            head_dim_=cfg.get("head_dim"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, tied: bool) -> "ModelConfig":
        """Build from GGUF metadata (key → value). `tied`: the file has no `output.weight`."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise LlamacpuError(f"unsupported GGUF architecture {arch!r}: llamacpu runs 'llama'")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise LlamacpuError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_heads = int(get("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise LlamacpuError(f"GGUF metadata lacks {arch}.vocab_size and a tokenizer")
            vocab = len(tokens)
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "llama3":  # rare: most llama3 GGUFs ship rope_freqs
            scaling = RopeScaling(factor=float(get("rope.scaling.factor")),
                                  original_max_position_embeddings=int(
                                      get("rope.scaling.original_context_length")))
        embed = int(get("embedding_length"))
        key_length = meta.get(f"{arch}.attention.key_length")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            hidden_size=embed,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=tied,
            max_position_embeddings=int(get("context_length", 2048)),
            head_dim_=int(key_length) if key_length is not None and int(key_length) != embed // n_heads else None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            architecture="LlamaForCausalLM",
        )

    def gguf_metadata(self) -> dict[str, Any]:
        """The `llama.*` keys that describe this config in a GGUF file."""
        meta: dict[str, Any] = {
            "llama.block_count": self.num_hidden_layers,
            "llama.context_length": self.max_position_embeddings,
            "llama.embedding_length": self.hidden_size,
            "llama.feed_forward_length": self.intermediate_size,
            "llama.attention.head_count": self.num_attention_heads,
            "llama.attention.head_count_kv": self.num_key_value_heads,
            "llama.rope.freq_base": float(self.rope_theta),
            "llama.attention.layer_norm_rms_epsilon": float(self.rms_norm_eps),
            "llama.vocab_size": self.vocab_size,
            "llama.rope.dimension_count": self.head_dim,
        }
        if self.head_dim_ is not None:
            meta["llama.attention.key_length"] = self.head_dim
            meta["llama.attention.value_length"] = self.head_dim
        return meta


def _rope_scaling_from_hf(rs: Mapping[str, Any] | None) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise LlamacpuError(f"unsupported rope_scaling type {kind!r}: llamacpu runs 'llama3' scaling only")
    defaults = RopeScaling()
    return RopeScaling(
        factor=float(rs.get("factor", defaults.factor)),
        low_freq_factor=float(rs.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(rs.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            rs.get("original_max_position_embeddings", defaults.original_max_position_embeddings)),
    )


def llama3_freq_factors(inv_freq: np.ndarray, rs: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of Llama-3.1 RoPE scaling (Meta's reference formula).

    Long wavelengths are divided by `factor`, short ones kept, and the band between is
    interpolated smoothly; llama.cpp stores the same divisors as the `rope_freqs` tensor.
    """
    old_ctx = rs.original_max_position_embeddings
    low_wavelen = old_ctx / rs.low_freq_factor
    high_wavelen = old_ctx / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    factors = 1.0 / ((1 - smooth) / rs.factor + smooth)  # the interpolated band
    factors = np.where(wavelen < high_wavelen, 1.0, factors)
    factors = np.where(wavelen > low_wavelen, rs.factor, factors)
    return factors
