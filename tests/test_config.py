import math

import numpy as np
import pytest

from llamacpu.config import ModelConfig, RopeScaling, llama3_freq_factors
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
    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
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


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(LlamacpuError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf({**HF, "rope_scaling": {"type": "yarn", "factor": 4.0}})
