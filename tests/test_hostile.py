"""Hostile inputs: every loader either works or raises LlamacpuError (one line), fast.

Hypothesis feeds small hostile files to each loader (GGUF header, safetensors header and HF
folder, tokenizer.json, chat template); every case a fuzz run of the CLI found (issues 7 and 13)
is kept below as a regression. The CLI-level cases (exit codes, signals, leftovers) run the
real command in a subprocess on a tiny model.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llamacpu.checkpoint import load_checkpoint
from llamacpu.errors import LlamacpuError
from llamacpu.loaders.gguf import GGUFFile
from llamacpu.loaders.hf import SafetensorsFile, shard_files
from llamacpu.template import ChatTemplate
from llamacpu.tokenizer import Tokenizer, _byte_level_bpe

from tiny import random_tensors, tiny_config, write_gguf, write_hf

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROOT = Path(__file__).resolve().parent.parent


def loads_or_refuses(fn, *args, **kwargs):
    """Run a loader: success, or LlamacpuError with a one-line message. Anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except LlamacpuError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return None


# ---- GGUF: a hand-written header (struct.pack from the GGUF spec, independent of both readers) ----

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def _gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _gguf_value(vtype: int, value) -> bytes:
    if vtype == STR:
        return _gguf_str(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_gguf_value(etype, v) for v in items)
    return struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[vtype], value)


def gguf_bytes(kvs, tensors, data: bytes = b"", align: int = 32) -> bytes:
    """kvs: [(key, vtype, value)]; tensors: [(name, dims fastest-first, ggml type, offset)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += _gguf_str(key) + struct.pack("<I", vtype) + _gguf_value(vtype, value)
    for name, dims, ggml_type, offset in tensors:
        out += _gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % align)
    return out + data


NORM = [("output_norm.weight", [32], 0, 0)]  # one f32 tensor of 32 values, at offset 0
NORM_DATA = np.ones(32, np.float32).tobytes()


@pytest.mark.parametrize("vtype,value", [(U32, 1), (U32, 3), (U32, 0), (I32, -32), (BOOL, True), (U32, 48),
                                         (STR, "32")])
def test_gguf_invalid_alignment_is_refused(tmp_path, vtype, value):
    path = tmp_path / "a.gguf"
    path.write_bytes(gguf_bytes([("general.alignment", vtype, value)], NORM, NORM_DATA))
    with pytest.raises(LlamacpuError, match="general.alignment"):
        GGUFFile(path)


def test_gguf_valid_alignment_is_read(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(gguf_bytes([("general.alignment", U32, 64)], NORM, NORM_DATA, align=64))
    f = GGUFFile(path)
    assert f.tensors[0].offset % 64 == 0


def test_gguf_misaligned_offset_duplicate_tensor_and_duplicate_key_are_refused(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(gguf_bytes([], [("output_norm.weight", [32], 0, 4)], NORM_DATA + NORM_DATA))
    with pytest.raises(LlamacpuError, match="not a multiple of the alignment"):
        GGUFFile(path)
    path.write_bytes(gguf_bytes([], NORM + NORM, NORM_DATA))
    with pytest.raises(LlamacpuError, match="appears twice"):
        GGUFFile(path)
    path.write_bytes(gguf_bytes([("general.name", STR, "a"), ("general.name", STR, "b")], NORM, NORM_DATA))
    with pytest.raises(LlamacpuError, match="general.name appears twice"):
        GGUFFile(path)


_KEYS = st.sampled_from(["general.alignment", "llama.block_count", "llama.embedding_length", "general.name",
                         "tokenizer.ggml.model", "tokenizer.ggml.tokens", "llama.context_length"])
_VALUES = st.one_of(
    st.tuples(st.just(U32), st.integers(0, 2 ** 32 - 1)), st.tuples(st.just(I32), st.integers(-2 ** 31, 2 ** 31 - 1)),
    st.tuples(st.just(BOOL), st.booleans()), st.tuples(st.just(STR), st.text(max_size=8)),
    st.tuples(st.just(F32), st.floats(width=32, allow_nan=True)),
    st.tuples(st.just(ARR), st.tuples(st.just(STR), st.lists(st.text(max_size=3), max_size=4))))
_TENSORS = st.lists(st.tuples(st.sampled_from(["output_norm.weight", "token_embd.weight", "blk.0.attn_q.weight",
                                                 "blk.99999999.ffn_up.weight", "nonsense"]),
                              st.lists(st.sampled_from([0, 1, 32, 64, 2 ** 40, 2 ** 63]), max_size=5),
                              st.sampled_from([0, 1, 2, 3, 8, 9, 12, 24, 30, 31, 39, 1000]),
                              st.sampled_from([0, 32, 33, 2 ** 62])), max_size=3)


@FAST
@given(kvs=st.lists(st.tuples(_KEYS, _VALUES), max_size=5), tensors=_TENSORS)
def test_gguf_hostile_headers_load_or_refuse(tmp_path_factory, kvs, tensors):
    path = tmp_path_factory.mktemp("g") / "h.gguf"
    path.write_bytes(gguf_bytes([(k, t, v) for k, (t, v) in kvs], tensors, NORM_DATA * 4))
    loads_or_refuses(load_checkpoint, path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    c = tiny_config()
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", c, random_tensors(c))


@FAST
@given(data=st.data())
def test_gguf_byte_mutations_load_or_refuse(tiny_gguf, tmp_path_factory, data):
    raw = bytearray(tiny_gguf.read_bytes())
    header_end = 2048  # mutate the header and metadata, where the structure lives
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, header_end))
        raw[i] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, raw[i] ^ 1]))
    path = tmp_path_factory.mktemp("m") / "m.gguf"
    path.write_bytes(bytes(raw[:data.draw(st.sampled_from([len(raw), header_end, 100]))]))
    ckpt = loads_or_refuses(load_checkpoint, path)
    if ckpt is not None:
        loads_or_refuses(ckpt.tokenizer)


def test_gguf_huge_block_count_is_refused_without_building_the_table(tmp_path):
    # Regression: block_count 2^32-1 built a 38-billion-entry table before looking at the file.
    c = tiny_config()
    ok = write_gguf(tmp_path / "ok.gguf", c, random_tensors(c))
    raw = ok.read_bytes()
    key = b"llama.block_count"
    at = raw.index(key) + len(key) + 4  # then the uint32 value
    assert struct.unpack_from("<I", raw, at)[0] == 2
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw[:at] + struct.pack("<I", 2 ** 32 - 1) + raw[at + 4:])
    with pytest.raises(LlamacpuError, match="config says 4294967295 layers"):
        load_checkpoint(bad)


def gguf_with_text_side(path: Path, tokens: list[str], merges: list[str], template: str | None = None) -> Path:
    """The tiny random model with the given byte-level vocabulary, merges and chat template."""
    import gguf
    from llamacpu.loaders.gguf import to_gguf_name
    c = tiny_config()
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in c.gguf_metadata().items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    if template is not None:
        w.add_chat_template(template)
    for name, t in random_tensors(c).items():
        w.add_tensor(to_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_info_refuses_a_template_built_to_exhaust_the_compiler(tmp_path):
    # Regression: 20000 nested parentheses were reported as "no chat template" with exit 0.
    from llamacpu.info import describe
    from llamacpu.template import HostileTemplateError
    tokens = ["a", "b", "ab"] + [chr(0x100 + i) for i in range(125)]
    path = gguf_with_text_side(tmp_path / "t.gguf", tokens, ["a b"], HOSTILE_TEMPLATES["deep-parens"])
    with pytest.raises(HostileTemplateError, match="nested too deeply"):
        describe(path)


def test_gguf_merge_longer_than_any_token_is_refused(tmp_path):
    # Regression: a merge of the longest token with itself panicked inside tokenizers (Rust),
    # a traceback from `run`, and `info` said nothing.
    from llamacpu.info import describe
    from llamacpu.tokenizer import CorruptTokenizerError
    tokens = ["a", "b", "ab", "<|endoftext|>"] + [chr(0x100 + i) for i in range(124)]
    merges = ["<|endoftext|> <|endoftext|>", "a b"]
    with pytest.raises(CorruptTokenizerError, match="BPE"):
        _byte_level_bpe(tokens, merges, "gpt2")
    path = gguf_with_text_side(tmp_path / "m.gguf", tokens, merges)
    with pytest.raises(CorruptTokenizerError):
        describe(path)


# ---- safetensors and HF folders ----------------------------------------------------------

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_safetensors_overlapping_and_reversed_offsets_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    two = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path.write_bytes(safetensors_bytes(two, bytes(32)))
    with pytest.raises(LlamacpuError, match="overlap"):
        SafetensorsFile(path)
    path.write_bytes(safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}}, bytes(16)))
    with pytest.raises(LlamacpuError, match="data_offsets"):
        SafetensorsFile(path)
    path.write_bytes(safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, bytes(16)))
    with pytest.raises(LlamacpuError, match="data_offsets"):
        SafetensorsFile(path)


_ST_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "F64", "I8", "nope", 3, None]),
    "shape": st.one_of(st.lists(st.integers(-2, 2 ** 40), max_size=3), st.text(max_size=2), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-64, 2 ** 40), min_size=0, max_size=3), st.none()),
})


@FAST
@given(header=st.dictionaries(st.sampled_from(["model.norm.weight", "lm_head.weight", "x"]), _ST_ENTRY, max_size=3))
def test_safetensors_hostile_headers_load_or_refuse(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("s") / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(64)))
    st_file = loads_or_refuses(SafetensorsFile, path)
    if st_file is not None:  # everything that passed the header check reads without surprises
        for name in st_file.keys():
            loads_or_refuses(st_file.get_f32, name)


def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    c = tiny_config()
    folder = write_hf(tmp_path / "hf", c, random_tensors(c), shards=2)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    index = folder / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    for escape in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors"):
        index.write_text(json.dumps({"weight_map": {k: (escape if i == 0 else v) for i, (k, v) in enumerate(wm.items())}}))
        with pytest.raises(LlamacpuError, match="outside the model folder"):
            shard_files(folder)


def test_config_with_a_billion_layers_is_refused_at_once(tmp_path):
    # Regression: num_hidden_layers 10^9 with tensors for 2 layers reached the 6 GB cap.
    c = tiny_config()
    folder = write_hf(tmp_path / "hf", c, random_tensors(c))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10 ** 9}))
    with pytest.raises(LlamacpuError, match="missing tensor layers.2.attn_norm"):
        load_checkpoint(folder)


@FAST
@given(cfg=st.dictionaries(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "vocab_size", "rope_theta",
                                            "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps"]),
                           st.one_of(st.integers(-1, 2 ** 62), st.floats(allow_nan=True), st.text(max_size=3),
                                     st.none(), st.booleans(), st.lists(st.integers(), max_size=2)), max_size=4))
def test_hf_config_values_load_or_refuse(tmp_path_factory, cfg):
    c = tiny_config()
    folder = write_hf(tmp_path_factory.mktemp("hf") / "m", c, random_tensors(c))
    base = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**base, **cfg}))
    loads_or_refuses(load_checkpoint, folder)


def test_fifo_and_devices_are_refused_not_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(LlamacpuError, match="not a regular file"):
        load_checkpoint(fifo)  # opening it would block forever
    with pytest.raises(LlamacpuError, match="not a regular file"):
        load_checkpoint("/dev/zero")


# ---- tokenizer.json ------------------------------------------------------------------------

def tokenizer_json(*, normalizer=None, pre_tokenizer=None, vocab=None, merges=None) -> str:
    vocab = vocab if vocab is not None else {"a": 0, "b": 1, "ab": 2, "<s>": 3}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 3, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges if merges is not None else ["a b"]}})


def from_json(text: str) -> Tokenizer:
    return Tokenizer._from_tokenizer_json(text, gguf={}, add_bos=False)


@pytest.mark.parametrize("spec", [
    dict(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAAAAAAAAAAAAAA"}),
    dict(normalizer={"type": "Precompiled", "precompiled_charsmap": "QUJD"}),
    dict(pre_tokenizer={"type": "FixedLength", "length": 0}),
], ids=["precompiled-empty", "precompiled-garbage", "fixed-length-0"])
def test_tokenizer_json_rust_panics_become_one_line(spec, capfd):
    # Regression: pyo3's PanicException is a BaseException; it escaped `except Exception` as a traceback,
    # after Rust had printed its own backtrace on stderr.
    with pytest.raises(LlamacpuError, match="tokenizer"):
        from_json(tokenizer_json(**spec))
    assert capfd.readouterr().err == ""


def test_tokenizer_json_huge_token_id_is_refused():
    # Regression: id 10^9 made a 10^9-entry token table.
    with pytest.raises(LlamacpuError, match="token id 1000000000"):
        from_json(tokenizer_json(vocab={"a": 0, "b": 1, "ab": 10 ** 9, "<s>": 3}))


def test_tokenizer_rejects_lone_surrogates():
    # Regression: invalid UTF-8 on stdin (surrogate-escaped) reached the Rust encoder as a TypeError.
    tok = from_json(tokenizer_json())
    with pytest.raises(LlamacpuError, match="not valid UTF-8"):
        tok.encode("hi \udcff there")


_NORMALIZERS = st.sampled_from([None, {"type": "NFC"}, {"type": "Lowercase"},
                                {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
                                {"type": "Replace", "pattern": {"String": "a"}, "content": ""},
                                {"type": "Prepend", "prepend": "▁"}, {"type": "Nope"}])
_PRETOKENIZERS = st.one_of(st.sampled_from([None, {"type": "Whitespace"}, {"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                             "use_regex": True}]),
                           st.builds(lambda n: {"type": "FixedLength", "length": n}, st.integers(-1, 3)))


@FAST
@given(normalizer=_NORMALIZERS, pre=_PRETOKENIZERS,
       merges=st.lists(st.sampled_from(["a b", "ab ab", "b a", "x y", "a", "ab <s>"]), max_size=3),
       text=st.text(max_size=12))
def test_tokenizer_json_components_load_or_refuse(normalizer, pre, merges, text):
    tok = loads_or_refuses(from_json, tokenizer_json(normalizer=normalizer, pre_tokenizer=pre, merges=merges))
    if tok is not None:
        loads_or_refuses(tok.encode, text)


# ---- chat templates -----------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]
HOSTILE_TEMPLATES = {
    "nested-range-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "doubling-concat": "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(64) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling-plus": "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(64) %}"
                     "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "repeat": "{{ 'x' * 10000000000 }}",
    "list-repeat": "{{ ([1] * 100000000)|length }}",
    "center": "{{ 'x'|center(10000000000) }}",
    "ljust": "{{ 'x'.ljust(10000000000) }}",
    "format-width": "{{ '{:>999999999}'.format(1) }}",
    "percent-width": "{{ '%0999999999d' % 1 }}",
    "replace-growth": "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "deep-parens": "{{ " + "(" * 20000 + "1" + ")" * 20000 + " }}",
    "huge-output": "{% for i in range(100000) %}{% for j in range(100) %}{{ messages[0].content * 500 }}"
                   "{% endfor %}{% endfor %}",
    "power": "{{ 9 ** 99999999 }}",
    "many-large-values": "{% set ns = namespace(s='x' * 1000000, l=[]) %}{% for i in range(100000) %}"
                         "{% set ns.l = ns.l + [ns.s ~ i] %}{% endfor %}{{ ns.l|length }}",
    "sandbox-escape": "{{ ''.__class__.__mro__ }}",
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_are_refused_in_one_line(name):
    # Regressions: hangs (nested loops), 3.2 GB strings, RecursionError as a traceback.
    from llamacpu.template import HostileTemplateError
    expected = LlamacpuError if name == "sandbox-escape" else HostileTemplateError
    with pytest.raises(expected) as e:
        ChatTemplate(HOSTILE_TEMPLATES[name], bos_token="<s>", eos_token="</s>").render(MESSAGES)
    assert "\n" not in str(e.value)


def test_real_templates_still_render_long_conversations():
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(200)]
    out = ChatTemplate(chatml).render(long)  # 2 MB of messages: more than the fixed limit, within the budget
    assert out.count("<|im_start|>") == 201 and len(out) > 2_000_000


_SNIPPETS = st.sampled_from([
    "{{ messages[0].content }}", "{% for m in messages %}{{ m.role }}{% endfor %}", "{{ bos_token }}",
    "{% for i in range(1000) %}{{ i }}{% endfor %}", "{{ 'ab' * 3 }}", "{{ messages|tojson }}",
    "{{ raise_exception('no') }}", "{% if x %}", "{% endif %}", "{{ messages[5] }}", "{{ 1 / 0 }}",
    "{{ 'x'|indent(4) }}", "{{ (messages[0].content ~ '!') * 2 }}", "{% set ns = namespace(n=0) %}",
    "{{ messages[0]['content'].split(' ') }}", "{{ 'a'.join(['b'] * 1000) }}", "{{ none.x }}",
])


@FAST
@given(parts=st.lists(_SNIPPETS, min_size=1, max_size=5))
def test_generated_templates_render_or_refuse(parts):
    t = loads_or_refuses(ChatTemplate, "".join(parts), bos_token="<s>", eos_token="</s>")
    if t is not None:
        loads_or_refuses(t.render, MESSAGES)


# ---- the CLI on a tiny model: exit codes, batches, signals, leftovers -------------------------

def cli(*args, stdin: bytes = b"", preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llamacpu.cli", *[os.fsdecode(a) for a in args]], input=stdin,
                          capture_output=True, env=env, timeout=timeout, preexec_fn=preexec_fn)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode("utf-8", "replace").strip()
    assert r.returncode == 2, (r.returncode, err)
    assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_fifo_and_dev_zero_as_text_are_refused(tiny_gguf, tmp_path):
    fifo = tmp_path / "text.txt"
    os.mkfifo(fifo)
    assert "not a regular file" in one_error_line(cli("perplexity", tiny_gguf, fifo, timeout=60))
    assert "not a regular file" in one_error_line(cli("perplexity", tiny_gguf, "/dev/zero", timeout=60))
    assert "not a regular file" in one_error_line(cli("info", fifo, timeout=60))


def test_non_utf8_model_path_works(tiny_gguf, tmp_path):
    weird = Path(os.fsdecode(os.fsencode(tmp_path) + b"/model-\xff\xfe.gguf"))
    weird.write_bytes(tiny_gguf.read_bytes())
    r = cli("info", weird, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.decode("utf-8", "surrogateescape"))["layers"] == 2
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out-\xfe.gguf"))
    r = cli("convert", weird, "-o", out, "--quant", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out).meta["general.name"] == "model-\ufffd\ufffd"


@pytest.fixture(scope="module")
def smollm_tiny(tmp_path_factory, smollm2_meta) -> Path:
    """The tiny random model with SmolLM2's real tokenizer and template, so `run` works end to end."""
    import gguf
    from llamacpu.loaders.gguf import to_gguf_name
    c = tiny_config(vocab_size=len(smollm2_meta["tokenizer.ggml.tokens"]))
    path = tmp_path_factory.mktemp("smol") / "tiny-smol.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in c.gguf_metadata().items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(smollm2_meta["tokenizer.ggml.pre"])
    w.add_token_list(smollm2_meta["tokenizer.ggml.tokens"])
    w.add_token_types([int(t) for t in smollm2_meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(smollm2_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(smollm2_meta["tokenizer.chat_template"])
    for name, t in random_tensors(c).items():
        w.add_tensor(to_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_jsonl_deeply_nested_line_is_an_error_row_and_the_batch_goes_on(smollm_tiny):
    good = json.dumps({"prompt": "hi", "max_tokens": 1, "temperature": 0})
    lines = [good, "[" * 100000, good, "hi \xff", good]
    stdin = "\n".join(lines[:2] + lines[2:3]).encode() + b"\n" + b'{"prompt": "hi \xff\xfe"}\n' + good.encode() + b"\n"
    r = cli("run", smollm_tiny, "--jsonl", stdin=stdin)
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2, 3, 4], r.stderr
    assert "error" not in rows[0] and "error" not in rows[2] and "error" not in rows[4]
    assert "nested too deeply" in rows[1]["error"]
    assert "error" in rows[3] and "Error" not in rows[3]["error"]
    assert b"Traceback" not in r.stderr


CONVERT_UNDER_SIGNAL = textwrap.dedent("""
    import os, signal, sys, gguf
    from llamacpu.cli import main
    sigs = [getattr(signal, s) for s in sys.argv[1].split(",")]
    real = gguf.GGUFWriter.write_tensor_data
    def write_then_signal(self, *a, **k):
        real(self, *a, **k)
        while sigs:  # the signal(s) arrive in the middle of the tensor data
            os.kill(os.getpid(), sigs.pop(0))
    gguf.GGUFWriter.write_tensor_data = write_then_signal
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sigs,expect_rc,pre", [
    ("SIGTERM", -signal.SIGTERM, False), ("SIGTERM", -signal.SIGTERM, True), ("SIGHUP", -signal.SIGHUP, True),
    ("SIGINT,SIGINT", 130, True), ("SIGTERM,SIGINT", -signal.SIGTERM, False)])
def test_interrupted_convert_leaves_nothing_and_keeps_the_old_output(tiny_gguf, tmp_path, sigs, expect_rc, pre):
    # Regression: SIGTERM/SIGHUP left `.out.gguf.<pid>.<hex>.part` beside OUT.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.gguf"
    if pre:
        out.write_bytes(b"previous conversion")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CONVERT_UNDER_SIGNAL, sigs, "convert", str(tiny_gguf), "-o", str(out),
                        "--quant", "q8_0"], capture_output=True, env=env, timeout=120)
    assert r.returncode == expect_rc, r.stderr
    assert b"Traceback" not in r.stderr, r.stderr
    left = sorted(p.name for p in out_dir.iterdir())
    assert left == (["out.gguf"] if pre else []), left
    if pre:
        assert out.read_bytes() == b"previous conversion"


@pytest.mark.parametrize("pre", [False, True], ids=["new", "pre-existing"])
def test_convert_past_the_file_size_limit_fails_cleanly(tiny_gguf, tmp_path, pre):
    # Regression: RLIMIT_FSIZE (a full disk) killed convert with SIGXFSZ, leaving the part file.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.gguf"
    if pre:
        out.write_bytes(b"previous conversion")
    limit = 64 * 1024  # the tiny model's q8_0 file is larger than this

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    err = one_error_line(cli("convert", tiny_gguf, "-o", out, "--quant", "q8_0", preexec_fn=small_files))
    assert "could not write" in err
    assert sorted(p.name for p in out_dir.iterdir()) == (["out.gguf"] if pre else [])
    if pre:
        assert out.read_bytes() == b"previous conversion"


def test_invalid_utf8_on_stdin_is_refused_in_one_line(smollm_tiny):
    # Regression: `TypeError: TextInputSequence must be str` with exit 1.
    err = one_error_line(cli("run", smollm_tiny, "--max-tokens", "1", stdin=b"hi \xff\xfe there\n"))
    assert "not valid UTF-8" in err


def test_chat_load_refuses_a_fifo(tmp_path):
    from llamacpu.chat import ChatSession
    fifo = tmp_path / "t.json"
    os.mkfifo(fifo)
    with pytest.raises(LlamacpuError, match="not a regular file"):
        ChatSession.load(object.__new__(ChatSession), fifo)  # the check comes before any session state


def test_unreadable_hf_files_are_errors(tmp_path):
    # Regression: a mode-000 tokenizer.json made `info` report "no tokenizer" with exit 0, and a
    # mode-000 shard gave `PermissionError` with exit 1. Root reads anything, so drop that power.
    import shutil
    c = tiny_config()
    folder = write_hf(tmp_path / "hf", c, random_tensors(c))
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "tokenizer.json").chmod(0)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    assert not prefix or shutil.which("setpriv"), "setpriv (util-linux) is needed to test permissions as root"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def llamacpu(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "llamacpu.cli", *map(str, args)],
                              capture_output=True, env=env, timeout=120)

    assert "tokenizer.json: Permission denied" in one_error_line(llamacpu("info", folder))
    (folder / "tokenizer.json").chmod(0o644)
    (folder / "model.safetensors").chmod(0)
    assert "Permission denied" in one_error_line(llamacpu("info", folder))
    (folder / "model.safetensors").chmod(0o644)
    (folder / "tokenizer.json").write_bytes(b'{"version": "\xff"}')
    assert "tokenizer.json: not valid UTF-8" in one_error_line(llamacpu("info", folder))


def test_tokenizer_guard_keeps_stderr_under_threads(capfd):
    # The panic guard silences fd 2 around each call into tokenizers; concurrent encodes (a server)
    # must not leave fd 2 pointing at /dev/null.
    from concurrent.futures import ThreadPoolExecutor
    tok = from_json(tokenizer_json())
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda i: tok.encode("ab" * (i % 7 + 1)) is not None, range(400)))
    os.write(2, b"still here\n")
    assert "still here" in capfd.readouterr().err
