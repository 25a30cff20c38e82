"""gprocpool.Executor: the concurrent.futures interface, with and without monkey patching.

The behaviour checks live in tests/executor_checks.py (a port of the applicable parts of
CPython's test_concurrent_futures).  Each runs here, in the test process, which is not
monkey-patched; and all of them run again in a child Python after ``monkey.patch_all()``.
"""
from __future__ import annotations

import re
import textwrap
import threading

import gevent
import psutil
import pytest

import executor_checks
import gprocpool
from conftest import run_script
from executor_checks import LONG, PROMPT, sleep_then, square


@pytest.mark.parametrize("check", executor_checks.CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_not_patched(check, tmp_path):
    check(str(tmp_path))


PATCHED_PROGRAM = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys
    import executor_checks
    from gprocpool import _executor
    assert monkey.is_module_patched("threading")
    # Patched, the futures wait with the stdlib's own code (gevent-aware locks).
    assert not _executor._must_wait_cooperatively(_executor._real_get_ident())
    sys.exit(executor_checks.main())
""")


@pytest.mark.subprocess
@pytest.mark.timeout(90)
def test_monkey_patched():
    proc = run_script(PATCHED_PROGRAM, timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = re.findall(r"^ok (\w+)$", proc.stdout, re.M)
    assert passed == [c.__name__ for c in executor_checks.CHECKS], proc.stdout


def test_waiting_in_another_thread():
    """A real thread waits with the stdlib's code while this thread's hub runs the task."""
    results = []
    with gprocpool.Executor(1) as ex:
        future = ex.submit(sleep_then, LONG / 4, "from the hub")
        thread = threading.Thread(target=lambda: results.append(future.result(timeout=PROMPT)))
        thread.start()
        while thread.is_alive():
            gevent.sleep(0.01)
        thread.join()
        assert results == ["from the hub"]
        # Submitting from that other thread is refused: this thread's hub runs the tasks.
        errors = []

        def submit_elsewhere():
            try:
                ex.submit(square, 2)
            except RuntimeError as exc:
                errors.append(exc)
        thread = threading.Thread(target=submit_elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 1 and "thread" in str(errors[0])


def test_options():
    with pytest.raises(TypeError, match="max_workers"):
        gprocpool.Executor(max_procs=2)
    with pytest.raises(TypeError):
        gprocpool.Executor(1, max_tasks_per_child=1, max_reqs=1)
    with pytest.raises(ValueError):
        gprocpool.Executor(1, max_tasks_per_child=0)
    with pytest.raises(TypeError):
        gprocpool.Executor(1, no_such_option=True)
    with gprocpool.Executor(2, mp_context=None) as ex:
        assert ex.pool.max_procs == 2
        assert "max_workers=2" in repr(ex)


# The same program, run with either executor: only the import line differs.
SWITCH_PROGRAM = textwrap.dedent("""
    import concurrent.futures as cf
    {import_line}
    from executor_checks import divide, mul, sleep_then, square


    def main():
        with Executor(max_workers=2) as ex:
            print("submit:", ex.submit(pow, 2, 10).result())
            print("keywords:", ex.submit(mul, 6, y=7).result())
            print("map:", list(ex.map(square, range(8))))
            print("map chunked:", list(ex.map(mul, range(9), range(9), chunksize=4)))
            futures = {{ex.submit(sleep_then, 0.05 * n, n): n for n in (3, 1, 2)}}
            print("as_completed:", sorted(f.result() for f in cf.as_completed(futures)))
            done, not_done = cf.wait(futures, return_when=cf.ALL_COMPLETED)
            print("wait:", len(done), len(not_done))
            failing = ex.submit(divide, 1, 0)
            print("exception:", type(failing.exception()).__name__)
            try:
                list(ex.map(sleep_then, [0, 0.5], timeout=0.2))
            except cf.TimeoutError:
                print("map timeout: TimeoutError")
        try:
            ex.submit(square, 1)
        except RuntimeError:
            print("after shutdown: RuntimeError")


    if __name__ == "__main__":
        main()
""")


@pytest.mark.subprocess
def test_switch_from_process_pool_executor_by_one_line():
    stdlib = run_script(SWITCH_PROGRAM.format(
        import_line="from concurrent.futures import ProcessPoolExecutor as Executor"))
    ours = run_script(SWITCH_PROGRAM.format(import_line="from gprocpool import Executor"))
    assert stdlib.returncode == 0, stdlib.stderr
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == stdlib.stdout
    assert ours.stdout.splitlines() == [
        "submit: 1024",
        "keywords: 42",
        "map: [0, 1, 4, 9, 16, 25, 36, 49]",
        "map chunked: [0, 1, 4, 9, 16, 25, 36, 49, 64]",
        "as_completed: [1, 2, 3]",
        "wait: 3 0",
        "exception: ZeroDivisionError",
        "map timeout: TimeoutError",
        "after shutdown: RuntimeError",
    ]


@pytest.mark.subprocess
@pytest.mark.parametrize("patched", [False, True], ids=["not-patched", "patched"])
def test_pending_tasks_finish_before_exit(patched):
    """Like the stdlib: a program that never calls shutdown() still runs what it submitted."""
    program = textwrap.dedent("""
        {patch}
        import gprocpool
        from executor_checks import sleep_then, worker_pid
        ex = gprocpool.Executor(2)
        print("worker", ex.submit(worker_pid).result(), flush=True)
        ex.submit(sleep_then, 0.3, "apple").add_done_callback(lambda f: print(f.result(), flush=True))
        print("main done", flush=True)
    """).format(patch="from gevent import monkey; monkey.patch_all()" if patched else "")
    proc = run_script(program)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1:] == ["main done", "apple"], proc.stdout
    worker = int(lines[0].split()[1])
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE

