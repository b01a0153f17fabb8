import dataclasses
import math

import numpy as np
import pytest

from llamacpu.config import GGUF_MATH_KEYS, HF_MATH_KEYS, ModelConfig, RopeScaling, llama3_freq_factors
from llamacpu.errors import LlamacpuError

HF = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
      "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
      "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
      "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "some_new_key": 7}


def test_from_hf_derives_sizes_and_ignores_unknown_keys():
    c = ModelConfig.from_hf(HF)
    assert (c.head_dim, c.kv_dim, c.q_dim, c.n_rep) == (64, 192, 576, 3)
    assert c.tie_word_embeddings and c.eos_token_ids == (2,)


def test_from_hf_refuses_other_architectures():
    with pytest.raises(LlamacpuError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf({**HF, "architectures": ["GPT2LMHeadModel"]})


def test_from_hf_mistral_with_explicit_head_dim_and_eos_list():
    c = ModelConfig.from_hf({**HF, "architectures": ["MistralForCausalLM"], "head_dim": 128,
                             "eos_token_id": [2, 7]})
    assert c.head_dim == 128 and c.q_dim == 9 * 128 and c.eos_token_ids == (2, 7)


def test_gqa_must_divide():
    with pytest.raises(LlamacpuError, match="not a multiple"):
        ModelConfig.from_hf({**HF, "num_key_value_heads": 4})


def test_gguf_metadata_round_trip():
    c = ModelConfig.from_hf(HF)
    meta = {"general.architecture": "llama", **c.gguf_metadata(),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    back = ModelConfig.from_gguf(meta, tied=True)
    assert back == c.__class__(**{**c.__dict__, "architecture": "LlamaForCausalLM"})


def test_gguf_refuses_other_architectures():
    with pytest.raises(LlamacpuError, match="unsupported GGUF architecture 'gemma'"):
        ModelConfig.from_gguf({"general.architecture": "gemma"}, tied=True)


def test_llama3_rope_scaling_matches_the_published_formula():
    # Meta's Llama-3.1 reference, evaluated point by point (independent of the vectorized code).
    rs = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
    c = ModelConfig.from_hf({**HF, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    base = 1.0 / 500000.0 ** (np.arange(32) * 2 / 64)
    expected = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(c.rope_inv_freq(), expected, rtol=1e-12)
    np.testing.assert_allclose(base / llama3_freq_factors(base, rs), expected, rtol=1e-12)
    np.testing.assert_allclose(c.rope_freqs(), base / np.array(expected), rtol=1e-6)  # llama.cpp's tensor


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


@pytest.mark.parametrize("kind", ["default", "linear", "llama3"])
def test_both_config_layouts_give_the_same_model(kind):
    params = {"linear": {"factor": 4.0}, "llama3": LLAMA3, "default": {}}[kind]
    legacy = {**HF, "rope_theta": 250000.0, "rope_scaling": {"type": kind, **params} if kind != "default" else None}
    v5 = {k: v for k, v in HF.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_theta": 250000.0, "rope_type": kind, **params}
    a, b = ModelConfig.from_hf(legacy), ModelConfig.from_hf(v5)
    assert a == b and a.rope_theta == 250000.0
    assert (a.rope_scaling.rope_type if a.rope_scaling else "default") == kind
    base = 1.0 / 250000.0 ** (np.arange(32) * 2 / 64)
    if kind == "default":
        np.testing.assert_allclose(b.rope_inv_freq(), base, rtol=1e-12)
    if kind == "linear":  # position interpolation: every frequency divided by the factor
        np.testing.assert_allclose(b.rope_inv_freq(), base / 4.0, rtol=1e-12)


def test_transformers_5_rope_theta_is_read():
    # issue 7: a SmolLM2 folder saved by transformers 5 ran with theta 1e4 instead of 1e5.
    cfg = {k: v for k, v in HF.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    assert ModelConfig.from_hf(cfg).rope_theta == 100000.0
    del cfg["rope_parameters"]
    assert ModelConfig.from_hf(cfg).rope_theta == 10000.0  # transformers' default_theta


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope", "proportional", "su"])
@pytest.mark.parametrize("where", ["rope_scaling.type", "rope_scaling.rope_type", "rope_parameters.rope_type"])
def test_other_rope_types_are_refused_by_name(kind, where):
    key, field = where.split(".")
    cfg = {**HF, key: {field: kind, "factor": 4.0, "original_max_position_embeddings": 2048}}
    with pytest.raises(LlamacpuError, match=f"unsupported RoPE type '{kind}'"):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"type": "linear"}}, "linear RoPE lacks factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}, "lacks high_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}, "parameter 'beta_fast'"),
    ({"rope_scaling": {"type": "linear", "rope_type": "llama3", "factor": 2.0}}, "RoPE type is given as both"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "linear", "factor": 3.0}},
     "rope_scaling and rope_parameters disagree"),
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, "rope_theta is given twice"),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "factor must be a positive number"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    ({"rope_scaling": {"type": ["linear"], "factor": 2.0}}, "RoPE type must be a string"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}, "partial_rotary_factor 0.25"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias True"),
    ({"mlp_bias": True}, "mlp_bias True"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quantization_config \(gptq\)"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
])
def test_keys_that_change_the_math_are_read_or_refused(change, match):
    with pytest.raises(LlamacpuError, match=match):
        ModelConfig.from_hf({**HF, **change})


def test_same_values_in_both_layouts_are_accepted():
    cfg = {**HF, "rope_scaling": {"type": "linear", "factor": 2.0},
           "rope_parameters": {"rope_theta": 100000.0, "rope_type": "linear", "factor": 2.0}}
    c = ModelConfig.from_hf(cfg)
    assert c.rope_scaling == RopeScaling("linear", 2.0) and c.rope_theta == 100000.0


def test_llama3_original_context_as_transformers_resolves_it():
    cfg = {**HF, "max_position_embeddings": 4096,
           "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"} | {
               "rope_type": "llama3"}}
    assert ModelConfig.from_hf(cfg).rope_scaling.original_max_position_embeddings == 4096  # falls back
    cfg["rope_scaling"]["original_max_position_embeddings"] = 1024
    assert ModelConfig.from_hf(cfg).rope_scaling.original_max_position_embeddings == 1024
    cfg["original_max_position_embeddings"] = 512  # a top-level value wins in transformers
    assert ModelConfig.from_hf(cfg).rope_scaling.original_max_position_embeddings == 512


def test_absent_keys_take_transformers_defaults():
    bare = {k: v for k, v in HF.items() if k not in (
        "rms_norm_eps", "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings", "rope_theta")}
    c = ModelConfig.from_hf(bare)
    assert (c.rms_norm_eps, c.num_key_value_heads, c.tie_word_embeddings, c.max_position_embeddings,
            c.rope_theta, c.sliding_window) == (1e-6, 9, False, 2048, 10000.0, None)
    m = ModelConfig.from_hf({**bare, "architectures": ["MistralForCausalLM"], "num_attention_heads": 16,
                             "hidden_size": 1024})
    assert (m.num_key_value_heads, m.max_position_embeddings, m.sliding_window) == (8, 131072, 4096)
    assert ModelConfig.from_hf({**bare, "architectures": ["MistralForCausalLM"], "num_key_value_heads": 3,
                                "sliding_window": None}).sliding_window is None
    assert ModelConfig.from_hf({**bare, "num_key_value_heads": None}).num_key_value_heads == 9
    with pytest.raises(LlamacpuError, match="num_key_value_heads must be a positive integer"):
        ModelConfig.from_hf({**bare, "architectures": ["MistralForCausalLM"], "num_key_value_heads": None})
    # LlamaForCausalLM has no sliding window in transformers: the key means nothing there.
    assert ModelConfig.from_hf({**HF, "sliding_window": 16}).sliding_window is None


def test_sliding_window_bounds_the_context():
    from llamacpu.model import KVCache
    c = ModelConfig.from_hf({**HF, "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
                             "max_position_embeddings": 32768})
    assert c.context_length == 4096
    KVCache(dataclasses.replace(c, num_hidden_layers=1), 4096)  # up to the window: the same math
    with pytest.raises(LlamacpuError, match="sliding attention window of 4096"):
        KVCache(c, 4097)
    meta = {"general.architecture": "llama", **c.gguf_metadata()}
    assert meta["llama.attention.sliding_window"] == 4096
    assert ModelConfig.from_gguf(meta, tied=True).sliding_window == 4096


class _Recorder(dict):
    """A config dict that records which keys were looked at."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = set()

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


# The decision for each key that changes the math lives in config.HF_MATH_KEYS / GGUF_MATH_KEYS.
# A key the loader starts reading must be added there, and here: deciding about it is the point.
HF_KEYS_DECIDED = {
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias",
    "quantization_config", "sliding_window", "rope_theta", "rope_scaling", "rope_parameters",
    "partial_rotary_factor", "original_max_position_embeddings",
}
NOT_MATH = {"bos_token_id", "eos_token_id"}


def test_every_config_key_read_is_a_decided_one():
    seen = set()
    for cfg in [{**HF, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},
                {**HF, "architectures": ["MistralForCausalLM"], "head_dim": 64},
                {k: v for k, v in HF.items() if k != "architectures"} | {"model_type": "llama"}]:
        if "architectures" not in cfg:
            with pytest.raises(LlamacpuError):  # model_type alone is not an architecture we run
                ModelConfig.from_hf(rec := _Recorder(cfg))
        else:
            ModelConfig.from_hf(rec := _Recorder(cfg))
        seen |= rec.seen
    assert seen - NOT_MATH <= HF_KEYS_DECIDED
    assert set(HF_MATH_KEYS) == HF_KEYS_DECIDED


GGUF_KEYS_DECIDED = {
    "general.architecture", "llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
    "llama.attention.head_count", "llama.context_length", "llama.attention.head_count_kv",
    "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length", "llama.attention.value_length",
    "llama.attention.scale", "llama.attention.sliding_window", "llama.rope.freq_base",
    "llama.rope.dimension_count", "llama.rope.scaling.type", "llama.rope.scaling.factor",
    "llama.rope.scale_linear", "llama.rope.scaling.attn_factor", "llama.expert_count", "llama.vocab_size",
}


def test_every_gguf_key_read_is_a_decided_one():
    meta = _Recorder({"general.architecture": "llama", **ModelConfig.from_hf(HF).gguf_metadata()})
    ModelConfig.from_gguf(meta, tied=True)
    assert meta.seen - {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"} <= GGUF_KEYS_DECIDED
    assert set(GGUF_MATH_KEYS) == GGUF_KEYS_DECIDED


def _gguf(**changes):
    meta = {"general.architecture": "llama", **ModelConfig.from_hf(HF).gguf_metadata()}
    for k, v in changes.items():
        key = "llama." + k.replace("__", ".")
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    return meta


@pytest.mark.parametrize("changes, match", [
    (dict(rope__scaling__type="yarn", rope__scaling__factor=4.0), "RoPE scaling type 'yarn'"),
    (dict(rope__scaling__type="longrope"), "RoPE scaling type 'longrope'"),
    (dict(rope__dimension_count=32), "partial rotary embeddings"),
    (dict(attention__key_length=64, attention__value_length=32), "value_length 32 differs"),
    (dict(expert_count=8), "mixture-of-experts"),
    (dict(attention__scale=0.5), "attention.scale 0.5"),
    (dict(rope__scaling__attn_factor=1.2), "attn_factor"),
    (dict(attention__layer_norm_rms_epsilon=None), "lacks llama.attention.layer_norm_rms_epsilon"),
    (dict(attention__head_count_kv=np.array([3, 3, 1] * 10, dtype=np.int32)), "varies per layer"),
    (dict(feed_forward_length="1536"), "must be an integer"),
    (dict(feed_forward_length=["1536"]), "must be an integer"),
    (dict(context_length=None), "lacks llama.context_length"),
    # only head counts and the FFN width may come one per layer (fuzz: block_count = [2, 2] ran)
    (dict(block_count=np.array([30, 30], dtype=np.int32)), "block_count must be an integer, got an array"),
    (dict(embedding_length=np.array([576] * 30, dtype=np.int32)), "must be an integer, got an array"),
])
def test_gguf_keys_that_change_the_math_are_read_or_refused(changes, match):
    with pytest.raises(LlamacpuError, match=match):
        ModelConfig.from_gguf(_gguf(**changes), tied=True)


def test_gguf_linear_scaling_and_per_layer_arrays():
    c = ModelConfig.from_gguf(_gguf(rope__scaling__type="linear", rope__scaling__factor=4.0), tied=True)
    assert c.rope_scaling == RopeScaling("linear", 4.0)
    assert ModelConfig.from_gguf(_gguf(rope__scale_linear=2.0), tied=True).rope_scaling == RopeScaling("linear", 2.0)
    assert ModelConfig.from_gguf(_gguf(rope__scaling__type="none", rope__scaling__factor=4.0),
                                 tied=True).rope_scaling is None
    assert ModelConfig.from_gguf(_gguf(rope__scaling__factor=1.0), tied=True).rope_scaling is None
    uniform = ModelConfig.from_gguf(_gguf(attention__head_count_kv=np.full(30, 3, np.int32)), tied=True)
    assert uniform.num_key_value_heads == 3
    # Written back as llama.cpp's converter writes linear scaling, and read again.
    lin = ModelConfig.from_hf({**HF, "rope_scaling": {"type": "linear", "factor": 4.0}})
    meta = lin.gguf_metadata()
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    back = ModelConfig.from_gguf({"general.architecture": "llama", **meta}, tied=True)
    assert dataclasses.replace(back, bos_token_id=1, eos_token_ids=(2,)) == lin
    # Llama-3 scaling has no key: it travels as the rope_freqs tensor.
    l3 = ModelConfig.from_hf({**HF, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    assert not any("scaling" in k for k in l3.gguf_metadata()) and l3.rope_freqs().shape == (32,)
    back = ModelConfig.from_gguf({"general.architecture": "llama", **l3.gguf_metadata()}, tied=True)
    np.testing.assert_allclose(back.rope_inv_freq(l3.rope_freqs()), l3.rope_inv_freq(), rtol=1e-6)
