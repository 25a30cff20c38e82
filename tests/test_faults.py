"""Fault injection: every fault fails exactly the task it hit, with a typed error, and the
pool goes on.

Each test uses real worker processes.  Tasks that must be caught "in the act" write a
marker file (their pid) first, so the test knows which worker runs them and that they
started.  Where a test says a worker is "gone", it means the process no longer exists
or has exited and waits only to be reaped.
"""
from __future__ import annotations

import os
import signal
import time

import gevent
import psutil
import pytest

import fault_tasks as ft
import gprocpool
from conftest import LARGE_TICK, SMALL_TICK
from gprocpool import (AcquireTimeout, PoolError, RemoteError, SerializationError,
                       TaskCancelled, TaskTimeout, WorkerLost)

# A failing call must report within this (the spec: "within a second or two").
FAIL_FAST = 2.0
# How long a killed worker may take to disappear: SIGTERM, the kill grace, SIGKILL, reaping.
GONE_WITHIN = 4.0
# A task that is never meant to finish by itself.
FOREVER = 30
MB = 1024 * 1024


# -- helpers ------------------------------------------------------------------------------

def wait_for_file(path, timeout=10.0) -> int:
    """Waits (cooperatively) until path exists; returns the pid written in it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        gevent.sleep(SMALL_TICK)
    with open(path) as f:
        return int(f.read())


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = GONE_WITHIN) -> float:
    """Waits until pid has exited; returns how long that took."""
    start = time.monotonic()
    while not is_gone(pid):
        assert time.monotonic() - start < timeout, f"process {pid} still alive after {timeout} s"
        gevent.sleep(SMALL_TICK)
    return time.monotonic() - start


def descendants():
    return psutil.Process().children(recursive=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raises_within(seconds, exc_type, fn, *args, **kwargs):
    """Calls fn, asserts it raises exc_type within seconds; returns the exception."""
    start = time.monotonic()
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"{exc_type.__name__} took {elapsed:.2f} s (limit {seconds} s)"
    return info.value


class Bystander:
    """A task running on another worker while a fault happens: it must not notice."""

    def __init__(self, pool, seconds=0.5):
        self.glet = gevent.spawn(pool.process, ft.tagged, ("bystander", seconds))
        gevent.sleep(LARGE_TICK)  # let it take its worker first

    def check(self):
        value, pid = self.glet.get(timeout=10)
        assert value == "bystander"
        return pid


def assert_pool_healthy(pool):
    assert pool.process(ft.identity, ("still works",), timeout=10) == "still works"
    assert pool.map(ft.identity, range(10), timeout=10) == list(range(10))


# -- task_timeout -------------------------------------------------------------------------

def test_pool_default_task_timeout(tmp_path):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(2, task_timeout=0.3) as pool:
        start = time.monotonic()
        err = raises_within(FAIL_FAST, TaskTimeout, pool.process, ft.mark_and_sleep, (marker, FOREVER))
        assert time.monotonic() - start >= 0.3
        assert isinstance(err, PoolError) and isinstance(err, TimeoutError)
        assert not isinstance(err, AcquireTimeout)
        victim = wait_for_file(marker)
        wait_gone(victim)
        assert pool.process(ft.sleep_return_pid, (0.05,)) != victim
        assert_pool_healthy(pool)


@pytest.mark.parametrize("api", ["process", "defer", "queue", "map"])
def test_per_call_task_timeout(api, tmp_path):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(2) as pool:   # no pool default: only the call's limit applies
        start = time.monotonic()
        if api == "process":
            with pytest.raises(TaskTimeout):
                pool.process(ft.mark_and_sleep, (marker, FOREVER), task_timeout=0.3)
        elif api == "defer":
            d = pool.defer(ft.mark_and_sleep, (marker, FOREVER), task_timeout=0.3)
            with pytest.raises(TaskTimeout):
                d.get(timeout=10)
        elif api == "queue":
            errors, results = [], []
            pool.queue(ft.mark_and_sleep, (marker, FOREVER), callback=results.append,
                       error_callback=errors.append, task_timeout=0.3)
            assert pool.join(timeout=10)
            assert results == [] and len(errors) == 1
            assert isinstance(errors[0], TaskTimeout)
        else:
            with pytest.raises(TaskTimeout):
                pool.map(ft.MarkIfLong(marker), [0.01, FOREVER, 0.01], task_timeout=0.3)
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < FAIL_FAST
        victim = wait_for_file(marker)
        wait_gone(victim)
        assert_pool_healthy(pool)


def test_per_call_task_timeout_overrides_pool_default():
    with gprocpool.Pool(2, task_timeout=0.2) as pool:
        assert pool.process(ft.pid_after, (0.5, "a"), task_timeout=None)[1] == "a"
        assert pool.process(ft.pid_after, (0.5, "b"), task_timeout=5)[1] == "b"
        assert pool.defer(ft.pid_after, (0.5, "c"), task_timeout=None).get(timeout=10)[1] == "c"
        assert [v for _, v in pool.map(ft.pid_after, [0.5, 0.5], task_timeout=None)] == [None, None]
        with pytest.raises(TaskTimeout):
            pool.process(ft.pid_after, (5, "d"))


def test_task_timeout_is_not_the_acquire_timeout(tmp_path):
    """``timeout`` bounds only the wait for a worker; a task may run far longer."""
    with gprocpool.Pool(1) as pool:
        first = gevent.spawn(pool.process, ft.pid_after, (0.6, "long"), timeout=0.1)
        gevent.sleep(LARGE_TICK)
        marker = str(tmp_path / "never")
        with pytest.raises(AcquireTimeout) as info:
            pool.process(ft.touch, (marker,), timeout=0.1)
        assert not isinstance(info.value, TaskTimeout)
        assert first.get(timeout=10)[1] == "long"
        assert not os.path.exists(marker)


def test_task_timeout_leaves_concurrent_tasks_alone(tmp_path):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(3) as pool:
        long_ok = gevent.spawn(pool.process, ft.pid_after, (1.0, "long"), task_timeout=5)
        doomed = pool.defer(ft.mark_and_sleep, (marker, FOREVER), task_timeout=0.3)
        shorts = []
        deadline = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < deadline:
            assert pool.process(ft.tagged, (i,))[0] == i
            shorts.append(i)
            i += 1
        long_pid, value = long_ok.get(timeout=10)
        assert value == "long"
        assert doomed.wait(timeout=10)
        assert isinstance(doomed.exception, TaskTimeout)
        assert len(shorts) > 10
        victim = wait_for_file(marker)
        assert victim != long_pid
        wait_gone(victim)
        assert not is_gone(long_pid)   # the long task's worker was not disturbed
        assert_pool_healthy(pool)


def test_task_ignoring_sigterm_is_still_stopped(tmp_path):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(1, task_timeout=0.3) as pool:
        # The caller hears about the timeout at once, not after the kill grace.
        raises_within(1.0, TaskTimeout, pool.process, ft.mark_ignore_sigterm_and_sleep, (marker, FOREVER))
        victim = wait_for_file(marker)
        wait_gone(victim, timeout=0.3 + 1.0 + 3.0)   # SIGTERM ignored: SIGKILL after the grace
        pid = pool.process(os.getpid)
        assert pid != victim
        assert pool.process(os.getpid) == pid


# -- max_memory ---------------------------------------------------------------------------

def test_max_memory_replaces_worker_after_delivering_result():
    with gprocpool.Pool(1, max_memory=150 * MB) as pool:
        value, hog_pid = pool.process(ft.hog, (250, "the result"))
        assert value == "the result"          # the result is never lost
        wait_gone(hog_pid)
        new_pid = pool.process(os.getpid)
        assert new_pid != hog_pid


def test_max_memory_keeps_worker_under_the_limit():
    with gprocpool.Pool(1, max_memory=150 * MB) as pool:
        _, pid1 = pool.process(ft.hog, (1, "small"))
        _, pid2 = pool.process(ft.hog, (1, "small"))
        assert pid1 == pid2


def test_max_memory_never_loses_map_results():
    with gprocpool.Pool(2, max_memory=100 * MB) as pool:
        results = pool.map(ft.hog_120, range(8), chunksize=1)
        assert [v for v, _ in results] == list(range(8))
        assert len({pid for _, pid in results}) == 8   # every chunk left its worker over the limit


# -- cancellation -------------------------------------------------------------------------

def test_cancel_queued_task_never_runs(tmp_path):
    marker = str(tmp_path / "never")
    with gprocpool.Pool(1) as pool:
        running = pool.defer(ft.pid_after, (0.4, "first"))
        queued = pool.defer(ft.touch, (marker,))
        gevent.sleep(0.1)                    # queued is now waiting for the only worker
        assert queued.cancel() is True
        with pytest.raises(TaskCancelled):
            queued.get(timeout=1)
        assert running.get(timeout=10)[1] == "first"
        assert pool.join(timeout=10)
        assert_pool_healthy(pool)
        assert not os.path.exists(marker)
        assert queued.cancel() is False   # already finished (cancelled)
        assert running.cancel() is False


def test_cancel_before_the_task_greenlet_ran(tmp_path):
    marker = str(tmp_path / "never")
    with gprocpool.Pool(2) as pool:
        d = pool.defer(ft.touch, (marker,))   # no yield between defer and cancel
        assert d.cancel() is True
        with pytest.raises(TaskCancelled):
            d.get(timeout=1)
        assert_pool_healthy(pool)
        assert not os.path.exists(marker)


def test_cancel_queued_task_from_queue_calls_error_callback(tmp_path):
    marker = str(tmp_path / "never")
    with gprocpool.Pool(1) as pool:
        pool.defer(ft.pid_after, (0.3,))
        results, errors = [], []
        d = pool.queue(ft.touch, (marker,), callback=results.append, error_callback=errors.append)
        gevent.sleep(0.05)
        d.cancel()
        assert pool.join(timeout=10)
        assert results == [] and len(errors) == 1 and isinstance(errors[0], TaskCancelled)
        assert not os.path.exists(marker)


def test_cancel_running_task_kills_and_replaces_worker(tmp_path):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool, seconds=1.0)
        d = pool.defer(ft.mark_and_sleep, (marker, FOREVER, "never"))
        victim = wait_for_file(marker)
        other_waiter = gevent.spawn(d.get)
        gevent.sleep(SMALL_TICK)
        start = time.monotonic()
        assert d.cancel() is True
        with pytest.raises(TaskCancelled):
            d.get(timeout=FAIL_FAST)
        other_waiter.join(timeout=FAIL_FAST)
        assert isinstance(other_waiter.exception, TaskCancelled)
        assert time.monotonic() - start < 0.5
        wait_gone(victim)
        assert bystander.check() != victim
        pids = set(pool.map(ft.sleep_return_pid, [0.2, 0.2], chunksize=1))
        assert victim not in pids
        assert_pool_healthy(pool)


@pytest.mark.parametrize("exception", [None, TaskCancelled("killed by the test")])
def test_killing_the_waiting_greenlet_kills_and_replaces_worker(tmp_path, exception):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool, seconds=1.0)
        g = gevent.spawn(pool.process, ft.mark_and_sleep, (marker, FOREVER, "never"))
        victim = wait_for_file(marker)
        if exception is None:
            g.kill(block=True, timeout=FAIL_FAST)
        else:
            g.kill(exception, block=True, timeout=FAIL_FAST)
            assert g.exception is exception
        assert g.dead
        wait_gone(victim)
        assert bystander.check() != victim
        assert victim not in set(pool.map(ft.sleep_return_pid, [0.2, 0.2], chunksize=1))
        assert_pool_healthy(pool)


def test_killing_a_greenlet_waiting_for_a_worker(tmp_path):
    """The task never runs and its place in the queue is not lost."""
    marker = str(tmp_path / "never")
    with gprocpool.Pool(1) as pool:
        first = gevent.spawn(pool.process, ft.pid_after, (0.3, "first"))
        gevent.sleep(LARGE_TICK)
        waiting = gevent.spawn(pool.process, ft.touch, (marker,))
        gevent.sleep(LARGE_TICK)
        waiting.kill(block=True, timeout=1)
        pid, value = first.get(timeout=10)
        assert value == "first"
        # The only worker token came back: the worker is reused, no AcquireTimeout.
        assert pool.process(os.getpid, timeout=2) == pid
        assert not os.path.exists(marker)


# -- serialization stages -----------------------------------------------------------------

def test_function_failing_to_serialize_in_parent():
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        f = ft.CallableRaisesOnReduce()
        for call in (lambda: pool.process(f, (1,)), lambda: pool.defer(f, (1,)),
                     lambda: pool.queue(f, (1,)), lambda: pool.map(f, [1, 2])):
            err = raises_within(FAIL_FAST, SerializationError, call)
            assert err.stage == "function"
            assert "CallableRaisesOnReduce" in str(err)
        bystander.check()
        assert_pool_healthy(pool)


def test_argument_failing_to_serialize_in_parent():
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        bad = ft.RaisesOnReduce()
        err = raises_within(FAIL_FAST, SerializationError, pool.process, ft.identity, (bad,))
        assert err.stage == "arguments" and "argument 0" in str(err) and "RaisesOnReduce" in str(err)
        err = raises_within(FAIL_FAST, SerializationError, pool.process, ft.identity, (), kwargs={"x": bad})
        assert err.stage == "arguments" and "'x'" in str(err) and "RaisesOnReduce" in str(err)
        # defer and queue raise at submission: nothing is queued.
        err = raises_within(FAIL_FAST, SerializationError, pool.defer, ft.identity, (1, bad))
        assert err.stage == "arguments" and "argument 1" in str(err)
        err = raises_within(FAIL_FAST, SerializationError, pool.queue, ft.identity, (bad,))
        assert err.stage == "arguments"
        bystander.check()
        assert_pool_healthy(pool)


def test_map_item_failing_to_serialize_names_it_and_reports_nothing_to_the_hub(capfd):
    with gprocpool.Pool(2) as pool:
        pool.map(ft.identity, [0])
        capfd.readouterr()
        err = raises_within(FAIL_FAST, SerializationError, pool.map, ft.identity, [1, 2, ft.RaisesOnReduce(), 4])
        assert err.stage == "arguments" and "item 2" in str(err) and "RaisesOnReduce" in str(err)
        assert_pool_healthy(pool)
        gevent.sleep(LARGE_TICK)
        # A clean failure raises to the caller; no internal greenlet dumps a traceback.
        assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("mode", ["raise", "exit", "keyboard"])
@pytest.mark.parametrize("what", ["arguments", "function"])
def test_deserialization_in_worker_fails(what, mode):
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        if what == "arguments":
            call = (pool.process, ft.identity, (ft.FailsInWorker(mode),))
        else:
            call = (pool.process, ft.CallableFailsInWorker(mode), (1,))
        err = raises_within(FAIL_FAST, SerializationError, *call)
        assert err.stage == f"{what} (in worker)"
        expected = {"raise": "ValueError", "exit": "SystemExit", "keyboard": "KeyboardInterrupt"}[mode]
        assert expected in str(err)
        bystander.check()
        assert_pool_healthy(pool)
        # The same hostile object fails the same way again (the function cache stays in step).
        err = raises_within(FAIL_FAST, SerializationError, *call)
        assert err.stage == f"{what} (in worker)"
        assert_pool_healthy(pool)


@pytest.mark.parametrize("mode", ["os_exit", "segfault"])
@pytest.mark.parametrize("what", ["arguments", "function"])
def test_deserialization_crashing_the_worker(what, mode):
    """Crashing the interpreter while rebuilding an argument: the implementation reports
    WorkerLost (the worker is gone; nothing is left to tell the stage)."""
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        if what == "arguments":
            call = (pool.process, ft.identity, (ft.FailsInWorker(mode),))
        else:
            call = (pool.process, ft.CallableFailsInWorker(mode), (1,))
        err = raises_within(FAIL_FAST, WorkerLost, *call)
        if mode == "os_exit":
            assert err.exitcode == 9 and err.signal is None
        else:
            assert err.signal == signal.SIGSEGV and err.exitcode is None
        wait_gone(err.pid)
        bystander.check()
        assert_pool_healthy(pool)


@pytest.mark.parametrize("task, type_name", [(ft.return_unpicklable, "Unpicklable"),
                                              (ft.return_generator, "generator")])
def test_result_failing_to_serialize_in_worker(task, type_name):
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = raises_within(FAIL_FAST, SerializationError, pool.process, task)
        assert err.stage == "result"
        assert type_name in str(err)
        bystander.check()
        assert_pool_healthy(pool)


def test_result_whose_serialization_calls_sys_exit():
    """sys.exit() inside a result's __reduce__ is a serialization failure of that result,
    like sys.exit() inside an argument's __setstate__ (reported as "arguments (in worker)")."""
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = raises_within(FAIL_FAST, PoolError, pool.process, ft.return_exits_on_reduce)
        assert isinstance(err, SerializationError), f"got {type(err).__name__}: {err}"
        assert err.stage == "result"
        assert "ExitsOnReduce" in str(err)
        bystander.check()
        assert_pool_healthy(pool)


def test_exception_whose_serialization_calls_sys_exit():
    """An exception that cannot travel comes back as RemoteError (type, message, traceback),
    also when pickling it calls sys.exit()."""
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = raises_within(FAIL_FAST, PoolError, pool.process, ft.raise_error_exiting_on_reduce)
        assert isinstance(err, RemoteError), f"got {type(err).__name__}: {err}"
        assert err.type_name == "fault_tasks.ErrorExitsOnReduce"
        assert err.message == "exits when pickled"
        bystander.check()
        assert_pool_healthy(pool)


def test_result_and_map_failing_to_deserialize_in_parent():
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = raises_within(FAIL_FAST, SerializationError, pool.process, ft.return_fails_in_parent, ("raise",))
        assert err.stage == "result (in parent)"
        assert "FailsInParent" in str(err) or "refuses" in str(err)
        err = raises_within(FAIL_FAST, SerializationError, pool.map, ft.return_fails_in_parent, ["raise"])
        assert err.stage == "result (in parent)"
        bystander.check()
        assert_pool_healthy(pool)


def pool_error_not_base(pool, f, args, what):
    """Runs f expecting a PoolError; fails the test if SystemExit/KeyboardInterrupt escapes instead."""
    try:
        return raises_within(FAIL_FAST, PoolError, pool.process, f, args)
    except BaseException as exc:  # noqa: BLE001 - the bug: it escapes as itself
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            pytest.fail(f"{what} raised {type(exc).__name__} in the caller")
        raise


@pytest.mark.parametrize("mode", ["exit", "keyboard"])
def test_result_whose_rebuild_in_parent_raises_base_exception(mode):
    """A result whose unpickling in the parent raises SystemExit or KeyboardInterrupt must not
    exit or interrupt the parent: the task's object did it, so the call fails, typed."""
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = pool_error_not_base(pool, ft.return_fails_in_parent, (mode,), "the result's rebuild")
        assert isinstance(err, SerializationError), f"got {type(err).__name__}: {err}"
        assert err.stage == "result (in parent)"
        bystander.check()
        assert_pool_healthy(pool)


def test_exception_failing_to_rebuild_in_parent():
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = raises_within(FAIL_FAST, RemoteError, pool.process, ft.raise_error_failing_in_parent, ("raise",))
        assert err.type_name == "fault_tasks.ErrorFailsInParent"
        assert "the original message" in str(err)
        assert "could not be rebuilt in the parent" in str(err)
        assert "raise_error_failing_in_parent" in err.traceback
        # cpython gh-79492: an exception whose __init__ takes other arguments.
        from gp_tasks import raise_bad_init
        err = raises_within(FAIL_FAST, RemoteError, pool.process, raise_bad_init)
        assert "BadInitError" in err.type_name
        bystander.check()
        assert_pool_healthy(pool)


@pytest.mark.parametrize("mode", ["exit", "keyboard"])
def test_exception_whose_rebuild_in_parent_raises_base_exception(mode):
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = pool_error_not_base(pool, ft.raise_error_failing_in_parent, (mode,), "the exception's rebuild")
        assert isinstance(err, RemoteError), f"got {type(err).__name__}: {err}"
        assert err.type_name == "fault_tasks.ErrorFailsInParent"
        bystander.check()
        assert_pool_healthy(pool)


def test_exception_that_cannot_be_serialized_in_worker():
    with gprocpool.Pool(2) as pool:
        err = raises_within(FAIL_FAST, RemoteError, pool.process, ft.raise_unpicklable_error)
        assert err.type_name == "fault_tasks.ErrorWithUnpicklable"
        assert err.message == "carries an unpicklable payload"
        assert "raise_unpicklable_error" in err.traceback
        assert_pool_healthy(pool)


# -- large payloads -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_100mb_argument_and_result_round_trip():
    n = 100 * MB
    with gprocpool.Pool(2) as pool:
        data = ft.pattern(n, seed=5)
        assert pool.process(ft.digest, (data,)) == ft.digest(data)
        result = pool.process(ft.make_big, (n, 9))
        assert len(result) == n and result == ft.pattern(n, 9)
        del result
        echoed = pool.process(ft.echo_big, (data,))
        assert echoed == data
        del echoed
        # Two at once in two workers, and a small task in between, all intact.
        a = gevent.spawn(pool.process, ft.make_big, (n, 1))
        b = gevent.spawn(pool.process, ft.digest, (data,))
        assert a.get(timeout=60) == ft.pattern(n, 1)
        assert b.get(timeout=60) == ft.digest(data)
        assert_pool_healthy(pool)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_killed_halfway_through_sending_a_large_result(tmp_path):
    n = 100 * MB
    marker = str(tmp_path / "m")
    seen = {}

    def killer():
        pid = wait_for_file(marker)
        # Block the hub (a non-cooperative sleep): the parent stops draining the pipe, so
        # the worker fills it and blocks in write() in the middle of the frame.
        deadline = time.monotonic() + 20
        while True:
            with open(f"/proc/{pid}/syscall") as f:
                if f.read().split()[0] == "1":    # x86-64 write(2)
                    break
            assert time.monotonic() < deadline, "the worker never blocked writing its result"
            time.sleep(0.001)
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        seen["written"] = int(io["wchar"])
        seen["pid"] = pid
        os.kill(pid, signal.SIGKILL)

    with gprocpool.Pool(1) as pool:
        pool.process(os.getpid)
        k = gevent.spawn(killer)
        err = raises_within(30, WorkerLost, pool.process, ft.big_result_after_marker, (marker, n))
        k.get(timeout=10)
        assert 0 < seen["written"] < n, seen   # it died mid-message
        assert err.pid == seen["pid"] and err.signal == signal.SIGKILL
        assert_pool_healthy(pool)
        # And a large result still arrives whole afterwards.
        assert pool.process(ft.make_big, (n // 4, 3)) == ft.pattern(n // 4, 3)


# -- BaseExceptions, exits and crashes ----------------------------------------------------

@pytest.mark.parametrize("code", [5, 0])
def test_sys_exit_in_task_is_worker_lost_with_its_code(code):
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        err = raises_within(FAIL_FAST, WorkerLost, pool.process, ft.sys_exit_with, (code,))
        assert err.exitcode == code and err.signal is None
        wait_gone(err.pid)
        bystander.check()
        assert_pool_healthy(pool)


def test_system_exit_with_message_is_worker_lost_code_1():
    with gprocpool.Pool(1) as pool:
        err = raises_within(FAIL_FAST, WorkerLost, pool.process, ft.raise_base, ("SystemExitNoCode",))
        assert err.exitcode == 1
        assert_pool_healthy(pool)


@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "GeneratorExit"])
def test_base_exceptions_fail_only_that_task(kind):
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        pid = pool.process(os.getpid)
        err = raises_within(FAIL_FAST, RemoteError, pool.process, ft.raise_base, (kind,))
        assert err.type_name == kind and "raised by the task" in err.message
        assert "raise_base" in err.traceback
        # In a map, too: the map raises a PoolError, not the BaseException itself.
        err = raises_within(FAIL_FAST, RemoteError, pool.map, ft.raise_base, [kind])
        assert err.type_name == kind
        d = pool.defer(ft.raise_base, (kind,))
        with pytest.raises(RemoteError):
            d.get(timeout=FAIL_FAST)
        bystander.check()
        assert pool.process(os.getpid) in (pid, bystander.check())
        assert_pool_healthy(pool)


@pytest.mark.parametrize("kind", ["os_exit", "sigkill", "sigterm", "segfault"])
def test_worker_death_mid_task(kind):
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool)
        call = {"os_exit": (ft.os_exit_with, (3,)), "sigkill": (ft.kill_self, (signal.SIGKILL,)),
                "sigterm": (ft.kill_self, (signal.SIGTERM,)), "segfault": (ft.segfault, ())}[kind]
        err = raises_within(FAIL_FAST, WorkerLost, pool.process, *call)
        expected = {"os_exit": (3, None), "sigkill": (None, signal.SIGKILL),
                    "sigterm": (None, signal.SIGTERM), "segfault": (None, signal.SIGSEGV)}[kind]
        assert (err.exitcode, err.signal) == expected
        assert isinstance(err.pid, int) and str(err.pid) in str(err)
        wait_gone(err.pid)
        assert bystander.check() != err.pid
        assert_pool_healthy(pool)


def test_worker_killed_from_outside_mid_task(tmp_path):
    marker = str(tmp_path / "m")
    with gprocpool.Pool(2) as pool:
        bystander = Bystander(pool, seconds=1.0)
        g = gevent.spawn(pool.process, ft.mark_and_sleep, (marker, FOREVER))
        victim = wait_for_file(marker)
        os.kill(victim, signal.SIGKILL)
        g.join(timeout=FAIL_FAST)
        assert isinstance(g.exception, WorkerLost)
        assert g.exception.pid == victim and g.exception.signal == signal.SIGKILL
        assert bystander.check() != victim
        assert_pool_healthy(pool)


@pytest.mark.timeout(60)
def test_external_kill_of_one_busy_worker_among_50_concurrent_calls(tmp_path):
    """Exactly the victim fails; the other 50 calls get their own results."""
    victim_index = 17
    with gprocpool.Pool(4) as pool:
        pool.map(ft.identity, range(4), chunksize=1)

        def call(i):
            seconds = 2.0 if i == victim_index else 0.1
            return pool.process(ft.mark_and_sleep, (str(tmp_path / f"{i}"), seconds, ("done", i)))

        callers = [gevent.spawn(call, i) for i in range(51)]
        victim = wait_for_file(str(tmp_path / f"{victim_index}"))
        os.kill(victim, signal.SIGKILL)
        gevent.joinall(callers, timeout=30)
        assert all(c.dead for c in callers)
        failed = {i: c.exception for i, c in enumerate(callers) if c.exception is not None}
        assert list(failed) == [victim_index], failed
        err = failed[victim_index]
        assert isinstance(err, WorkerLost) and err.pid == victim and err.signal == signal.SIGKILL
        for i, c in enumerate(callers):
            if i != victim_index:
                assert c.value == ("done", i)
        assert_pool_healthy(pool)


def _one_failure(pool, i, tmp_path):
    kinds = [
        (WorkerLost, lambda: pool.process(ft.os_exit_with, (3,))),
        (WorkerLost, lambda: pool.process(ft.sys_exit_with, (4,))),
        (WorkerLost, lambda: pool.process(ft.segfault)),
        (WorkerLost, lambda: pool.process(ft.kill_self, (signal.SIGKILL,))),
        (TaskTimeout, lambda: pool.process(ft.sleep_return_pid, (FOREVER,), task_timeout=0.1)),
        (TaskTimeout, lambda: pool.process(ft.mark_ignore_sigterm_and_sleep,
                                           (str(tmp_path / f"t{i}"), FOREVER), task_timeout=0.1)),
        (ValueError, lambda: pool.process(ft.misbehave, ("raise",))),
        (SerializationError, lambda: pool.process(ft.return_unpicklable)),
        (SerializationError, lambda: pool.process(ft.identity, (ft.FailsInWorker("exit"),))),
        (SerializationError, lambda: pool.process(ft.return_fails_in_parent, ("raise",))),
        (RemoteError, lambda: pool.process(ft.raise_base, ("KeyboardInterrupt",))),
        (TaskCancelled, lambda: _cancel_running(pool, str(tmp_path / f"c{i}"))),
    ]
    expected, fn = kinds[i % len(kinds)]
    raises_within(FAIL_FAST + 1, expected, fn)


def _cancel_running(pool, marker):
    d = pool.defer(ft.mark_and_sleep, (marker, FOREVER))
    wait_for_file(marker)
    d.cancel()
    d.get(timeout=FAIL_FAST)


@pytest.mark.timeout(90)
def test_20_repeated_failures_then_success_without_growth(tmp_path):
    with gprocpool.Pool(2) as pool:
        pool.map(ft.sleep_return_pid, [0.1, 0.1], chunksize=1)   # both workers started
        children_before = len(descendants())
        fds_before = open_fds()
        for i in range(20):
            _one_failure(pool, i, tmp_path)
        assert pool.process(ft.identity, ("ok",)) == "ok"
        assert pool.map(ft.identity, range(5)) == list(range(5))
        # Killed workers are reaped in the background: give them the kill grace.
        deadline = time.monotonic() + GONE_WITHIN + 2
        while True:
            procs = descendants()
            zombies = [p.pid for p in procs if is_gone(p.pid)]
            if len(procs) <= children_before and open_fds() <= fds_before and not zombies:
                break
            assert time.monotonic() < deadline, (
                f"children {children_before} -> {len(procs)} (zombies {zombies}), "
                f"fds {fds_before} -> {open_fds()}")
            gevent.sleep(LARGE_TICK)
        assert pool.process(ft.identity, ("still ok",)) == "still ok"
