"""Text ↔ token ids, the way llama.cpp does it.

One `Tokenizer` class over three encoders:
- the `sentencepiece` library on the original `tokenizer.model` bytes (exact for SentencePiece models),
- our own SentencePiece BPE merge loop over tokens/scores/types (GGUF `tokenizer.ggml.model = llama`),
- the `tokenizers` library: a verbatim `tokenizer.json`, or a byte-level BPE built from GGUF
  vocab + merges with the pre-tokenizer named by `tokenizer.ggml.pre` (GGUF `gpt2`).

Around the encoder the rules follow llama.cpp (src/llama-vocab.cpp): control/user-defined token
strings in the text are cut out first (longest first) and become single ids; SentencePiece gets a
space prefix on every text fragment; decoding concatenates per-token bytes. References:
llama.cpp `llama-vocab.cpp`, sentencepiece `bpe_model.cc`, GPT-2 `encoder.py`, HF `tokenizers`.
"""

from __future__ import annotations

import codecs
import contextlib
import heapq
import json
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .errors import LlamacpuError

# GGUF token types; sentencepiece's ModelProto uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn or a document (llama.cpp keeps a similar list); only
# non-normal tokens count, so a plain-text "</s>" in some vocab never stops generation.
END_OF_TURN = frozenset({
    "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
    "<|end|>", "<end_of_turn>", "<EOT>", "<|END_OF_TURN_TOKEN|>", "<end_of_utterance>",
})

# Pre-tokenizer regexes, as llama.cpp applies them (each regex splits the pieces of the
# previous one; matches and the gaps between them both become pieces).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's regex with its (?i:...) contractions spelled out, as llama.cpp does: the
# case-insensitive group would also match Unicode case-folds such as "ſ" (long s).
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's "default" (also used when `tokenizer.ggml.pre` is missing): not plain GPT-2.
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")

PRE_TOKENIZERS = {  # tokenizer.ggml.pre → (regexes, digits split one by one first, ignore_merges)
    "default": (DEFAULT_REGEXES, False, False),
    "gpt-2": ((GPT2_REGEX,), False, False),
    "gpt2": ((GPT2_REGEX,), False, False),
    "smollm": ((GPT2_REGEX,), True, False),
    "llama-bpe": ((LLAMA3_REGEX,), False, True),
    "llama3": ((LLAMA3_REGEX,), False, True),
    "llama-v3": ((LLAMA3_REGEX,), False, True),
}
# Pre-tokenizers whose models want BOS by default (llama.cpp); GGUF add_bos_token overrides.
BOS_BY_DEFAULT_PRE = frozenset({"llama-bpe", "llama3", "llama-v3"})


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map, char → byte: printable bytes stand for themselves, the
    other 68 take the code points from U+0100 upward, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


_ALPHABET = byte_level_alphabet()


class Tokenizer:
    """Encode text to token ids and decode ids back to text.

    Attributes: `vocab_size`, `bos_id`/`eos_id` (or None), `bos_token`/`eos_token` strings for chat
    templates, `add_bos` (whether raw prompts get BOS), `stop_ids` (EOS plus end-of-turn control
    tokens, fixed at construction), `kind` ("sentencepiece", "spm", "bpe" or "tokenizer.json") and
    `pre` (the byte-level pre-tokenizer name, or None).
    Build one with `from_gguf_metadata` or `from_hf_dir`.
    """

    def __init__(self, *, tokens: list[str], types: Iterable[int], encoder: Callable[[str], list[int]] | None,
                 byte_level: bool, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 strip_prefix_space: bool, kind: str, gguf: dict[str, Any], pre: str | None = None,
                 extra_stop_ids: Iterable[int] = (), hf=None):
        self.vocab_size = len(tokens)
        self.kind, self.pre = kind, pre
        self.bos_id = _checked_id(bos_id, len(tokens), "BOS")
        self.eos_id = _checked_id(eos_id, len(tokens), "EOS")
        self.bos_token = tokens[self.bos_id] if self.bos_id is not None else None
        self.eos_token = tokens[self.eos_id] if self.eos_id is not None else None
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self._tokens = tokens
        self._types = [int(t) for t in types]
        self._encoder = encoder  # ids for a text fragment free of special tokens
        self._hf = hf  # instead of the two above: a tokenizer.json that cuts out its own added tokens
        self._gguf = gguf
        # An SPM-style text starts with a dummy "▁" the decoder drops (sentencepiece and llama.cpp do).
        self._strip_prefix_space = strip_prefix_space
        self._pieces = [_piece_bytes(t, k, byte_level) for t, k in zip(tokens, self._types)]
        self._specials = sorted(
            ((t, i, k) for i, (t, k) in enumerate(zip(tokens, self._types))
             if k in (CONTROL, USER_DEFINED, UNKNOWN) and t),
            key=lambda s: (-len(s[0]), s[1]))
        stops = {i for i, (t, k) in enumerate(zip(tokens, self._types)) if t in END_OF_TURN and k != NORMAL}
        stops.update(i for i in extra_stop_ids if 0 <= i < len(tokens))
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids = frozenset(stops)

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (key → plain Python value, numeric arrays as numpy).

        Uses, in order: `llamacpu.tokenizer.json` (verbatim tokenizer.json), `llamacpu.tokenizer.model`
        (sentencepiece bytes), then `tokenizer.ggml.model` "llama" (SentencePiece BPE from tokens,
        scores and types) or "gpt2" (byte-level BPE from tokens and merges, pre-tokenizer by
        `tokenizer.ggml.pre`). Anything else raises LlamacpuError.
        """
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise LlamacpuError("GGUF metadata has no tokenizer (tokenizer.ggml.model is missing)")
        gguf = {k: v for k, v in meta.items() if k.startswith(("tokenizer.ggml.", "llamacpu.tokenizer."))}
        ids = {
            "bos_id": _meta_id(meta, "bos"), "eos_id": _meta_id(meta, "eos"),
            "extra_stop_ids": [i for i in (_meta_id(meta, "eot"), _meta_id(meta, "eom")) if i is not None],
        }
        if "llamacpu.tokenizer.json" in meta:
            return cls._from_tokenizer_json(str(meta["llamacpu.tokenizer.json"]), gguf=gguf,
                                            add_bos=meta.get("tokenizer.ggml.add_bos_token"), **ids)
        if "llamacpu.tokenizer.model" in meta:
            return cls._from_sentencepiece(bytes(meta["llamacpu.tokenizer.model"]), gguf=gguf,
                                           add_bos=meta.get("tokenizer.ggml.add_bos_token"), **ids)
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise LlamacpuError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens = list(tokens)
        types = _meta_array(meta, "tokenizer.ggml.token_type", len(tokens), NORMAL)
        if model == "llama":
            return cls._from_spm_vocab(meta, tokens, types, gguf, ids)
        if model == "gpt2":
            return cls._from_bpe_vocab(meta, tokens, types, gguf, ids)
        raise LlamacpuError(f"unsupported tokenizer model {model!r} (supported: llama, gpt2)")

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Build from a Hugging Face model directory: `tokenizer.json` if present, else
        `tokenizer.model`. BOS/EOS and add_bos come from `tokenizer_config.json`,
        `special_tokens_map.json`, `config.json` and `generation_config.json` where present."""
        path = Path(path)
        if not path.is_dir():
            raise LlamacpuError(f"{path}: not a directory")
        cfg = _HfConfig(path)
        if (path / "tokenizer.json").is_file():
            text = read_text_file(path / "tokenizer.json")
            return cls._from_tokenizer_json(text, gguf=None, hf_config=cfg)
        if (path / "tokenizer.model").is_file():
            try:
                data = (path / "tokenizer.model").read_bytes()
            except OSError as e:
                raise LlamacpuError(f"cannot read {path / 'tokenizer.model'}: {e.strerror or e}") from None
            return cls._from_sentencepiece(data, gguf=None, hf_config=cfg)
        raise LlamacpuError(f"{path}: no tokenizer.json or tokenizer.model")

    @classmethod
    def _from_sentencepiece(cls, model_bytes: bytes, *, gguf: dict | None, hf_config: "_HfConfig | None" = None,
                            bos_id=None, eos_id=None, add_bos=None, extra_stop_ids=()) -> "Tokenizer":
        import sentencepiece

        proto = _SpmProto.parse(model_bytes)
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LlamacpuError(f"not a valid sentencepiece model ({reason})") from None
        tokens = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
        if gguf is None:  # from an HF directory: ids and flags come from its config files
            bos_id = hf_config.token_id("bos", tokens, default=_non_negative(sp.bos_id()))
            eos_id = hf_config.token_id("eos", tokens, default=_non_negative(sp.eos_id()))
            add_bos = hf_config.add_bos(default=True)
            extra_stop_ids = hf_config.extra_eos_ids()
            gguf = proto.gguf_metadata(model_bytes, bos_id, eos_id, _non_negative(sp.unk_id()),
                                       _non_negative(sp.pad_id()), add_bos)
        else:  # from GGUF: its keys win, the model file fills gaps
            bos_id = bos_id if bos_id is not None else _non_negative(sp.bos_id())
            eos_id = eos_id if eos_id is not None else _non_negative(sp.eos_id())
            add_bos = True if add_bos is None else add_bos  # llama.cpp's default for SentencePiece
        return cls(tokens=tokens, types=proto.types, encoder=lambda s: sp.encode(s), byte_level=False,
                   bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, strip_prefix_space=proto.add_dummy_prefix,
                   kind="sentencepiece", gguf=gguf, extra_stop_ids=extra_stop_ids)

    @classmethod
    def _from_spm_vocab(cls, meta, tokens, types, gguf, ids) -> "Tokenizer":
        scores = _meta_array(meta, "tokenizer.ggml.scores", len(tokens), 0.0)
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        encoder = _SpmEncoder(tokens, scores, types, _meta_id(meta, "unknown"), add_space_prefix)
        return cls(tokens=tokens, types=types, encoder=encoder, byte_level=False,
                   add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
                   strip_prefix_space=add_space_prefix, kind="spm", gguf=gguf, **ids)

    @classmethod
    def _from_bpe_vocab(cls, meta, tokens, types, gguf, ids) -> "Tokenizer":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise LlamacpuError("GGUF metadata has no tokenizer.ggml.merges for a gpt2 tokenizer")
        hf = _byte_level_bpe(tokens, list(merges), pre)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", pre in BOS_BY_DEFAULT_PRE)
        missing = len(tokens)  # the id of _MISSING_BYTE

        def encode(s: str) -> list[int]:
            with _rust_guard("cannot tokenize the text"):
                return [i for i in hf.encode(s, add_special_tokens=False).ids if i != missing]

        return cls(tokens=tokens, types=types, encoder=encode,
                   byte_level=True, add_bos=add_bos, strip_prefix_space=False, kind="bpe", pre=pre,
                   gguf=gguf, **ids)

    @classmethod
    def _from_tokenizer_json(cls, text: str, *, gguf: dict | None, hf_config: "_HfConfig | None" = None,
                             bos_id=None, eos_id=None, add_bos=None, extra_stop_ids=()) -> "Tokenizer":
        import tokenizers

        try:
            spec = json.loads(text)
            if not isinstance(spec, dict):
                raise ValueError("not a JSON object")
            with _rust_guard("invalid tokenizer.json"):
                hf = tokenizers.Tokenizer.from_str(text)
                hf.encode(_PROBE, add_special_tokens=False)
        except LlamacpuError:
            raise
        except (Exception, RecursionError) as e:  # json.JSONDecodeError, or the Rust side's Exception
            raise LlamacpuError(f"invalid tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None
        tokens, types = _tokenizer_json_vocab(hf, spec, len(text))
        byte_level, strip = _tokenizer_json_decoding(spec)
        if gguf is None:
            bos_id = hf_config.token_id("bos", tokens, default=None)
            eos_id = hf_config.token_id("eos", tokens, default=None)
            add_bos = hf_config.add_bos(default=_post_processor_adds(spec, tokens, bos_id))
            extra_stop_ids = hf_config.extra_eos_ids()
            gguf = _tokenizer_json_gguf(spec, text, tokens, types, byte_level, bos_id, eos_id, add_bos)

        return cls(tokens=tokens, types=types, encoder=None, byte_level=byte_level, bos_id=bos_id,
                   eos_id=eos_id, add_bos=bool(add_bos), strip_prefix_space=strip, kind="tokenizer.json",
                   pre=gguf.get("tokenizer.ggml.pre"), gguf=gguf, extra_stop_ids=extra_stop_ids, hf=hf)

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids for `text`.

        parse_special=True turns control-token strings in the text (e.g. "<|im_start|>" from a
        chat template) into their single ids, as llama.cpp's parse_special does; user-defined
        tokens are always cut out. add_bos=None means `self.add_bos`.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: stdin's undecodable bytes (surrogateescape)
            raise LlamacpuError(f"the text is not valid UTF-8 (at character {e.start})") from None
        if add_bos is None:
            add_bos = self.add_bos
        elif add_bos and self.bos_id is None:
            raise LlamacpuError("this tokenizer has no BOS token")
        ids = [self.bos_id] if add_bos else []
        if self._hf is not None:
            # tokenizer.json knows its added tokens (with their lstrip/rstrip rules): let it cut them.
            self._hf.encode_special_tokens = not parse_special
            with _rust_guard("cannot tokenize the text"):
                ids.extend(self._hf.encode(text, add_special_tokens=False).ids)
            return ids
        for part in self._partition(text, parse_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._encoder(part))
        return ids

    def decode(self, ids: Iterable[int], *, continuation: bool = False) -> str:
        """Text for `ids`: the concatenated bytes of each token, decoded as UTF-8 (invalid
        bytes become U+FFFD).

        Control, unknown and unused tokens render as "" (llama.cpp without `special`);
        user-defined tokens render as their text. No tokenization-space clean-up is done.
        continuation=False treats `ids` as the start of a text: a SentencePiece dummy-prefix
        space on the first non-control token is dropped, as sentencepiece does.
        continuation=True keeps it: use that for tokens generated after a prompt.
        """
        strip = self._strip_prefix_space and not continuation
        chunks = []
        for i in ids:
            piece, strip = self._token_bytes(i, strip)
            chunks.append(piece)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def stream_decoder(self, *, continuation: bool = False) -> "StreamDecoder":
        """An incremental decoder: `push(id)` returns the text that is now final, `flush()` the rest.
        The pushes plus the flush concatenate to exactly `decode(ids, continuation=continuation)`."""
        return StreamDecoder(self, self._strip_prefix_space and not continuation)

    def gguf_metadata(self) -> dict[str, Any]:
        """The `tokenizer.ggml.*` keys (and `llamacpu.tokenizer.model` / `.json` for exact
        round trips) for a GGUF writer. `from_gguf_metadata` on the result gives the same ids."""
        return dict(self._gguf)

    # ---- internals ----------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token strings out of `text`, longest token first (llama.cpp's order),
        leaving text fragments and token ids in sequence."""
        parts: list[str | int] = [text] if text else []
        for piece, token_id, kind in self._specials:
            if not parse_special and kind != USER_DEFINED:
                continue
            if not any(isinstance(p, str) and piece in p for p in parts):
                continue
            cut: list[str | int] = []
            for p in parts:
                if isinstance(p, int) or piece not in p:
                    cut.append(p)
                    continue
                for k, fragment in enumerate(p.split(piece)):
                    if k:
                        cut.append(token_id)
                    if fragment:
                        cut.append(fragment)
            parts = cut
        return parts

    def _token_bytes(self, token_id: int, strip: bool) -> tuple[bytes, bool]:
        """Bytes of one token, and whether the dummy-prefix space is still to be stripped."""
        if not 0 <= token_id < self.vocab_size:
            raise LlamacpuError(f"token id {token_id} is out of range (vocab size {self.vocab_size})")
        piece = self._pieces[token_id]
        if not strip or self._types[token_id] == CONTROL:
            return piece, strip
        if self._types[token_id] == NORMAL and piece.startswith(b" "):
            piece = piece[1:]
        return piece, False


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back an incomplete UTF-8 character
    (an emoji can span several byte tokens) until the bytes that finish it come in."""

    def __init__(self, tokenizer: Tokenizer, strip_prefix_space: bool):
        self._tokenizer = tokenizer
        self._strip = strip_prefix_space
        # Python's incremental UTF-8 decoder yields exactly what a one-shot decode would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can no longer change."""
        piece, self._strip = self._tokenizer._token_bytes(token_id, self._strip)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---- SentencePiece BPE from tokens/scores/types ------------------------------------------

class _SpmEncoder:
    """SentencePiece's BPE encoding, from the vocabulary alone (no original model file).

    Start from single characters and repeatedly merge the adjacent pair whose concatenation is
    the highest-scoring vocabulary piece (leftmost on ties); characters left without a piece fall
    back to <0xNN> byte tokens. Only normal, user-defined and unused pieces take part in
    merges (as in sentencepiece); unused ones are split back into their parts at the end.
    """

    def __init__(self, tokens: list[str], scores, types: list[int], unk_id: int | None, add_space_prefix: bool):
        self.add_space_prefix = add_space_prefix
        self.unk_id = unk_id
        self.mergeable: dict[str, tuple[int, float]] = {}
        self.unused: set[str] = set()
        self.byte_ids: dict[int, int] = {}
        for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
            if kind in (NORMAL, USER_DEFINED, UNUSED):
                self.mergeable.setdefault(text, (i, float(score)))
                if kind == UNUSED:
                    self.unused.add(text)
            elif kind == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                self.byte_ids[int(text[3:5], 16)] = i

    def __call__(self, fragment: str) -> list[int]:
        """Ids for one text fragment (no special tokens in it)."""
        text = (" " + fragment if self.add_space_prefix else fragment).replace(" ", "▁")
        symbols, following, unmerge = self._merge(text)
        out: list[int] = []
        i = 0 if symbols else -1
        while i != -1:
            self._resegment(symbols[i], unmerge, out)
            i = following[i]
        return out

    def _merge(self, text: str) -> tuple[list[str], list[int], dict[str, tuple[str, str]]]:
        """Run the merges. Returns the symbol starting at each char index ("" once merged away),
        the index of the next live symbol, and how each unused piece was made."""
        n = len(text)
        symbols = list(text)
        following = [*range(1, n), -1] if n else []
        preceding = list(range(-1, n - 1))
        unmerge: dict[str, tuple[str, str]] = {}
        agenda: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def consider(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = symbols[left] + symbols[right]
            entry = self.mergeable.get(merged)
            if entry is not None:
                heapq.heappush(agenda, (-entry[1], left, right, len(merged)))
                if merged in self.unused:
                    unmerge[merged] = (symbols[left], symbols[right])

        for i in range(n - 1):
            consider(i, i + 1)
        while agenda:
            _, left, right, size = heapq.heappop(agenda)
            # Stale if either side was merged since: the pair no longer spans `size` chars.
            if (not symbols[left] or not symbols[right] or following[left] != right
                    or len(symbols[left]) + len(symbols[right]) != size):
                continue
            symbols[left] += symbols[right]
            symbols[right] = ""
            following[left] = following[right]
            if following[left] >= 0:
                preceding[following[left]] = left
            consider(preceding[left], left)
            consider(left, following[left])
        return symbols, following, unmerge

    def _resegment(self, symbol: str, unmerge: dict[str, tuple[str, str]], out: list[int]) -> None:
        entry = self.mergeable.get(symbol)
        if entry is not None and symbol not in self.unused:
            out.append(entry[0])
        elif symbol in unmerge:
            for part in unmerge[symbol]:
                self._resegment(part, unmerge, out)
        elif entry is not None:
            out.append(entry[0])
        else:
            self._fallback(symbol, out)

    def _fallback(self, symbol: str, out: list[int]) -> None:
        data = symbol.encode("utf-8")
        if all(b in self.byte_ids for b in data):
            out.extend(self.byte_ids[b] for b in data)
        elif self.unk_id is not None:
            out.append(self.unk_id)
        else:
            raise LlamacpuError(f"cannot encode {symbol!r}: no byte tokens and no unknown token in the vocabulary")


# ---- byte-level BPE from vocab + merges ---------------------------------------------------

_MISSING_BYTE = "\ue000missing-byte"  # not made of byte-level chars, so no text can produce it


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str):
    """A `tokenizers` byte-level BPE with the pre-tokenizer llama.cpp uses for `pre`.
    Special tokens are not registered: Tokenizer._partition cuts them out beforehand."""
    from tokenizers import Regex, Tokenizer as HfTokenizer, models, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise LlamacpuError(f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, split_digits, ignore_merges = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        k = m.find(" ", 1)  # llama.cpp splits at the first space after the first char
        if k < 0:
            raise LlamacpuError(f"malformed BPE merge {m!r}")
        pairs.append((m[:k], m[k + 1:]))
    # A byte missing from the vocabulary must still separate its neighbours (llama.cpp drops it
    # only at the end), so it becomes a sentinel unknown token that the encoder filters out.
    vocab[_MISSING_BYTE] = len(tokens)
    try:
        with _rust_guard("invalid BPE vocabulary or merges"):
            hf = HfTokenizer(models.BPE(vocab, pairs, unk_token=_MISSING_BYTE, fuse_unk=False,
                                        ignore_merges=ignore_merges))
            steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
            steps += [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
            hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
            hf.encode(_PROBE, add_special_tokens=False)
    except LlamacpuError:
        raise
    except Exception as e:  # a merge naming a token that is not in the vocabulary
        raise LlamacpuError(f"invalid BPE vocabulary ({str(e).splitlines()[0] if str(e) else e})") from None
    return hf


def _piece_bytes(text: str, kind: int, byte_level: bool) -> bytes:
    """What one token contributes to decoded text (llama.cpp's token_to_piece, special=false)."""
    if kind not in (NORMAL, USER_DEFINED, BYTE):  # control, unknown, unused, undefined
        return b""
    if kind == USER_DEFINED:
        return text.encode("utf-8")
    if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
        return bytes([int(text[3:5], 16)])
    if byte_level:
        # A char outside the byte alphabet (a malformed vocab) passes through as its UTF-8.
        return b"".join(bytes([_ALPHABET[c]]) if c in _ALPHABET else c.encode("utf-8") for c in text)
    return text.replace("▁", " ").encode("utf-8")


# ---- sentencepiece model file -------------------------------------------------------------

class _SpmProto:
    """The few fields of a sentencepiece ModelProto we need, read from the protobuf wire format
    (the `sentencepiece` package exposes piece types only partly, and no normalizer flags)."""

    def __init__(self):
        self.tokens: list[str] = []
        self.scores: list[float] = []
        self.types: list[int] = []
        self.add_dummy_prefix = True  # protobuf default

    @classmethod
    def parse(cls, data: bytes) -> "_SpmProto":
        proto = cls()
        try:
            for field, value in _proto_fields(data):
                if field == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                    piece = dict(_proto_fields(value))
                    proto.tokens.append(piece.get(1, b"").decode("utf-8"))
                    proto.scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
                    proto.types.append(piece.get(3, NORMAL))
                elif field == 3:  # NormalizerSpec {3: add_dummy_prefix}
                    proto.add_dummy_prefix = bool(dict(_proto_fields(value)).get(3, 1))
        except (IndexError, UnicodeDecodeError, struct.error, TypeError):
            raise LlamacpuError("not a valid sentencepiece model file") from None
        if not proto.tokens:
            raise LlamacpuError("not a valid sentencepiece model file (no pieces)")
        return proto

    def gguf_metadata(self, model_bytes: bytes, bos_id, eos_id, unk_id, pad_id, add_bos) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": list(self.tokens),
            "tokenizer.ggml.scores": np.asarray(self.scores, dtype=np.float32),
            "tokenizer.ggml.token_type": np.asarray(self.types, dtype=np.int32),
            "tokenizer.ggml.add_bos_token": bool(add_bos),
            "tokenizer.ggml.add_space_prefix": self.add_dummy_prefix,
            "llamacpu.tokenizer.model": bytes(model_bytes),
        }
        for name, value in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id), ("padding", pad_id)):
            if value is not None:
                meta[f"tokenizer.ggml.{name}_token_id"] = int(value)
        return meta


def _proto_fields(data: bytes):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise TypeError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise IndexError("truncated protobuf")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


# ---- the `tokenizers` library (Rust) --------------------------------------------------------

# Text that walks a tokenizer through its normalizer, pre-tokenizer and merges at load, so a
# broken tokenizer fails when it is opened rather than on some later prompt.
_PROBE = "Hello, world! It's 2024: 3.14159 × 42 = ?  héllo Ünïcödé 日本語 😀\n\tab  ab\r\n"


class CorruptTokenizerError(LlamacpuError):
    """Tokenizer data that breaks the tokenizers library itself (a Rust panic): the file is corrupt,
    as opposed to a tokenizer llamacpu does not support."""


_STDERR_LOCK = threading.RLock()


@contextlib.contextmanager
def _rust_guard(what: str):
    """Around a call into `tokenizers`: a Rust panic surfaces as pyo3's PanicException, a
    BaseException that `except Exception` misses, after Rust's panic hook has written a
    backtrace to fd 2. Keep fd 2 quiet for the call and turn the panic into LlamacpuError."""
    with _STDERR_LOCK:  # one redirection at a time: threads must not save each other's /dev/null
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        try:
            yield
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            reason = (str(e).splitlines() or [""])[0] or "internal error"
            raise CorruptTokenizerError(f"{what}: the tokenizers library failed on it ({reason})") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---- tokenizer.json -----------------------------------------------------------------------

def _tokenizer_json_vocab(hf, spec: dict, file_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types: special added tokens are control, other added
    tokens user-defined, <0xNN> pieces of a byte-fallback model are bytes."""
    vocab = hf.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    if size > max(file_size, 256):
        # Holes in the id range are filled with placeholders, so the largest id sets the table's
        # size: bound it by what the file could describe.
        raise LlamacpuError(f"invalid tokenizer.json: token id {size - 1} is larger than a file of "
                            f"{file_size} bytes can describe")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size  # holes in the id range (llama.cpp's converter does the same)
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback"))
    for text, i in vocab.items():
        tokens[i] = text
        is_byte = byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        types[i] = BYTE if is_byte else NORMAL
    if model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = UNKNOWN
    for i, added in hf.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    return tokens, types


def _json_nodes(node, type_name: str) -> list[dict]:
    """All objects with "type" == type_name inside a tokenizer.json component (nested Sequences)."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == type_name:
            found.append(node)
        for v in node.values():
            found += _json_nodes(v, type_name)
    elif isinstance(node, list):
        for v in node:
            found += _json_nodes(v, type_name)
    return found


def _metaspace_prepends(node: dict) -> bool:
    scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
    return scheme != "never"


def _tokenizer_json_decoding(spec: dict) -> tuple[bool, bool]:
    """(byte-level?, strip a leading space?) from tokenizer.json's decoder."""
    decoder = spec.get("decoder")
    if _json_nodes(decoder, "ByteLevel"):
        return True, False
    if any(_json_nodes(decoder, t) for t in ("Metaspace", "Replace", "ByteFallback")):
        strip = any(s.get("content") == " " and s.get("start", 0) > 0 for s in _json_nodes(decoder, "Strip"))
        strip = strip or any(_metaspace_prepends(m) for m in _json_nodes(decoder, "Metaspace"))
        return False, strip
    raise LlamacpuError("unsupported tokenizer.json decoder (need ByteLevel or SentencePiece-style)")


def _post_processor_adds(spec: dict, tokens: list[str], bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS in front of a single sequence."""
    for template in _json_nodes(spec.get("post_processor"), "TemplateProcessing"):
        single = template.get("single") or []
        first = single[0].get("SpecialToken") if single and isinstance(single[0], dict) else None
        if first and bos_id is not None and first.get("id") == tokens[bos_id]:
            return True
    return False


def _detect_pre(spec: dict) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer we recognise, else None."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and r"\p{N}{1,3}" in str(steps[0].get("pattern", {}).get("Regex", "")):
        return "llama-bpe"
    return None


def _tokenizer_json_gguf(spec, text, tokens, types, byte_level, bos_id, eos_id, add_bos) -> dict[str, Any]:
    """GGUF tokenizer keys for a tokenizer.json source; the verbatim json makes our round trip exact,
    the ggml keys serve other GGUF readers as well as they can."""
    model = spec.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2" if byte_level else "llama",
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.add_bos_token": bool(add_bos),
        "llamacpu.tokenizer.json": text,
    }
    if merges:
        meta["tokenizer.ggml.merges"] = merges
    if byte_level:
        pre = _detect_pre(spec)
        if pre is not None:
            meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.add_space_prefix"] = False
    else:
        meta["tokenizer.ggml.scores"] = _scores_from_merges(tokens, merges)
        prepend = _json_nodes(spec.get("normalizer"), "Prepend") or [
            m for m in _json_nodes(spec.get("pre_tokenizer"), "Metaspace") if _metaspace_prepends(m)]
        meta["tokenizer.ggml.add_space_prefix"] = bool(prepend)
    for name, value in (("bos", bos_id), ("eos", eos_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{name}_token_id"] = int(value)
    if model.get("unk_token") in tokens:
        meta["tokenizer.ggml.unknown_token_id"] = tokens.index(model["unk_token"])
    return meta


def _scores_from_merges(tokens: list[str], merges: list[str]) -> np.ndarray:
    """SentencePiece scores for a BPE given as ranked merges: the earlier a piece is made, the higher."""
    index = {t: i for i, t in enumerate(tokens)}
    scores = np.zeros(len(tokens), dtype=np.float32)
    seen = set()
    for rank, m in enumerate(merges):
        merged = m.replace(" ", "", 1)
        if merged in index and merged not in seen:
            seen.add(merged)
            scores[index[merged]] = -float(rank)
    return scores


# ---- Hugging Face config files ------------------------------------------------------------

class _HfConfig:
    """BOS/EOS/add_bos settings spread over an HF directory's JSON files."""

    def __init__(self, path: Path):
        self.tokenizer_config = _read_json(path / "tokenizer_config.json")
        self.special_tokens_map = _read_json(path / "special_tokens_map.json")
        self.config = _read_json(path / "config.json")
        self.generation_config = _read_json(path / "generation_config.json")

    def token_id(self, name: str, tokens: list[str], default: int | None) -> int | None:
        """Id of `name` ("bos"/"eos"): by string from the tokenizer files, else by id from config.json."""
        for source in (self.tokenizer_config, self.special_tokens_map):
            text = _token_content(source.get(f"{name}_token"))
            if text is not None and text in tokens:
                return tokens.index(text)
        for source in (self.config, self.generation_config):
            value = source.get(f"{name}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
        return default

    def add_bos(self, default: bool) -> bool:
        value = self.tokenizer_config.get("add_bos_token")
        return bool(value) if isinstance(value, bool) else default

    def extra_eos_ids(self) -> list[int]:
        """All EOS ids listed in config.json / generation_config.json (Llama 3.x lists several)."""
        ids = []
        for source in (self.config, self.generation_config):
            value = source.get("eos_token_id")
            ids += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
        return ids


def read_text_file(path: Path) -> str:
    """A UTF-8 file's text (tokenizer.json, a chat template); one-line errors for unreadable or invalid files."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise LlamacpuError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise LlamacpuError(f"{path}: not valid UTF-8 (at byte {e.start})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(read_text_file(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise LlamacpuError(f"{path}: invalid JSON ({(str(e).splitlines() or ['nested too deeply'])[0]})") from None
    return value if isinstance(value, dict) else {}


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ---- GGUF metadata helpers ----------------------------------------------------------------

def _meta_id(meta: dict, name: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return int(value) if value is not None else None


def _meta_array(meta: dict, key: str, n: int, fill) -> list:
    value = meta.get(key)
    if value is None:
        return [fill] * n
    value = list(np.asarray(value).tolist())
    if len(value) < n:
        raise LlamacpuError(f"{key} has {len(value)} entries for {n} tokens")
    return value[:n]


def _checked_id(token_id: int | None, n: int, name: str) -> int | None:
    if token_id is None:
        return None
    if not 0 <= int(token_id) < n:
        raise LlamacpuError(f"{name} token id {token_id} is out of range (vocab size {n})")
    return int(token_id)


def _non_negative(value: int) -> int | None:
    return value if value >= 0 else None
