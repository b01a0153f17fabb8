"""`llamacpu batch` on a real local Ray with 2 workers and the real SmolLM2 model.

The reference for every row is `run --jsonl` on the same lines, in one process. Each batch run
starts its own local Ray (in the subprocess) and must leave no Ray process behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamacpu.batch import plan_job
from llamacpu.errors import LlamacpuError

PROMPTS = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello.",
           "Name a fruit.", "What is the sun?", "Count to five.", "Name a planet."]
# Timings differ between runs, and so do the random seeds of unseeded (here greedy) lines; the rest must match.
SAME = ("index", "id", "text", "token_ids", "prompt_tokens", "completion_tokens", "stop_reason", "error")


def command() -> list[str]:
    exe = Path(sys.executable).with_name("llamacpu")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llamacpu.cli"]


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}


def request_lines(n_tokens: int = 10) -> list[str]:
    lines = [json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": n_tokens, "temperature": 0})
             for i, p in enumerate(PROMPTS)]
    lines.insert(3, "{not json")  # malformed: an error row
    lines.insert(5, "")  # blank: no row, but it counts in the indexes
    lines.append(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi!"}],
                             "max_tokens": n_tokens, "temperature": 0}))
    return lines


def batch(inp: Path, out: Path, model: Path, *extra, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command() + ["batch", str(inp), "-o", str(out), "--model", str(model),
                                       "--workers", "2", *map(str, extra)],
                          capture_output=True, text=True, env=env(), timeout=timeout, stdin=subprocess.DEVNULL)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def same(row: dict) -> dict:
    return {k: row.get(k) for k in SAME}


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "in.jsonl"
    path.write_text("\n".join(request_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(requests, smollm2_path) -> list[dict]:
    r = subprocess.run(command() + ["run", str(smollm2_path), "--jsonl"], input=requests.read_text(),
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 1, r.stderr  # one row failed (the malformed line): exit 1, as for every command
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == len(PROMPTS) + 2 and sum("error" in o for o in out) == 1
    return out


@pytest.fixture(scope="module")
def finished(requests, smollm2_path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("batch-out") / "out.jsonl"
    return out, batch(requests, out, smollm2_path)


def test_rows_equal_run_jsonl_in_order(finished, reference):
    out, r = finished
    assert r.returncode == 1, r.stderr
    got = rows(out)
    assert [same(g) for g in got] == [same(x) for x in reference]
    assert "error" in got[3] and "JSON" in got[3]["error"]
    assert got[-1]["id"] == "chat" and got[-1]["text"]
    # the summary, and no noise from Ray on stderr
    assert f"{len(got)} rows" in r.stderr and "1 errors" in r.stderr
    assert "WARNING" not in r.stderr and "INFO" not in r.stderr and "core_worker" not in r.stderr, r.stderr


def test_resume_computes_only_the_missing_rows(finished, requests, smollm2_path, tmp_path):
    full, _ = finished
    data = full.read_bytes()
    keep = b"".join(data.splitlines(keepends=True)[:3])
    out = tmp_path / "out.jsonl"
    out.write_bytes(keep + data.splitlines(keepends=True)[3][:20])  # a torn fourth line, as after a crash
    r = batch(requests, out, smollm2_path)
    assert r.returncode == 1, r.stderr
    assert out.read_bytes().startswith(keep)  # the kept rows, timings included: not recomputed
    assert [same(x) for x in rows(out)] == [same(x) for x in rows(full)]
    assert "3 resumed" in r.stderr

    # A finished file is not touched, and nothing starts.
    before, mtime = out.read_bytes(), out.stat().st_mtime_ns
    r = batch(requests, out, smollm2_path)
    assert r.returncode == 1, r.stderr
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    assert "0 computed" in r.stderr


def test_output_of_another_input_is_refused(finished, smollm2_path, tmp_path):
    full, _ = finished
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "prompt": "Hello"}) + "\n" * 2 + "\n".join(request_lines()) + "\n")
    before = full.read_bytes()
    r = batch(other, full, smollm2_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "another input" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert full.read_bytes() == before


def test_bad_input_is_one_line_and_writes_nothing(requests, smollm2_path, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    out = tmp_path / "out.jsonl"
    for args, message in (((requests, out, fake), "not a readable GGUF"),
                          ((tmp_path / "missing.jsonl", out, smollm2_path), "no such file"),
                          ((requests, requests, smollm2_path), "must not be the input")):
        r = batch(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_worker_loses_and_repeats_nothing(smollm2_path, tmp_path):
    # Longer answers, so that the job is still running when a worker dies.
    lines = [json.dumps({"id": f"k{i}", "prompt": p, "max_tokens": 24, "temperature": 0})
             for i, p in enumerate(PROMPTS * 2)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(command() + ["batch", str(inp), "-o", str(out), "--model", str(smollm2_path),
                                         "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            stdin=subprocess.DEVNULL)
    ray_pids: list[int] = []
    try:
        killed, deadline = None, time.monotonic() + 240
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if not out.exists() or out.read_bytes().count(b"\n") < 2:
                continue
            ray_pids = _descendants(proc.pid)
            workers = [p for p in ray_pids if "MapWorker" in _cmdline(p)]
            if workers:
                killed = workers[0]
                rows_at_kill = out.read_bytes().count(b"\n")
                os.kill(killed, signal.SIGKILL)
        assert killed is not None, "no worker was killed before the job ended"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert rows_at_kill < len(lines)
    got = rows(out)
    assert [g["index"] for g in got] == list(range(len(lines)))
    assert [g["id"] for g in got] == [f"k{i}" for i in range(len(lines))]
    assert all("error" not in g for g in got)
    # Greedy: the rows of the repeated prompts (one side maybe computed after the restart) agree.
    half = len(PROMPTS)
    assert [g["token_ids"] for g in got[:half]] == [g["token_ids"] for g in got[half:]]
    # Ray is shut down: none of the processes the job started outlives it.
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in ray_pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in ray_pids if _alive(p)]
    for p in left:  # do not leave them to the next test, but fail
        os.kill(p, signal.SIGKILL)
    assert not left, [_cmdline(p) for p in left]


# ---- the plan, without Ray ---------------------------------------------------------------------

def test_plan_marks_duplicate_ids_and_bad_lines(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": 1, "prompt": "a"}\n\n{"id": 1.0, "prompt": "b"}\n{"id": 1, "prompt": "c"}\n'
                    b'{"prompt": "no id"}\n\xff\xfe\n{"prompt": "no id"}\n')
    job = plan_job(inp, tmp_path / "out.jsonl")
    assert job.total == 6 and job.done == 0
    assert [p["index"] for p in job.pending] == [0, 2, 3, 4, 5, 6]
    decided = {p["index"]: json.loads(p["row"]) for p in job.pending if p["row"]}
    assert set(decided) == {3, 5}  # 1.0 is another id than 1; rows without an id are known by index
    assert decided[3]["id"] == 1 and "duplicate id 1" in decided[3]["error"] and "line 1" in decided[3]["error"]
    assert "not UTF-8" in decided[5]["error"]


def test_plan_resumes_after_whole_rows_and_refuses_foreign_files(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"prompt": "z"}\n')
    whole = '{"index": 0, "id": "a", "text": "t"}\n'
    out.write_text(whole + '{"index": 1, "id": "b", "te')
    job = plan_job(inp, out)
    assert (job.done, job.keep_bytes, [p["index"] for p in job.pending]) == (1, len(whole), [1, 2])
    for foreign in ('{"index": 0, "id": "zz", "text": "t"}\n', '{"index": 1, "id": "a"}\n', "hello\n",
                    whole + '{"index": 1, "id": "b"}\n' + '{"index": 2}\n' + '{"index": 3}\n'):
        out.write_text(foreign)
        with pytest.raises(LlamacpuError, match="another -o"):
            plan_job(inp, out)
