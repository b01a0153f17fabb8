"""convert: HF folders and GGUF files → GGUF, read back by our loader; metadata, tokenizer and
template carried over; no partial output on failure."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import llamacpu.convert as convert
from llamacpu.checkpoint import load_checkpoint
from llamacpu.config import llama3_freq_factors
from llamacpu.convert import convert_model
from llamacpu.errors import LlamacpuError
from llamacpu.loaders.gguf import read_metadata
from llamacpu.runtime import open_model
from tiny import random_tensors, tiny_config, write_hf

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXT = "The quick brown fox jumps over the lazy dog. " * 8


def add_tokenizer(folder: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer.json trained on a few sentences, plus tokenizer_config.json
    with BOS/EOS and a chat template. Returns the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT, "Hello world, hello tiny model."], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": TEMPLATE}))
    return tok.get_vocab_size()


def tiny_hf(folder: Path, *, dtype=np.float32, seed=0, **overrides) -> Path:
    folder.mkdir(parents=True)
    vocab = add_tokenizer(folder, 300)
    c = tiny_config(vocab_size=vocab, **overrides)
    write_hf(folder, c, random_tensors(c, seed), dtype=dtype)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    # intermediate 80: the rows of w_down (80 long) can't be blocked and must fall back to f16.
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-hf", intermediate_size=80)


def same_model(a, b) -> bool:
    """Configs equal apart from BOS/EOS ids, which a GGUF takes from its tokenizer keys, and
    float fields, which GGUF stores as float32."""
    def norm(c):
        return dataclasses.replace(c, bos_token_id=None, eos_token_ids=(), rms_norm_eps=float(np.float32(c.rms_norm_eps)),
                                   rope_theta=float(np.float32(c.rope_theta)))
    return norm(a) == norm(b)


def logits(runtime, ids):
    return runtime.model.forward(np.asarray(ids), runtime.model.new_cache(len(ids)), all_logits=True)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_hf_round_trip(hf_dir, tmp_path, quant):
    out = tmp_path / f"tiny.{quant}.gguf"
    seen = []
    report = convert_model(hf_dir, out, quant, progress=lambda done, total, name: seen.append((done, total, name)))
    assert report.out == out and report.quant == quant and out.exists()
    assert report.bytes_written == out.stat().st_size
    assert report.n_tensors == len(seen) == 2 + 1 + 2 * 9  # embed, output, norm, 2 layers
    assert [d for d, _, _ in seen] == list(range(1, report.n_tensors + 1))
    blocked = quant not in ("f32", "f16")
    assert report.fallback == (["layers.0.w_down", "layers.1.w_down"] if blocked else [])
    ckpt = load_checkpoint(out)
    fmts = {name: t.fmt for name, t in ckpt.tensors.items()}
    assert fmts["norm"] == fmts["layers.1.attn_norm"] == "f32"
    assert fmts["layers.0.w_down"] == ("f16" if blocked else quant)
    assert fmts["layers.0.wq"] == quant and fmts["embed"] == quant  # untied: the embedding takes `quant`
    assert fmts["output"] == ("q8_0" if quant in ("q4_0", "q4_1") else quant)  # the head keeps 8 bits
    meta = read_metadata(out)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny-hf"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}[quant]
    assert meta["general.quantization_version"] == 2
    assert meta["tokenizer.chat_template"] == TEMPLATE
    assert meta["llama.feed_forward_length"] == 80

    src, dst = open_model(hf_dir, dequantize=True), open_model(out)
    assert same_model(dst.config, src.config)
    ids = src.tokenizer.encode(TEXT)
    assert dst.tokenizer.encode(TEXT) == ids and ids[0] == src.tokenizer.bos_id
    assert dst.template.render([{"role": "user", "content": "hi"}]) == "<s>user: hi</s>"
    a, b = logits(src, ids[:24]), logits(dst, ids[:24])
    if quant == "f32":
        np.testing.assert_array_equal(a, b)
    else:  # relative RMS error of the logits; measured 0.0008, 0.022, 0.29, 0.22 on this random model
        bound = {"f16": 3e-3, "q8_0": 0.05, "q4_0": 0.45, "q4_1": 0.35}[quant]
        assert np.sqrt(((a - b) ** 2).mean() / (a ** 2).mean()) < bound
    if quant == "q8_0":  # the same blocks as the runtime's own quantization at load
        np.testing.assert_array_equal(b, logits(open_model(hf_dir, quant="q8_0"), ids[:24]))


def test_f16_source_and_llama3_rope(tmp_path):
    src = tiny_hf(tmp_path / "l3", dtype=np.float16, seed=3)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "l3.gguf"
    convert_model(src, out, "f32")
    ckpt = load_checkpoint(out)
    c = load_checkpoint(src).config
    hd = c.head_dim
    base = 1.0 / c.rope_theta ** (np.arange(hd // 2) * 2 / hd)
    expect = llama3_freq_factors(base, c.rope_scaling)
    np.testing.assert_allclose(ckpt.tensors["rope_freqs"].dequantize(), expect, rtol=1e-6)
    ids = list(range(3, 40))
    np.testing.assert_allclose(logits(open_model(out), ids), logits(open_model(src, dequantize=True), ids),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2_q8(smollm2_path, tmp_path_factory) -> tuple[Path, "convert.ConvertReport"]:
    out = tmp_path_factory.mktemp("smol") / "smollm2.q8_0.gguf"
    return out, convert_model(smollm2_path, out)


def test_real_model_to_q8_0(smollm2_path, smollm2_q8):
    out, report = smollm2_q8
    assert report.quant == "q8_0" and report.fallback == [] and report.n_tensors == 272
    assert report.formats == {"q8_0": 211, "f32": 61}
    src_meta, meta = read_metadata(smollm2_path), read_metadata(out)
    for key, value in src_meta.items():
        if key.startswith("tokenizer.") or key == "general.name":
            assert meta[key] == value if not isinstance(value, np.ndarray) else np.array_equal(meta[key], value), key
    assert meta["general.file_type"] == 7
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.context_length"):
        assert meta[key] == src_meta[key]
    src = open_model(smollm2_path, dequantize=True)
    dst = open_model(out)
    assert dst.config == src.config
    prompt = src.template.render([{"role": "user", "content": "What is the capital of France?"}])
    assert dst.template.render([{"role": "user", "content": "What is the capital of France?"}]) == prompt
    ids = src.tokenizer.encode(prompt)
    assert dst.tokenizer.encode(prompt) == ids
    a, b = logits(src, ids), logits(dst, ids)
    rel_rms = np.sqrt(((a - b) ** 2).mean() / ((a - a.mean()) ** 2).mean())
    assert rel_rms < 0.05, rel_rms  # measured 0.016
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_gguf_source_same_format_is_copied(smollm2_q8, tmp_path):
    # q8_0 → q8_0 copies blocks as they are: the second file's tensors equal the first's bytes.
    first, _ = smollm2_q8
    again = tmp_path / "again.gguf"
    convert_model(first, again, "q8_0")
    a, b = load_checkpoint(first).tensors, load_checkpoint(again).tensors
    for name in ("embed", "layers.7.w_up", "norm"):
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data))


class Boom(Exception):
    pass


def test_failure_mid_write_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    calls = []
    real = convert._convert_tensor

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:  # header and four tensors already on disk
            raise Boom()
        return real(*args)

    monkeypatch.setattr(convert, "_convert_tensor", failing)
    with pytest.raises(Boom):
        convert_model(hf_dir, out, "q8_0")
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []


def test_interrupt_keeps_an_existing_output(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")
    monkeypatch.setattr(convert, "_convert_tensor", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert_model(hf_dir, out, "q4_0")
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_full_disk_is_a_one_line_error(hf_dir, tmp_path, monkeypatch):
    import errno

    import gguf

    def no_space(self, tensor, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", no_space)
    out = tmp_path / "out.gguf"
    with pytest.raises(LlamacpuError, match="No space left on device"):
        convert_model(hf_dir, out, "f16")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(hf_dir, tmp_path):
    with pytest.raises(LlamacpuError, match="unknown quantization"):
        convert_model(hf_dir, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(LlamacpuError, match="does not exist"):
        convert_model(hf_dir, tmp_path / "missing" / "x.gguf")
    with pytest.raises(LlamacpuError, match="is a directory"):
        convert_model(hf_dir, tmp_path)
    with pytest.raises(LlamacpuError, match="no such file"):
        convert_model(tmp_path / "nothing", tmp_path / "x.gguf")
    no_tokenizer = tmp_path / "bare"
    c = tiny_config()
    write_hf(no_tokenizer, c, random_tensors(c))
    with pytest.raises(LlamacpuError, match="tokenizer"):
        convert_model(no_tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_silu_second_moment_against_sampling():
    rng = np.random.default_rng(0)
    var = np.array([0.01, 1.0, 25.0])
    g = rng.standard_normal((200_000, 1)) * np.sqrt(var)
    sampled = ((g / (1 + np.exp(-g))) ** 2).mean(0)
    np.testing.assert_allclose(convert._silu_second_moment(var), sampled, rtol=0.02)


def test_importance_follows_the_inputs_of_each_matrix():
    from llamacpu.quant import QTensor
    c = tiny_config()
    raw = random_tensors(c, seed=1)
    raw["embed"][:, 5] *= 10  # residual channel 5 carries an outlier
    t = {k: QTensor("f32", v.shape, v) for k, v in raw.items()}
    imp = convert.input_importance(t, c)
    assert set(imp) == {f"layers.{i}.{n}" for i in range(2) for n in
                        ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    assert all(v.dtype == np.float32 and abs(v.mean() - 1) < 1e-5 for v in imp.values())
    # Layer 0's attention input: gain^2 times the embedding's channel second moments.
    s = (raw["embed"].astype(np.float64) ** 2).mean(0)
    expect = raw["layers.0.attn_norm"].astype(np.float64) ** 2 * s
    np.testing.assert_allclose(imp["layers.0.wq"], expect / expect.mean(), rtol=1e-5)
    assert imp["layers.0.wq"].argmax() == 5 and imp["layers.0.w_up"][5] > 1.2  # the outlier carries on
    # wo: query head h reads value head h // n_rep; its columns get that head's E[v^2].
    wo = imp["layers.0.wo"].reshape(c.num_attention_heads, c.head_dim)
    for h in range(c.num_attention_heads):
        np.testing.assert_array_equal(wo[h], wo[h // c.n_rep * c.n_rep])
    assert imp["layers.0.w_down"].shape == (c.intermediate_size,)


def test_tiny_gguf_source(tmp_path):
    from tiny import write_gguf
    c = tiny_config(tie_word_embeddings=True)
    raw = random_tensors(c, seed=7)
    src = write_gguf(tmp_path / "src.gguf", c, raw)
    out = tmp_path / "out.gguf"
    report = convert_model(src, out, "q4_0")
    assert report.fallback == [] and report.formats == {"f32": 5, "q4_0": 14, "q8_0": 1}  # tied head: q8_0
    a, b = read_metadata(src), read_metadata(out)
    assert b["tokenizer.ggml.tokens"] == a["tokenizer.ggml.tokens"]
    assert b["tokenizer.ggml.bos_token_id"] == 1 and b["general.file_type"] == 2
    ckpt = load_checkpoint(out)
    assert ckpt.config.tie_word_embeddings and "output" not in ckpt.tensors
    w = ckpt.tensors["layers.1.w_up"].dequantize()
    rel = np.sqrt(((w - raw["layers.1.w_up"]) ** 2).mean() / (raw["layers.1.w_up"] ** 2).mean())
    assert 0.02 < rel < 0.15  # 4-bit rounding: present, and bounded


def test_metadata_types():
    import gguf
    T = gguf.GGUFValueType
    assert convert._typed("tokenizer.ggml.bos_token_id", 1) == (1, T.UINT32, None)
    assert convert._typed("k", True) == (True, T.BOOL, None)
    assert convert._typed("k", 0.5) == (0.5, T.FLOAT32, None)
    assert convert._typed("k", ["a", "b"]) == (["a", "b"], T.ARRAY, T.STRING)
    assert convert._typed("k", np.array([1, 3], np.int32)) == ([1, 3], T.ARRAY, T.INT32)
    assert convert._typed("k", np.array([0.5], np.float32)) == ([0.5], T.ARRAY, T.FLOAT32)
    assert convert._typed("k", b"\x01\x02") == (b"\x01\x02", T.ARRAY, T.UINT8)
    assert convert._typed("k", []) is None
    with pytest.raises(LlamacpuError, match="cannot store metadata k"):
        convert._typed("k", [[1], [2]])
    carried = convert._carried_gguf_metadata({"general.tags": [[1]], "general.file_type": 2,
                                              "tokenizer.ggml.merges": [], "general.name": "x"})
    assert carried == {"general.name": ("x", T.STRING, None)}


def tiny_model_tensors(seed=3):
    from llamacpu.quant import QTensor
    c = tiny_config(bos_token_id=1)
    raw = random_tensors(c, seed=seed)
    return c, raw, {k: QTensor("f32", v.shape, v) for k, v in raw.items()}


def test_self_calibration_forward_and_moments():
    from llamacpu.calibrate import self_calibrate
    from llamacpu.model import Model
    c, raw, t = tiny_model_tensors()
    tokens, moments, seen = self_calibrate(t, c, start=1, sequences=3, length=20, seed=0, capture_logits=True)
    assert tokens.shape == (3, 20) and (tokens[:, 0] == 1).all() and seen.shape == (3, 20, c.vocab_size)
    assert len(np.unique(tokens[:, 1:])) > 10  # sampled, not stuck on one token
    # The batched step-by-step forward computes the model's logits (model.py's full forward).
    model = Model(c, t, threads=1)
    for b in range(3):
        full = model.forward(tokens[b], model.new_cache(20), all_logits=True)
        np.testing.assert_allclose(seen[b], full, rtol=1e-4, atol=1e-4)
    # Layer 0's attention input is RMSNorm(embedding) * gain, whatever the sampled tokens are.
    x = raw["embed"][tokens.reshape(-1)].astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * raw["layers.0.attn_norm"]
    np.testing.assert_allclose(moments["layers.0.wq"], (h * h).mean(0), rtol=1e-5)
    assert moments["layers.0.wk"] is moments["layers.0.wq"] and moments["layers.1.w_up"] is moments["layers.1.w_gate"]
    assert {k: v.shape for k, v in moments.items()} == {
        f"layers.{i}.{n}": ((c.intermediate_size,) if n == "w_down" else (c.q_dim,) if n == "wo" else (c.hidden_size,))
        for i in range(2) for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}


def test_self_calibration_is_deterministic():
    c, _, t = tiny_model_tensors()
    a = convert.calibrated_importance(t, c)
    b = convert.calibrated_importance(t, c)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(v.dtype == np.float32 and abs(v.mean() - 1) < 1e-5 for v in a.values())
    from llamacpu.calibrate import self_calibrate
    other = self_calibrate(t, c, start=1, seed=1)[1]
    assert not np.array_equal(other["layers.1.w_down"], self_calibrate(t, c, start=1, seed=0)[1]["layers.1.w_down"])


def test_calibration_switch(hf_dir, tmp_path):
    on = convert_model(hf_dir, tmp_path / "on.gguf", "q4_0")
    off = convert_model(hf_dir, tmp_path / "off.gguf", "q4_0", calibrate=False)
    assert (on.importance, off.importance) == ("self-calibrated", "weights-only")
    assert convert_model(hf_dir, tmp_path / "q8.gguf", "q8_0").importance is None
    assert (tmp_path / "on.gguf").read_bytes() == convert_model(hf_dir, tmp_path / "again.gguf", "q4_0").out.read_bytes()


def test_generation_config_becomes_gguf_sampling_keys(hf_dir, tmp_path):
    """HF's generation_config.json → llama.cpp's general.sampling.* keys, typed as gguf-py's
    writer types them, and read back by gguf-py (not by us)."""
    import shutil

    import gguf
    folder = shutil.copytree(hf_dir, tmp_path / "with-gen")
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1}))
    out = convert_model(folder, tmp_path / "out.gguf", quant="q8_0")
    fields = gguf.GGUFReader(str(out.out)).fields
    T = gguf.GGUFValueType
    expected = {"general.sampling.temp": (0.6, T.FLOAT32), "general.sampling.top_k": (20, T.INT32),
                "general.sampling.top_p": (0.8, T.FLOAT32), "general.sampling.penalty_repeat": (1.1, T.FLOAT32)}
    for key, (value, vtype) in expected.items():
        assert fields[key].types == [vtype] and abs(fields[key].contents() - value) < 1e-6, key
    assert "general.sampling.min_p" not in fields
    assert load_checkpoint(out.out).sampling == {"temperature": 0.6, "top_k": 20, "top_p": 0.8, "repeat_penalty": 1.1}


def test_quantizing_at_load_does_not_calibrate(hf_dir, tmp_path, monkeypatch):
    # issue 7: `run ./hf --quant q4_0` silently sampled ~1k tokens in f32 at every load.
    import llamacpu.calibrate

    def refuse(*a, **k):
        raise AssertionError("self-calibration ran at load")
    monkeypatch.setattr(llamacpu.calibrate, "self_calibrate", refuse)
    rt = open_model(hf_dir, quant="q4_0")
    convert_model(hf_dir, tmp_path / "off.gguf", "q4_0", calibrate=False)  # the weights-only search
    off = load_checkpoint(tmp_path / "off.gguf")
    for name, t in rt.checkpoint.tensors.items():
        assert t.fmt == off.tensors[name].fmt
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(off.tensors[name].data), err_msg=name)
    with pytest.raises(AssertionError, match="self-calibration ran"):  # the guard is real
        convert_model(hf_dir, tmp_path / "on.gguf", "q4_0")


def test_transcoded_source_is_converted_from_its_own_values(tmp_path):
    """A tensor the loader can't run as stored (MXFP4 here) is transcoded to q8_0 at load;
    convert must start from the file's values instead, not stack a second rounding."""
    import gguf
    from llamacpu.loaders.gguf import to_gguf_name
    c = tiny_config(hidden_size=64, intermediate_size=64)
    w = random_tensors(c, seed=5)
    path = tmp_path / "fp4.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    for key, value in c.gguf_metadata().items():
        (wr.add_float32 if isinstance(value, float) else wr.add_uint32)(key, value)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    wr.add_token_types([1] * c.vocab_size)
    wr.add_token_merges([])
    for name, t in w.items():
        if name != "layers.0.w_up":
            wr.add_tensor(to_gguf_name(name), t)
    fp4 = gguf.quants.quantize(w["layers.0.w_up"], gguf.GGMLQuantizationType.MXFP4)
    wr.add_tensor("blk.0.ffn_up.weight", fp4, raw_shape=fp4.shape, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
    assert load_checkpoint(path).transcoded == {"layers.0.w_up": ("MXFP4", "q8_0")}
    convert_model(path, tmp_path / "f32.gguf", "f32")
    got = load_checkpoint(tmp_path / "f32.gguf").tensors["layers.0.w_up"].dequantize()
    want = gguf.quants.dequantize(fp4, gguf.GGMLQuantizationType.MXFP4)  # gguf-py, independently
    np.testing.assert_array_equal(got, want)


def test_k_mixtures_choose_what_llama_cpp_chooses():
    """Per tensor, the format of q4_k_m / q5_k_m / q6_k is the type llama.cpp's quantizer picked
    for the same model (tests/data/kquant_mixtures.json, from tools/check_kquants.py --mixtures):
    SmolLM2 (rows of 576: Q5_0/Q5_1/Q8_0 fallbacks) and the TinyLlama-1.1B shape (untied head)."""
    from llamacpu.loaders.gguf import to_gguf_name
    data = json.loads((Path(__file__).parent / "data" / "kquant_mixtures.json").read_text())
    assert set(data["models"]) == {"smollm2-135m", "tinyllama-1.1b-shape"}
    for model, entry in data["models"].items():
        shapes = entry["shapes"]
        n_layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("blk."))
        ours = ["embed", "output", "norm"] + [f"layers.{i}.{m}" for i in range(n_layers) for m in (
            "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")]
        names = {to_gguf_name(n): n for n in ours}
        tied = "output.weight" not in shapes
        for quant, types in entry["types"].items():
            assert set(types) <= set(names), model
            got = {g: convert.tensor_format(names[g], tuple(reversed(shapes[g])), quant, tied=tied,
                                            n_layers=n_layers)[0] for g in types}
            assert got == types, (model, quant, {g: (got[g], types[g]) for g in types if got[g] != types[g]})


def test_k_mixture_file(hf_dir, tmp_path):
    """A q4_k_m file of the tiny model: llama.cpp's file type, the mixture's formats, values that
    gguf-py reads back equal to ours, and the f16 fallback for rows that can't be blocked."""
    import gguf
    out = convert_model(hf_dir, tmp_path / "k.gguf", "q4_k_m", calibrate=False)
    reader = gguf.GGUFReader(str(out.out))
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    ckpt = load_checkpoint(out.out, dequantize=True)
    src = load_checkpoint(hf_dir)
    for t in reader.tensors:
        ours = next(n for n in ckpt.tensors if convert.to_gguf_name(n) == t.name)
        fmt, _ = convert.tensor_format(ours, src.tensors[ours].shape, "q4_k_m", tied=src.config.tie_word_embeddings,
                                       n_layers=src.config.num_hidden_layers)
        assert t.tensor_type.name.lower() == fmt, t.name
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.tensors[ours].shape)
        np.testing.assert_array_equal(ckpt.tensors[ours].dequantize(), theirs, err_msg=t.name)
    assert out.fallback == [f"layers.{i}.w_down" for i in range(src.config.num_hidden_layers)]
    assert out.importance == "weights-only"


def test_k_mixtures_are_for_convert_not_load(hf_dir):
    with pytest.raises(LlamacpuError, match="written by `llamacpu convert`"):
        open_model(hf_dir, quant="q4_k_m")
    with pytest.raises(LlamacpuError, match="unknown quantization 'q4_k'"):
        convert_model(hf_dir, hf_dir.parent / "x.gguf", "q4_k")  # a tensor format, not a file type
