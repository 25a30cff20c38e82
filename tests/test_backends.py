"""The core scenarios on every backend: the same tests, parametrized over ``backend``.

``backend="local"`` gets a fresh pool per test.  ``backend="ray"`` (marked ``ray``)
shares one pool per module, because starting Ray takes seconds: its gateway and Ray's
processes stay alive across tests through conftest's LONG_LIVED_PIDS hook, and the
module fixture checks at teardown that all of them are gone and Ray's folder removed.
Tests that need a pool of their own (other options) get one from ``make_pool``.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import signal
import time

import gevent
import psutil
import pytest

import gprocpool
from backend_tasks import pid_and_initialized, pid_file_then_sleep
from conftest import LEAK_GRACE, LONG_LIVED_PIDS, PATCHED_TICKER, run_script
from gp_tasks import (add, boom, call_sys_exit, die_signal, double, identity, remember_init,
                      sleep_then)

HAVE_RAY = importlib.util.find_spec("ray") is not None
# A task_timeout well below the sleep of the task it stops, and a bound on how long
# stopping it may take (a Ray worker is force-cancelled, a local one killed).
TASK_TIMEOUT = 0.5
STOP_WITHIN = 5.0


def _session_processes(sid):
    """Every process in the session the Ray gateway leads (all of Ray's processes)."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                found.append(pid)
        except OSError:
            pass
    return found


def shutdown_and_check(pool, wait=True):
    """Shuts a Ray-backed pool down; asserts Ray's processes and its folder are gone."""
    gateway = pool._ray.gateway
    pool.shutdown(wait=wait)
    if gateway is None:
        return
    deadline = time.monotonic() + LEAK_GRACE
    while _session_processes(gateway.pid) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert not _session_processes(gateway.pid), "Ray's processes outlived the pool"
    temp_dir = gateway.config["temp_dir"]
    assert temp_dir is None or not os.path.exists(temp_dir), f"{temp_dir} was not removed"


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request):
    if request.param == "ray" and not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'gprocpool[ray]')")
    return request.param


@pytest.fixture(scope="module")
def shared_pool(backend):
    """The module's Ray-backed pool (None for the local backend)."""
    if backend != "ray":
        yield None
        return
    pool = gprocpool.Pool(2, backend="ray")
    # Start the gateway and Ray now, before any test counts its fds.
    assert pool.process(double, (1,)) == 2
    pid = pool._ray.gateway.pid
    LONG_LIVED_PIDS.add(pid)
    try:
        yield pool
    finally:
        LONG_LIVED_PIDS.discard(pid)
        shutdown_and_check(pool, wait=False)


@pytest.fixture
def bpool(backend, shared_pool):
    """A pool with max_procs=2 on the backend under test."""
    if shared_pool is not None:
        gateway_pid = shared_pool._ray.gateway.pid
        yield shared_pool
        # A test that restarted the gateway would leave the new one unaccounted for.
        assert shared_pool._ray.gateway.pid == gateway_pid
        return
    pool = gprocpool.Pool(2)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False)


@pytest.fixture
def make_pool(backend):
    """Makes pools with other options on the backend under test; shuts them down after."""
    pools = []

    def make(*args, **kwargs):
        if backend == "ray":
            kwargs["backend"] = "ray"
        pool = gprocpool.Pool(*args, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        if backend == "ray":
            shutdown_and_check(pool, wait=False)
        else:
            pool.shutdown(wait=False)


# -- the core scenarios, on every backend ---------------------------------------------------

def test_process(bpool):
    assert bpool.process(double, (21,)) == 42
    assert bpool.process(add, (1,), kwargs={"b": 2}) == 3
    assert bpool.process("gp_tasks:double", (4,)) == 8
    offset = 100
    assert bpool.process(lambda x: x + offset, (1,)) == 101   # by value (dill)


def test_map(bpool):
    assert bpool.map(double, range(200)) == [2 * i for i in range(200)]
    assert bpool.map(lambda x: -x, [1, 2, 3]) == [-1, -2, -3]
    assert bpool.map(double, []) == []


def test_imap(bpool):
    assert list(bpool.imap(double, range(20))) == [2 * i for i in range(20)]


def test_defer(bpool):
    deferreds = [bpool.defer(double, (i,)) for i in range(10)]
    gevent.wait(deferreds, timeout=30)
    assert [d() for d in deferreds] == [2 * i for i in range(10)]
    failing = bpool.defer(boom, ("deferred",))
    with pytest.raises(ValueError, match="deferred"):
        failing.get()


def test_queue_with_callbacks(bpool):
    results, errors = [], []
    for i in range(6):
        bpool.queue(double, (i,), callback=results.append, error_callback=errors.append)
    bpool.queue(boom, ("queued",), callback=results.append, error_callback=errors.append)
    assert bpool.join(timeout=30)
    assert sorted(results) == [0, 2, 4, 6, 8, 10]
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and str(errors[0]) == "queued"


def test_pipeline(bpool):
    pipe = bpool.pipeline()
    for i in range(8):
        pipe.queue(double, (i,))
    pipe.shutdown()
    assert sorted(pipe) == [2 * i for i in range(8)]


def test_large_argument_and_result(bpool):
    blob = os.urandom(1 << 20) * 8   # 8 MB each way: past every pipe and inline limit
    assert bpool.process(identity, (blob,)) == blob
    assert bpool.map(identity, [blob[:3 << 20], b"small"]) == [blob[:3 << 20], b"small"]


def test_task_error_has_its_own_type_and_remote_traceback(bpool):
    with pytest.raises(ValueError) as info:
        bpool.process(boom, ("from the task",))
    exc = info.value
    assert type(exc) is ValueError and str(exc) == "from the task"
    assert not isinstance(exc, gprocpool.PoolError)
    remote = str(exc.__cause__)
    assert "in boom" in remote and "raise ValueError(message)" in remote
    # Items of a map fail alone; the first failing item's error is raised.
    with pytest.raises(ValueError):
        bpool.map(boom, ["a", "b"])
    assert bpool.process(double, (5,)) == 10


def test_sys_exit_in_a_task_is_worker_lost_with_its_code(bpool):
    with pytest.raises(gprocpool.WorkerLost) as info:
        bpool.process(call_sys_exit, (5,))
    assert info.value.exitcode == 5
    assert bpool.process(double, (3,)) == 6


def test_task_timeout_stops_the_task(bpool):
    started = time.monotonic()
    with pytest.raises(gprocpool.TaskTimeout):
        bpool.process(sleep_then, (30,), task_timeout=TASK_TIMEOUT)
    assert time.monotonic() - started < STOP_WITHIN
    assert bpool.process(double, (4,)) == 8


def test_cancel_stops_a_running_task(bpool, tmp_path):
    path = str(tmp_path / "pid")
    deferred = bpool.defer(pid_file_then_sleep, (path, 30))
    _wait_for_file(path)
    assert deferred.cancel()
    with pytest.raises(gprocpool.TaskCancelled):
        deferred.get(timeout=STOP_WITHIN)
    victim = int(open(path).read())
    _wait_gone(victim)
    assert bpool.process(double, (6,)) == 12


def test_worker_killing_itself_is_worker_lost(bpool):
    with pytest.raises(gprocpool.WorkerLost):
        bpool.process(die_signal)
    assert bpool.process(double, (7,)) == 14


def test_worker_killed_from_outside_fails_only_its_task(bpool, tmp_path):
    path = str(tmp_path / "pid")
    victim = bpool.defer(pid_file_then_sleep, (path, 30))
    bystander = bpool.defer(sleep_then, (1.0, "bystander"))
    _wait_for_file(path)
    os.kill(int(open(path).read()), signal.SIGKILL)
    with pytest.raises(gprocpool.WorkerLost):
        victim.get(timeout=STOP_WITHIN)
    assert bystander.get(timeout=30) == "bystander"
    assert bpool.process(double, (8,)) == 16


def test_max_reqs_recycles_workers_and_initializer_runs_in_each(make_pool):
    pool = make_pool(1, max_reqs=2, initializer=remember_init, initargs=("init",))
    seen = [pool.process(pid_and_initialized) for _ in range(4)]
    uses = collections.Counter(pid for pid, _ in seen)
    assert max(uses.values()) <= 2 and len(uses) >= 2, uses
    assert all(init == ["init"] for _, init in seen), seen


# -- Ray only ------------------------------------------------------------------------------

@pytest.mark.ray
def test_ray_gateway_death_fails_tasks_in_flight_and_restarts():
    if not HAVE_RAY:
        pytest.skip("ray is not installed")
    pool = gprocpool.Pool(2, backend="ray")
    try:
        assert pool.process(double, (1,)) == 2
        first = pool._ray.gateway
        running = [pool.defer(sleep_then, (30,)) for _ in range(2)]
        gevent.sleep(0.5)
        os.kill(first.pid, signal.SIGKILL)
        for deferred in running:
            with pytest.raises(gprocpool.WorkerLost, match="gateway"):
                deferred.get(timeout=STOP_WITHIN)
        # What the dead gateway left (Ray's processes, its folder) is cleaned up at once.
        deadline = time.monotonic() + LEAK_GRACE
        while _session_processes(first.pid) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert not _session_processes(first.pid)
        assert not os.path.exists(first.config["temp_dir"])
        assert pool.process(double, (2,)) == 4   # a new gateway
        assert pool._ray.gateway.pid != first.pid
    finally:
        shutdown_and_check(pool)


@pytest.mark.ray
def test_ray_address_where_no_cluster_listens_fails_fast():
    if not HAVE_RAY:
        pytest.skip("ray is not installed")
    pool = gprocpool.Pool(1, backend="ray", ray_address="127.0.0.1:1")
    try:
        started = time.monotonic()
        with pytest.raises(gprocpool.PoolError, match="cannot reach a Ray cluster"):
            pool.process(double, (1,))
        assert time.monotonic() - started < 30
    finally:
        pool.shutdown()


def test_backend_arguments_are_validated():
    with pytest.raises(ValueError, match="'local', 'ray'"):
        gprocpool.Pool(1, backend="dask")
    with pytest.raises(TypeError, match="backend='ray'"):
        gprocpool.Pool(1, ray_address="127.0.0.1:6379")
    with pytest.raises(TypeError, match="backend='ray'"):
        gprocpool.Pool(1, ray_init_kwargs={"num_cpus": 1})
    if HAVE_RAY:
        with pytest.raises(ValueError, match="max_memory"):
            gprocpool.Pool(1, backend="ray", max_memory=1 << 30)
        with pytest.raises(ValueError, match="ray_address"):
            gprocpool.Pool(1, backend="ray", ray_init_kwargs={"address": "auto"})
        with pytest.raises(TypeError, match="ray_init_kwargs"):
            gprocpool.Pool(1, backend="ray", ray_init_kwargs=[("num_cpus", 1)])


@pytest.mark.ray
@pytest.mark.subprocess
def test_hub_keeps_ticking_under_monkey_patch_all_while_ray_tasks_run():
    if not HAVE_RAY:
        pytest.skip("ray is not installed")
    code = """
from gevent import monkey; monkey.patch_all()
import sys, time, threading
import gevent
import gprocpool
from gp_tasks import busy, double

""" + PATCHED_TICKER + """
with gprocpool.Pool(2, backend="ray") as pool:
    start = time.monotonic()
    threading.Thread(target=ticker, daemon=True).start()   # patched: a greenlet
    pool.process(double, (1,))                             # starts the gateway and Ray
    print("START", time.monotonic() - start, "STARTGAP", max(gaps))
    del gaps[:]
    callers = [gevent.spawn(pool.process, busy, (0.5,)) for _ in range(2)]
    gevent.joinall(callers, raise_error=True)
    assert all(c.value > 0 for c in callers)
    pool.map(busy, [0.1] * 8)
    print("MAXGAP", max(gaps), "TICKS", len(gaps))
print("RAY_IMPORTED", "ray" in sys.modules)
"""
    proc = run_script(code, timeout=90)
    assert proc.returncode == 0, proc.stderr
    values = {}
    for line in proc.stdout.splitlines():
        words = line.split()
        for key, value in zip(words[::2], words[1::2]):
            values[key] = value
    assert values["RAY_IMPORTED"] == "False"     # the parent never imports Ray
    assert int(values["TICKS"]) > 50
    assert float(values["MAXGAP"]) < 0.050, f"hub stalled for {float(values['MAXGAP']) * 1000:.1f} ms"


# -- helpers -------------------------------------------------------------------------------

def _wait_for_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the task never started"
        gevent.sleep(0.01)


def _wait_gone(pid, timeout=STOP_WITHIN):
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        assert time.monotonic() < deadline, f"process {pid} was not stopped"
        gevent.sleep(0.02)
