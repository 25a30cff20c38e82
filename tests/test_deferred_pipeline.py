"""defer(), queue(), join(), pipeline() and shutdown(), with real worker processes."""
from __future__ import annotations

import logging
import random
import time

import gevent
import gevent.event
import psutil
import pytest

import gprocpool
from api_tasks import touch_then_sleep
from conftest import PROMPT, wait_until
from gp_tasks import boom, double, identity, pid, sleep_then



def live_children():
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]




def ran_before_yield(submit):
    """Calls submit(); returns whether a greenlet spawned just before got to run meanwhile."""
    ran = []
    g = gevent.spawn(ran.append, True)
    result = submit()
    yielded = bool(ran)
    g.join()
    return yielded, result


# -- defer() ----------------------------------------------------------------------------------

def test_defer_returns_at_once_and_resolves(pool):
    began = time.monotonic()
    yielded, d = ran_before_yield(lambda: pool.defer(sleep_then, (0.5, "value")))
    assert time.monotonic() - began < 0.2
    assert not yielded, "defer() yielded to the hub"
    assert isinstance(d, gprocpool.Deferred)
    assert not d.ready()
    assert not d.successful()
    assert d.exception is None
    with pytest.raises(TimeoutError):
        d.get(timeout=0.05)
    assert not d.ready()
    assert d() == "value"
    assert d.ready() and d.successful() and d.exception is None
    assert d() == "value" and d.get() == "value" and d.get(timeout=0) == "value"


def test_defer_with_kwargs_and_falsy_results(pool):
    d = pool.defer(identity, kwargs={"x": 0})
    ds = [pool.defer(identity, (v,)) for v in (None, "", False)]
    assert d() == 0
    assert [x() for x in ds] == [None, "", False]
    assert all(x.successful() for x in ds)


def test_defer_error_surfaces_only_on_call(pool):
    d = pool.defer(boom, ("deferred error",))  # must not raise
    assert pool.join(timeout=PROMPT)
    assert d.ready()
    assert not d.successful()
    assert isinstance(d.exception, ValueError)
    assert str(d.exception) == "deferred error"
    with pytest.raises(ValueError, match="deferred error"):
        d()
    with pytest.raises(ValueError, match="deferred error"):
        d.get(timeout=1)
    assert pool.process(double, (2,)) == 4


def test_defer_acquire_timeout_surfaces_on_call(pool1):
    busy = pool1.defer(sleep_then, (0.6, "busy"))
    gevent.sleep(0)
    d = pool1.defer(double, (1,), timeout=0.1)
    assert not d.ready()
    with pytest.raises(gprocpool.AcquireTimeout):
        d()
    assert busy() == "busy"


def test_defer_works_with_gevent_wait(pool):
    slow = pool.defer(sleep_then, (0.5, "slow"))
    fast = pool.defer(sleep_then, (0.0, "fast"))
    first = gevent.wait([slow, fast], count=1, timeout=PROMPT)
    assert len(first) == 1 and first[0] is fast
    done = gevent.wait([slow, fast], timeout=PROMPT)
    assert len(done) == 2
    assert {id(x) for x in done} == {id(slow), id(fast)}
    assert all(isinstance(x, gprocpool.Deferred) for x in done)
    assert slow() == "slow" and fast() == "fast"
    # iwait yields them in completion order, as Deferreds.
    a = pool.defer(sleep_then, (0.4, "a"))
    b = pool.defer(sleep_then, (0.05, "b"))
    order = [x() for x in gevent.iwait([a, b], timeout=PROMPT)]
    assert order == ["b", "a"]
    # An already finished Deferred is reported too.
    assert gevent.wait([a], timeout=PROMPT) == [a]


def test_defer_failure_works_with_gevent_wait(pool):
    d = pool.defer(boom, ("waited error",))
    assert gevent.wait([d], timeout=PROMPT) == [d]
    assert isinstance(d.exception, ValueError)


# -- queue() ----------------------------------------------------------------------------------

def test_queue_returns_without_yielding_and_calls_callback_once(pool):
    results = []
    errors = []
    yielded, d = ran_before_yield(lambda: pool.queue(double, (21,), callback=results.append,
                                                     error_callback=errors.append))
    assert not yielded, "queue() yielded to the hub"
    assert isinstance(d, gprocpool.Deferred)
    assert results == []
    assert pool.join(timeout=PROMPT)
    wait_until(lambda: results, what="the callback ran")
    assert d() == 42
    gevent.sleep(0.1)
    assert results == [42]
    assert errors == []


def test_queue_error_callback_called_once(pool):
    results = []
    errors = []
    d = pool.queue(boom, ("queued error",), callback=results.append, error_callback=errors.append)
    assert pool.join(timeout=PROMPT)
    wait_until(lambda: errors, what="the error callback ran")
    gevent.sleep(0.1)
    assert len(errors) == 1
    assert isinstance(errors[0], ValueError) and str(errors[0]) == "queued error"
    assert results == []
    with pytest.raises(ValueError, match="queued error"):
        d()


def test_queue_error_without_error_callback_is_logged(pool, caplog):
    results = []
    with caplog.at_level(logging.ERROR, logger="gprocpool"):
        pool.queue(boom, ("nobody listens",), callback=results.append)
        assert pool.join(timeout=PROMPT)
        wait_until(lambda: any(r.name == "gprocpool" and r.levelno >= logging.ERROR
                               for r in caplog.records), what="the error was logged")
    records = [r for r in caplog.records if r.name == "gprocpool" and r.levelno >= logging.ERROR]
    assert len(records) == 1
    text = records[0].getMessage()
    if records[0].exc_info:
        text += repr(records[0].exc_info[1])
    assert "nobody listens" in text
    assert results == []


def test_queue_success_is_not_logged_as_error(pool, caplog):
    with caplog.at_level(logging.DEBUG, logger="gprocpool"):
        pool.queue(double, (1,))
        assert pool.join(timeout=PROMPT)
        gevent.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_queue_with_kwargs_and_falsy(pool):
    got = []
    pool.queue(identity, kwargs={"x": 0}, callback=got.append)
    pool.queue(identity, (None,), callback=got.append)
    pool.queue(identity, ("",), callback=got.append)
    assert pool.join(timeout=PROMPT)
    wait_until(lambda: len(got) == 3)
    assert sorted(got, key=repr) == sorted([0, None, ""], key=repr)


def test_queue_many_shuffled_with_callbacks(pool):
    """Upstream 0.17-0.19: 100 shuffled tasks with per-task callbacks, an event when all are in."""
    items = list(range(1, 101))
    random.shuffle(items)
    got = {}
    all_in = gevent.event.Event()

    def collect(i):
        def callback(result):
            got[i] = result
            if len(got) == len(items):
                all_in.set()
        return callback

    for i in items:
        pool.queue(double, (i,), callback=collect(i))
    assert all_in.wait(timeout=30)
    assert got == {i: 2 * i for i in items}


# -- join() -----------------------------------------------------------------------------------

def test_join_returns_at_once_when_idle():
    pool = gprocpool.Pool(2)
    try:
        began = time.monotonic()
        assert pool.join() is True
        assert pool.join(timeout=0) is True
        assert time.monotonic() - began < 0.5
        assert live_children() == []
        assert pool.process(double, (1,)) == 2
        began = time.monotonic()
        assert pool.join() is True
        assert time.monotonic() - began < 0.5
    finally:
        pool.shutdown()


def test_join_waits_for_outstanding_tasks(pool):
    ds = [pool.defer(sleep_then, (0.3, i)) for i in range(3)]
    got = []
    pool.queue(sleep_then, (0.2, "q"), callback=got.append)
    assert pool.join() is True
    assert all(d.ready() for d in ds)
    assert [d() for d in ds] == [0, 1, 2]
    assert got == ["q"]


def test_join_timeout(pool):
    d = pool.defer(sleep_then, (1.0, "late"))
    began = time.monotonic()
    assert pool.join(timeout=0.1) is False
    assert time.monotonic() - began < 0.9
    assert not d.ready()
    assert pool.join(timeout=PROMPT) is True
    assert d() == "late"


def test_join_waits_for_process_in_other_greenlets(pool):
    g = gevent.spawn(pool.process, sleep_then, (0.3, "from greenlet"))
    gevent.sleep(0)
    assert pool.join(timeout=PROMPT) is True
    gevent.sleep(0)
    assert g.ready() and g.value == "from greenlet"


# -- pipeline() -------------------------------------------------------------------------------

def test_pipeline_yields_in_completion_order(pool):
    pipe = pool.pipeline()
    assert isinstance(pipe, gprocpool.Pipeline)
    pipe.queue(sleep_then, (0.5, "slow"))
    pipe.queue(sleep_then, (0.05, "fast"))
    assert next(pipe) == "fast"
    assert next(pipe) == "slow"
    pipe.shutdown()
    with pytest.raises(StopIteration):
        next(pipe)


def test_pipeline_raises_failed_task_error_and_goes_on(pool):
    pipe = pool.pipeline()
    pipe.queue(boom, ("pipeline error",))
    with pytest.raises(ValueError, match="pipeline error"):
        next(pipe)
    pipe.queue(double, (5,))
    assert next(pipe) == 10
    pipe.shutdown()
    assert list(pipe) == []


def test_pipeline_shutdown_ends_iteration_after_queued_results(pool):
    pipe = pool.pipeline()
    for i in range(5):
        pipe.queue(sleep_then, (0.05 * (i % 2), i))
    pipe.shutdown()
    assert sorted(pipe) == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        next(pipe)
    assert list(pipe) == []


def test_pipeline_shutdown_with_nothing_pending(pool):
    pipe = pool.pipeline()
    pipe.shutdown()
    with gevent.Timeout(PROMPT, AssertionError("iteration did not end")):
        assert list(pipe) == []
        with pytest.raises(StopIteration):
            next(pipe)
    # After every result was taken.
    pipe = pool.pipeline()
    pipe.queue(double, (1,))
    assert next(pipe) == 2
    pipe.shutdown()
    with gevent.Timeout(PROMPT, AssertionError("iteration did not end")):
        assert list(pipe) == []


def test_pipeline_shutdown_wakes_a_waiting_consumer(pool):
    pipe = pool.pipeline()
    consumer = gevent.spawn(list, pipe)
    gevent.sleep(0.05)
    assert not consumer.ready()
    pipe.shutdown()
    assert consumer.get(timeout=PROMPT) == []


def test_pipeline_queue_after_shutdown_raises(pool):
    pipe = pool.pipeline()
    pipe.queue(double, (1,))
    pipe.shutdown()
    with pytest.raises(gprocpool.PipelineClosed) as info:
        pipe.queue(double, (2,))
    assert isinstance(info.value, gprocpool.PoolError)
    assert list(pipe) == [2]
    with pytest.raises(gprocpool.PipelineClosed):
        pipe.queue(double, (3,))


def test_pipeline_auto_shutdown(pool):
    pipe = pool.pipeline(auto_shutdown=True)
    for i in range(4):
        pipe.queue(sleep_then, (0.05, i))
    with gevent.Timeout(PROMPT, AssertionError("auto_shutdown pipeline did not end")):
        assert sorted(pipe) == [0, 1, 2, 3]
    with pytest.raises(gprocpool.PipelineClosed):
        pipe.queue(double, (1,))


def test_pipeline_falsy_results_are_not_end_of_stream(pool):
    pipe = pool.pipeline()
    values = [0, None, "", False, [], 0.0]
    for v in values:
        pipe.queue(identity, (v,))
    pipe.shutdown()
    got = list(pipe)
    assert len(got) == len(values)
    assert sorted(got, key=repr) == sorted(values, key=repr)
    # auto_shutdown too, where the stream ends by itself.
    pipe = pool.pipeline(auto_shutdown=True)
    pipe.queue(identity, (0,))
    pipe.queue(identity, (None,))
    with gevent.Timeout(PROMPT):
        assert sorted(pipe, key=repr) == [0, None]


def test_pipeline_queue_with_kwargs(pool):
    pipe = pool.pipeline()
    d = pipe.queue(identity, kwargs={"x": "kw"})
    assert isinstance(d, gprocpool.Deferred)
    assert next(pipe) == "kw"
    assert d() == "kw"
    pipe.shutdown()


# -- shutdown() -------------------------------------------------------------------------------

def test_shutdown_wait_delivers_submitted_results():
    pool = gprocpool.Pool(2)
    try:
        ds = [pool.defer(double, (i,)) for i in range(1, 12)]
        slow = [pool.defer(sleep_then, (0.2, i)) for i in range(3)]
        pool.shutdown(wait=True)
        assert live_children() == []
        assert [d() for d in ds] == [2 * i for i in range(1, 12)]
        assert [d() for d in slow] == [0, 1, 2]
        # Reusable: workers respawn on demand.
        assert pool.process(double, (21,)) == 42
        assert pool.map(double, [1, 2]) == [2, 4]
    finally:
        pool.shutdown()
    assert live_children() == []


def test_shutdown_wait_false_cancels_queued_and_running(pool1, tmp_path):
    marker = tmp_path / "running"
    running = pool1.defer(touch_then_sleep, (str(marker), 30, "never"))
    queued = pool1.defer(double, (1,))
    caller = gevent.spawn(pool1.process, double, (2,))
    wait_until(marker.exists, what="the long task started")
    victim = int(marker.read_text())
    began = time.monotonic()
    pool1.shutdown(wait=False)
    assert time.monotonic() - began < 10
    with pytest.raises(gprocpool.TaskCancelled):
        running.get(timeout=PROMPT)
    with pytest.raises(gprocpool.TaskCancelled):
        queued.get(timeout=PROMPT)
    with pytest.raises(gprocpool.TaskCancelled):
        caller.get(timeout=PROMPT)
    assert isinstance(running.exception, gprocpool.PoolError)
    wait_until(lambda: not psutil.pid_exists(victim) or
               psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
               what="the running worker was killed")
    wait_until(lambda: live_children() == [], what="all workers stopped")
    # Reusable afterwards.
    assert pool1.process(double, (4,)) == 8
    assert pool1.process(pid) != victim


def test_shutdown_wait_false_kills_worker_ignoring_sigterm(pool1, tmp_path):
    from api_tasks import touch_ignore_sigterm_sleep
    marker = tmp_path / "running"
    d = pool1.defer(touch_ignore_sigterm_sleep, (str(marker), 30))
    wait_until(marker.exists, what="the task started")
    began = time.monotonic()
    pool1.shutdown(wait=False)
    assert time.monotonic() - began < 10
    with pytest.raises(gprocpool.TaskCancelled):
        d.get(timeout=PROMPT)
    assert live_children() == []
    assert pool1.process(double, (3,)) == 6


def test_shutdown_wait_false_before_the_task_started():
    pool = gprocpool.Pool(1)
    try:
        d = pool.defer(double, (1,))  # its greenlet has not run yet
        pool.shutdown(wait=False)
        with pytest.raises(gprocpool.TaskCancelled):
            d.get(timeout=PROMPT)
        assert pool.process(double, (2,)) == 4
    finally:
        pool.shutdown()


def test_shutdown_wait_false_during_map(pool):
    g = gevent.spawn(pool.map, sleep_then, [30] * 4)
    gevent.sleep(0.3)
    pool.shutdown(wait=False)
    with pytest.raises(gprocpool.TaskCancelled):
        g.get(timeout=PROMPT)
    assert pool.map(double, [1, 2, 3]) == [2, 4, 6]


def test_second_shutdown_is_a_no_op():
    pool = gprocpool.Pool(2)
    pool.shutdown()  # never used
    assert pool.process(double, (1,)) == 2
    pool.shutdown()
    began = time.monotonic()
    pool.shutdown()
    pool.shutdown(wait=False)
    assert time.monotonic() - began < 1
    assert live_children() == []
    assert pool.process(double, (2,)) == 4
    pool.shutdown(wait=False)
    pool.shutdown(wait=False)
    assert live_children() == []


def test_context_manager_shuts_down():
    with gprocpool.Pool(2) as pool:
        assert isinstance(pool, gprocpool.Pool)
        ds = [pool.defer(sleep_then, (0.1, i)) for i in range(3)]
        assert pool.process(double, (1,)) == 2
        assert live_children() != []
    assert live_children() == []
    assert [d() for d in ds] == [0, 1, 2]


def test_context_manager_shuts_down_on_error():
    with pytest.raises(RuntimeError, match="inside with"):
        with gprocpool.Pool(1) as pool:
            assert pool.process(double, (1,)) == 2
            raise RuntimeError("inside with")
    assert live_children() == []


def test_shutdown_closes_pipelines_consumers_get_results(pool):
    pipe = pool.pipeline()
    for i in range(3):
        pipe.queue(sleep_then, (0.1, i))
    pipe.shutdown()
    pool.shutdown(wait=True)
    assert sorted(pipe) == [0, 1, 2]
