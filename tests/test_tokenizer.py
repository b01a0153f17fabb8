"""Tokenizer tests against independent oracles.

Reference ids in tests/data/tokenizer_reference.json come from llama.cpp (llama-cpp-python) and
the sentencepiece library (tools/make_tokenizer_reference.py); live checks compare against the
sentencepiece library, and against llama.cpp when llama-cpp-python is installed.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacpu.errors import LlamacpuError
from llamacpu.loaders.gguf import read_metadata
from llamacpu.tokenizer import CONTROL, Tokenizer

REFERENCE = json.loads((Path(__file__).parent / "data/tokenizer_reference.json").read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]
SPM_CASES = REFERENCE["spm_cases"]
PRE_CASES = [(pre, c) for pre, cases in REFERENCE["pre_variants"].items() for c in cases]
PLAIN_TEXTS = sorted({c["text"] for c in CASES if "<|" not in c["text"] and "<s>" not in c["text"]})

# Texts built from pieces that stress pre-tokenizers, merges and special-token cutting.
PIECES = st.sampled_from([
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", " ", "  ", "\n", "\n\n", "\t", "\r\n",
    "'s", "'RE", "2024", "3.14", "é", "😀", "👍🏽", "中文", "Hello", " world", "▁", ",x", "$+<=>^~|",
])
TEXTS = st.one_of(st.text(max_size=40), st.lists(st.one_of(PIECES, st.text(max_size=4)), max_size=10).map("".join))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def case_id(case) -> str:
    return f"{case['text'][:24]!r}-special={case['parse_special']}"


def streamed(tok: Tokenizer, ids, continuation=False) -> str:
    decoder = tok.stream_decoder(continuation=continuation)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


# ---- SmolLM2 (GGUF, gpt2 BPE, pre "smollm") against llama.cpp ------------------------------

def test_reference_is_for_this_model(smollm2_path, spm_model_path):
    assert REFERENCE["model"]["file"] == smollm2_path.name
    assert REFERENCE["spm_model"]["file"] == spm_model_path.name
    assert len(CASES) >= 40 and any(not c["parse_special"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_smollm2_ids_match_llama_cpp(smollm2, case):
    assert smollm2.encode(case["text"], parse_special=case["parse_special"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_smollm2_decode_matches_llama_cpp(smollm2, case):
    assert smollm2.decode(case["ids"]) == case["llama_cpp_decoded"]
    assert streamed(smollm2, case["ids"]) == case["llama_cpp_decoded"]


@pytest.mark.parametrize(("pre", "case"), PRE_CASES, ids=[f"{p}-{case_id(c)}" for p, c in PRE_CASES])
def test_other_pre_tokenizers_match_llama_cpp(smollm2_meta, pre_tokenizers, pre, case):
    assert pre_tokenizers[pre].encode(case["text"], parse_special=case["parse_special"]) == case["ids"]


def test_smollm2_attributes(smollm2):
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id) == (49152, 1, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert smollm2.add_bos is False and smollm2.kind == "bpe" and smollm2.pre == "smollm"
    assert smollm2.encode("Hi")[0] != 1 and smollm2.encode("Hi", add_bos=True)[0] == 1


# ---- SentencePiece: the library on the file, and our merge loop on GGUF-style vocab ---------

@pytest.mark.parametrize("case", SPM_CASES, ids=case_id)
def test_spm_ids_match_sentencepiece_and_llama_cpp(spm, spm_vocab_only, case):
    assert case["sentencepiece_ids"] == case["llama_cpp_ids"]  # the two oracles agree
    for tok in (spm, spm_vocab_only):
        assert tok.encode(case["text"], add_bos=False, parse_special=False) == case["sentencepiece_ids"]


@pytest.mark.parametrize("case", SPM_CASES, ids=case_id)
def test_spm_decode_matches_oracles(spm, spm_vocab_only, case):
    for tok in (spm, spm_vocab_only):
        assert tok.decode(case["sentencepiece_ids"]) == case["sentencepiece_decoded"]
        # llama.cpp's per-token pieces keep the dummy-prefix space: that is continuation mode.
        assert tok.decode(case["sentencepiece_ids"], continuation=True) == case["llama_cpp_decoded"]


def test_spm_vocab_only_fuzz_against_sentencepiece(spm_vocab_only, sentencepiece_processor):
    @FUZZ
    @given(TEXTS)
    def check(text):
        assert spm_vocab_only.encode(text, add_bos=False, parse_special=False) == sentencepiece_processor.encode(text)

    check()


def test_spm_parse_special_cuts_control_tokens(spm, spm_vocab_only):
    for tok in (spm, spm_vocab_only):
        # After a special token the next fragment gets its own space prefix (llama.cpp, sentencepiece).
        assert tok.encode("<s>hi</s>", add_bos=False) == [1] + tok.encode("hi", add_bos=False) + [2]
        assert 1 not in tok.encode("<s>hi</s>", add_bos=False, parse_special=False)


def test_spm_attributes(spm, spm_vocab_only):
    for tok in (spm, spm_vocab_only):
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids) == (32000, 1, 2, {2})
        assert tok.add_bos and tok.encode("hi")[0] == 1 and tok.encode("hi", add_bos=False)[0] != 1
    assert (spm.kind, spm_vocab_only.kind) == ("sentencepiece", "spm")


# ---- streaming decode ------------------------------------------------------------------------

@pytest.mark.parametrize("continuation", [False, True])
def test_stream_equals_decode_on_reference_texts(smollm2, spm, continuation):
    for tok in (smollm2, spm):
        for text in PLAIN_TEXTS:
            ids = tok.encode(text, parse_special=False)
            assert streamed(tok, ids, continuation) == tok.decode(ids, continuation=continuation)


def test_stream_holds_back_partial_characters(smollm2, spm):
    for tok in (smollm2, spm):
        ids = tok.encode("a😀中文👍🏽", add_bos=False)
        assert len(ids) > 5  # the emoji and CJK are split over several tokens
        decoder = tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "a😀中文👍🏽"
        assert "" in pieces  # some tokens finished no character


@FUZZ
@given(ids=st.lists(st.integers(0, 49151), max_size=30), continuation=st.booleans())
def test_stream_equals_decode_on_random_smollm2_ids(smollm2, ids, continuation):
    assert streamed(smollm2, ids, continuation) == smollm2.decode(ids, continuation=continuation)


@FUZZ
@given(ids=st.lists(st.one_of(st.integers(0, 31999), st.integers(3, 258)), max_size=30), continuation=st.booleans())
def test_stream_equals_decode_on_random_spm_ids(spm, ids, continuation):
    # ids 3..258 are the <0xNN> byte tokens: random bytes make split and invalid UTF-8.
    assert streamed(spm, ids, continuation) == spm.decode(ids, continuation=continuation)


@FUZZ
@given(TEXTS)
def test_round_trip_and_stream_on_random_text(smollm2, spm, text):
    for tok in (smollm2, spm):
        ids = tok.encode(text, parse_special=False)
        assert streamed(tok, ids) == tok.decode(ids)
    # SmolLM2's vocabulary lacks some byte tokens (0x04, 0x13, 0xF1...): those bytes are dropped.
    if all(ord(c) not in (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D) and ord(c) < 0x40000 for c in text):
        assert smollm2.decode(smollm2.encode(text, parse_special=False)) == text
    # SentencePiece writes spaces as "▁", so a literal "▁" comes back as a space (as in sentencepiece).
    assert spm.decode(spm.encode(text, parse_special=False)) == text.replace("▁", " ")


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_round_trip_reference_texts(smollm2, spm, text):
    for tok in (smollm2, spm):
        assert tok.decode(tok.encode(text, parse_special=False)) == text


def test_control_tokens_decode_to_nothing(smollm2):
    assert smollm2.decode([1, 19556, 2, 0]) == "Hello"


# ---- GGUF metadata round trips ---------------------------------------------------------------

def test_smollm2_gguf_metadata_round_trip(smollm2):
    again = Tokenizer.from_gguf_metadata(smollm2.gguf_metadata())
    for case in CASES:
        assert again.encode(case["text"], parse_special=case["parse_special"]) == case["ids"]


def test_spm_hf_dir_round_trip(spm):
    meta = spm.gguf_metadata()
    assert isinstance(meta["llamacpu.tokenizer.model"], bytes)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.scores"].dtype == np.float32 and meta["tokenizer.ggml.token_type"].dtype == np.int32
    again = Tokenizer.from_gguf_metadata(meta)
    assert again.kind == "sentencepiece"
    for case in SPM_CASES:
        assert again.encode(case["text"], add_bos=False, parse_special=False) == case["sentencepiece_ids"]


def test_tokenizer_json_dir_matches_llama_cpp(smollm2_json_dir):
    tok = Tokenizer.from_hf_dir(smollm2_json_dir)
    assert tok.kind == "tokenizer.json" and tok.stop_ids == {0, 2} and tok.bos_id == 1 and not tok.add_bos
    for case in CASES:
        assert tok.encode(case["text"], parse_special=case["parse_special"]) == case["ids"]
        assert tok.decode(case["ids"]) == case["llama_cpp_decoded"]
    meta = tok.gguf_metadata()
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    exact = Tokenizer.from_gguf_metadata(meta)
    rebuilt = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if not k.startswith("llamacpu.")})
    assert (exact.kind, rebuilt.kind) == ("tokenizer.json", "bpe")
    for case in CASES:
        for again in (exact, rebuilt):
            assert again.encode(case["text"], parse_special=case["parse_special"]) == case["ids"]


def test_hf_config_files_set_bos_eos_and_stops(tmp_path, spm_model_path):
    shutil.copy(spm_model_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": False}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, False, {2, 7})


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"tokenizer.ggml.model": None}, "no tokenizer"),
    ({"tokenizer.ggml.model": "t5"}, "unsupported tokenizer model 't5'"),
    ({"tokenizer.ggml.pre": "qwen9"}, "unsupported pre-tokenizer 'qwen9'"),
    ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["Ġ zzz-not-a-token"]}, "invalid BPE vocabulary"),
    ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "out of range"),
    ({"tokenizer.ggml.token_type": np.ones(5, dtype=np.int32)}, "5 entries"),
])
def test_bad_gguf_metadata_raises(smollm2_meta, change, message):
    meta = {**smollm2_meta, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(LlamacpuError, match=message):
        Tokenizer.from_gguf_metadata(meta)


def test_bad_hf_dirs_raise(tmp_path):
    with pytest.raises(LlamacpuError, match="not a directory"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    with pytest.raises(LlamacpuError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05junk")
    with pytest.raises(LlamacpuError, match="sentencepiece"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlamacpuError, match="invalid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_bad_ids_raise(smollm2, spm_vocab_only):
    with pytest.raises(LlamacpuError, match="out of range"):
        smollm2.decode([49152])
    with pytest.raises(LlamacpuError, match="out of range"):
        smollm2.stream_decoder().push(-1)
    no_bos = Tokenizer.from_gguf_metadata({k: v for k, v in spm_vocab_only.gguf_metadata().items()
                                           if k != "tokenizer.ggml.bos_token_id"})
    assert no_bos.bos_id is None and not no_bos.add_bos
    with pytest.raises(LlamacpuError, match="no BOS"):
        no_bos.encode("x", add_bos=True)


# ---- fixtures (smollm2_path, spm_model_path and smollm2_meta come from conftest.py) ----

@pytest.fixture(scope="module")
def smollm2(smollm2_meta):
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.fixture(scope="module")
def pre_tokenizers(smollm2_meta):
    return {pre: Tokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.pre": pre})
            for pre in REFERENCE["pre_variants"]}


@pytest.fixture(scope="module")
def spm(spm_model_path, tmp_path_factory):
    """From an HF-style directory holding only tokenizer.model (the sentencepiece library)."""
    directory = tmp_path_factory.mktemp("spm")
    shutil.copy(spm_model_path, directory / "tokenizer.model")
    return Tokenizer.from_hf_dir(directory)


@pytest.fixture(scope="module")
def spm_vocab_only(spm):
    """Our SentencePiece merge loop: GGUF metadata without the original model bytes."""
    return Tokenizer.from_gguf_metadata({k: v for k, v in spm.gguf_metadata().items() if not k.startswith("llamacpu.")})


@pytest.fixture(scope="module")
def sentencepiece_processor(spm_model_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model_path))


@pytest.fixture(scope="module")
def smollm2_json_dir(smollm2_meta, tmp_path_factory):
    """An HF directory like SmolLM2's original: tokenizer.json with the pre-tokenizer from
    FACTS.md (Digits then ByteLevel), control tokens as special added tokens."""
    from tokenizers import AddedToken, Tokenizer as HfTokenizer, decoders, models, pre_tokenizers

    tokens = smollm2_meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in smollm2_meta["tokenizer.ggml.merges"]]
    hf = HfTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    types = smollm2_meta["tokenizer.ggml.token_type"]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == CONTROL])
    directory = tmp_path_factory.mktemp("smollm2-hf")
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return directory
