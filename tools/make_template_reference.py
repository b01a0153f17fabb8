"""Write tests/data/template_reference.json: chat prompts rendered by Hugging Face transformers.

transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` is the
oracle for llamacpu.template. Templates: SmolLM2's own (transformers reads it, with the special
tokens, straight from the GGUF file) and two small ones written here to exercise features that
ChatML does not use: bos_token/eos_token variables, raise_exception, loop controls, tojson,
namespace, whitespace control and the {% generation %} tag.

Run from the repo root (needs the `reference` extra: torch, transformers, accelerate):
    .venv/bin/python tools/make_template_reference.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from llamacpu.fetch import sha256_of

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests/data/template_reference.json"
COMMAND = ".venv/bin/python tools/make_template_reference.py"

# A Llama-2-chat-style template: system folded into the first user turn, roles must alternate.
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Multi-line, indented blocks: trim_blocks/lstrip_blocks decide every newline here.
FEATURES = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
<{{ message['role'] }} n={{ ns.turns }}>
    {{- message | tojson }}
    {%- if message['content'] == 'STOP' %}{% break %}{% endif %}

{% endfor %}
{% if add_generation_prompt %}
<assistant>
{% endif %}
"""

# transformers' {% generation %} block (marks assistant text for training masks).
GENERATION_TAG = (
    "{% for m in messages %}\n  <{{ m['role'] }}>\n"
    "  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}\n"
    "  {% else %}{{ m['content'] }}\n  {% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello!"}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn_system": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please."},
    ],
    "unicode_and_whitespace": [
        {"role": "user", "content": "  Ünïcödé 中文 😀 <b>&amp;</b> \"quotes\"\n\tline two  "},
    ],
    "stop_and_bad_roles": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "STOP"},
        {"role": "assistant", "content": "never seen"},
    ],
}


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)


def tiny_tokenizer(chat_template: str):
    """A throwaway fast tokenizer that only carries the template and <s>/</s>."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def render_cases(tokenizer) -> list[dict]:
    cases = []
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            case = {"name": name, "messages": messages, "add_generation_prompt": add_generation_prompt}
            try:
                case["rendered"] = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            except Exception as e:  # raise_exception() in the template: we must fail too
                case["error"] = f"{type(e).__name__}: {e}"
            cases.append(case)
    return cases


def main() -> int:
    import transformers

    smollm2 = smollm2_tokenizer()
    templates = {
        "smollm2": {"source": "gguf", "chat_template": smollm2.chat_template,
                    "bos_token": smollm2.bos_token, "eos_token": smollm2.eos_token,
                    "cases": render_cases(smollm2)},
    }
    for name, source in (("llama2_style", LLAMA2_STYLE), ("features", FEATURES), ("generation_tag", GENERATION_TAG)):
        tok = tiny_tokenizer(source)
        templates[name] = {"source": "inline", "chat_template": source, "bos_token": "<s>",
                           "eos_token": "</s>", "cases": render_cases(tok)}
    data = {
        "command": COMMAND,
        "oracle": f"transformers {transformers.__version__} apply_chat_template(tokenize=False)",
        "model": {"file": MODEL.name, "sha256": sha256_of(MODEL)},
        "templates": templates,
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {sum(len(t['cases']) for t in templates.values())} renderings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
