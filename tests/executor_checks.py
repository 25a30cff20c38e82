"""Behaviour checks of ``gprocpool.Executor``, after CPython's test_concurrent_futures.

Each ``check_*`` function is a plain program fragment: it makes its own executor, shuts
it down, and raises AssertionError on a deviation.  tests/test_executor.py runs every
check in the test process (no monkey patching) and, through :func:`main`, all of them
again in a child Python that calls ``monkey.patch_all()`` first.  The task functions are
module level so that workers (and ProcessPoolExecutor) import them by reference.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import time
import traceback

import gevent
import psutil

import gprocpool

# A short task, a task that is clearly still running when checked, and the bound for
# anything that should be prompt (generous: only a hang or a blocked hub exceeds it).
SHORT = 0.05
LONG = 0.4
PROMPT = 5.0


# -- task functions (run in the workers) ------------------------------------------------

def mul(x, y):
    return x * y


def square(x):
    return x * x


def capture(*args, **kwargs):
    return args, kwargs


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def touch_then_sleep(path, seconds, value=None):
    """Leaves a trace that the task ran, then takes its time."""
    with open(path, "w"):
        pass
    time.sleep(seconds)
    return value


def raise_value_error(message):
    raise ValueError(message)  # the line the remote traceback must show


def divide(a, b):
    return a / b


def worker_pid(*_):
    return os.getpid()


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


_INIT = []


def remember(value):
    _INIT.append(value)


def remembered():
    return list(_INIT)


# -- helpers ---------------------------------------------------------------------------

def finished_future(value):
    f = cf.Future()
    f.set_result(value)
    return f


def failed_future(exc):
    f = cf.Future()
    f.set_exception(exc)
    return f


def cancelled_and_notified_future():
    f = cf.Future()
    assert f.cancel()
    assert not f.set_running_or_notify_cancel()
    return f


def warm_up(ex):
    """Starts every worker, so that worker start-up does not count in timed checks."""
    list(ex.map(sleep_then, [SHORT] * ex.pool.max_procs))
    return ex


def wait_until(predicate, what, timeout=PROMPT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout} s"
        gevent.sleep(0.005)


class Ticker:
    """A greenlet that counts ticks: proof that the hub ran while the caller waited."""

    def __init__(self, interval=0.01):
        self.ticks = 0
        self.interval = interval
        self._greenlet = gevent.spawn(self._run)

    def _run(self):
        while True:
            self.ticks += 1
            gevent.sleep(self.interval)

    def stop(self):
        self._greenlet.kill()


# -- submit and result ------------------------------------------------------------------

def check_submit(tmp):
    with gprocpool.Executor(2) as ex:
        future = ex.submit(pow, 2, 8)
        assert isinstance(future, cf.Future)
        assert future.result() == 256
        assert future.done() and not future.running() and not future.cancelled()
        assert future.exception() is None
        assert ex.submit(mul, 6, 7).result(timeout=PROMPT) == 42


def check_submit_keyword(tmp):
    with gprocpool.Executor(2) as ex:
        assert ex.submit(mul, 2, y=8).result() == 16
        # 'fn' and 'self' are ordinary keyword arguments of the task.
        assert ex.submit(capture, 1, self=2, fn=4).result() == ((1,), {"self": 2, "fn": 4})


def check_exception(tmp):
    with gprocpool.Executor(2) as ex:
        future = ex.submit(raise_value_error, "bad input")
        exc = future.exception()
        assert type(exc) is ValueError and str(exc) == "bad input", repr(exc)
        try:
            future.result()
        except ValueError as err:
            # The worker's traceback travels as the cause, as with ProcessPoolExecutor.
            assert "the line the remote traceback must show" in str(err.__cause__), err.__cause__
        else:
            raise AssertionError("result() did not raise")
        assert isinstance(ex.submit(divide, 1, 0).exception(), ZeroDivisionError)
        # Failures of the pool itself come back through the future too.
        unpicklable = ex.submit(square, Unpicklable())
        assert isinstance(unpicklable.exception(), gprocpool.SerializationError)
    with gprocpool.Executor(1, task_timeout=LONG / 2) as ex:
        assert isinstance(ex.submit(sleep_then, 2 * LONG).exception(), gprocpool.TaskTimeout)
        assert ex.submit(square, 3).result() == 9  # a fresh worker took over


def check_result_timeout(tmp):
    with gprocpool.Executor(1) as ex:
        future = ex.submit(sleep_then, LONG, "late")
        began = time.monotonic()
        try:
            future.result(timeout=SHORT)
        except cf.TimeoutError:
            pass
        else:
            raise AssertionError("result(timeout) did not time out")
        assert SHORT * 0.9 <= time.monotonic() - began < PROMPT
        try:
            future.exception(timeout=0)
        except cf.TimeoutError:
            pass
        else:
            raise AssertionError("exception(timeout=0) did not time out")
        assert future.result() == "late"


def check_max_workers(tmp):
    for bad in (0, -1):
        try:
            gprocpool.Executor(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"max_workers={bad} accepted")
    with gprocpool.Executor() as ex:
        assert ex.pool.max_procs == (os.cpu_count() or 1)


def check_pool_options(tmp):
    with gprocpool.Executor(1, initializer=remember, initargs=("ready",)) as ex:
        assert ex.submit(remembered).result() == ["ready"]
    with gprocpool.Executor(1, max_tasks_per_child=1) as ex:
        pids = [ex.submit(worker_pid).result() for _ in range(3)]
        assert len(set(pids)) == 3, pids
    with gprocpool.Executor(1, max_reqs=2) as ex:
        pids = [ex.submit(worker_pid).result() for _ in range(4)]
        assert len(set(pids)) == 2, pids


# -- map ----------------------------------------------------------------------------------

def check_map(tmp):
    with gprocpool.Executor(2) as ex:
        assert list(ex.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
        for chunksize in (1, 2, 3, 7, 50):
            assert list(ex.map(pow, range(40), range(40), chunksize=chunksize)) == \
                list(map(pow, range(40), range(40))), chunksize
        assert list(ex.map(square, [])) == []
        # zip() semantics: the shortest iterable wins.
        assert list(ex.map(mul, [1, 2, 3], [10, 20])) == [10, 40]
        for bad in (0, -1):
            try:
                ex.map(square, range(3), chunksize=bad)
            except ValueError:
                pass
            else:
                raise AssertionError(f"chunksize={bad} accepted")


def check_map_is_lazy(tmp):
    with gprocpool.Executor(2) as ex:
        began = time.monotonic()
        results = ex.map(sleep_then, [LONG / 4] * 4, range(4))
        assert time.monotonic() - began < LONG / 4, "map() waited for the results"
        assert next(results) == 0
        assert list(results) == [1, 2, 3]


def check_map_exception(tmp):
    with gprocpool.Executor(2) as ex:
        results = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(results) == (0, 1)
        assert next(results) == (0, 1)
        try:
            next(results)
        except ZeroDivisionError:
            pass
        else:
            raise AssertionError("the failing item did not raise")


def check_map_timeout(tmp):
    with warm_up(gprocpool.Executor(2)) as ex:
        got = []
        began = time.monotonic()
        try:
            for value in ex.map(sleep_then, [0, 0, LONG], ["a", "b", "c"], timeout=LONG / 4):
                got.append(value)
        except cf.TimeoutError:
            pass
        else:
            raise AssertionError("map(timeout=...) did not time out")
        assert got == ["a", "b"]
        assert LONG / 4 * 0.9 <= time.monotonic() - began < LONG


def check_map_timeout_counts_from_the_call(tmp):
    # One worker, three tasks of T/2 each, timeout 3T/4: the first result is in time, the
    # second would only be at T.  A per-item timeout would let all three pass.
    marks = [os.path.join(tmp, f"map-{i}") for i in range(3)]
    with gprocpool.Executor(1) as ex:
        ex.submit(square, 1).result()  # the worker is up: its start does not count
        got = []
        try:
            for value in ex.map(touch_then_sleep, marks, [LONG / 2] * 3, range(3), timeout=0.75 * LONG):
                got.append(value)
        except cf.TimeoutError:
            pass
        else:
            raise AssertionError("map(timeout=...) measured each item, not the whole call")
        assert got == [0]
    # The task that had not started when map() gave up was cancelled, never run.
    assert [os.path.exists(m) for m in marks] == [True, True, False]


# -- cancel and shutdown ------------------------------------------------------------------

def check_cancel(tmp):
    mark = os.path.join(tmp, "cancelled-task-ran")
    with gprocpool.Executor(1) as ex:
        running = ex.submit(sleep_then, LONG / 2, "kept")
        queued = ex.submit(touch_then_sleep, mark, 0)
        wait_until(running.running, "the first task running")
        assert not queued.running()
        assert not running.cancel(), "a running future was cancelled"
        assert queued.cancel()
        assert queued.cancel(), "cancelling twice must still say True"
        assert queued.cancelled() and queued.done()
        # Cancelled futures count as done for wait() at once, not when their turn comes.
        done, not_done = cf.wait([queued], timeout=0)
        assert done == {queued} and not not_done
        try:
            queued.result()
        except cf.CancelledError:
            pass
        else:
            raise AssertionError("result() of a cancelled future did not raise CancelledError")
        assert running.result() == "kept"
        assert not running.cancel(), "a finished future was cancelled"
    assert not os.path.exists(mark), "the cancelled task ran"


def check_done_callbacks(tmp):
    seen = []
    with gprocpool.Executor(2) as ex:
        future = ex.submit(mul, 3, 4)
        future.add_done_callback(lambda f: seen.append(("first", f.result())))
        # A callback may submit more work (it runs in a greenlet, not in the hub).
        future.add_done_callback(lambda f: seen.append(("chained", ex.submit(square, f.result()))))
        assert future.result() == 12
        wait_until(lambda: len(seen) == 2, "both callbacks")
        assert seen[0] == ("first", 12)
        assert seen[1][1].result() == 144
        # A callback added to a finished future runs at once.
        future.add_done_callback(lambda f: seen.append("late"))
        assert seen[-1] == "late"


def check_shutdown_waits(tmp):
    ex = gprocpool.Executor(2)
    futures = [ex.submit(sleep_then, SHORT * 2, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(6))
    try:
        ex.submit(square, 2)
    except RuntimeError:
        pass
    else:
        raise AssertionError("submit() after shutdown() did not raise RuntimeError")
    ex.shutdown()  # a second shutdown is harmless


def check_shutdown_no_wait(tmp):
    ex = gprocpool.Executor(2)
    futures = [ex.submit(sleep_then, LONG / 4, i) for i in range(4)]
    began = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - began < LONG / 4, "shutdown(wait=False) waited"
    assert not any(f.done() for f in futures)
    # The pending tasks still run to completion, as in the stdlib.
    assert [f.result() for f in futures] == [0, 1, 2, 3]
    ex.shutdown(wait=True)  # waits for the background close


def check_shutdown_cancel_futures(tmp):
    marks = [os.path.join(tmp, f"task-{i}") for i in range(30)]
    ex = gprocpool.Executor(2)
    futures = [ex.submit(touch_then_sleep, m, SHORT, i) for i, m in enumerate(marks)]
    wait_until(futures[0].done, "the first task")
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert len(cancelled) >= 20, f"only {len(cancelled)} of 30 cancelled"
    for f in others:
        assert f.done() and f.exception() is None
    for f, mark in zip(futures, marks):
        assert os.path.exists(mark) != f.cancelled(), "a cancelled task ran, or a kept one did not"


def check_shutdown_cancel_futures_no_wait(tmp):
    ex = gprocpool.Executor(1)
    first = ex.submit(sleep_then, LONG / 4, "first")
    rest = [ex.submit(square, i) for i in range(10)]
    wait_until(first.running, "the first task running")
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in rest)
    assert first.result() == "first"
    ex.shutdown()


def check_context_manager(tmp):
    with gprocpool.Executor(2) as ex:
        futures = [ex.submit(sleep_then, SHORT, i) for i in range(4)]
    assert all(f.done() for f in futures)
    try:
        ex.submit(square, 1)
    except RuntimeError:
        pass
    else:
        raise AssertionError("submit() after the with block did not raise RuntimeError")


# -- wait and as_completed ----------------------------------------------------------------

def check_as_completed(tmp):
    with warm_up(gprocpool.Executor(2)) as ex:
        already = finished_future("already")
        slow = ex.submit(sleep_then, LONG / 2, "slow")
        fast = ex.submit(sleep_then, 0, "fast")
        order = [f.result() for f in cf.as_completed([slow, already, fast])]
        assert order[0] == "already" and order[1:] == ["fast", "slow"], order
        # A future given several times is yielded once.
        assert list(cf.as_completed([fast, fast, fast])) == [fast]


def check_as_completed_timeout(tmp):
    with gprocpool.Executor(2) as ex:
        done = ex.submit(square, 5)
        done.result()
        slow = ex.submit(sleep_then, LONG)
        got = []
        began = time.monotonic()
        try:
            for f in cf.as_completed([done, slow], timeout=LONG / 4):
                got.append(f)
        except cf.TimeoutError:
            pass
        else:
            raise AssertionError("as_completed(timeout=...) did not time out")
        assert got == [done]
        assert LONG / 4 * 0.9 <= time.monotonic() - began < LONG
        got = []
        try:
            for f in cf.as_completed([done, slow], timeout=0):
                got.append(f)
        except cf.TimeoutError:
            pass
        else:
            raise AssertionError("as_completed(timeout=0) did not time out")
        assert got == [done]


def check_wait_first_completed(tmp):
    with warm_up(gprocpool.Executor(2)) as ex:
        fast = ex.submit(mul, 21, 2)
        slow = ex.submit(sleep_then, LONG)
        done, not_done = cf.wait([fast, slow], return_when=cf.FIRST_COMPLETED)
        assert done == {fast} and not_done == {slow}
        # With one already finished, wait() returns at once.
        already = finished_future(1)
        began = time.monotonic()
        done, not_done = cf.wait([already, slow], return_when=cf.FIRST_COMPLETED)
        assert done == {already} and not_done == {slow}
        assert time.monotonic() - began < LONG / 4
        # Duplicates are one future (bpo-20369).
        done, not_done = cf.wait([fast, fast], return_when=cf.FIRST_COMPLETED)
        assert done == {fast} and not not_done


def check_wait_first_exception(tmp):
    with warm_up(gprocpool.Executor(3)) as ex:
        ok = ex.submit(mul, 2, 3)
        ok.result()
        boom = ex.submit(raise_value_error, "first exception")
        slow = ex.submit(sleep_then, LONG)
        done, not_done = cf.wait([ok, boom, slow], return_when=cf.FIRST_EXCEPTION)
        assert done == {ok, boom} and not_done == {slow}
        # An already failed future returns at once.
        failed = failed_future(OSError("already failed"))
        done, not_done = cf.wait([failed, slow], return_when=cf.FIRST_EXCEPTION)
        assert done == {failed} and not_done == {slow}


def check_wait_all_completed(tmp):
    with gprocpool.Executor(2) as ex:
        prebuilt = [finished_future(1), failed_future(OSError("x")), cancelled_and_notified_future()]
        mine = [ex.submit(mul, 2, 5), ex.submit(sleep_then, LONG / 4, "s"), ex.submit(divide, 1, 0)]
        done, not_done = cf.wait(prebuilt + mine, return_when=cf.ALL_COMPLETED)
        assert done == set(prebuilt + mine) and not not_done
        assert [f.done() for f in mine] == [True, True, True]


def check_wait_timeout(tmp):
    with warm_up(gprocpool.Executor(2)) as ex:
        fast = ex.submit(mul, 6, 7)
        slow = ex.submit(sleep_then, LONG)
        began = time.monotonic()
        done, not_done = cf.wait([fast, slow], timeout=LONG / 4, return_when=cf.ALL_COMPLETED)
        assert done == {fast} and not_done == {slow}
        assert LONG / 4 * 0.9 <= time.monotonic() - began < LONG


# -- gevent: the hub runs while the caller waits ----------------------------------------------

def check_waiting_lets_other_greenlets_run(tmp):
    """result(), wait() and as_completed() park only the calling greenlet."""
    ticker = Ticker()
    try:
        with gprocpool.Executor(2) as ex:
            for wait in (lambda f: f.result(),
                         lambda f: f.exception(),
                         lambda f: cf.wait([f]),
                         lambda f: cf.wait([f], return_when=cf.FIRST_COMPLETED),
                         lambda f: list(cf.as_completed([f])),
                         lambda f: list(ex.map(sleep_then, [LONG / 4]))):
                future = ex.submit(sleep_then, LONG / 4)
                before = ticker.ticks
                wait(future)
                assert future.done()
                # About 20 ticks fit in the wait; a blocked hub gives at most 1.
                ticks = ticker.ticks - before
                assert ticks >= 5, f"the hub did not run while waiting ({ticks} ticks)"
    finally:
        ticker.stop()


def check_many_tasks(tmp):
    with gprocpool.Executor(2) as ex:
        futures = {ex.submit(square, i): i for i in range(300)}
        assert sorted(f.result() for f in cf.as_completed(futures)) == sorted(i * i for i in range(300))
        assert all(f.result() == futures[f] ** 2 for f in futures)


CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("check_")]


# -- running every check in one program ------------------------------------------------------

def _children_left(timeout=PROMPT):
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        gevent.sleep(0.05)


def main() -> int:
    """Runs every check; prints ``ok <name>`` or ``FAIL <name>`` and a traceback for each."""
    import tempfile
    failures = 0
    for check in CHECKS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                check(tmp)
                left = _children_left()
                assert not left, f"processes left behind: {[p.pid for p in left]}"
            except BaseException:  # noqa: BLE001 - report every check, then fail
                failures += 1
                print(f"FAIL {check.__name__}", flush=True)
                traceback.print_exc(file=sys.stdout)
            else:
                print(f"ok {check.__name__}", flush=True)
    return 1 if failures else 0
