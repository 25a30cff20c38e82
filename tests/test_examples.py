"""Runs every script in examples/ in a child process and checks what it prints.

The examples are documentation: if one of them stops working, the README is wrong too.
"""
from __future__ import annotations

import os
import re
import sys

import gevent.subprocess as subprocess
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# Generous: the scripts take a second or two; a stuck one must still fail, not hang.
SCRIPT_TIMEOUT = 45


def run_example(name: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Runs examples/<name> as a user would: ``python examples/<name>`` from the checkout."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the example must find its own modules, as for a user
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _lines(proc: subprocess.CompletedProcess) -> list:
    return proc.stdout.splitlines()


def test_every_example_is_run_by_a_test():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    test_sources = ""
    for name in os.listdir(tests_dir):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests_dir, name)) as f:
                test_sources += f.read()
    for name in os.listdir(EXAMPLES):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(EXAMPLES, name)) as f:
            is_script = 'if __name__ == "__main__":' in f.read()
        if is_script:
            assert f'"{name}"' in test_sources, f"no test runs examples/{name}"


@pytest.mark.subprocess
@pytest.mark.parametrize("cwd", [ROOT, EXAMPLES, "/"], ids=["repo-root", "examples-dir", "elsewhere"])
def test_synopsis(cwd):
    out = _lines(run_example("synopsis.py", cwd=cwd))
    assert "pool with max_procs=4, max_reqs=100" in out
    assert "process in sequence: 1000 results, result[21] = 42" in out
    assert "map: 1000 results, first five [2, 4, 6, 8, 10]" in out
    assert "defer: 1000 deferreds resolved, sum = 1001000" in out
    assert "gevent.wait on deferreds: [10, 12, 14]" in out
    assert "task class tasks_example:Doubler(21).run() = 42" in out
    assert "task function tasks_example.double(21) = 42" in out
    assert "module function by reference: 42" in out
    assert sorted(line for line in out if line.startswith("callback: 2 * ")) == \
        [f"callback: 2 * {n} = {2 * n}" for n in range(1, 6)]
    assert "queue: 5 callbacks ran" in out
    assert "callback: 200" in out
    assert "error_callback: ValueError: invalid literal for int() with base 10: 'not a number'" in out
    assert out.index("join: every queued task has finished") > out.index("callback: 200")
    assert "pipeline: [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]" in out
    assert "after shutdown, the pool still works: 100" in out
    assert any(re.fullmatch(r"with block: ran in worker \d+, pool shut down on exit", line) for line in out)
    assert out[-1] == "synopsis done"


@pytest.mark.subprocess
def test_monkey_patched_legacy():
    out = _lines(run_example("monkey_patched_legacy.py"))
    assert any(re.fullmatch(r"threads: jobs \[0, 1, 2, 3\] finished, .* took [\d.]+ s", line) for line in out)
    assert "map: 4 results; the sleeping thread woke up meanwhile: True" in out
    ticker = next(line for line in out if line.startswith("ticker: "))
    ticks, gap = map(int, re.fullmatch(r"ticker: (\d+) ticks, longest gap (\d+) ms \(a tick is 10 ms\)",
                                       ticker).groups())
    # About 1.5 s of work at one tick per 10 ms; the bound on the gap is loose for busy CI
    # machines (tests/test_hub.py holds the strict one).
    assert ticks > 50
    assert gap < 250
    assert out[-1] == "the program kept running while the workers computed"


@pytest.mark.subprocess
def test_errors():
    proc = run_example("errors.py")
    out = _lines(proc)
    expected_starts = [
        "task exception: ValueError: invalid literal for int() with base 10: 'forty-two'",
        "  __cause__ holds the worker's traceback: True, names the task function: True",
        "unrebuildable exception: RemoteError: __main__.NeedsTwoArgs: disk: full",
        "  type_name='__main__.NeedsTwoArgs', traceback included: True",
        "acquire timeout: AcquireTimeout: ",
        "  also a TimeoutError: True",
        "task timeout: TaskTimeout: ",
        "  also a TimeoutError: True",
        "worker lost: WorkerLost: ",
        "  pid=",
        "worker lost: WorkerLost: ",
        "  pid=",
        "unserializable argument: SerializationError: argument 0 could not be serialized",
        "  stage='arguments'",
        "unserializable result: SerializationError: ",
        "  stage='result'",
        "cancelled (running): TaskCancelled: ",
        "cancelled (queued): TaskCancelled: ",
        "the pool still works: parse('42') = 42",
        "initializer failed: WorkerInitError: ",
        "every one of these is a PoolError except the task's own: True",
        "errors done",
    ]
    assert len(out) == len(expected_starts), proc.stdout
    for line, start in zip(out, expected_starts):
        assert line.startswith(start), (line, start)
    assert re.search(r"exitcode=3 signal=None", proc.stdout)
    assert re.search(r"exitcode=None signal=9", proc.stdout)
    # The two lost workers are also logged (on stderr, through logging's last resort).
    assert "exited with code 3 while running a task" in proc.stderr
    assert "was killed by signal 9 (SIGKILL) while running a task" in proc.stderr


README = os.path.join(ROOT, "README.md")


def readme_programs() -> list:
    """The README's ```python blocks as programs to run.

    The blocks are written to be read in order, each continuing from the ones before, so
    they run as one program; a block that calls ``monkey.patch_all()`` must come first in
    its program, so it runs on its own.
    """
    with open(README) as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
    alone = [b for b in blocks if "monkey.patch_all()" in b]
    together = "\n".join(b for b in blocks if b not in alone)
    return [together] + alone


@pytest.mark.subprocess
@pytest.mark.parametrize("index", range(len(readme_programs())))
def test_readme_snippets_run(index, tmp_path):
    script = tmp_path / "readme_snippets.py"
    script.write_text(readme_programs()[index])
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert proc.returncode == 0, f"README program {index} failed:\n{proc.stdout}\n{proc.stderr}"
    # An error reported to the hub (a failed greenlet) does not change the exit code.
    assert "Traceback" not in proc.stderr, proc.stderr
