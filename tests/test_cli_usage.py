"""The CLI as people who use ollama, llm and llama.cpp expect it (issue 11), through the command:
sampling defaults from the model, models by name, the usual flags, quiet pipes, the chat REPL
(on a pseudo-terminal too), help text, and one exit-code rule.

Uses the fixtures of test_cli.py: a tiny random model with SmolLM2's tokenizer and template,
and a $LLAMACPU_HOME holding the pinned SmolLM2 file.
"""

import json
import os
import re
import select
import shutil
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamacpu import cli
from test_cli import (COMMANDS, _command, default_home, llamacpu, one_line_error, tiny,  # noqa: F401
                      write_tiny_gguf)

runner = CliRunner()
# llama.cpp's defaults (common/common.h) and SmolLM2's model card (temperature=0.2, top_p=0.9).
LLAMA_CPP = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
SMOLLM2_CARD = {"temperature": 0.2, "top_p": 0.9}


def home_env(home: Path) -> dict:
    return {"LLAMACPU_HOME": str(home)}


# ---- 1. sampling defaults come from the model --------------------------------------------------

@pytest.fixture(scope="module")
def recommending(tmp_path_factory, smollm2_path) -> Path:
    """The tiny model with general.sampling.* keys, written by gguf-py's own writer."""
    def sampling(w):
        w.add_sampling_temp(0.3)
        w.add_sampling_top_k(7)
        w.add_sampling_top_p(0.5)
    return write_tiny_gguf(tmp_path_factory.mktemp("rec") / "recommending.gguf", smollm2_path, extra=sampling)


def test_gguf_sampling_keys_are_the_defaults_and_flags_win(recommending):
    r = llamacpu("run", recommending, "hi", "-n", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sampling"] == {**LLAMA_CPP, "temperature": 0.3, "top_k": 7, "top_p": 0.5}
    r = llamacpu("run", recommending, "hi", "-n", "1", "--json", "--temp", "0", "--top-k", "3")
    assert json.loads(r.stdout)["sampling"] == {**LLAMA_CPP, "temperature": 0.0, "top_k": 3, "top_p": 0.5}
    v = llamacpu("run", recommending, "hi", "-n", "1", "--verbose")
    assert "temperature 0.3 (recommending.gguf (general.sampling.*))" in v.stderr
    assert "top-k 40" not in v.stderr and "min-p 0.05 (llamacpu default)" in v.stderr
    info = llamacpu("info", recommending, "--json")
    assert json.loads(info.stdout)["sampling"] == {"temperature": 0.3, "top_k": 7, "top_p": 0.5}


def test_convert_carries_the_sampling_keys(recommending, tmp_path):
    import gguf
    out = tmp_path / "q4.gguf"
    r = llamacpu("convert", recommending, "-o", out, "--quant", "q4_0", "--no-calibrate", "--json")
    assert r.returncode == 0, r.stderr
    fields = gguf.GGUFReader(str(out)).fields  # read back by gguf-py, not by us
    temp, top_k = fields["general.sampling.temp"], fields["general.sampling.top_k"]
    assert temp.types == [gguf.GGUFValueType.FLOAT32] and abs(temp.contents() - 0.3) < 1e-7
    assert top_k.types == [gguf.GGUFValueType.INT32] and top_k.contents() == 7
    assert "general.sampling.min_p" not in fields  # only what the source recommends


def test_hf_generation_config_is_read(tmp_path, data_dir):
    folder = shutil.copytree(data_dir / "tiny_llama", tmp_path / "hf")
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "repetition_penalty": 1.1, "bos_token_id": 1}))
    r = llamacpu("info", folder, "--json")
    assert json.loads(r.stdout)["sampling"] == {"temperature": 0.6, "top_p": 0.8, "repeat_penalty": 1.1}
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_p": 0.8}))
    assert json.loads(llamacpu("info", folder, "--json").stdout)["sampling"] == {"temperature": 0.0, "top_p": 0.8}
    (folder / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    assert "generation_config.json" in one_line_error(llamacpu("info", folder))


def test_default_model_samples_as_its_card_says(default_home):
    r = llamacpu("run", "What is the capital of France?", "-n", "1", "--json", env=home_env(default_home))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sampling"] == {**LLAMA_CPP, **SMOLLM2_CARD}
    v = llamacpu("run", "smollm2", "Hi", "-n", "1", "-v", env=home_env(default_home))
    assert "temperature 0.2 (smollm2 model card)" in v.stderr and "top-p 0.9 (smollm2 model card)" in v.stderr


def test_help_says_where_sampling_defaults_come_from():
    out = runner.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "general.sampling" in out and "generation_config.json" in out
    flat = " ".join(out.split())
    assert ("--temperature, --temp T Sampling temperature; 0 is greedy. "
            "[default: the model's; smollm2: 0.2; else 0.8]") in flat
    assert "--top-k K Keep the K most likely tokens; 0 keeps all. [default: the model's; else 40]" in flat


# ---- 2. models by name --------------------------------------------------------------------------

def test_models_by_name_list_and_rm(tmp_path, smollm2_path, tiny):
    import gguf
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(smollm2_path, home / smollm2_path.name)  # rm must unlink the link, not the cache
    shutil.copy(tiny, home / "mytiny.gguf")
    env = home_env(home)
    listed = llamacpu("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"smollm2", "mytiny"}
    for name, path in [("smollm2", smollm2_path), ("mytiny", home / "mytiny.gguf")]:
        reader = gguf.GGUFReader(str(path))
        assert rows[name]["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
        assert rows[name]["size"] == path.stat().st_size
    assert rows["smollm2"]["format"] == "q4_1" and rows["mytiny"]["format"] == "q8_0"
    plain = llamacpu("list", env=env).stdout.splitlines()
    assert plain[0].split() == ["NAME", "FILE", "SIZE", "FORMAT", "PARAMETERS"] and len(plain) == 3

    r = llamacpu("run", "mytiny", "hi", "-n", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    name = gguf.GGUFReader(str(smollm2_path)).fields["general.name"].contents()
    assert json.loads(llamacpu("info", "--json", env=env).stdout)["name"] == name  # no MODEL: the default
    assert "no model named 'nosuch'" in one_line_error(llamacpu("run", "nosuch", "hi", env=env))

    assert llamacpu("rm", "mytiny", env=env).returncode == 0
    assert not (home / "mytiny.gguf").exists()
    assert [row["name"] for row in json.loads(llamacpu("list", "--json", env=env).stdout)] == ["smollm2"]
    one_line_error(llamacpu("rm", "mytiny", env=env))
    assert llamacpu("rm", "smollm2", env=env).returncode == 0
    assert smollm2_path.exists() and not (home / smollm2_path.name).exists()
    assert llamacpu("list", "--json", env=env).stdout.strip() == "[]"


# ---- 3. flags -------------------------------------------------------------------------------------

def test_version():
    r = llamacpu("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llamacpu {version('llamacpu')}"


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_short_and_long_help_on_every_command(command):
    outputs = [runner.invoke(cli.app, [*command, flag], env={"COLUMNS": "80"}) for flag in ("-h", "--help")]
    assert all(o.exit_code == 0 for o in outputs) and outputs[0].output == outputs[1].output
    assert outputs[0].output.startswith("Usage: ")


def test_aliases(tiny):
    base = ("run", tiny, "Hello", "-n", "2", "--json")
    plain = json.loads(llamacpu(*base, "--temperature", "0", "--threads", "1").stdout)
    short = json.loads(llamacpu(*base, "--temp", "0", "-t", "1", "-c", "64").stdout)
    assert short["token_ids"] == plain["token_ids"] and short["sampling"]["temperature"] == 0
    with_system = json.loads(llamacpu(*base, "-s", "Be brief.").stdout)
    assert with_system["prompt_tokens"] == json.loads(llamacpu(*base, "--system", "Be brief.").stdout)["prompt_tokens"]
    assert with_system["prompt_tokens"] != plain["prompt_tokens"]  # "Be brief." replaced the default system turn
    for flag in ("-c", "--ctx-size"):
        assert "context holds 8" in one_line_error(llamacpu(*base, flag, "8"))


def test_seed_minus_one_is_random_and_other_negatives_are_refused(tiny):
    base = ("run", tiny, "Tell me a story.", "-n", "4", "--temp", "1", "--json")
    seeds = {json.loads(llamacpu(*base, "--seed", "-1").stdout)["seed"] for _ in range(2)}
    assert len(seeds) == 2 and all(s >= 0 for s in seeds)
    assert "-1 for a random seed" in one_line_error(llamacpu(*base, "--seed", "-2"))
    r = llamacpu("run", tiny, "--jsonl", input=json.dumps({"prompt": "x", "seed": -5}) + "\n")
    assert r.returncode == 1 and "seed" in json.loads(r.stdout)["error"]


# ---- 4. a reader that closes the pipe early --------------------------------------------------------

@pytest.mark.parametrize("args, stdin", [
    (["run", "Tell me a long story.", "-n", "200", "--temp", "0"], b""),
    (["run", "Tell me a long story.", "-n", "20", "--temp", "0", "--json"], b""),
    (["chat", "--temp", "0", "-n", "20"], b"Hello\nTell me more\n"),
])
def test_a_closed_pipe_ends_quietly_with_0(tiny, args, stdin):
    read_end, write_end = os.pipe()
    p = subprocess.Popen([*_command(), args[0], str(tiny), *args[1:]], stdin=subprocess.PIPE, stdout=write_end,
                         stderr=subprocess.PIPE)
    os.close(write_end)
    os.close(read_end)  # the reader has gone before the first token, as `| head -c 20` after 20 bytes
    _, err = p.communicate(stdin, timeout=300)
    assert (p.returncode, err) == (0, b"")


def test_head_c_20_with_pipefail(tiny):
    cmd = " ".join([*_command(), "run", str(tiny), "'Tell me a long story'", "-n", "300", "--temp", "0"])
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -c 20"], capture_output=True, timeout=300)
    assert r.returncode == 0 and len(r.stdout) == 20 and r.stderr == b""


# ---- 5. chat ------------------------------------------------------------------------------------

def test_piped_chat_only_known_commands_are_commands_and_blocks_are_one_message(tiny, tmp_path):
    saved = tmp_path / "t.json"
    text = ('/usr/bin holds what?\n'
            '"""\nline one\n/exit is text here\n\nline two"""\n'
            '/frobnicate the widget\n'
            f'/save {saved}\n')
    r = llamacpu("chat", tiny, "--temp", "0", "-n", "3", input=text)
    assert r.returncode == 0, r.stderr
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["/usr/bin holds what?", "line one\n/exit is text here\n\nline two", "/frobnicate the widget"]
    assert len(r.stdout.splitlines()) == 3  # one answer line per message
    unclosed = llamacpu("chat", tiny, "--temp", "0", "-n", "3", input='Hi\n"""\nnever closed\n')
    assert unclosed.returncode == 1 and '"""' in unclosed.stderr and len(unclosed.stdout.splitlines()) == 1


def test_piped_chat_show_set_and_system(tiny):
    r = llamacpu("chat", tiny, "--temp", "1.5", "--seed", "3", "-n", "4",
                 input="/system\n/set temperature 0.3\n/set top-k 7\n/show\n/system Be terse.\n/system\n"
                       "/set temperature -1\n/set nonsense 1\n/unset system\n/system\n")
    assert r.returncode == 1  # the two bad /set lines failed, and said so
    err = r.stderr.splitlines()
    assert err[0].startswith("no system prompt")
    assert "temperature: 0.3 (/set)" in err and "top-k: 7 (/set)" in err and "seed: 3" in err
    assert "system prompt: Be terse." in err and err[-1].startswith("no system prompt")
    assert sum(line.startswith("error: ") for line in err) == 2


def test_chat_set_changes_the_next_answer(tiny):
    greedy = llamacpu("run", tiny, "Hello", "-n", "8", "--temp", "0").stdout.strip()
    hot = ("chat", tiny, "--temp", "1.5", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--seed", "3", "-n", "8")
    assert llamacpu(*hot, input="Hello\n").stdout.strip() != greedy
    assert llamacpu(*hot, input="/set temperature 0\nHello\n").stdout.strip() == greedy


class Terminal:
    """`llamacpu ARGS` on a pseudo-terminal, with SIGINT at its default (so Ctrl-C works even
    under a parent that ignores it). Waits on output, never on the clock."""

    def __init__(self, *args):
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.environ["COLUMNS"] = "120"
                cmd = _command()
                os.execv(cmd[0], cmd + [str(a) for a in args])
            finally:
                os._exit(127)
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = 600) -> bytes:
        while pattern not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, f"no {pattern!r} in {self.seen[-300:]!r}"
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"exited before {pattern!r}; printed {self.seen[-600:]!r}")
            self.seen += chunk
        before, _, self.seen = self.seen.partition(pattern)
        return before

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def finish(self) -> tuple[bytes, int]:
        """Everything printed until the program closes the terminal, and its exit code."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: closed
                break
            if not chunk:
                break
            self.seen += chunk
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return self.seen, os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_terminal_chat_ctrl_c_at_the_prompt_blocks_show_and_save(tiny, tmp_path):
    saved = tmp_path / "t.json"
    t = Terminal("chat", tiny, "--temp", "0", "-n", "3", "--system", "Be brief.")
    try:
        assert b"/help" in t.expect(b"> ")  # the banner names /help
        t.send(b"half a thought")
        t.expect(b"thought")
        t.send(b"\x03")  # Ctrl-C at the prompt: the line is dropped, the chat stays
        try:
            t.expect(b"/exit leaves", timeout=30)
        except AssertionError:
            # Seen twice in ~10 full runs before cli._start_worker_threads: the signal had landed on
            # a worker thread while the main thread slept in readline. A person presses Ctrl-C again;
            # so do we, once (two SIGINTs before Python looks are one KeyboardInterrupt).
            t.send(b"\x03")
            t.expect(b"/exit leaves")
        t.expect(b"> ")
        t.send(b'"""\r')  # a message of several lines
        t.send(b"first line\r")
        t.send(b'second line"""\r')
        t.expect(b"tok/s")  # answered once, as one message
        t.expect(b"> ")
        t.send(b"/system\r")
        assert b"Be brief." in t.expect(b"> ")
        t.send(b"/set temperature 0.2\r")
        t.expect(b"> ")
        t.send(b"/show\r")
        shown = re.sub(rb"\x1b\[[0-9;]*m", b"", t.expect(b"> "))
        assert re.search(rb"temperature\s+0\.2 \(/set\)", shown) and b"Be brief." in shown
        t.send(f"/save {saved}\r".encode())
        t.expect(b"> ")
        t.send(b"\x04")  # Ctrl-D leaves
        out, code = t.finish()
        assert code == 0
    finally:
        t.kill()
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]  # "half a thought" never sent
    assert messages[1]["content"] == "first line\nsecond line"


def test_terminal_run_quiet_silences_stats(tiny):
    outputs = {}
    for quiet in (False, True):
        t = Terminal("run", tiny, "Hello", "-n", "3", "--temp", "0", *(["--quiet"] if quiet else []))
        try:
            outputs[quiet], code = t.finish()
        finally:
            t.kill()
        assert code == 0
    assert b"tok/s" in outputs[False] and b"tok/s" not in outputs[True]


# ---- 6. help reads like a person wrote it ------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_metavars_not_types_and_unwrapped_examples(command):
    out = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "60"}).output
    assert not re.search(r"<(str|int|float|bool|path)>|list\[", out), out
    click_command = cli.typer.main.get_command(cli.app).commands[command]
    examples = click_command.epilog.split("\b\n", 1)[1].splitlines()
    assert examples and all(e.strip().startswith(("llamacpu", "echo", "cat", "printf")) for e in examples)
    lines = [line.strip() for line in out.splitlines()]
    for example in examples:
        assert example.strip() in lines  # whole, on one line, even at 60 columns


def test_options_name_what_to_type():
    out = runner.invoke(cli.app, ["run", "--help"]).output
    for option in ("-n, --max-tokens N", "--stop TEXT", "-s, --system TEXT", "-t, --threads N",
                   "-c, --ctx, --ctx-size N", "--seed N", "--quant FORMAT"):
        assert option in out
    convert = runner.invoke(cli.app, ["convert", "--help"]).output
    assert "-o, --out FILE" in convert


# ---- 7. exit codes, stats, JSON ----------------------------------------------------------------------

def test_one_exit_code_rule_across_run_jsonl_and_chat(tiny):
    good = json.dumps({"prompt": "Hi", "max_tokens": 2}) + "\n"
    assert llamacpu("run", tiny, "--jsonl", input=good * 2).returncode == 0
    assert llamacpu("run", tiny, "--jsonl", input=good + "{bad\n").returncode == 1
    assert llamacpu("run", tiny, "Hi", "--jsonl").returncode == 2  # usage: nothing was run
    assert llamacpu("chat", tiny, "-n", "2", input="Hi\n").returncode == 0
    assert llamacpu("chat", tiny, "-n", "2", input="Hi\n/set top-p 9\n").returncode == 1
    assert llamacpu("chat", tiny, "--top-p", "9", input="Hi\n").returncode == 2
    assert llamacpu("run", tiny, "Hi", "--quiet", "--verbose").returncode == 2


def test_json_floats_are_rounded(tiny):
    d = json.loads(llamacpu("run", tiny, "Hello", "-n", "5", "--json").stdout)
    floats = [v for v in d.values() if isinstance(v, float)] + [v for v in d["sampling"].values()
                                                                 if isinstance(v, float)]
    assert len(floats) >= 6
    assert all(v == float(f"{v:.4g}") for v in floats), floats


def test_an_interrupted_answer_has_no_rate():
    from llamacpu.generate import GenerationStats
    stats = GenerationStats(prompt_tokens=10, completion_tokens=1, prefill_seconds=0.1, decode_seconds=5.0,
                            stop_reason="interrupted")
    line = cli._speed_line(stats)
    assert "interrupted" in line and "decode" not in line and "prefill 10 tokens" in line
    stats.stop_reason = "eos"
    assert "decode" in cli._speed_line(stats)


def test_convert_writes_a_k_quant_mixture(recommending, tmp_path):
    import gguf
    out = tmp_path / "k.gguf"
    r = llamacpu("convert", recommending, "-o", out, "--quant", "q4_k_m", "--no-calibrate", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["quant"] == "q4_k_m" and set(report["formats"]) <= {"f32", "f16", "q4_k", "q5_0", "q6_k", "q8_0"}
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    bad = llamacpu("convert", recommending, "-o", tmp_path / "s.gguf", "--quant", "q4_k_s")
    assert bad.returncode == 2 and "unknown quantization 'q4_k_s'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "s.gguf").exists()
