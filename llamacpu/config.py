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
ROPE_TYPES = ("default", "linear", "llama3")  # transformers' rope_type values we compute


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_type` names it ("default" is no scaling).

    linear: every inverse frequency divided by `factor` (position interpolation).
    llama3: Llama 3.1's band-wise division: long wavelengths by `factor`, short ones kept,
        the band between interpolated; uses the three fields below (None for "linear").
    """

    rope_type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise LlamacpuError(f"unsupported RoPE type {self.rope_type!r}: llamacpu runs {', '.join(ROPE_TYPES)}")
        numbers = {"factor": self.factor}
        if self.rope_type == "llama3":
            numbers.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                           original_max_position_embeddings=self.original_max_position_embeddings)
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LlamacpuError(f"config: {self.rope_type} RoPE {name} must be a positive number, got {value!r}")

    def freq_factors(self, inv_freq: np.ndarray) -> np.ndarray:
        """Per-frequency divisors (hd/2,) of the unscaled inverse frequencies `inv_freq` (hd/2,)."""
        if self.rope_type == "linear":
            return np.full(inv_freq.shape, float(self.factor))
        return llama3_freq_factors(inv_freq, self)


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
    rope_scaling: RopeScaling | None = None  # None: "default" RoPE
    tie_word_embeddings: bool = False  # output head reuses the embedding matrix
    max_position_embeddings: int = 2048  # context length the model was trained for
    head_dim_: int | None = None  # explicit head_dim (Mistral configs carry one)
    sliding_window: int | None = None  # Mistral: each query sees only the last `sliding_window` keys
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
        if self.head_dim_ is not None:
            sizes["head_dim"] = self.head_dim_
        if self.sliding_window is not None:
            sizes["sliding_window"] = self.sliding_window
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LlamacpuError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlamacpuError(
                f"config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads")
        if self.head_dim_ is None and self.hidden_size % self.num_attention_heads:
            raise LlamacpuError("config: hidden_size is not a multiple of num_attention_heads")
        if self.head_dim % 2:
            raise LlamacpuError(f"config: head_dim {self.head_dim} must be even for RoPE")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise LlamacpuError(f"config: {name} must be a positive number, got {value!r}")

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

    @property
    def context_length(self) -> int:
        """The most positions this model runs exactly: its trained context, or Mistral's sliding
        window when that is smaller (past the window each query would have to drop its oldest
        keys, which llamacpu does not implement; up to it, full attention is the same math)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def check_context(self, n_positions: int) -> None:
        """Refuse a KV cache of `n_positions` that sliding-window attention would make inexact."""
        if self.sliding_window is not None and n_positions > self.sliding_window:
            raise LlamacpuError(
                f"a context of {n_positions} tokens exceeds this model's sliding attention window of "
                f"{self.sliding_window}; llamacpu runs sliding-window models only within the window "
                f"(use a context of at most {self.sliding_window})")

    def rope_inv_freq(self, freq_factors: np.ndarray | None = None) -> np.ndarray:
        """Inverse frequencies (head_dim/2,) float64: theta^(-2i/head_dim), divided per frequency by
        the scaling's divisors and by `freq_factors`, llama.cpp's `rope_freqs` tensor (hd/2,) as a
        GGUF may carry it (llama.cpp applies both, so do we).

        transformers computes the same formulas in float32 (about 1e-7 relative apart).
        """
        half = self.head_dim // 2
        inv = 1.0 / self.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / self.head_dim)
        divisors = np.ones(half)
        if self.rope_scaling is not None:
            divisors = divisors * self.rope_scaling.freq_factors(inv)
        if freq_factors is not None:
            ff = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
            if ff.shape != (half,) or not np.all(np.isfinite(ff)) or np.any(ff <= 0):
                raise LlamacpuError(f"rope_freqs must hold {half} positive finite factors")
            divisors = divisors * ff
        return inv / divisors

    # Construction.
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a HF `config.json` dict, reading or refusing every key of `HF_MATH_KEYS`.

        Other keys (token ids aside) do not change the forward pass and are ignored. A key that
        is absent takes transformers 5.24's default for the architecture.
        """
        archs = cfg.get("architectures") or []
        arch = archs[0] if isinstance(archs, list) and archs else cfg.get("model_type", "?")
        if arch not in SUPPORTED_HF_ARCHITECTURES:
            raise LlamacpuError(
                f"unsupported architecture {arch!r}: llamacpu runs {', '.join(SUPPORTED_HF_ARCHITECTURES)}")
        mistral = arch == "MistralForCausalLM"
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise LlamacpuError(f"config.json lacks {', '.join(missing)}")
        _require(cfg, "hidden_act", "silu", lambda v: v == "silu", "llamacpu runs SwiGLU with silu")
        _require(cfg, "attention_bias", False, lambda v: v is False, "llamacpu has no attention biases")
        _require(cfg, "mlp_bias", False, lambda v: v is False, "llamacpu has no MLP biases")
        quant = cfg.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else quant
            raise LlamacpuError(f"config.json: quantization_config ({method}) is not supported; "
                                "give the unquantized checkpoint")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        n_heads = cfg["num_attention_heads"]
        theta, scaling = _rope_from_hf(cfg)
        # transformers' defaults when a key is absent (LlamaConfig / MistralConfig, 5.24). A null
        # num_key_value_heads means the head count for Llama; MistralConfig refuses it, so do we.
        kv = cfg.get("num_key_value_heads", 8 if mistral else n_heads)
        kv = n_heads if kv is None and not mistral else kv
        window = cfg.get("sliding_window", 4096) if mistral else None  # LlamaForCausalLM has no window
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=kv,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_flag(cfg.get("tie_word_embeddings", False), "tie_word_embeddings"),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072 if mistral else 2048),
            head_dim_=cfg.get("head_dim"),  # None (absent or null): hidden_size // heads
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, tied: bool) -> "ModelConfig":
        """Build from GGUF metadata (key → value), reading or refusing every key of `GGUF_MATH_KEYS`.

        `tied`: the file has no `output.weight`. Absent optional keys take llama.cpp's defaults.
        """
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise LlamacpuError(f"unsupported GGUF architecture {arch!r}: llamacpu runs 'llama'")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise LlamacpuError(f"GGUF metadata lacks {arch}.{key}")
            return value

        def integer(key: str, default: Any = None) -> int:
            # llama.cpp reads only these as "one value or one per layer"; the rest are scalars
            per_layer = key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
            return _gguf_int(get(key, default), f"{arch}.{key}", per_layer=per_layer)

        def real(key: str, default: Any = None, *, allow_zero: bool = False) -> float:
            return _number(get(key, default), f"{arch}.{key}", allow_zero=allow_zero)

        experts = integer("expert_count", 0)
        if experts:
            raise LlamacpuError(f"{arch}.expert_count is {experts}: mixture-of-experts models are not supported")
        n_heads = integer("attention.head_count")
        embed = integer("embedding_length")
        head_dim = integer("attention.key_length", embed // n_heads if n_heads else 0)
        value_length = integer("attention.value_length", head_dim)
        if value_length != head_dim:
            raise LlamacpuError(f"{arch}.attention.value_length {value_length} differs from key_length "
                                f"{head_dim}; llamacpu needs one head size")
        rope_dims = integer("rope.dimension_count", head_dim)
        if rope_dims != head_dim:  # llama.cpp refuses this for `llama` too ("invalid n_rot")
            raise LlamacpuError(f"{arch}.rope.dimension_count {rope_dims} differs from the head size "
                                f"{head_dim}: partial rotary embeddings are not supported")
        scale = real("attention.scale", 0.0, allow_zero=True)
        if scale != 0.0:
            raise LlamacpuError(f"{arch}.attention.scale {scale} is not supported (llamacpu scales by 1/sqrt(head_dim))")
        attn_factor = real("rope.scaling.attn_factor", 1.0)
        if attn_factor != 1.0:
            raise LlamacpuError(f"{arch}.rope.scaling.attn_factor {attn_factor} is not supported")
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise LlamacpuError(f"GGUF metadata lacks {arch}.vocab_size and a tokenizer")
            vocab = len(tokens)
        window = integer("attention.sliding_window", 0)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            hidden_size=embed,
            intermediate_size=integer("feed_forward_length"),
            num_hidden_layers=integer("block_count"),
            num_attention_heads=n_heads,
            num_key_value_heads=integer("attention.head_count_kv", n_heads),
            vocab_size=_gguf_int(vocab, f"{arch}.vocab_size"),
            rms_norm_eps=real("attention.layer_norm_rms_epsilon"),  # llama.cpp requires it too
            rope_theta=real("rope.freq_base", 10000.0),
            rope_scaling=_rope_from_gguf(meta, arch),
            tie_word_embeddings=tied,
            max_position_embeddings=integer("context_length"),
            head_dim_=head_dim if head_dim != (embed // n_heads if n_heads else 0) else None,
            sliding_window=window or None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            architecture="LlamaForCausalLM",
        )

    def gguf_metadata(self) -> dict[str, Any]:
        """The `llama.*` keys that describe this config in a GGUF file, as llama.cpp reads them.

        Llama-3 scaling is not a key: llama.cpp takes it from the `rope_freqs` tensor, which
        `convert` writes (`rope_freqs()`). Linear scaling is `rope.scaling.type` + `factor`,
        as llama.cpp's convert_hf_to_gguf.py writes it. A sliding window is written as
        `attention.sliding_window`; llama.cpp's `llama` ignores it, llamacpu honours it.
        """
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
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "linear":
            meta["llama.rope.scaling.type"] = "linear"
            meta["llama.rope.scaling.factor"] = float(self.rope_scaling.factor)
        if self.sliding_window is not None:
            meta["llama.attention.sliding_window"] = self.sliding_window
        return meta

    def rope_freqs(self) -> np.ndarray | None:
        """llama.cpp's `rope_freqs` tensor (hd/2,) float32 for Llama-3 scaling; None otherwise."""
        if self.rope_scaling is None or self.rope_scaling.rope_type != "llama3":
            return None
        half = self.head_dim // 2
        base = 1.0 / self.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / self.head_dim)
        return self.rope_scaling.freq_factors(base).astype(np.float32)


# Every config.json key that changes the forward pass of LlamaForCausalLM / MistralForCausalLM in
# transformers 5.24, and what `from_hf` does with it. Keys not listed (token ids, dtype, dropout,
# initializer_range, use_cache, pretraining_tp: a sharding detail of the same math) are ignored.
HF_MATH_KEYS = {
    "architectures": "LlamaForCausalLM or MistralForCausalLM, else refused",
    "model_type": "read only when architectures is absent",
    "hidden_size": "read", "intermediate_size": "read", "num_hidden_layers": "read",
    "num_attention_heads": "read", "vocab_size": "read",
    "num_key_value_heads": "read (absent or null: the head count; Mistral: absent 8, null refused)",
    "head_dim": "read (absent or null: hidden_size // num_attention_heads)",
    "rms_norm_eps": "read (absent: 1e-6)",
    "tie_word_embeddings": "read (absent: false)",
    "max_position_embeddings": "read (absent: 2048; Mistral: 131072)",
    "hidden_act": "silu, else refused",
    "attention_bias": "false, else refused",
    "mlp_bias": "false, else refused",
    "quantization_config": "refused",
    "sliding_window": "Mistral: read (absent: 4096), contexts beyond it refused; Llama: has none",
    "rope_theta": "read (absent: 10000)",
    "rope_scaling": "legacy RoPE parameters: type default / linear / llama3, others refused",
    "rope_parameters": "transformers 5 RoPE parameters: the same",
    "partial_rotary_factor": "1.0, else refused",
    "original_max_position_embeddings": "read for llama3 RoPE (transformers gives it precedence)",
}

# RoPE parameter keys by type (transformers' `_validate_*_rope_parameters`); "type" is the legacy
# spelling of "rope_type". Any other key is refused: its meaning would be guessed.
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings"},
}


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either layout, as transformers 5.24 standardizes them.

    Legacy: top-level `rope_theta`, and `rope_scaling` {type | rope_type, factor, ...} or null.
    transformers 5: `rope_parameters` {rope_theta, rope_type, factor, ...}. transformers lets
    `rope_scaling` win over `rope_parameters`, and the dict's rope_theta over the top-level one;
    a config where two places disagree is refused rather than resolved silently.
    """
    legacy, v5 = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    for name, value in (("rope_scaling", legacy), ("rope_parameters", v5)):
        if value is not None and not isinstance(value, Mapping):
            raise LlamacpuError(f"config.json: {name} must be an object, got {value!r}")
    if legacy and v5 and _rope_view(legacy) != _rope_view(v5):
        raise LlamacpuError("config.json: rope_scaling and rope_parameters disagree; "
                            "remove the stale one")
    params = dict(legacy or v5 or {})
    thetas = {float(v) for v in (cfg.get("rope_theta"), params.get("rope_theta"))
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(thetas) > 1:
        raise LlamacpuError(f"config.json: rope_theta is given twice, as {sorted(thetas)}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = _number(theta, "rope_theta")
    kinds = {params[k] for k in ("rope_type", "type") if k in params and isinstance(params[k], str)}
    if any(not isinstance(params[k], str) for k in ("rope_type", "type") if k in params):
        raise LlamacpuError(f"config.json: the RoPE type must be a string, got {params!r:.80}")
    if len(kinds) > 1:
        raise LlamacpuError(f"config.json: RoPE type is given as both {sorted(map(str, kinds))}")
    kind = kinds.pop() if kinds else "default"
    if kind not in ROPE_TYPES:
        raise LlamacpuError(f"unsupported RoPE type {kind!r} (rope_type): llamacpu runs {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(params) - _ROPE_KEYS[kind])
    if unknown:
        raise LlamacpuError(f"config.json: unsupported {kind} RoPE parameter {unknown[0]!r}")
    for where in (params, cfg):
        prf = where.get("partial_rotary_factor", 1.0)
        if prf != 1.0:
            raise LlamacpuError(f"config.json: partial_rotary_factor {prf!r} is not supported (only 1.0)")
    if kind == "default":
        return theta, None
    missing = sorted((_ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor",
                                          "original_max_position_embeddings"}) - set(params))
    if missing:
        raise LlamacpuError(f"config.json: {kind} RoPE lacks {', '.join(missing)}")
    if kind == "linear":
        return theta, RopeScaling("linear", params["factor"])
    # transformers: a top-level original_max_position_embeddings wins (Phi-3's layout); else the
    # dict's; else max_position_embeddings.
    original = cfg.get("original_max_position_embeddings",
                       params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)))
    return theta, RopeScaling("llama3", params["factor"], params["low_freq_factor"],
                              params["high_freq_factor"], original)


def _rope_view(d: Mapping[str, Any]) -> dict[str, Any]:
    """A RoPE dict with the legacy `type` spelled `rope_type`, for comparing the two layouts."""
    out = {k: v for k, v in d.items() if k != "type"}
    if "type" in d:
        out.setdefault("rope_type", d["type"])
    out.pop("rope_theta", None)  # compared separately (it may sit at the top level instead)
    return out


def _rope_from_gguf(meta: Mapping[str, Any], arch: str) -> RopeScaling | None:
    """Scaling from `{arch}.rope.scaling.*` as llama.cpp reads it: the type defaults to linear,
    and a factor (or the old `rope.scale_linear`) of 0 or 1 means none. Llama-3 GGUFs carry
    their scaling as the `rope_freqs` tensor instead, which the model applies."""
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 0.0))
    factor = _number(factor, f"{arch}.rope.scaling.factor", allow_zero=True)
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        return None
    if kind != "linear":
        raise LlamacpuError(f"unsupported RoPE scaling type {kind!r} ({arch}.rope.scaling.type): "
                            "llamacpu runs none, linear, and llama3 frequency factors")
    return RopeScaling("linear", factor)


# Every GGUF metadata key that changes the forward pass of llama.cpp's `llama` architecture, and
# what `from_gguf` does with it.
GGUF_MATH_KEYS = {
    "general.architecture": "llama, else refused",
    "llama.embedding_length": "read", "llama.feed_forward_length": "read", "llama.block_count": "read",
    "llama.attention.head_count": "read", "llama.context_length": "read",
    "llama.attention.head_count_kv": "read (absent: head_count)",
    "llama.attention.layer_norm_rms_epsilon": "read (required, as in llama.cpp)",
    "llama.attention.key_length": "read as head_dim (absent: embedding_length // head_count)",
    "llama.attention.value_length": "equal to key_length, else refused",
    "llama.attention.scale": "absent or 0, else refused",
    "llama.attention.sliding_window": "read; contexts beyond it refused",
    "llama.rope.freq_base": "read (absent: 10000)",
    "llama.rope.dimension_count": "equal to head_dim, else refused",
    "llama.rope.scaling.type": "none or linear, else refused",
    "llama.rope.scaling.factor": "read for linear scaling",
    "llama.rope.scale_linear": "read for linear scaling (the old key)",
    "llama.rope.scaling.attn_factor": "absent or 1, else refused",
    "llama.expert_count": "absent or 0, else refused",
    "llama.vocab_size": "read (absent: the tokenizer's size)",
}


def _require(cfg: Mapping[str, Any], key: str, default: Any, ok, why: str) -> None:
    value = cfg.get(key, default)
    if not ok(value):
        raise LlamacpuError(f"config.json: {key} {value!r} is not supported; {why}")


def _number(value: Any, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise LlamacpuError(f"config: {name} must be a positive number, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise LlamacpuError(f"config: {name} must be true or false, got {value!r}")
    return value


def _gguf_int(value: Any, name: str, *, per_layer: bool = False) -> int:
    """A GGUF integer; for a `per_layer` key, an array is accepted when every layer has the same value."""
    if isinstance(value, (list, np.ndarray)) and not per_layer:
        raise LlamacpuError(f"GGUF {name} must be an integer, got an array")
    if isinstance(value, (list, np.ndarray)):
        arr = np.asarray(value).reshape(-1)
        if arr.dtype.kind not in "iu":
            raise LlamacpuError(f"GGUF {name} must be an integer, got an array of {arr.dtype}")
        values = {int(v) for v in arr}
        if len(values) != 1:
            raise LlamacpuError(f"GGUF {name} varies per layer; llamacpu needs one value")
        value = values.pop()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LlamacpuError(f"GGUF {name} must be an integer, got {value!r}")
    return int(value)


def llama3_freq_factors(inv_freq: np.ndarray, rs: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of Llama-3.1 RoPE scaling (Meta's reference formula, as
    transformers' `_compute_llama3_parameters` applies it).

    Long wavelengths are divided by `factor`, short ones kept, and the band between is
    interpolated smoothly; llama.cpp stores the same divisors as the `rope_freqs` tensor.
    """
    old_ctx = rs.original_max_position_embeddings
    low_wavelen = old_ctx / rs.low_freq_factor
    high_wavelen = old_ctx / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    with np.errstate(divide="ignore", invalid="ignore"):  # high == low: the band is empty
        smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        factors = 1.0 / ((1 - smooth) / rs.factor + smooth)  # the interpolated band
    factors = np.where(wavelen < high_wavelen, 1.0, factors)
    factors = np.where(wavelen > low_wavelen, rs.factor, factors)
    return factors
