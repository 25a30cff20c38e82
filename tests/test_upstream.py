"""Coro::ProcessPool's own test suites, ported (see coro-processpool-history.md section 2).

2.1 is v0.30 t/01-Coro-ProcessPool.t (PROCS=2, REQS=3, COUNT=11), 2.2 is v0.30
t/02-Coro-ProcessPool-Pipeline.t; the rest are cases from older releases worth keeping.
"""
from __future__ import annotations

import collections
import os
import random

import gevent
import psutil
import pytest

import gprocpool
from api_tasks import FortyTwo, double_all, double_pair
from conftest import HERE
from gp_tasks import boom, double, pid

PROCS = 2
REQS = 3
COUNT = 11
INCLUDE_DIR = os.path.join(HERE, "include_dir")


def live_children():
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def shuffled(seq):
    seq = list(seq)
    random.shuffle(seq)
    return seq


@pytest.fixture
def upool():
    """The pool most upstream subtests use: max_procs=2, max_reqs=3."""
    p = gprocpool.Pool(PROCS, max_reqs=REQS)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


@pytest.fixture
def pipe_pool():
    """t/02 shares one max_procs=2 pool across its subtests; the leak check wants one per test."""
    p = gprocpool.Pool(PROCS)
    try:
        yield p
    finally:
        p.join()
        p.shutdown()


# -- 2.1 t/01-Coro-ProcessPool.t ----------------------------------------------------------------

def test_life_cycle():
    pool = gprocpool.Pool()
    try:
        assert pool.max_procs > 0
        assert pool.max_procs == os.cpu_count()
        assert pool.join() is True
    finally:
        pool.shutdown()
    assert live_children() == []


def test_defer_eleven_resolved_in_any_order():
    with gprocpool.Pool(PROCS) as pool:
        deferred = {i: pool.defer(double, (i,)) for i in range(1, COUNT + 1)}
        assert all(deferred.values())
        for i in shuffled(deferred):
            assert deferred[i]() == 2 * i
        assert pool.join() is True


def test_error_raises_on_recv_only():
    with gprocpool.Pool(PROCS) as pool:
        d = pool.defer(boom, ("some error",))
        assert d
        with pytest.raises(ValueError, match="some error"):
            d()


def test_max_reqs_every_pid_at_most_reqs_times(upool):
    deferred = [upool.defer(pid) for _ in range(COUNT)]
    counts = collections.Counter(deferred[i]() for i in shuffled(range(COUNT)))
    assert sum(counts.values()) == COUNT
    assert max(counts.values()) <= REQS, counts
    assert len(counts) >= 4, counts
    assert upool.join() is True


def test_process_sequential_doubles(upool):
    for i in range(1, COUNT + 1):
        assert upool.process(double, (i,)) == 2 * i
    assert upool.join() is True


def test_map_doubles_in_order(upool):
    assert upool.map(double, range(1, COUNT + 1)) == [2 * i for i in range(1, COUNT + 1)]
    assert upool.join() is True


def test_two_pools_used_alternately():
    pool1 = gprocpool.Pool(PROCS, max_reqs=REQS)
    pool2 = gprocpool.Pool(PROCS)
    try:
        pids1, pids2 = set(), set()
        for i in range(1, COUNT + 1):
            if i % 2 == 0:
                assert pool1.process(double, (i,)) == 2 * i
                pids1.add(pool1.process(pid))
            else:
                assert pool2.process(double, (i,)) == 2 * i
                pids2.add(pool2.process(pid))
        assert not pids1 & pids2, "the two pools shared a worker"
        assert pool1.join() is True
        assert pool2.join() is True
        pool2.shutdown()
        # pool1 is unaffected by pool2's shutdown.
        assert pool1.process(double, (50,)) == 100
    finally:
        pool1.shutdown()
        pool2.shutdown()
    assert live_children() == []


def test_two_pools_used_concurrently():
    with gprocpool.Pool(PROCS, max_reqs=REQS) as pool1, gprocpool.Pool(PROCS) as pool2:
        ds = [(i, (pool1 if i % 2 == 0 else pool2).defer(double, (i,))) for i in range(1, 21)]
        assert all(d() == 2 * i for i, d in ds)


def test_large_tasks():
    """Upstream 2.1.8 (env-gated there): 100,000-element arrays, doubled in the workers."""
    with gprocpool.Pool(PROCS) as pool:
        deferred = {i: pool.defer(double_all, ([i] * 100_000,)) for i in range(1, COUNT + 1)}
        for i in shuffled(deferred):
            assert deferred[i]() == [2 * i] * 100_000


# -- 2.2 t/02-Coro-ProcessPool-Pipeline.t ---------------------------------------------------------

def _check_replies(replies):
    assert len(replies) == 10
    for x, doubled in replies:
        assert doubled == 2 * x
    assert sorted(x for x, _ in replies) == list(range(1, 11))


def test_pipeline_class_loads():
    assert gprocpool.Pipeline.__name__ == "Pipeline"


@pytest.mark.parametrize("make", ["class", "pool"])
def test_pipeline_basic(pipe_pool, make):
    pipe = gprocpool.Pipeline(pipe_pool) if make == "class" else pipe_pool.pipeline()
    raised = []

    def producer():
        for i in shuffled(range(1, 11)):
            pipe.queue(double_pair, (i,))
        pipe.shutdown()
        try:
            pipe.queue(double_pair)
        except gprocpool.PipelineClosed as exc:
            raised.append(exc)

    prod = gevent.spawn(producer)
    replies = []
    while True:
        try:
            reply = next(pipe)
        except StopIteration:
            break
        replies.append(reply)
    prod.get(timeout=30)
    _check_replies(replies)
    assert len(raised) == 1
    with pytest.raises(gprocpool.PipelineClosed, match="shut down"):
        pipe.queue(double_pair, (1,))


def test_pipeline_errors(pipe_pool):
    pipe = gprocpool.Pipeline(pipe_pool)
    pipe.queue(boom, ("test error",))
    with pytest.raises(ValueError, match="test error"):
        next(pipe)
    pipe.shutdown()
    assert list(pipe) == []


def test_pipeline_auto_shutdown(pipe_pool):
    pipe = gprocpool.Pipeline(pipe_pool, auto_shutdown=True)

    def producer():
        for i in shuffled(range(1, 11)):
            pipe.queue(double_pair, (i,))

    prod = gevent.spawn(producer)
    with gevent.Timeout(30, AssertionError("the auto_shutdown pipeline never ended")):
        replies = list(pipe)
        prod.get()
    _check_replies(replies)
    assert pipe_pool.join() is True


# -- 2.3 v0.28 extras -----------------------------------------------------------------------------

def test_shutdown_after_defer_before_resolving_delivers_all():
    pool = gprocpool.Pool(PROCS)
    deferred = {i: pool.defer(double, (i,)) for i in range(1, COUNT + 1)}
    pool.shutdown()
    assert pool.join() is True
    assert live_children() == []
    for i in shuffled(deferred):
        assert deferred[i]() == 2 * i


def test_task_class_forty_two():
    with gprocpool.Pool(1) as pool:
        assert pool.process("api_tasks:FortyTwo", ("ignored", 1)) == 42
        assert pool.process(FortyTwo("x").run) == 42


def test_include_task_class_without_namespace():
    with gprocpool.Pool(1, include=[INCLUDE_DIR]) as pool:
        assert pool.process("gp_only_via_include:TestTaskNoNS") == 42


def test_stop_then_join_still_delivers_pending():
    pool = gprocpool.Pool(PROCS)
    deferred = {i: pool.defer(double, (i,)) for i in (1, 2, 3)}
    collector = gevent.spawn(lambda: {i: d() for i, d in deferred.items()})
    gevent.sleep(0)
    pool.shutdown()
    assert pool.join() is True
    assert collector.get(timeout=30) == {1: 2, 2: 4, 3: 6}


def test_worker_killed_while_waiting_then_replaced():
    """v0.26: a worker killed under a pending task fails that task; the pool goes on."""
    from gp_tasks import die_signal
    with gprocpool.Pool(1) as pool:
        victim = pool.process(pid)
        with pytest.raises(gprocpool.WorkerLost, match=str(victim)):
            pool.process(die_signal)
        assert pool.process(double, (21,)) == 42


# -- 2.4 v0.26: shared pool(max_procs=4, max_reqs=2) ---------------------------------------------

def test_v026_shared_pool_suite():
    with gprocpool.Pool(4, max_reqs=2) as pool:
        for i in range(1, 21):
            assert pool.process(double, (i,)) == 2 * i
        order = shuffled(range(1, 21))
        deferred = {i: pool.defer(double, (i,)) for i in order}
        assert [deferred[i]() for i in range(1, 21)] == [2 * i for i in range(1, 21)]
        assert pool.map(double, range(1, 21)) == [2 * i for i in range(1, 21)]
        with pytest.raises(ZeroDivisionError):
            pool.process(lambda: 1 / 0)
        counts = collections.Counter(pool.map(pid, range(20)))
        assert max(counts.values()) <= 2


# -- 2.5 removed tests from older eras --------------------------------------------------------------

def test_acquire_timeout_with_free_and_busy_worker():
    from gp_tasks import sleep_then
    with gprocpool.Pool(1) as pool:
        assert pool.process(double, (1,), timeout=1) == 2
        d = pool.defer(sleep_then, (1.0, "busy"))
        gevent.sleep(0)
        with pytest.raises(gprocpool.AcquireTimeout, match="within"):
            pool.process(double, (1,), timeout=0.2)
        assert d() == "busy"


def test_many_concurrent_greenlets_calling_process():
    with gprocpool.Pool(PROCS) as pool:
        greenlets = [gevent.spawn(pool.process, double, (i,)) for i in range(20)]
        gevent.joinall(greenlets, timeout=30, raise_error=True)
        assert [g.value for g in greenlets] == [2 * i for i in range(20)]
        assert pool.map(double, range(1, 101)) == [2 * i for i in range(1, 101)]
