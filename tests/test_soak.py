"""Soak: many tasks from many greenlets with faults mixed in; nothing lost, nothing leaked."""
from __future__ import annotations

import collections
import os
import random
import signal
import time

import gevent
import psutil
import pytest

import fault_tasks as ft
import gprocpool
from conftest import SMALL_TICK
from gprocpool import SerializationError, TaskTimeout, WorkerLost

N_TASKS = 20000
N_GREENLETS = 100
MAX_PROCS = 2
MAX_REQS = 50
FAULT_KINDS = ("exit", "sigkill", "timeout", "exception", "unpicklable")
N_FAULTS = N_TASKS // 100            # about 1%
FAULT_TASK_TIMEOUT = 0.25
# Safety net only: a healthy task that hit it would be counted as a wrong outcome.
POOL_TASK_TIMEOUT = 20.0


def _plan(seed: int = 20240601) -> list:
    rng = random.Random(seed)
    plan = ["ok"] * N_TASKS
    for n, i in enumerate(rng.sample(range(N_TASKS), N_FAULTS)):
        plan[i] = FAULT_KINDS[n % len(FAULT_KINDS)]
    return plan


def _check(i: int, kind: str, outcome) -> str:
    """Returns "" if outcome is right for task i of this kind, else what is wrong."""
    if kind == "ok":
        ok = isinstance(outcome, tuple) and outcome[0] == i * 3 + 1
    elif kind == "exit":
        ok = isinstance(outcome, WorkerLost) and outcome.exitcode == 17
    elif kind == "sigkill":
        ok = isinstance(outcome, WorkerLost) and outcome.signal == signal.SIGKILL
    elif kind == "timeout":
        ok = isinstance(outcome, TaskTimeout)
    elif kind == "exception":
        ok = type(outcome) is ValueError and str(outcome) == f"fault {i}"
    else:
        ok = isinstance(outcome, SerializationError) and outcome.stage == "result"
    return "" if ok else f"task {i} ({kind}): got {outcome!r}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_every_task_accounted_for_exactly_once():
    plan = _plan()
    outcomes: dict = {}
    duplicates = []
    gaps = [0.0]

    def ticker():
        last = time.monotonic()
        while True:
            gevent.sleep(SMALL_TICK)
            now = time.monotonic()
            gaps[0] = max(gaps[0], now - last)
            last = now

    def record(i, outcome):
        if i in outcomes:
            duplicates.append(i)
        outcomes[i] = outcome

    def client(pool, k):
        # A quarter of the clients go through defer(), the rest through process().
        use_defer = k % 4 == 0
        for i in range(k, N_TASKS, N_GREENLETS):
            kind = plan[i]
            options = {"task_timeout": FAULT_TASK_TIMEOUT} if kind == "timeout" else {}
            try:
                if use_defer:
                    value = pool.defer(ft.soak_task, (i, kind), **options).get()
                else:
                    value = pool.process(ft.soak_task, (i, kind), **options)
            except Exception as exc:  # noqa: BLE001 - every error is an outcome to check
                record(i, exc)
            else:
                record(i, value)

    children_before = len(psutil.Process().children(recursive=True))
    tick = gevent.spawn(ticker)
    started = time.monotonic()
    try:
        with gprocpool.Pool(MAX_PROCS, max_reqs=MAX_REQS, task_timeout=POOL_TASK_TIMEOUT) as pool:
            clients = [gevent.spawn(client, pool, k) for k in range(N_GREENLETS)]
            gevent.joinall(clients, timeout=200)
            hung = [k for k, c in enumerate(clients) if not c.dead]
            crashed = [(k, c.exception) for k, c in enumerate(clients) if c.dead and c.exception]
            gevent.killall(clients)
            assert not hung, f"clients {hung} never finished"
            assert not crashed, crashed
            assert pool.process(ft.identity, ("after the soak",)) == "after the soak"
        elapsed = time.monotonic() - started
    finally:
        tick.kill()

    # Every task accounted for exactly once, with the right result or the right error.
    assert not duplicates, duplicates[:10]
    assert sorted(outcomes) == list(range(N_TASKS))
    wrong = [w for w in (_check(i, plan[i], outcomes[i]) for i in range(N_TASKS)) if w]
    assert not wrong, f"{len(wrong)} wrong outcomes, e.g. {wrong[:5]}"
    # No worker pid ever ran more than max_reqs tasks.
    per_pid = collections.Counter(outcomes[i][1] for i in range(N_TASKS) if plan[i] == "ok")
    assert max(per_pid.values()) <= MAX_REQS
    # Nothing leaked once the pool is shut down (the conftest fixture checks fds too).
    deadline = time.monotonic() + 5
    while len(psutil.Process().children(recursive=True)) > children_before:
        assert time.monotonic() < deadline, psutil.Process().children(recursive=True)
        gevent.sleep(SMALL_TICK)

    counts = collections.Counter(plan)
    print(f"\nsoak: {N_TASKS} tasks from {N_GREENLETS} greenlets, max_procs={MAX_PROCS}, "
          f"max_reqs={MAX_REQS}, in {elapsed:.1f} s ({N_TASKS / elapsed:.0f} tasks/s)")
    print("soak: outcomes " + ", ".join(f"{k}={counts[k]}" for k in ("ok",) + FAULT_KINDS)
          + " (all as expected)")
    print(f"soak: {len(per_pid)} worker processes served the healthy tasks "
          f"(at most {max(per_pid.values())} each); largest hub gap {gaps[0] * 1000:.0f} ms")
