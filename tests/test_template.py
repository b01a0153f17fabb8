"""Chat templates against renderings by transformers' apply_chat_template
(tests/data/template_reference.json, made by tools/make_template_reference.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamacpu.errors import LlamacpuError
from llamacpu.template import ChatTemplate

REFERENCE = json.loads((Path(__file__).parent / "data/template_reference.json").read_text(encoding="utf-8"))
CASES = [(name, case) for name, t in REFERENCE["templates"].items() for case in t["cases"]]


def template_for(name: str) -> ChatTemplate:
    t = REFERENCE["templates"][name]
    return ChatTemplate(t["chat_template"], bos_token=t["bos_token"], eos_token=t["eos_token"])


@pytest.mark.parametrize(("name", "case"), CASES, ids=[f"{n}-{c['name']}-{c['add_generation_prompt']}" for n, c in CASES])
def test_render_matches_transformers(name, case):
    template = template_for(name)
    if "error" in case:
        with pytest.raises(LlamacpuError, match="roles must alternate"):
            template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    else:
        assert template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"]) == case["rendered"]


def test_reference_has_errors_and_renderings():
    # Guards against a regenerated reference in which every case failed (or none did).
    assert sum("error" in c for _, c in CASES) >= 2
    assert sum("rendered" in c for _, c in CASES) >= 40


def test_from_gguf_metadata_uses_tokenizer_strings():
    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    t = ChatTemplate.from_gguf_metadata({"tokenizer.chat_template": REFERENCE["templates"]["llama2_style"]["chat_template"]}, tok)
    assert t.render([{"role": "user", "content": "x"}]) == "<s>[INST] x [/INST]"
    assert ChatTemplate.from_gguf_metadata({}, tok) is None


def test_from_gguf_metadata_real_model(smollm2_meta):
    tok = SimpleNamespace(bos_token="<|im_start|>", eos_token="<|im_end|>")
    t = ChatTemplate.from_gguf_metadata(smollm2_meta, tok)
    case = next(c for n, c in CASES if n == "smollm2" and c["name"] == "with_system" and c["add_generation_prompt"])
    assert t.render(case["messages"]) == case["rendered"]


def test_from_hf_dir_variants(tmp_path):
    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTemplate.from_hf_dir(tmp_path, tok) is None  # no template anywhere
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{{ bos_token }}"}))
    assert ChatTemplate.from_hf_dir(tmp_path, tok).render(msgs) == "A<s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}))
    assert ChatTemplate.from_hf_dir(tmp_path, tok).render(msgs) == "D</s>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert ChatTemplate.from_hf_dir(tmp_path, tok).render(msgs) == "Jhi"  # the .jinja file wins


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ messages[0] ", "{% endif %}"])
def test_malformed_template_raises(source):
    with pytest.raises(LlamacpuError, match="malformed chat template"):
        ChatTemplate(source)


def test_sandbox_blocks_python_internals():
    with pytest.raises(LlamacpuError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])


def test_bad_template_lists_raise(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}]}))
    with pytest.raises(LlamacpuError, match="no 'default'"):
        ChatTemplate.from_hf_dir(tmp_path, SimpleNamespace(bos_token=None, eos_token=None))
    with pytest.raises(LlamacpuError, match="not a directory"):
        ChatTemplate.from_hf_dir(tmp_path / "missing", SimpleNamespace(bos_token=None, eos_token=None))
