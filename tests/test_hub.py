"""The hub keeps running while workers compute: only the calling greenlet waits."""
from __future__ import annotations

import time

import gevent
import pytest

import gprocpool
from conftest import PATCHED_TICKER, SMALL_TICK, run_script
from gp_tasks import busy

MAX_GAP = 0.050


class Ticker:
    """A greenlet that wakes every SMALL_TICK and records the largest gap between wake-ups."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._glet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            gevent.sleep(SMALL_TICK)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def stop(self) -> None:
        self._glet.kill()


def _load(pool: gprocpool.Pool) -> None:
    n = pool.max_procs
    # Several greenlets using process(), then map(), each keeping every worker busy 0.5 s.
    callers = [gevent.spawn(pool.process, busy, (0.5,)) for _ in range(n)]
    gevent.joinall(callers, raise_error=True)
    assert all(c.value > 0 for c in callers)
    mappers = [gevent.spawn(pool.map, busy, [0.25] * n) for _ in range(2)]
    gevent.joinall(mappers, raise_error=True)


def test_ticker_never_stalls_while_workers_busy():
    with gprocpool.Pool(2) as pool:
        pool.map(busy, [0.01, 0.01])  # warm: the template start is measured elsewhere
        ticker = Ticker()
        try:
            started = time.monotonic()
            _load(pool)
            elapsed = time.monotonic() - started
        finally:
            ticker.stop()
    # The work really ran in parallel in the workers, while the ticker kept ticking.
    assert elapsed >= 0.9
    assert ticker.ticks >= elapsed / SMALL_TICK / 3
    assert ticker.max_gap < MAX_GAP, f"hub stalled for {ticker.max_gap * 1000:.1f} ms"


@pytest.mark.subprocess
def test_ticker_never_stalls_under_monkey_patch_all():
    code = """
from gevent import monkey; monkey.patch_all()
import time, threading
import gevent
import gprocpool
from gp_tasks import busy

""" + PATCHED_TICKER + """
with gprocpool.Pool(2) as pool:
    pool.map(busy, [0.01, 0.01])
    t = threading.Thread(target=ticker, daemon=True)  # patched: a greenlet
    t.start()
    callers = [gevent.spawn(pool.process, busy, (0.5,)) for _ in range(2)]
    gevent.joinall(callers, raise_error=True)
    pool.map(busy, [0.25] * 4)
print("MAXGAP", max(gaps), "TICKS", len(gaps))
"""
    proc = run_script(code, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("MAXGAP")][0]
    _, gap, _, ticks = line.split()
    assert int(ticks) > 50
    assert float(gap) < MAX_GAP, f"hub stalled for {float(gap) * 1000:.1f} ms"


def test_first_use_does_not_stall_the_hub():
    """Starting the template and the first worker is cooperative too."""
    ticker = Ticker()
    try:
        with gprocpool.Pool(2) as pool:
            assert pool.map(busy, [0.05, 0.05])
    finally:
        ticker.stop()
    assert ticker.max_gap < MAX_GAP, f"hub stalled for {ticker.max_gap * 1000:.1f} ms"
