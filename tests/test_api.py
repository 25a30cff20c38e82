"""The core API: Pool(), process(), map(), task forms, errors, interruption, stdio.

Every test runs real worker processes.  Timing assertions only bound waits generously
(the conftest deadlock timeout is the backstop); none relies on tight timings.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import os
import signal
import sys
import textwrap
import time

import gevent
import psutil
import pytest

import gprocpool
from api_tasks import (CallableAdder, CustomError, ExplodesOnLoad, KwTask, Scaler,
                       raise_unsendable,
                       UnpicklableCallable, append_pid, fail_once, fail_some, import_and_call,
                       raise_custom, raise_with_args, return_falsy, return_loads_only_in_worker,
                       sleep_return, touch, touch_then_sleep, worker_env)
from conftest import HERE, PROMPT, run_script, wait_until
from gp_tasks import (Unpicklable, add, busy, call_sys_exit, die_exit, die_segfault,
                      die_signal, double, echo, fail_init, identity, initialized, pid,
                      raise_base, raise_bad_init, remember_init, return_list,
                      return_unpicklable, sleep_then)

INCLUDE_DIR = os.path.join(HERE, "include_dir")
# A bound for things that should happen "promptly" or "at once"; generous on purpose.


def live_children():
    """Descendant processes of the test process that are alive (not zombies)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def pid_gone(p: int) -> bool:
    try:
        return psutil.Process(p).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True




def assert_usable(pool, value=7):
    """The pool still runs tasks and returns the right result for each."""
    assert pool.process(double, (value,)) == 2 * value
    assert pool.process(identity, (f"fresh-{value}",)) == f"fresh-{value}"


# -- Pool() ---------------------------------------------------------------------------------

@pytest.mark.parametrize("max_procs", [None, 0])
def test_max_procs_default_is_cpu_count(max_procs):
    pool = gprocpool.Pool(max_procs)
    try:
        assert pool.max_procs == os.cpu_count()
        assert pool.max_procs > 0
    finally:
        pool.shutdown()


def test_max_procs_no_args_and_explicit():
    with gprocpool.Pool() as pool:
        assert pool.max_procs == os.cpu_count()
    with gprocpool.Pool(3) as pool:
        assert pool.max_procs == 3


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (-100, ValueError), (1.5, TypeError),
                                        ("2", TypeError), ([2], TypeError)])
def test_max_procs_invalid(bad, error):
    with pytest.raises(error, match="max_procs"):
        gprocpool.Pool(bad)
    assert live_children() == []


def test_workers_spawn_lazily_and_are_reused():
    pool = gprocpool.Pool(4)
    try:
        assert live_children() == [], "a worker started before the first task"
        pids = [pool.process(pid) for _ in range(6)]
        assert len(set(pids)) == 1, f"sequential calls used several workers: {pids}"
        assert pids[0] != os.getpid()
        # The pool forks workers from one template process; besides it, one worker only.
        descendants = {p.pid for p in live_children()}
        assert pids[0] in descendants
        assert len(descendants) <= 2, descendants
    finally:
        pool.shutdown()


def test_max_reqs_sequential_replaces_worker():
    with gprocpool.Pool(1, max_reqs=2) as pool:
        pids = [pool.process(pid) for _ in range(7)]
    counts = collections.Counter(pids)
    assert max(counts.values()) <= 2, counts
    assert len(counts) == 4, counts
    # One worker at a time: each pid's tasks are consecutive.
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_max_reqs_with_map_and_concurrency():
    with gprocpool.Pool(2, max_reqs=3) as pool:
        pids = pool.map(pid, range(11))
        pids += [d() for d in [pool.defer(pid) for _ in range(11)]]
    counts = collections.Counter(pids)
    assert max(counts.values()) <= 3, counts
    assert len(counts) >= 8, counts


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError)])
def test_max_reqs_invalid(bad, error):
    with pytest.raises(error, match="max_reqs"):
        gprocpool.Pool(1, max_reqs=bad)


def test_include_finds_task_class_only_through_include():
    # Not importable in this process: tests/include_dir is not on sys.path.
    assert importlib.util.find_spec("gp_only_via_include") is None
    with gprocpool.Pool(1) as pool:
        with pytest.raises(ImportError, match="gp_only_via_include"):
            pool.process("gp_only_via_include:OnlyHere", (21,))
        assert_usable(pool)
    with gprocpool.Pool(1, include=[INCLUDE_DIR]) as pool:
        assert pool.process("gp_only_via_include:OnlyHere", (21,)) == ("only_here", 42, INCLUDE_DIR)
        assert pool.process("gp_only_via_include.TestTaskNoNS") == 42
        # The include directory comes first on the worker's sys.path.
        _cwd, path, _pid = pool.process(worker_env)
        assert path[0] == INCLUDE_DIR


def test_include_relative_path_resolves_against_parent_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(HERE)
    pool = gprocpool.Pool(1, include=["include_dir"])
    try:
        assert pool.process("gp_only_via_include:OnlyHere", (5,)) == ("only_here", 10, INCLUDE_DIR)
    finally:
        pool.shutdown()
    # Resolved against the cwd at construction, even if the parent moves before the first task.
    pool = gprocpool.Pool(1, include=["include_dir"])
    monkeypatch.chdir(tmp_path)
    try:
        assert pool.process("gp_only_via_include:OnlyHere", (6,)) == ("only_here", 12, INCLUDE_DIR)
    finally:
        pool.shutdown()


def test_include_rejects_a_bare_string():
    with pytest.raises(TypeError, match="include"):
        gprocpool.Pool(1, include=INCLUDE_DIR)


def test_workers_see_parent_sys_path_and_cwd(monkeypatch, tmp_path):
    mods = tmp_path / "abs_mods"
    mods.mkdir()
    (mods / "gp_probe_abs.py").write_text("def f(x):\n    return ('abs', x)\n")
    rel = tmp_path / "rel_mods"
    rel.mkdir()
    (rel / "gp_probe_rel.py").write_text("def f(x):\n    return ('rel', x)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(mods))
    monkeypatch.syspath_prepend("rel_mods")  # relative: resolves against the parent's cwd
    with gprocpool.Pool(1) as pool:
        cwd, path, wpid = pool.process(worker_env)
        assert wpid != os.getpid()
        assert os.path.realpath(cwd) == os.path.realpath(str(tmp_path))
        assert str(mods) in path
        assert pool.process(import_and_call, ("gp_probe_abs", "f", 1)) == ("abs", 1)
        assert pool.process(import_and_call, ("gp_probe_rel", "f", 2)) == ("rel", 2)
        # Every entry of the parent's sys.path is on the worker's (relative ones made absolute).
        for entry in sys.path:
            assert os.path.abspath(entry) in path, entry


def test_initializer_runs_once_per_worker(tmp_path):
    log_file = tmp_path / "init.log"
    with gprocpool.Pool(2, initializer=append_pid, initargs=(str(log_file),)) as pool:
        # Two tasks at once force two workers; then more tasks reuse them.
        first = [pool.defer(sleep_return, ((0.3, i),)) for i in range(2)]
        pids = {pool.process(pid)}
        for d in first:
            d()
        pids |= {pool.process(pid) for _ in range(5)}
        pids |= set(pool.map(pid, range(10)))
    lines = log_file.read_text().split()
    counts = collections.Counter(int(x) for x in lines)
    assert set(counts.values()) == {1}, f"initializer ran more than once in a worker: {counts}"
    assert pids <= set(counts), (pids, counts)
    assert len(counts) == 2


def test_initializer_state_is_seen_by_tasks():
    with gprocpool.Pool(1, initializer=remember_init, initargs=("configured",)) as pool:
        assert pool.process(initialized) == ["configured"]
        assert pool.process(initialized) == ["configured"]
    with gprocpool.Pool(1, max_reqs=1, initializer=remember_init, initargs=("again",)) as pool:
        assert [pool.process(initialized) for _ in range(3)] == [["again"]] * 3


def test_initializer_that_raises_fails_tasks_clearly_without_hanging():
    with gprocpool.Pool(1, initializer=fail_init) as pool:
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(gprocpool.WorkerInitError) as info:
                pool.process(double, (1,))
            assert time.monotonic() - began < PROMPT
            assert isinstance(info.value, gprocpool.PoolError)
            assert "initializer" in str(info.value)
            assert "initializer exploded" in str(info.value)
            assert "RuntimeError" in str(info.value)
        with pytest.raises(gprocpool.WorkerInitError):
            pool.map(double, range(5))
        d = pool.defer(double, (1,))
        with pytest.raises(gprocpool.WorkerInitError):
            d.get(timeout=PROMPT)


def test_initializer_failure_then_pool_usable(tmp_path):
    marker = tmp_path / "failed-once"
    with gprocpool.Pool(1, initializer=fail_once, initargs=(str(marker),)) as pool:
        with pytest.raises(gprocpool.WorkerInitError, match="initializer failed once"):
            pool.process(double, (1,))
        assert marker.exists()
        assert_usable(pool)
        assert pool.map(double, range(4)) == [0, 2, 4, 6]


# -- process(): arguments, timeout ----------------------------------------------------------

def test_process_args_list_or_tuple_and_kwargs(pool1):
    assert pool1.process(add, (1, 2)) == 3
    assert pool1.process(add, [1, 2]) == 3
    assert pool1.process(add, [5]) == 5
    assert pool1.process(echo) == ((), {})
    assert pool1.process(echo, (1,), kwargs={"a": 2}) == ((1,), {"a": 2})
    assert pool1.process(add, kwargs={"a": 1, "b": 4}) == 5
    assert pool1.process(add, (1,), kwargs={"b": 10}) == 11


@pytest.mark.parametrize("bad", [5, "ab", None, {"a": 1}, {1, 2}, iter([1])])
def test_process_args_other_types_rejected(pool1, bad):
    with pytest.raises(TypeError, match="list or tuple") as info:
        pool1.process(identity, bad)
    assert type(bad).__name__ in str(info.value)
    assert live_children() == [], "a worker was started for a rejected call"


def test_process_timeout_bounds_only_acquisition(pool1, tmp_path):
    busy_marker = tmp_path / "busy-started"
    marker = tmp_path / "must-not-exist"
    d = pool1.defer(touch_then_sleep, (str(busy_marker), 1.0, "busy done"))
    wait_until(busy_marker.exists, what="the busy task started")
    began = time.monotonic()
    with pytest.raises(gprocpool.AcquireTimeout) as info:
        pool1.process(touch, (str(marker), "ran"), timeout=0.2)
    elapsed = time.monotonic() - began
    assert 0.1 <= elapsed < PROMPT
    assert isinstance(info.value, gprocpool.PoolError)
    assert isinstance(info.value, TimeoutError)
    assert d() == "busy done"
    assert pool1.join(timeout=PROMPT)
    gevent.sleep(0.2)
    assert not marker.exists(), "the timed-out task ran anyway"
    # The timeout does not bound the run itself.
    assert pool1.process(sleep_then, (0.5, "slow but fine"), timeout=0.05) == "slow but fine"
    assert pool1.process(double, (2,), 0) == 4


def test_process_only_blocks_the_calling_greenlet(pool1):
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    t = gevent.spawn(ticker)
    try:
        assert pool1.process(busy, (0.4,)) > 0
    finally:
        t.kill()
    assert len(ticks) >= 10, f"the hub was blocked: only {len(ticks)} ticks"


# -- process(): forms of f --------------------------------------------------------------------

def _closure(offset):
    def inner(x):
        return x + offset
    return inner


class _LocalStyle:
    def __init__(self, tag):
        self.tag = tag

    def tagged(self, x):
        return f"{self.tag}:{x}"


@pytest.mark.parametrize("f, args, expected", [
    (double, (21,), 42),
    (lambda x: x * 3, (5,), 15),
    (_closure(10), (1,), 11),
    (Scaler(4).scale, (5,), 20),
    (_LocalStyle("t").tagged, (9,), "t:9"),
    (functools.partial(add, 1), (2,), 3),
    (functools.partial(add, b=5), (1,), 6),
    (len, (["a", "b", "c"],), 3),
    (sorted, ([3, 1, 2],), [1, 2, 3]),
    (CallableAdder(100), (1,), 101),
    ("gp_tasks:Doubler", (21,), 42),
    ("gp_tasks.Doubler", (21,), 42),
    ("gp_tasks:double", (4,), 8),
    ("gp_tasks.double", (4,), 8),
    ("api_tasks:KwTask", (3,), 30),
], ids=["function", "lambda", "closure", "bound-method", "bound-method-test-module",
        "partial", "partial-kw", "builtin-len", "builtin-sorted", "callable-object",
        "name-colon-class", "name-dot-class", "name-colon-function", "name-dot-function",
        "name-class-kw-default"])
def test_process_forms_of_f(pool1, f, args, expected):
    assert pool1.process(f, args) == expected


def test_process_closure_over_local_state(pool1):
    secret = {"k": [1, 2, 3]}
    assert pool1.process(lambda: sum(secret["k"])) == 6
    count = 5
    assert pool1.process(lambda y: [count] * y, (2,)) == [5, 5]


def test_process_closure_sees_current_state(pool1):
    """Each call runs f as it is now: a closure's captured state is not frozen at first use."""
    data = [1]
    f = lambda: sum(data)  # noqa: E731
    assert pool1.process(f) == 1
    data.append(10)
    assert pool1.process(f) == 11
    counter = {"n": 0}

    def read_counter():
        return counter["n"]

    for n in range(3):
        counter["n"] = n
        assert pool1.process(read_counter) == n
        assert pool1.map(lambda _: read_counter(), [0]) == [n]


def test_process_builtin_runs_in_worker(pool1):
    wpid = pool1.process(os.getpid)
    assert wpid != os.getpid()
    assert wpid in {p.pid for p in live_children()}


def test_process_task_class_with_kwargs(pool1):
    assert pool1.process("api_tasks:KwTask", (2,), kwargs={"b": 7}) == 27
    assert pool1.process("api_tasks:KwTask", kwargs={"a": 1, "b": 1}) == 11
    assert pool1.process(KwTask(1, 2).run) == 12


def test_process_function_from_script_main():
    code = textwrap.dedent("""
        import math
        import os
        import gprocpool

        SCALE = 3

        def helper(x):
            return math.sqrt(x) * SCALE

        def task(x):
            # calls another __main__ function and uses a module-level import
            return helper(x) + len(os.sep)

        class Greeter:
            def __init__(self, name):
                self.name = name

            def __call__(self, greeting):
                return f"{greeting}, {self.name} from {os.getpid() != PARENT}"

        PARENT = os.getpid()

        if __name__ == "__main__":
            with gprocpool.Pool(1) as pool:
                print("process", pool.process(task, (16,)))
                print("map", pool.map(task, [1, 4, 9]))
                print("lambda", pool.process(lambda y: helper(y) * 2, (25,)))
                print("object", pool.process(Greeter("main"), ("hi",)))
                d = pool.defer(task, (100,))
                print("defer", d())
                print("worker", pool.process(os.getpid) != os.getpid())
    """)
    proc = run_script(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["process 13.0", "map [4.0, 7.0, 10.0]", "lambda 30.0",
                     "object hi, main from True", "defer 31.0", "worker True"], proc.stdout


def test_main_function_sees_current_module_globals():
    code = textwrap.dedent("""
        import gprocpool

        LIMIT = 1

        def task():
            return LIMIT

        if __name__ == "__main__":
            with gprocpool.Pool(1) as pool:
                print("first", pool.process(task))
                LIMIT = 2
                print("after rebinding", pool.process(task))
    """)
    proc = run_script(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["first 1", "after rebinding 2"], proc.stdout


def test_main_class_instances_come_back_as_the_parents_class():
    code = textwrap.dedent("""
        from dataclasses import dataclass
        import gprocpool

        @dataclass
        class Point:
            x: int
            y: int

        def make(x):
            return Point(x, x + 1)

        if __name__ == "__main__":
            with gprocpool.Pool(1) as pool:
                p = pool.process(make, (1,))
                print("isinstance", isinstance(p, Point))
                print("equal", p == Point(1, 2))
                print("map", pool.map(make, [1, 2]) == [Point(1, 2), Point(2, 3)])
                print("defer", pool.defer(make, (3,))() == Point(3, 4))
                print("argument", pool.process(lambda q: q.x + q.y, (Point(2, 3),)))
    """)
    proc = run_script(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["isinstance True", "equal True", "map True",
                                        "defer True", "argument 5"], proc.stdout


@pytest.mark.parametrize("name, error, needle", [
    ("gp_no_such_module_xyz:Task", ImportError, "gp_no_such_module_xyz"),
    ("gp_no_such_module_xyz.Task", ImportError, "gp_no_such_module_xyz"),
    ("gp_tasks:NoSuchTask", AttributeError, "NoSuchTask"),
    ("gp_tasks.NoSuchTask", AttributeError, "NoSuchTask"),
    ("gp_tasks:NoRun", TypeError, "run"),
], ids=["missing-module-colon", "missing-module-dot", "missing-attr-colon", "missing-attr-dot",
        "class-without-run"])
def test_process_task_name_errors_name_what_is_missing(pool1, name, error, needle):
    with pytest.raises(error) as info:
        pool1.process(name, (1,))
    assert needle in str(info.value)
    if needle == "run":
        assert "NoRun" in str(info.value)
    assert_usable(pool1)


@pytest.mark.parametrize("name", ["no_module_part", ":Name", "module:", ""])
def test_process_malformed_task_name(pool1, name):
    with pytest.raises(ValueError, match="package.module"):
        pool1.process(name)
    assert_usable(pool1)


def test_process_rejects_non_callable(pool1):
    with pytest.raises(TypeError, match="callable"):
        pool1.process(42)


# -- map() ------------------------------------------------------------------------------------

def test_map_preserves_input_order_when_tasks_finish_out_of_order(pool):
    items = [(0.5, 0), (0.05, 1), (0.05, 2), (0.05, 3), (0.0, 4)]
    results = pool.map(sleep_return, items)
    assert [value for value, _ in results] == [0, 1, 2, 3, 4]
    finished = {value: at for value, at in results}
    assert finished[1] < finished[0], "the test meant item 1 to finish before item 0"


def test_map_does_not_flatten(pool):
    assert pool.map(return_list, [1, 2, 3]) == [[1, 1], [2, 2], [3, 3]]
    assert pool.map(identity, [(1, 2), [3], [], ()]) == [(1, 2), [3], [], ()]
    assert pool.map(identity, [[]]) == [[]]


def test_map_of_empty_input_spawns_nothing():
    pool = gprocpool.Pool(2)
    try:
        assert pool.map(double, []) == []
        assert pool.map(double, iter(())) == []
        assert pool.map(double, (x for x in ())) == []
        assert live_children() == []
    finally:
        pool.shutdown()


def test_map_accepts_any_iterable(pool):
    assert pool.map(double, range(1, 12)) == [2 * i for i in range(1, 12)]
    assert pool.map(double, (i for i in range(3))) == [0, 2, 4]
    assert pool.map(double, {"a": 1}) == ["aa"]
    assert pool.map("gp_tasks:Doubler", [1, 2]) == [2, 4]
    with pytest.raises(TypeError, match="iterable"):
        pool.map(double, 5)


def test_map_raises_first_failing_item_in_input_order(pool):
    # Item 3 fails first in time, item 1 first in input order.
    items = [(0.3, 0, False), (0.5, 1, True), (0.0, 2, False), (0.0, 3, True),
             (0.0, 4, False), (0.0, 5, True)]
    with pytest.raises(ValueError, match="bad item 1$") as info:
        pool.map(fail_some, items)
    assert "fail_some" in str(info.value.__cause__)
    # Fully usable afterwards, with no stray results turning up later.
    assert pool.join(timeout=PROMPT)
    assert pool.map(double, range(20)) == [2 * i for i in range(20)]
    for i in range(10):
        assert pool.process(identity, (("after", i),)) == ("after", i)
    gevent.sleep(0.3)
    assert [d() for d in [pool.defer(identity, (i,)) for i in range(6)]] == list(range(6))


def test_map_error_then_more_maps(pool):
    for _ in range(3):
        with pytest.raises(ValueError, match="bad item 2"):
            pool.map(fail_some, [(0.0, i, i >= 2) for i in range(8)])
        assert pool.map(identity, list(range(50))) == list(range(50))


@pytest.mark.parametrize("kind, value", [("zero", 0), ("none", None), ("empty", ""),
                                         ("false", False), ("bytes", b""), ("list", [])])
def test_falsy_results_round_trip(pool1, kind, value):
    result = pool1.process(return_falsy, (kind,))
    assert result == value and type(result) is type(value)


def test_falsy_results_round_trip_in_map(pool):
    values = [0, None, "", False, b"", [], 0.0]
    assert pool.map(identity, values) == values


# -- errors -----------------------------------------------------------------------------------

def test_all_errors_subclass_pool_error():
    for name in ["AcquireTimeout", "PipelineClosed", "RemoteError", "SerializationError",
                 "TaskCancelled", "WorkerInitError", "WorkerLost"]:
        assert issubclass(getattr(gprocpool, name), gprocpool.PoolError), name
    assert issubclass(gprocpool.PoolError, Exception)
    assert issubclass(gprocpool.AcquireTimeout, TimeoutError)


def test_task_exception_keeps_type_args_and_remote_traceback(pool1):
    with pytest.raises(ValueError) as info:
        pool1.process(raise_with_args, ("bad", 42))
    exc = info.value
    assert type(exc) is ValueError
    assert exc.args == ("bad", 42)
    cause = str(exc.__cause__)
    assert "Traceback" in cause and "raise_with_args" in cause and "ValueError" in cause
    with pytest.raises(CustomError, match="custom text") as info:
        pool1.process(raise_custom, ("custom text",))
    assert type(info.value) is CustomError
    assert "raise_custom" in str(info.value.__cause__)
    with pytest.raises(ZeroDivisionError):
        pool1.process(lambda: 1 / 0)
    assert_usable(pool1)


def test_unrebuildable_exception_becomes_remote_error(pool1):
    with pytest.raises(gprocpool.RemoteError) as info:
        pool1.process(raise_bad_init)
    exc = info.value
    assert isinstance(exc, gprocpool.PoolError)
    assert exc.type_name.endswith("BadInitError")
    assert "1-2" in exc.message
    assert "BadInitError" in str(exc)
    assert "raise_bad_init" in exc.traceback and "Traceback" in exc.traceback
    assert_usable(pool1)


def test_exception_that_cannot_be_sent_becomes_remote_error(pool1):
    with pytest.raises(gprocpool.RemoteError) as info:
        pool1.process(raise_unsendable)
    exc = info.value
    assert exc.type_name == "ValueError"
    assert "generator" in exc.message
    assert "raise_unsendable" in exc.traceback
    assert_usable(pool1)


def test_base_exception_from_task_does_not_escape_as_itself(pool1):
    with pytest.raises(gprocpool.RemoteError) as info:
        pool1.process(raise_base, ("KeyboardInterrupt",))
    assert "KeyboardInterrupt" in info.value.type_name
    assert_usable(pool1)


def test_unserializable_function(pool1):
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(UnpicklableCallable())
    assert "function" in str(info.value)
    assert "refuses to be pickled" in str(info.value)
    assert info.value.stage == "function"
    assert live_children() == [], "nothing should have been sent to a worker"
    assert_usable(pool1)


def test_unserializable_argument(pool1):
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(identity, (Unpicklable(),))
    assert "argument 0" in str(info.value)
    assert "refuses to be pickled" in str(info.value)
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(add, (1, Unpicklable()))
    assert "argument 1" in str(info.value)
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(echo, (1,), kwargs={"k": Unpicklable()})
    assert "'k'" in str(info.value)
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.map(identity, [1, 2, Unpicklable()])
    assert "item 2" in str(info.value)
    assert_usable(pool1)


def test_argument_that_cannot_be_rebuilt_in_worker(pool1):
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(identity, (ExplodesOnLoad(),))
    assert "argument" in str(info.value)
    assert "cannot be rebuilt" in str(info.value)
    assert_usable(pool1)


def test_unserializable_result(pool1):
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(return_unpicklable)
    assert "result" in str(info.value)
    assert "refuses to be pickled" in str(info.value)
    assert_usable(pool1)
    with pytest.raises(gprocpool.SerializationError, match="result"):
        pool1.map(lambda x: return_unpicklable() if x == 1 else x, [0, 1, 2])
    assert_usable(pool1)


def test_result_that_cannot_be_rebuilt_in_parent(pool1):
    with pytest.raises(gprocpool.SerializationError) as info:
        pool1.process(return_loads_only_in_worker)
    assert "result" in str(info.value)
    assert_usable(pool1)


@pytest.mark.parametrize("task, args, exitcode, sig", [
    (die_exit, (3,), 3, None),
    (die_signal, (signal.SIGKILL,), None, signal.SIGKILL),
    (die_segfault, (), None, signal.SIGSEGV),
    (call_sys_exit, (5,), 5, None),
], ids=["os._exit", "SIGKILL", "segfault", "sys.exit"])
def test_worker_death_raises_worker_lost(pool1, task, args, exitcode, sig):
    victim = pool1.process(pid)
    began = time.monotonic()
    with pytest.raises(gprocpool.WorkerLost) as info:
        pool1.process(task, args)
    assert time.monotonic() - began < PROMPT
    exc = info.value
    assert isinstance(exc, gprocpool.PoolError)
    assert exc.pid == victim
    assert str(victim) in str(exc)
    assert exc.exitcode == exitcode
    assert exc.signal == sig
    if exitcode is not None:
        assert str(exitcode) in str(exc)
    else:
        assert str(int(sig)) in str(exc) or signal.Signals(sig).name in str(exc)
    assert pool1.process(double, (21,)) == 42
    assert pool1.process(pid) != victim


def test_worker_dying_while_idle_does_not_fail_the_next_task(pool1):
    """Only a task running when its worker dies fails; an idle worker's death costs nobody."""
    victim = pool1.process(pid)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: pid_gone(victim), what="the idle worker died")
    gevent.sleep(0.2)  # the pool's exit report arrives
    assert pool1.process(double, (21,)) == 42
    assert pool1.process(pid) != victim


def test_worker_death_in_map_and_defer(pool):
    with pytest.raises(gprocpool.WorkerLost) as info:
        pool.map(die_exit, [7])
    assert info.value.exitcode == 7
    d = pool.defer(die_exit, (9,))
    with pytest.raises(gprocpool.WorkerLost) as info:
        d.get(timeout=PROMPT)
    assert info.value.exitcode == 9
    assert pool.map(double, range(5)) == [0, 2, 4, 6, 8]


# -- interrupting a waiting greenlet ------------------------------------------------------------

def test_gevent_timeout_while_task_runs_frees_slot_and_drops_result(pool1):
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.2):
            pool1.process(sleep_then, (0.5, "late"))
    began = time.monotonic()
    assert pool1.process(identity, ("fresh",)) == "fresh"
    assert time.monotonic() - began < PROMPT
    gevent.sleep(0.6)  # past the moment the interrupted task would have finished
    assert pool1.process(identity, ("fresh2",)) == "fresh2"
    assert pool1.map(identity, ["a", "b"]) == ["a", "b"]


def test_greenlet_kill_while_task_runs(pool1, tmp_path):
    marker = tmp_path / "started"
    g = gevent.spawn(pool1.process, touch_then_sleep, (str(marker), 10, "late"))
    wait_until(marker.exists, what="the task started")
    victim = int(marker.read_text())
    g.kill()
    assert g.dead and isinstance(g.value, gevent.GreenletExit)
    began = time.monotonic()
    assert pool1.process(identity, ("next",)) == "next"
    assert time.monotonic() - began < PROMPT, "the slot was not free promptly"
    wait_until(lambda: pid_gone(victim), what="the interrupted worker exited")
    assert pool1.join(timeout=PROMPT)


def test_greenlet_killed_while_waiting_for_a_worker(pool1, tmp_path):
    marker = tmp_path / "must-not-exist"
    d = pool1.defer(sleep_then, (0.3, "first"))
    g = gevent.spawn(pool1.process, touch, (str(marker),))
    gevent.sleep(0.05)
    assert not g.dead
    g.kill()
    assert d() == "first"
    assert pool1.process(double, (1,)) == 2
    assert pool1.join(timeout=PROMPT)
    gevent.sleep(0.1)
    assert not marker.exists()


def test_greenlet_kill_during_map(pool):
    g = gevent.spawn(pool.map, sleep_return, [(5, i) for i in range(4)])
    gevent.sleep(0.3)
    g.kill()
    began = time.monotonic()
    assert pool.map(identity, list(range(6))) == list(range(6))
    assert time.monotonic() - began < PROMPT
    assert pool.join(timeout=PROMPT)


def test_large_payloads_round_trip(pool):
    big = os.urandom(8 * 1024 * 1024)
    assert pool.process(identity, (big,)) == big
    assert pool.map(identity, [big, b"", big[:70000]]) == [big, b"", big[:70000]]
    assert pool.process(len, (big,), kwargs=None) == len(big)


# -- stdio ------------------------------------------------------------------------------------

def test_task_stdio_does_not_corrupt_the_pool():
    code = textwrap.dedent("""
        import sys
        import gprocpool
        from api_tasks import write_fds, print_lots
        from gp_tasks import read_stdin, double

        with gprocpool.Pool(1) as pool:
            print("result", pool.process(write_fds, ("hello",)), flush=True)
            print("stdin", repr(pool.process(read_stdin)), flush=True)
            print("lots", pool.process(print_lots, (5000,)), flush=True)
            print("after", pool.map(double, [1, 2, 3]), flush=True)
        print("parent stdin", repr(sys.stdin.read()), flush=True)
    """)
    proc = run_script(code, input="data for the parent\n")
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout, proc.stderr
    for needle in ["hello print\n", "hello fd1\n", "result hello\n", "stdin ''\n",
                   "line 004999 ", "lots 5000\n", "after [2, 4, 6]\n",
                   "parent stdin 'data for the parent\\n'\n"]:
        assert needle in out, (needle, out[-2000:])
    assert "hello sys.stderr\n" in err and "hello fd2\n" in err, err
    # The task's own output comes before the parent prints the task's result.
    assert out.index("hello print") < out.index("result hello")
    assert out.index("line 004999") < out.index("lots 5000")
    assert out.count("line ") == 5000


def test_task_reading_stdin_gets_eof(pool1):
    from gp_tasks import read_stdin
    assert pool1.process(read_stdin) == ""
    with pytest.raises(EOFError):
        pool1.process(input)
    assert_usable(pool1)
