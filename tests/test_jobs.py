"""Request lines (`jobs.py`), shared by `run --jsonl` and `batch`: parsing and settings checks."""

import pytest

from llamacpu.errors import LlamacpuError
from llamacpu.jobs import parse_request, request_settings

DEFAULTS = dict(system=None, raw=False, max_tokens=8, temperature=0.0, top_k=40, top_p=0.95, min_p=0.05,
                repeat_penalty=1.0, seed=None, stop=[])
HI = [{"role": "user", "content": "Hi"}]


def test_settings_come_from_the_line_over_the_defaults():
    s = request_settings({"id": 3, "prompt": "x", "max_tokens": 2, "stop": "."}, DEFAULTS)
    assert (s["prompt"], s["max_tokens"], s["stop"], s["temperature"]) == ("x", 2, ["."], 0.0)
    s = request_settings({"messages": HI + [{"role": "assistant", "content": "Hello"}, *HI]}, DEFAULTS)
    assert len(s["messages"]) == 3


@pytest.mark.parametrize("req, message", [
    ({}, '"prompt" or a "messages"'),
    ({"prompt": "x", "messages": HI}, "not both"),
    ({"prompt": "  "}, "non-empty"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
    ({"messages": HI, "system": "s"}, "system turn"),
    ({"prompt": "x", "max_tokens": True}, '"max_tokens" must be int'),
    ({"prompt": "x", "stop": [1]}, "list of strings"),
    ({"prompt": "x", "temprature": 0}, "temprature"),
])
def test_bad_settings_are_named(req, message):
    with pytest.raises(LlamacpuError) as e:
        request_settings(req, DEFAULTS)
    assert message in str(e.value)


def test_lines_that_are_not_objects_are_errors():
    assert parse_request('{"prompt": "x"}', 0) == {"prompt": "x"}
    for line, message in (("[1]", "line 4 is not a JSON object"), ("{x", "line 4 is not JSON"),
                          ("[" * 100_000, "line 4 is nested too deeply")):
        with pytest.raises(LlamacpuError) as e:
            parse_request(line, 3)
        assert message in str(e.value)
