"""Write tests/data/tokenizer_reference.json: token ids from independent tokenizers.

Oracles (none of them is llamacpu code):
- llama.cpp, through llama-cpp-python (`Llama(vocab_only=True).tokenize(...)`), on the real
  SmolLM2 GGUF (gpt2 BPE, pre "smollm"), with parse_special on and off;
- llama.cpp on vocab-only copies of that GGUF whose `tokenizer.ggml.pre` is changed to "default",
  "gpt-2" and "llama-bpe", to pin the other pre-tokenizer regexes;
- the `sentencepiece` library on tokenizer.model.v1, and llama.cpp on a vocab-only GGUF built from
  that model's pieces/scores/types (read with the sentencepiece library).
Each case also stores llama.cpp's detokenization (its per-token pieces, concatenated).

Run from the repo root (needs the `bench` extra: llama-cpp-python):
    .venv/bin/python tools/make_tokenizer_reference.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from llamacpu.fetch import sha256_of

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SPM_MODEL = ROOT / ".cache/models/tokenizer.model.v1"
OUT = ROOT / "tests/data/tokenizer_reference.json"
COMMAND = ".venv/bin/python tools/make_tokenizer_reference.py"
PRE_VARIANTS = ("default", "gpt-2", "llama-bpe")

CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat's 12+30? Answer in 😀 emoji.<|im_end|>\n<|im_start|>assistant\n"
)

TEXTS = [
    "Hello world",
    "12345", "3.14159", "year 2024", "1,000,000 and 0.5% of 1234567", "٣٤٥ ½ ² ⅷ",
    "  two leading spaces", "trailing spaces   ", "a  b   c    d", " ", "\n", "\n\n\nthree newlines",
    "line1\r\nline2\r\n", " \n \n", "\t\ttabs\tand\tmore", "mixed \t \n  whitespace\n\n  indent",
    "中文字符测试，你好世界。", "日本語のテキストです", "한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "🤖",
    "It's what we're doing; they've, I'm, you'll, he'd", "IT'S WE'RE THEY'VE", "'s 're 'll",
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    '<div class="x">&amp;</div>', "SELECT * FROM t WHERE id = 42;",
    "café naïve résumé Ångström façade Øresund", "Ζεύς Ελληνικά Русский текст",
    "Hello!!! What?? ... --- *** $100 +5 <=> ^~|", "https://example.com/path?q=1&r=2",
    '(paren) "quoted" ,comma .dot #tag @user', "x=1;y=22;z=333;w=4444",
    "\u00a0nbsp\u200bzwsp\ufeffbom", "ﬁ ligature Ⅻ roman ① circled",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_end|><|im_start|>", "text<|endoftext|>more", "<|im_start|",
    "<s>hi</s> <unk>", CHATML_PROMPT,
]
SPECIAL_TEXTS = [t for t in TEXTS if "<|" in t or "<s>" in t]


def load_vocab(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_case(llm, text: str, special: bool) -> dict:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    decoded = llm.detokenize(ids).decode("utf-8", errors="replace")
    return {"text": text, "parse_special": special, "ids": list(ids), "llama_cpp_decoded": decoded}


def copy_with_pre(src: Path, dst: Path, pre: str) -> None:
    """A vocab-only GGUF: every key of `src` (no tensors), with tokenizer.ggml.pre replaced."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.ggml.pre"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    writer.add_tokenizer_pre(pre)
    write(writer)


def spm_gguf(src: Path, dst: Path) -> None:
    """A vocab-only llama GGUF holding a sentencepiece model's pieces, scores and types."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(src))
    n = sp.GetPieceSize()
    types = []
    for i in range(n):  # the `sentencepiece` API cannot tell user-defined pieces; v1 has none
        if sp.IsUnknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.IsByte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.IsUnused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(dst, arch="llama")
    for add, value in ((writer.add_context_length, 4096), (writer.add_embedding_length, 64),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 128),
                       (writer.add_head_count, 1), (writer.add_head_count_kv, 1),
                       (writer.add_rope_dimension_count, 64), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.IdToPiece(i) for i in range(n)])
    writer.add_token_scores([sp.GetScore(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    write(writer)


def write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def smollm2_cases() -> list[dict]:
    llm = load_vocab(SMOLLM2)
    cases = [llama_cpp_case(llm, t, True) for t in TEXTS]
    return cases + [llama_cpp_case(llm, t, False) for t in SPECIAL_TEXTS]


def pre_variant_cases(tmp: Path) -> dict[str, list[dict]]:
    variants = {}
    for pre in PRE_VARIANTS:
        path = tmp / f"smollm2-vocab-{pre}.gguf"
        copy_with_pre(SMOLLM2, path, pre)
        llm = load_vocab(path)
        variants[pre] = [llama_cpp_case(llm, t, True) for t in TEXTS]
    return variants


def spm_cases(tmp: Path) -> list[dict]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SPM_MODEL))
    path = tmp / "spm-v1-vocab.gguf"
    spm_gguf(SPM_MODEL, path)
    llm = load_vocab(path)
    cases = []
    for text in TEXTS:
        case = llama_cpp_case(llm, text, False)
        case["llama_cpp_ids"] = case.pop("ids")
        case["sentencepiece_ids"] = sp.encode(text)
        case["sentencepiece_decoded"] = sp.decode(case["sentencepiece_ids"])
        cases.append(case)
    return cases


def main() -> int:
    import llama_cpp
    import sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        data = {
            "command": COMMAND,
            "oracles": {"llama_cpp_python": llama_cpp.__version__, "sentencepiece": sentencepiece.__version__},
            "model": {"file": SMOLLM2.name, "sha256": sha256_of(SMOLLM2)},
            "spm_model": {"file": SPM_MODEL.name, "sha256": sha256_of(SPM_MODEL)},
            "cases": smollm2_cases(),
            "pre_variants": pre_variant_cases(Path(tmp)),
            "spm_cases": spm_cases(Path(tmp)),
        }
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    differ = [c["text"] for c in data["spm_cases"] if c["llama_cpp_ids"] != c["sentencepiece_ids"]]
    print(f"wrote {OUT.relative_to(ROOT)}: {len(data['cases'])} SmolLM2 cases, "
          f"{len(PRE_VARIANTS)}x{len(TEXTS)} pre variants, {len(data['spm_cases'])} SentencePiece cases; "
          f"llama.cpp and sentencepiece differ on {len(differ)}: {differ!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
