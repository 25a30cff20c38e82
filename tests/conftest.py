"""Shared test harness.

Every test runs under a gevent timeout, and afterwards must leave no child process and
no extra open file descriptor behind (checked with psutil and /proc/self/fd).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time

import gevent
import psutil
import pytest

import gprocpool

# Timing constants, kept apart from the one generous deadlock timeout.
SMALL_TICK = 0.005
LARGE_TICK = 0.05
TEST_TIMEOUT = float(os.environ.get("GPROCPOOL_TEST_TIMEOUT", "60"))
LEAK_GRACE = 5.0
# How long something that should happen "promptly" may take.
PROMPT = 5.0

HERE = os.path.dirname(os.path.abspath(__file__))


def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


# Hook for module-scoped fixtures that keep a helper process alive across tests on purpose
# (tests/test_backends.py's shared Ray pool: its gateway, with Ray's processes under it).
# A pid in here, and its descendants, are not counted as leaks; the fixture that adds a
# pid removes it at teardown and checks there that those processes are gone.
LONG_LIVED_PIDS: set = set()


def _children() -> list:
    children = psutil.Process().children(recursive=True)
    spared = set()
    for pid in LONG_LIVED_PIDS:
        try:
            spared.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            continue
        spared.add(pid)
    return [p for p in children if p.pid not in spared]


@pytest.fixture(scope="session", autouse=True)
def _warm_up():
    """Lets gevent and the pool open their one-time resources before fds are counted."""
    with gprocpool.Pool(1) as pool:
        pool.process(os.getpid)
    gevent.sleep(0)
    yield


@pytest.fixture(autouse=True)
def _bounded_and_leak_free(request):
    marker = request.node.get_closest_marker("timeout")
    limit = marker.args[0] if marker else TEST_TIMEOUT
    fds_before = _open_fds()
    # A hard backstop in case something blocks the hub itself (a gevent timeout needs it).
    faulthandler.dump_traceback_later(limit + 30, exit=True)
    timer = gevent.Timeout(limit, AssertionError(f"test did not finish within {limit} s"))
    timer.start()
    try:
        yield
    finally:
        timer.close()
        faulthandler.cancel_dump_traceback_later()
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        children = [p for p in _children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        zombies = [p for p in _children() if p.is_running() and p.status() == psutil.STATUS_ZOMBIE]
        leaked = _open_fds() - fds_before
        # An fd that appeared and vanished again between the two listings is not a leak.
        leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
        if not children and not zombies and not leaked:
            break
        if time.monotonic() > deadline:
            details = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                       if os.path.exists(f"/proc/self/fd/{fd}")}
            for p in children:
                p.kill()
            pytest.fail(f"leaked children {[p.pid for p in children]}, zombies "
                        f"{[p.pid for p in zombies]}, fds {details}")
        gevent.sleep(0.05)


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): per-test gevent timeout")
    config.addinivalue_line("markers", "ray: runs on the Ray backend (needs the 'ray' extra)")


# For programs run with run_script() after monkey.patch_all(): a greenlet (a patched
# thread) appending every gap between 5 ms sleeps to `gaps`; the program imports time.
PATCHED_TICKER = """
gaps = []
def ticker():
    last = time.monotonic()
    while True:
        time.sleep(0.005)          # patched: a cooperative sleep
        now = time.monotonic(); gaps.append(now - last); last = now
"""


def wait_until(predicate, timeout=PROMPT, what="condition"):
    """Polls predicate cooperatively until it holds; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        gevent.sleep(LARGE_TICK / 5)


@pytest.fixture
def pool1():
    """A one-worker pool, shut down (wait=False) after the test."""
    p = gprocpool.Pool(1)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


@pytest.fixture
def pool():
    """A small pool shut down after the test."""
    p = gprocpool.Pool(2)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


def run_script(code: str, timeout: float = 60, env=None, **kwargs):
    """Runs a Python program in a child process (cooperatively); returns CompletedProcess."""
    import gevent.subprocess as subprocess
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE),
                                              full_env.get("PYTHONPATH", "")])
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kwargs)
