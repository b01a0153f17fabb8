"""The generation loop and the stop-string text layer, on a scripted fake model."""

import numpy as np
import pytest

from llamacpu.errors import LlamacpuError
from llamacpu.generate import Completion, GenerationStats, TextStream, complete, generate
from llamacpu.sampling import make_sampler

VOCAB = ["<eos>", "a", "b", "c", " ", "St", "OP", "!", "\n"]
EOS = 0


class FakeCache:
    def __init__(self, max_seq):
        self.max_seq, self.pos = max_seq, 0

    def truncate(self, n):
        assert 0 <= n <= self.pos
        self.pos = n


class ScriptedModel:
    """Predicts `script[position]` with certainty; records every forward call."""

    def __init__(self, script, vocab=len(VOCAB)):
        self.script, self.vocab, self.calls = list(script), vocab, []

    def new_cache(self, max_seq=None):
        return FakeCache(max_seq or 64)

    def forward(self, tokens, cache, *, all_logits=False):
        tokens = list(tokens)
        assert cache.pos + len(tokens) <= cache.max_seq
        self.calls.append(tokens)
        cache.pos += len(tokens)
        logits = np.full(self.vocab, -10.0, dtype=np.float32)
        logits[self.script[cache.pos - 1] if cache.pos - 1 < len(self.script) else EOS] = 10.0
        return logits


class FakeTokenizer:
    stop_ids = frozenset({EOS})

    def stream_decoder(self, continuation=False):
        class Decoder:
            def push(self, i):
                return VOCAB[i] if i != EOS else ""

            def flush(self):
                return ""
        return Decoder()

    def decode(self, ids, continuation=False):
        return "".join(VOCAB[i] for i in ids if i != EOS)


def run(model, prompt, max_tokens=10, cache=None, **kw):
    cache = cache or FakeCache(64)
    stats = GenerationStats()
    out = list(generate(model, prompt, cache=cache, sampler=make_sampler(0.0), rng=np.random.default_rng(0),
                        max_tokens=max_tokens, stop_ids={EOS}, stats=stats, **kw))
    return out, stats, cache


def test_prefill_once_then_one_token_per_step_until_eos():
    # positions 0-2 are the prompt; the model then says 1, 2, 3, eos
    model = ScriptedModel([8, 8, 1, 2, 3, EOS])
    out, stats, cache = run(model, [4, 4, 4])
    assert out == [1, 2, 3]
    assert model.calls == [[4, 4, 4], [1], [2], [3]]
    assert stats.stop_reason == "eos"
    assert (stats.prompt_tokens, stats.completion_tokens, stats.decode_steps) == (3, 3, 3)
    assert cache.pos == 6  # prompt + every yielded token (the eos was never fed)


def test_max_tokens_ends_with_length_and_does_not_feed_the_last_token():
    model = ScriptedModel([8, 1, 2, 3, 1, 2, 3])
    out, stats, cache = run(model, [4, 4], max_tokens=3)
    assert out == [1, 2, 3]
    assert stats.stop_reason == "length"
    assert cache.pos == 4  # 2 prompt + 2 of the 3 yielded tokens
    assert stats.decode_steps == 2


def test_full_cache_ends_with_length():
    model = ScriptedModel([1] * 20)
    out, stats, cache = run(model, [4, 4], max_tokens=100, cache=FakeCache(5))
    assert len(out) == 4 and stats.stop_reason == "length" and cache.pos == 5


def test_prompt_that_does_not_fit_is_refused_before_running():
    model = ScriptedModel([1] * 20)
    with pytest.raises(LlamacpuError, match="does not fit"):
        run(model, [4] * 6, cache=FakeCache(5))
    assert model.calls == []
    with pytest.raises(LlamacpuError, match="empty"):
        run(model, [])


def test_prefill_continues_after_what_the_cache_holds():
    model = ScriptedModel([8, 8, 1, EOS])
    cache = FakeCache(64)
    cache.pos = 2  # two positions already cached (a chat's earlier turns)
    out, stats, _ = run(model, [4], cache=cache)
    assert out == [1] and model.calls[0] == [4] and stats.prompt_tokens == 1


def test_repeat_penalty_steers_away_from_recent_tokens():
    class Tied(ScriptedModel):
        def forward(self, tokens, cache, *, all_logits=False):
            super().forward(tokens, cache)
            return np.array([-5, 2.0, 1.9, 1.8, -5, -5, -5, -5, -5], dtype=np.float32)
    out, _, _ = run(Tied([]), [1], max_tokens=3, repeat_penalty=1.5)
    assert out == [2, 3, 1]  # greedy would say 1, 1, 1
    out, _, _ = run(Tied([]), [1], max_tokens=3)
    assert out == [1, 1, 1]


def test_repeat_penalty_window_reaches_into_the_cached_ids():
    class Tied(ScriptedModel):
        def forward(self, tokens, cache, *, all_logits=False):
            super().forward(tokens, cache)
            return np.array([-5, 2.0, 1.9, 1.8, -5, -5, -5, -5, -5], dtype=np.float32)
    # Sequence [1, 5, 5, 4]: fed whole, or with its first three ids already in the cache.
    fresh, _, _ = run(Tied([]), [1, 5, 5, 4], max_tokens=3, repeat_penalty=1.5)
    cache = FakeCache(64)
    cache.pos = 3
    reused, _, _ = run(Tied([]), [4], max_tokens=3, repeat_penalty=1.5, cache=cache, earlier_ids=[1, 5, 5])
    assert reused == fresh == [2, 3, 1]  # 1 is penalised from the start either way (greedy: 1, 1, 1)
    # Only the last repeat_last_n ids count, wherever they sit.
    far, _, _ = run(Tied([]), [4], max_tokens=1, repeat_penalty=1.5, cache=cache, earlier_ids=[1, 5, 5],
                    repeat_last_n=2)
    assert far == [1]


def test_presence_and_frequency_penalties_count_only_generated_tokens():
    class Tied(ScriptedModel):
        def forward(self, tokens, cache, *, all_logits=False):
            super().forward(tokens, cache)
            return np.array([-5, 2.0, 1.5, 0.2, -5, -5, -5, -5, -5], dtype=np.float32)
    # The prompt's 1s are not penalised. Presence takes 0.6 once from every generated id:
    # 1 (2.0) → 2 (1.5 > 1.4) → 1 (1.4 > 0.9) → 1 (still 1.4: presence does not grow with use).
    out, _, _ = run(Tied([]), [1, 1], max_tokens=4, presence_penalty=0.6)
    assert out == [1, 2, 1, 1]
    # Frequency takes 1.0 per use: 1 (2.0) → 2 (1.5 > 1.0) → 1 (1.0 > 0.5) → 2 (0.5 > 0.2 > 0.0).
    out, _, _ = run(Tied([]), [1], max_tokens=4, frequency_penalty=1.0)
    assert out == [1, 2, 1, 2]
    with pytest.raises(LlamacpuError, match="presence penalty"):
        run(Tied([]), [1], presence_penalty=3.0)


def test_stats_survive_the_consumer_stopping_early():
    model = ScriptedModel([1] * 20)
    stats = GenerationStats()
    tokens = generate(model, [4], cache=FakeCache(64), sampler=make_sampler(0.0), rng=np.random.default_rng(0),
                      max_tokens=10, stats=stats)
    assert next(tokens) == 1 and next(tokens) == 1
    tokens.close()
    assert stats.completion_tokens == 2 and stats.decode_seconds > 0


def test_text_stream_holds_back_a_possible_stop_string_and_never_emits_it():
    ts = TextStream(FakeTokenizer(), stop=["STOP"])
    assert ts.push(5) == "St"  # case matters: "St" cannot start "STOP"
    ts2 = TextStream(FakeTokenizer(), stop=["StOP!"])
    assert ts2.push(1) == "a"
    assert ts2.push(5) == ""  # held: "St" may begin "StOP!"
    assert ts2.push(6) == ""  # "StOP" still may
    assert ts2.push(7) == ""  # "StOP!" — stop, never printed
    assert ts2.stopped and ts2.text == "a"
    assert ts2.flush() == ""


def test_text_stream_releases_held_text_when_it_cannot_be_a_stop():
    ts = TextStream(FakeTokenizer(), stop=["StOP!"])
    assert ts.push(5) == ""
    assert ts.push(1) == "Sta"
    assert ts.push(5) + ts.flush() == "St"  # the end of the text releases everything
    assert ts.text == "StaSt" and not ts.stopped


def test_text_stream_cuts_inside_a_token_and_picks_the_earliest_stop():
    ts = TextStream(FakeTokenizer(), stop=["c", "b"])
    assert ts.push(1) == "a"
    assert ts.push(2) == ""  # "b" stops; text ends before it
    assert ts.text == "a" and ts.stopped


def test_complete_reports_text_ids_and_stop_reason():
    model = ScriptedModel([1, 2, 5, 6, 7, 3, EOS])
    result = Completion()
    pieces = list(complete(model, FakeTokenizer(), [4], cache=FakeCache(64), sampler=make_sampler(0.0),
                           rng=np.random.default_rng(0), max_tokens=20, stop=["OP!"], result=result))
    assert "".join(pieces) == "abSt" == result.text
    assert result.stats.stop_reason == "stop"
    assert result.token_ids == [1, 2, 5, 6, 7]
    d = result.to_dict()
    for key in ("text", "token_ids", "prompt_tokens", "completion_tokens", "stop_reason",
                "prefill_tok_s", "decode_tok_s"):
        assert key in d

    result = Completion()
    text = "".join(complete(ScriptedModel([1, 2, EOS]), FakeTokenizer(), [4], cache=FakeCache(64),
                            sampler=make_sampler(0.0), rng=np.random.default_rng(0), max_tokens=20, result=result))
    assert text == "ab" and result.stats.stop_reason == "eos" and result.token_ids == [1, 2]


def test_sampled_generation_is_reproducible_with_a_seed():
    class Flat(ScriptedModel):
        def forward(self, tokens, cache, *, all_logits=False):
            super().forward(tokens, cache)
            return np.zeros(self.vocab, dtype=np.float32)

    def once(seed):
        return list(generate(Flat([]), [4], cache=FakeCache(64), sampler=make_sampler(1.0),
                             rng=np.random.default_rng(seed), max_tokens=12, stop_ids=set()))
    assert once(3) == once(3)
    assert once(3) != once(4)


def test_stream_decoding_of_real_tokens_matches_full_decode(smollm2_path):
    """A multi-byte character split over byte tokens comes out whole, once."""
    from llamacpu.loaders.gguf import read_metadata
    from llamacpu.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(read_metadata(smollm2_path))
    ids = tok.encode("Tea 🍵 time: 東京, naïve!", add_bos=False)
    ts = TextStream(tok, stop=["naïve"])
    out = "".join(ts.push(i) for i in ids) + ts.flush()
    assert out == "Tea 🍵 time: 東京, " and ts.stopped
    ts = TextStream(tok)
    assert "".join(ts.push(i) for i in ids) + ts.flush() == tok.decode(ids, continuation=True)
