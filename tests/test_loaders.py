"""GGUF and HF loaders: names, shapes, Q/K row order, and clear errors on bad files."""

import numpy as np
import pytest

from llamacpu.checkpoint import load_checkpoint
from llamacpu.errors import LlamacpuError
from llamacpu.loaders.gguf import read_metadata
from llamacpu.loaders.hf import pairs_to_rotate_half, rotate_half_to_pairs

from tiny import random_tensors, tiny_config, write_gguf, write_hf


def test_gguf_round_trip_f32(tmp_path):
    c = tiny_config()
    w = random_tensors(c)
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", c, w))
    assert ck.config.num_key_value_heads == 2 and not ck.config.tie_word_embeddings
    for name, t in w.items():
        np.testing.assert_array_equal(ck.tensors[name].dequantize(), t)


def test_gguf_tied_embeddings_when_output_absent(tmp_path):
    c = tiny_config(tie_word_embeddings=True)
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", c, random_tensors(c)))
    assert ck.config.tie_word_embeddings and "output" not in ck.tensors


def test_real_model_metadata_and_mmap(smollm2_path):
    ck = load_checkpoint(smollm2_path)
    c = ck.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert ck.tensors["layers.0.wq"].fmt == "q4_1" and ck.tensors["embed"].fmt == "q8_0"
    assert isinstance(ck.tensors["layers.0.wq"].data.base, np.memmap) or \
        isinstance(ck.tensors["layers.0.wq"].data, np.memmap)  # used straight from the mapping
    meta = read_metadata(smollm2_path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.tokens"]) == 49152


def test_real_model_dequantized_matches_gguf_package(smollm2_path):
    import gguf
    ours = load_checkpoint(smollm2_path, dequantize=True).tensors["layers.3.w_down"].dequantize()
    reader = gguf.GGUFReader(smollm2_path)
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    theirs = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("skip,match", [(("layers.1.wk",), "missing tensor layers.1.wk"),
                                        (("norm",), "missing tensor norm")])
def test_gguf_missing_tensor_is_named(tmp_path, skip, match):
    c = tiny_config()
    p = write_gguf(tmp_path / "m.gguf", c, random_tensors(c), skip=skip)
    with pytest.raises(LlamacpuError, match=match):
        load_checkpoint(p)


def test_gguf_unexpected_and_misshaped_tensors(tmp_path):
    c = tiny_config()
    w = random_tensors(c)
    p = write_gguf(tmp_path / "a.gguf", c, w, extra={"blk.0.attn_bogus.weight": np.zeros(4, np.float32)})
    with pytest.raises(LlamacpuError, match="unexpected tensor blk.0.attn_bogus.weight"):
        load_checkpoint(p)
    w["layers.0.wv"] = w["layers.0.wv"][:-1]
    p = write_gguf(tmp_path / "b.gguf", c, w)
    with pytest.raises(LlamacpuError, match=r"tensor layers.0.wv has shape \(31, 64\), expected \(32, 64\)"):
        load_checkpoint(p)


def test_gguf_truncated_and_garbage_files(tmp_path):
    c = tiny_config()
    p = write_gguf(tmp_path / "m.gguf", c, random_tensors(c))
    blob = p.read_bytes()
    for cut in (10, 300, len(blob) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(blob[:cut])
        with pytest.raises(LlamacpuError):
            load_checkpoint(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world, not a model" * 10)
    with pytest.raises(LlamacpuError, match="not a readable GGUF"):
        load_checkpoint(junk)
    with pytest.raises(LlamacpuError, match="no such file"):
        load_checkpoint(tmp_path / "absent.gguf")


def test_gguf_unsupported_architecture(tmp_path):
    c = tiny_config()
    p = write_gguf(tmp_path / "m.gguf", c, random_tensors(c), arch="gpt2")
    with pytest.raises(LlamacpuError, match="unsupported GGUF architecture 'gpt2'"):
        load_checkpoint(p)


def test_rotate_half_permutation_is_a_bijection_with_the_documented_order():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8
    p = rotate_half_to_pairs(w, 2)
    # Head 0: rows 0..3 (first half) and 4..7 (second half) interleave as 0,4,1,5,2,6,3,7.
    np.testing.assert_array_equal(p[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])
    np.testing.assert_array_equal(pairs_to_rotate_half(p, 2), w)


@pytest.mark.parametrize("shards,dtype", [(1, np.float32), (3, np.float16)])
def test_hf_folder_single_and_sharded(tmp_path, shards, dtype):
    c = tiny_config()
    w = random_tensors(c)
    ck = load_checkpoint(write_hf(tmp_path / "hf", c, w, dtype=dtype, shards=shards))
    for name, t in w.items():  # Q/K come back in llamacpu's row order
        np.testing.assert_allclose(ck.tensors[name].dequantize(), t.astype(dtype), rtol=0, atol=0)


def test_hf_errors(tmp_path):
    c = tiny_config()
    w = random_tensors(c)
    folder = write_hf(tmp_path / "hf", c, w)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace(
        "LlamaForCausalLM", "Qwen2ForCausalLM"))
    with pytest.raises(LlamacpuError, match="unsupported architecture 'Qwen2ForCausalLM'"):
        load_checkpoint(folder)
    del w["layers.0.w_up"]
    with pytest.raises(LlamacpuError, match="missing tensor layers.0.w_up"):
        load_checkpoint(write_hf(tmp_path / "hf2", c, w))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LlamacpuError, match="no config.json"):
        load_checkpoint(empty)


def test_gguf_types_without_native_kernels_are_transcoded_with_one_notice(tmp_path):
    import gguf
    from llamacpu.model import Model
    from llamacpu.quant import quantize
    c = tiny_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    w = random_tensors(c)
    rng = np.random.default_rng(3)
    # Q3_K has no Python quantizer: build valid blocks (hmask[32], qs[64], 12 scale bytes, f16 d).
    rows = c.intermediate_size
    blocks = rng.integers(0, 256, size=(rows, c.hidden_size // 256, 110), dtype=np.uint8)
    blocks[..., 108:110] = np.array([0.002], np.float16).view(np.uint8)
    q3k = blocks.reshape(rows, -1)
    path = tmp_path / "mixed.gguf"
    writer_tensors = {k: v for k, v in w.items() if k not in ("layers.0.w_up", "layers.1.wq")}
    wr = gguf.GGUFWriter(str(path), "llama")
    for key, value in c.gguf_metadata().items():
        (wr.add_float32 if isinstance(value, float) else wr.add_uint32)(key, value)
    wr.add_tokenizer_model("gpt2")
    wr.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    from llamacpu.loaders.gguf import to_gguf_name
    for name, t in writer_tensors.items():
        wr.add_tensor(to_gguf_name(name), t)
    fp4 = gguf.quants.quantize(w["layers.1.wq"], gguf.GGMLQuantizationType.MXFP4)
    wr.add_tensor("blk.1.attn_q.weight", fp4, raw_shape=fp4.shape, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    wr.add_tensor("blk.0.ffn_up.weight", q3k, raw_shape=q3k.shape, raw_dtype=gguf.GGMLQuantizationType.Q3_K)
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()

    ck = load_checkpoint(path)
    assert ck.notices == ["transcoded at load (the kernels run Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K natively; "
                          "`llamacpu convert` does it once): 1 × MXFP4→q8_0, 1 × Q3_K→q8_0"]
    assert ck.tensors["layers.0.w_up"].fmt == "q8_0" and ck.tensors["layers.1.wq"].fmt == "q8_0"
    # What was transcoded is data (convert branches on it); the notice is built from it.
    assert ck.transcoded == {"layers.0.w_up": ("Q3_K", "q8_0"), "layers.1.wq": ("MXFP4", "q8_0")}
    assert load_checkpoint(path, dequantize=True).transcoded == {}
    expected_up = gguf.quants.dequantize(q3k, gguf.GGMLQuantizationType.Q3_K)
    np.testing.assert_allclose(ck.tensors["layers.0.w_up"].dequantize(),
                               quantize(expected_up, "q8_0").dequantize(), rtol=0, atol=0)
    model = Model(ck.config, ck.tensors)
    logits = model.forward(np.arange(5), model.new_cache(8))
    assert np.isfinite(logits).all()
