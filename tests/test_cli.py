"""The `llamacpu` command: argument handling in-process, then real pipes through subprocesses.

Most subprocess tests use a tiny random-weight model that carries SmolLM2's real tokenizer and
chat template (written here with the `gguf` package), so they exercise every layer quickly;
the tests that need real answers use the pinned SmolLM2 model with few tokens.
"""

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llamacpu import cli

ANSI = "\x1b["
COMMANDS = ["run", "chat", "info", "list", "rm", "convert", "bench", "perplexity"]


# ---- fixtures ---------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, real: Path, *, seed: int = 0, extra=None) -> Path:
    """A 2-layer, width-64 llama with random q8_0 weights and the tokenizer/template of `real`;
    `extra(writer)` may add metadata."""
    import gguf

    from llamacpu.loaders.gguf import read_metadata
    meta = read_metadata(real)
    D, F, H, KV, L, V = 64, 128, 4, 2, 2, len(meta["tokenizer.ggml.tokens"])
    hd = D // H
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(bool(meta["tokenizer.ggml.add_bos_token"]))
    w.add_chat_template(meta["tokenizer.chat_template"])
    if extra is not None:
        extra(w)
    rng = np.random.default_rng(seed)

    def matrix(name, rows, cols, scale=0.3):
        a = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", V, D, 1.0)
    w.add_tensor("output_norm.weight", np.ones(D, dtype=np.float32))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", D, D)
        matrix(f"blk.{i}.attn_k.weight", KV * hd, D)
        matrix(f"blk.{i}.attn_v.weight", KV * hd, D)
        matrix(f"blk.{i}.attn_output.weight", D, D)
        matrix(f"blk.{i}.ffn_gate.weight", F, D)
        matrix(f"blk.{i}.ffn_up.weight", F, D)
        matrix(f"blk.{i}.ffn_down.weight", D, F)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", smollm2_path)


@pytest.fixture(scope="module")
def default_home(tmp_path_factory, smollm2_path) -> Path:
    """A $LLAMACPU_HOME that already holds the pinned default model, as fetched (no network)."""
    home = tmp_path_factory.mktemp("home")
    os.symlink(smollm2_path, home / smollm2_path.name)
    return home


def _command() -> list[str]:
    exe = Path(sys.executable).with_name("llamacpu")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llamacpu.cli"]


def llamacpu(*args, input="", env=None, timeout=600):
    """Run the console script; stdin is always a pipe (empty by default), never inherited."""
    cmd = _command()
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    full_env.update({"TERM": "xterm-256color", **(env or {})})
    return subprocess.run(cmd + [str(a) for a in args], input=input, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def one_line_error(result, code=2):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ---- argument handling (in-process) --------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(cli.app, [command, "--help"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Example" in result.output


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--min-p", "2"], "min-p"),
    (["--top-k", "-3"], "top-k"),
    (["--repeat-penalty", "0"], "repeat penalty"),
    (["--max-tokens", "-1"], "max-tokens"),
    (["--json", "--jsonl"], "cannot be combined"),
])
def test_bad_settings_fail_before_loading_with_exit_2(args, message, capsys):
    # No model exists at this path: the settings must be refused first.
    assert cli.main(["run", "/no/such/model.gguf", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_serve_parallel_default_is_the_schedulers():
    import typer

    from llamacpu import scheduler
    serve = typer.main.get_command(cli.app).commands["serve"]
    assert next(p for p in serve.params if p.name == "parallel").default == scheduler.PARALLEL


def test_help_loads_no_numba():
    """Help (and the option defaults it shows, such as scheduler.PARALLEL) needs neither numba
    nor the model: both load only when a command opens a model."""
    code = ("import sys\n"
            "from llamacpu.cli import main\n"
            "assert main(['--help']) == 0 and main(['serve', '--help']) == 0\n"
            "print(sorted(m for m in ('numba', 'llamacpu.model', 'llamacpu.kernels') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_usage_errors_are_one_line_with_exit_2(capsys):
    assert cli.main(["run", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--no-such-flag" in err and err.count("\n") == 1
    assert cli.main(["run", "--temperature", "hot"]) == 2
    assert cli.main(["rm"]) == 2  # NAME is required
    assert cli.main(["frobnicate"]) == 2


def test_unknown_model_path_and_corrupt_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["run", str(tmp_path / "missing.gguf"), "hi"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert cli.main(["run", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert cli.main(["info", str(bad)]) == 2


def test_one_argument_is_a_model_only_if_it_looks_like_one(tmp_path):
    assert cli._looks_like_model(str(tmp_path))
    assert cli._looks_like_model("some/model.gguf")
    assert not cli._looks_like_model("Summarise this:")
    assert not cli._looks_like_model("What is 1/2 of 10?")


def test_default_model_is_fetched_once_and_kept_as_shipped(tmp_path, monkeypatch):
    from llamacpu import registry
    calls, notes = [], []
    monkeypatch.setenv("LLAMACPU_HOME", str(tmp_path))

    def fake_fetch(item, dest):
        calls.append(Path(dest))
        (Path(dest) / item.filename).write_bytes(b"as shipped")
        return Path(dest) / item.filename

    monkeypatch.setattr(registry, "fetch", fake_fetch)
    path = registry.resolve_model(None, notify=notes.append)
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == b"as shipped"
    assert calls == [tmp_path] and any("downloading" in n for n in notes)
    assert registry.resolve_model("smollm2") == path  # the name and the default are one file
    assert calls == [tmp_path]  # fetched once, never converted
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_info_json_and_plain(tiny, capsys):
    assert cli.main(["info", str(tiny), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layers"] == 2 and d["hidden_size"] == 64 and d["chat_template"] is True
    assert d["formats"]["attention"] == {"q8_0": 8} and d["formats"]["norm"] == {"f32": 5}
    assert d["tokenizer"]["kind"] == "bpe" and d["context_length"] == 4096
    assert cli.main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "layers: 2" in out and ANSI not in out
    assert cli.main(["info", str(Path(__file__).parent / "data" / "tiny_llama"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "hf" and d["formats"]["ffn"] == {"bf16": 6} and d["tokenizer"] is None


def test_convert_then_bench_in_process(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.q4_0.gguf"
    assert cli.main(["convert", str(tiny), "-o", str(out), "--quant", "q4_0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quant"] == "q4_0" and out.exists()
    assert cli.main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["formats"]["ffn"] == {"q4_0": 6}
    assert cli.main(["convert", str(tiny), "-o", str(tmp_path / "x.gguf"), "--quant", "q3_k"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.main(["bench", str(out), "--prompt-tokens", "8", "--gen-tokens", "4", "-r", "3", "--threads", "1",
                     "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["decode_tok_s"] > 0 and b["prompt_tokens"] == 8 and b["gen_tokens"] == 4 and b["repeats"] == 3
    for kind in ("prefill", "decode"):  # mean ± sample sd of the runs, as llama-bench reports them
        runs = b[f"{kind}_tok_s_runs"]
        assert len(runs) == 3 and b[f"{kind}_tok_s_best"] == max(runs)
        # JSON numbers carry 4 significant digits
        assert b[f"{kind}_tok_s"] == pytest.approx(np.mean(runs), rel=1e-3)
        assert b[f"{kind}_tok_s_sd"] == pytest.approx(np.std(runs, ddof=1), rel=1e-3, abs=1e-3 * np.mean(runs))
    assert cli.main(["bench", str(out), "--prompt-tokens", "8", "--gen-tokens", "2", "-r", "2", "--threads", "1"]) == 0
    assert re.search(r"decode tok/s: [0-9.]+ ± [0-9.]+", capsys.readouterr().out)


def test_adaptive_threads_generates_the_same_greedy_text(tiny):
    args = ("run", tiny, "--temperature", "0", "--max-tokens", "12", "--json")
    plain = llamacpu(*args, input="What is 12 times 7?\n")
    adaptive = llamacpu(*args, "--adaptive-threads", input="What is 12 times 7?\n")
    assert plain.returncode == 0 and adaptive.returncode == 0, adaptive.stderr
    assert json.loads(adaptive.stdout)["text"] == json.loads(plain.stdout)["text"]


# ---- real pipes, tiny model ----------------------------------------------------------------------

def test_run_through_a_pipe_is_clean_text(tiny):
    r = llamacpu("run", tiny, "--temperature", "0", "--max-tokens", "12", "--verbose", input="What is 12 times 7?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and ANSI not in r.stdout
    assert "tok/s" in r.stderr and ANSI not in r.stderr  # --verbose: stats on stderr, plain when piped
    j = llamacpu("run", tiny, "--temperature", "0", "--max-tokens", "12", "--json", input="What is 12 times 7?\n")
    assert j.stderr == ""  # no stats or notices without --verbose when stderr is not a terminal
    d = json.loads(j.stdout)
    assert r.stdout == d["text"] + ("\n" if not d["text"].endswith("\n") else "")
    for key in ("text", "token_ids", "prompt_tokens", "completion_tokens", "stop_reason",
                "prefill_tok_s", "decode_tok_s", "seed"):
        assert key in d
    assert d["completion_tokens"] == len(d["token_ids"]) <= 12


def test_argument_and_stdin_are_joined(tiny):
    from llamacpu.chat import encode_prompt
    from llamacpu.runtime import open_model
    rt = open_model(tiny)
    r = llamacpu("run", tiny, "Summarise this:", "-n", "1", "--temperature", "0", "--json", input="Some notes.\n")
    expected = encode_prompt(rt.tokenizer, rt.template, "Summarise this:\n\nSome notes.")
    assert json.loads(r.stdout)["prompt_tokens"] == len(expected)


def test_same_seed_same_text_and_another_seed_differs(tiny):
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_tokens": 16}
    requests = [{"prompt": "Tell me a story.", "seed": seed, **settings} for seed in (7, 7, 8)]
    batch = llamacpu("run", tiny, "--jsonl", input="".join(json.dumps(r) + "\n" for r in requests))
    a, b, c = (json.loads(line) for line in batch.stdout.splitlines())
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["prompt_tokens"] == b["prompt_tokens"]  # each row is prefilled whole, whatever came before
    assert a["token_ids"] != c["token_ids"]
    # and in another process, through the flags
    single = llamacpu("run", tiny, "Tell me a story.", "--temperature", "1.0", "--top-k", "0", "--top-p", "1",
                      "--min-p", "0", "-n", "16", "--seed", "7", "--json")
    d = json.loads(single.stdout)
    assert d["token_ids"] == a["token_ids"] and d["seed"] == 7


def test_stop_string_cuts_the_output_and_is_not_printed(tiny):
    base = ("run", tiny, "Hello", "--temperature", "0", "-n", "24", "--raw")
    full = json.loads(llamacpu(*base, "--json").stdout)["text"]
    assert len(full) > 12
    stop = full[6:9]
    expected = full[:full.index(stop)]
    r = llamacpu(*base, "--stop", stop, "--stop", "never-there")
    assert r.returncode == 0 and r.stdout.rstrip("\n") == expected.rstrip("\n")


def test_jsonl_keeps_order_and_survives_a_bad_line(tiny):
    lines = [
        json.dumps({"prompt": "First", "max_tokens": 3, "temperature": 0, "id": "a"}),
        "{not json",
        json.dumps({"prompt": "Second", "max_tokens": 2, "temperature": 0.5, "seed": 1}),
        json.dumps({"prompt": "Third", "top_p": 7}),
        "",
        json.dumps({"prompt": "Fourth", "max_tokens": 1, "temprature": 0}),
        json.dumps({"prompt": "Fifth", "max_tokens": 1, "stop": "x", "raw": True}),
    ]
    r = llamacpu("run", tiny, "--jsonl", input="\n".join(lines) + "\n")
    assert r.returncode == 1, r.stderr  # some requests failed, each reported in its row
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["index"] for o in out] == [0, 1, 2, 3, 5, 6]
    assert out[0]["id"] == "a" and out[0]["completion_tokens"] <= 3 and "error" not in out[0]
    assert "error" in out[1] and "JSON" in out[1]["error"]
    assert out[2]["completion_tokens"] <= 2 and out[2]["seed"] == 1
    assert "top-p" in out[3]["error"]
    assert "temprature" in out[4]["error"]
    assert "text" in out[5]


def test_bad_input_through_pipes(tiny, tmp_path):
    # (settings and paths are checked in-process above; these need a real pipe or a real file)
    one_line_error(llamacpu("run", tiny, input="   \n"))  # empty prompt on stdin
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(tiny.read_bytes()[:5000])  # truncated in the middle of the vocabulary
    one_line_error(llamacpu("run", bad, "--top-p", "1.01", input="hi\n"))  # the first problem is reported
    one_line_error(llamacpu("run", bad, input="hi\n"))


def test_chat_through_a_pipe_reuses_the_cache(tiny, tmp_path):
    transcript = tmp_path / "t.json"
    r = llamacpu("chat", tiny, "--temperature", "0", "--max-tokens", "4",
                 input=f"Hello there\n/stats\nHow are you?\n/stats\n/save {transcript}\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    stats = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(stats) == 2
    first, second = stats
    assert first["last_reused_tokens"] == 0 and first["last_prefilled_tokens"] == first["last_prompt_tokens"]
    assert second["last_reused_tokens"] > first["last_prompt_tokens"]
    assert second["last_prefilled_tokens"] == second["last_prompt_tokens"] - second["last_reused_tokens"]
    saved = json.loads(transcript.read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert ANSI not in r.stdout


def test_piped_chat_failed_command_is_reported_and_exits_1(tiny):
    r = llamacpu("chat", tiny, "--temperature", "0", "-n", "2", input="/load /no/such.json\nhi\n")
    assert r.returncode == 1
    assert r.stderr.count("error: ") == 1 and "/no/such.json" in r.stderr
    assert len(r.stdout.splitlines()) == 1  # "hi" was still answered


def _default_sigint() -> None:
    """In a child before exec: SIGINT back to its default disposition. A parent that ignores
    SIGINT (a background job of a non-interactive shell, some CI runners) passes SIG_IGN on
    through exec, and Python then installs no KeyboardInterrupt handler, so Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_keeps_what_was_streamed_and_exits_130(tiny):
    # SIGINT at its default in the child, so that Ctrl-C works even under a parent that ignores it
    p = subprocess.Popen([*_command(), "run", str(tiny), "Go on forever.", "--max-tokens", "4000"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_default_sigint)
    first = p.stdout.read(1)  # generation has started
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert first and (first + rest).endswith(b"\n") and b"Traceback" not in err


def test_interactive_chat_on_a_terminal(tiny, tmp_path):
    """The terminal path: live answers with a speed line, /stats, Ctrl-C stops an answer but keeps
    the session, /exit leaves with 0. Waits on output, never on the clock."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:  # the child: become llamacpu chat on the pseudo-terminal
        try:
            os.environ["COLUMNS"] = "120"
            _default_sigint()
            cmd = _command()
            os.execv(cmd[0], cmd + ["chat", str(tiny), "--max-tokens", "3000", "--temperature", "0"])
        finally:
            os._exit(127)  # never return into pytest in the child
    seen = b""

    def expect(pattern: bytes) -> bytes:
        nonlocal seen
        while pattern not in seen:
            ready, _, _ = select.select([fd], [], [], 120)
            assert ready, f"no {pattern!r} in {seen[-300:]!r}"
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: the chat has closed the terminal
                raise AssertionError(f"chat exited before {pattern!r}; it printed {seen[-600:]!r}") from None
        before, _, seen = seen.partition(pattern)
        return before

    try:
        expect(b"> ")
        os.write(fd, b"/stats\r")
        assert b"context size" in expect(b"> ")
        os.write(fd, b"Tell me everything.\r")
        expect(b"everything.")  # the echo of our line
        # The tty may echo the line twice (once cooked, once by readline): wait until answer text
        # follows the last echo, so that Ctrl-C reaches the answer and not the prompt.
        while True:
            _, echo, after = seen.rpartition(b"everything.")
            if len(after if echo else seen) > 40:
                break
            ready, _, _ = select.select([fd], [], [], 120)
            assert ready, f"no answer after {seen[-300:]!r}"
            seen += os.read(fd, 65536)
        os.write(fd, b"\x03")
        answer = expect(b"> ")
        assert b"stopped" in answer and b"interrupted" in answer and b"tok/s" in answer
        assert b"decode" not in answer  # an interrupted answer has no decode rate
        os.write(fd, b"/stats\r")
        stats = expect(b"> ")
        assert b"messages" in stats and b"interrupted" in stats
        os.write(fd, b"/exit\r")
        while True:  # drain until the chat closes its terminal
            try:
                if not os.read(fd, 65536):
                    break
            except OSError:  # EIO: the terminal is closed
                break
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


# ---- the real model --------------------------------------------------------------------------------

def test_default_model_answers_a_pipe(default_home):
    """The issue's example, verbatim: no MODEL, so the default model is converted on first use."""
    r = llamacpu("run", "--temperature", "0", "--max-tokens", "24", input="What is 12 times 7?\n",
                 env={"LLAMACPU_HOME": str(default_home)})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # nothing to fetch or convert: the file is used as shipped
    assert [p.name for p in default_home.iterdir()] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    text = r.stdout
    assert text.strip() and ANSI not in text and text.endswith("\n")
    assert all(ch.isprintable() or ch in "\n\t" for ch in text)
    assert "12" in text  # it answers the question (the 135M model is not reliable at arithmetic)


def test_real_chat_second_turn_refers_to_the_first(default_home):
    r = llamacpu("chat", "--temperature", "0", "--max-tokens", "12",
                 input="I have a dog named Rex.\n/stats\nWhat is the name of my dog?\n/stats\n",
                 env={"LLAMACPU_HOME": str(default_home)})
    assert r.returncode == 0, r.stderr
    first_answer, first, second_answer, second = r.stdout.strip().splitlines()
    first, second = json.loads(first), json.loads(second)
    assert "Rex" in second_answer  # greedy SmolLM2: "The name of your dog is Rex."
    from llamacpu.loaders.gguf import read_metadata
    from llamacpu.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(read_metadata(default_home / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    own = tok.encode("<|im_end|>\n<|im_start|>user\nWhat is the name of my dog?<|im_end|>\n<|im_start|>assistant\n",
                     add_bos=False)
    # An answer cut by --max-tokens leaves its last token unfed (its logits were never needed),
    # so that one token is prefilled with the next turn.
    unfed = 1 if first["last_stop_reason"] == "length" else 0
    assert second["last_prefilled_tokens"] == len(own) + unfed
    assert second["last_reused_tokens"] == first["last_prompt_tokens"] + first["last_completion_tokens"] - unfed


def test_perplexity_on_the_real_model(smollm2_path, tmp_path, capsys):
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    r = llamacpu("perplexity", smollm2_path, text, "--ctx", "32", "--chunks", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tokens"] == 31 and 1.0 < d["ppl"] < 50  # a repeated sentence is easy to predict
    assert cli.main(["perplexity", str(smollm2_path), str(text), "--ctx", "32", "--chunks", "1"]) == 0
    out = capsys.readouterr().out
    assert "ppl: " in out and "tokens: 31" in out
    assert cli.main(["perplexity", str(smollm2_path), str(tmp_path / "missing.txt")]) == 2


def test_unsupported_architecture_and_non_model_files(tmp_path, capsys, monkeypatch):
    from tiny import random_tensors, tiny_config, write_gguf, write_hf
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    c = tiny_config()
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", c, random_tensors(c), arch="gpt2")
    qwen = write_hf(tmp_path / "qwen", c, random_tensors(c), arch="Qwen2ForCausalLM")
    text = tmp_path / "notes.txt"
    text.write_text("just some text, not a model\n")
    for path, message in [(gpt2, "unsupported GGUF architecture 'gpt2'"),
                          (qwen, "unsupported architecture 'Qwen2ForCausalLM'"),
                          (text, "not a readable GGUF")]:
        assert cli.main(["run", str(path), "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
