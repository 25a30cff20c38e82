"""The workloads, written once against the contender interface (:mod:`benchmarks.contenders`).

Each workload warms its pool first (workers started, the function seen once), then times
``repeats`` runs and returns one figure per run; the report takes the median.

    L             round trip of one tiny task (x * 2), warm pool of 1 worker, sequential calls,
                  with the benchmark and its pool pinned to one CPU (see below)
    L_free        the same without pinning
    T_map         throughput of tiny tasks through map(), 2 workers
    T_concurrent  throughput of tiny tasks, 100 callers each doing call(), 2 workers
    B             bulk: tasks each sending and returning a large bytes payload, 1 worker
    R             recycling: tasks on 1 worker with max_reqs=1 (a fresh worker per task)
    S             start-up: a new pool of 1 worker to its first result
    H_map         hub stall: largest gap seen by a 1 ms ticker greenlet during T_map
    H_concurrent  the same during T_concurrent

L is pinned because a ping-pong between two processes on this kind of machine (a small VM)
is bimodal: about 12 us per round trip when the kernel keeps both ends on one CPU, about
50-60 us when every wake-up crosses CPUs, and runs flip between the two at random.  On one
CPU the figure is stable and measures what the pool's own code costs per call; L_free
shows what the scheduler made of it in this run.

H is measured the same way for everyone: the ticker greenlet runs in the benchmark's hub
and the workload runs in another greenlet of the same hub.  A peer that blocks while it
waits keeps the ticker from running for as long as it blocks.
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable, Dict, List, Tuple

from benchmarks import tasks
from benchmarks.contenders import Contender

TICK = 0.001
MB = 1e6

# workload key -> (title, unit, lower_is_better)
WORKLOADS: Dict[str, Tuple[str, str, bool]] = {
    "L": ("round trip of one tiny task, warm 1-worker pool, sequential calls, all on one CPU",
          "us/call", True),
    "L_free": ("the same as L, with the scheduler free to place processes on any CPU", "us/call", True),
    "T_map": ("throughput of tiny tasks via map, 2 workers", "tasks/s", False),
    "T_concurrent": ("throughput of tiny tasks, callers each doing one call at a time, 2 workers",
                     "tasks/s", False),
    "B": ("bulk: tasks each sending and returning a bytes payload, 1 worker", "MB/s", False),
    "R": ("recycling: one fresh worker per task (max_reqs=1), 1 worker", "ms/task", True),
    "S": ("start-up: new 1-worker pool to first result", "ms", True),
    "H_map": ("hub stall: largest gap of a 1 ms ticker greenlet during T_map", "ms", True),
    "H_concurrent": ("hub stall: largest gap of a 1 ms ticker greenlet during T_concurrent",
                     "ms", True),
}


class Ticker:
    """A greenlet that sleeps TICK in a loop and records the largest gap between wake-ups."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._stop = False
        self._greenlet: Any = None

    def _run(self) -> None:
        import gevent
        last = time.perf_counter()
        while not self._stop:
            gevent.sleep(TICK)
            now = time.perf_counter()
            if now - last > self.max_gap:
                self.max_gap = now - last
            last = now
            self.ticks += 1

    def __enter__(self) -> "Ticker":
        import gevent
        self._greenlet = gevent.spawn(self._run)
        while self.ticks < 3:   # ticking before the workload starts
            gevent.sleep(TICK)
        self.max_gap = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        import gevent
        # One more tick records the gap that ends when the workload does.
        ticks = self.ticks
        while self.ticks == ticks and not self._greenlet.dead:
            gevent.sleep(TICK)
        self._stop = True
        self._greenlet.join()


def run_in_greenlet_with_ticker(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """Runs fn in a greenlet while a ticker greenlet runs; returns (fn's result, max gap in s)."""
    import gevent
    with Ticker() as ticker:
        job = gevent.spawn(fn)
        job.join()
    return job.get(), ticker.max_gap


def _timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _check(got: Any, expected: Any, what: str) -> None:
    if got != expected:
        raise AssertionError(f"{what}: wrong result")


class Runner:
    """Runs the workloads of one contender with the given sizes.

    Args:
        sizes: see ``SIZES`` in :mod:`benchmarks.run`.
    """

    def __init__(self, contender: Contender, sizes: Dict[str, Any]) -> None:
        self.c = contender
        self.sizes = sizes

    def repeats(self, workload: str) -> int:
        return int(self.sizes.get(f"{workload}_repeats", self.sizes["repeats"]))

    def _repeat(self, workload: str, once: Callable[[], Tuple[float, Dict[str, float]]]) -> Dict[str, Any]:
        """Runs once() up to repeats times (at least min_repeats, then within the time budget)."""
        samples: List[float] = []
        extras: Dict[str, List[float]] = {}
        budget = float(self.sizes.get("budget", 1e9))
        min_repeats = min(int(self.sizes.get("min_repeats", 3)), self.repeats(workload))
        began = time.perf_counter()
        for i in range(self.repeats(workload)):
            if i >= min_repeats and time.perf_counter() - began > budget:
                break
            value, extra = once()
            samples.append(value)
            for k, v in extra.items():
                extras.setdefault(k, []).append(v)
        return {"samples": samples, "extra": extras}

    def _sequential_calls(self, n: int, workload: str, scale: float) -> Tuple[float, Dict[str, float]]:
        """n sequential calls of the tiny task; returns the time per call times scale."""
        c = self.c

        def loop() -> int:
            last = 0
            for i in range(n):
                last = c.call(tasks.double, i)
            return last
        last, dt = _timed(loop)
        _check(last, 2 * (n - 1), workload)
        return dt / n * scale, {}

    # -- workloads ------------------------------------------------------------------------

    def L(self) -> Dict[str, Any]:
        return self._latency("L", pin=True)

    def L_free(self) -> Dict[str, Any]:
        return self._latency("L_free", pin=False)

    def _latency(self, workload: str, pin: bool) -> Dict[str, Any]:
        n = self.sizes["L_calls"]
        c = self.c
        affinity = os.sched_getaffinity(0)
        if pin:
            # The pool's processes and threads start after this and inherit the mask.
            os.sched_setaffinity(0, {min(affinity)})
        try:
            c.open(1)
        except BaseException:
            os.sched_setaffinity(0, affinity)
            raise
        try:
            for i in range(max(20, n // 10)):
                c.call(tasks.double, i)

            return self._repeat(workload, lambda: self._sequential_calls(n, workload, 1e6))
        finally:
            c.close()
            os.sched_setaffinity(0, affinity)

    def _t(self, workload: str, concurrent: bool, ticker: bool) -> Dict[str, Any]:
        n = self.sizes["T_tasks"]
        callers = self.sizes["T_callers"]
        items = list(range(n))
        expected = [2 * x for x in items]
        c = self.c
        c.open(2)
        try:
            def run() -> List[Any]:
                if concurrent:
                    return c.concurrent(tasks.double, items, callers)
                return c.map(tasks.double, items)

            warm = list(range(min(n, 200)))
            _check(c.concurrent(tasks.double, warm, min(callers, len(warm))) if concurrent
                   else c.map(tasks.double, warm), [2 * x for x in warm], f"{workload} warm-up")

            def once() -> Tuple[float, Dict[str, float]]:
                if ticker:
                    gc.collect()
                    t0 = time.perf_counter()
                    result, gap = run_in_greenlet_with_ticker(run)
                    dt = time.perf_counter() - t0
                    _check(result, expected, workload)
                    return gap * 1e3, {"tasks_per_s": n / dt}
                result, dt = _timed(run)
                _check(result, expected, workload)
                return n / dt, {"seconds": dt}
            return self._repeat(workload, once)
        finally:
            c.close()

    def T_map(self) -> Dict[str, Any]:
        return self._t("T_map", concurrent=False, ticker=False)

    def T_concurrent(self) -> Dict[str, Any]:
        return self._t("T_concurrent", concurrent=True, ticker=False)

    def H_map(self) -> Dict[str, Any]:
        return self._t("H_map", concurrent=False, ticker=True)

    def H_concurrent(self) -> Dict[str, Any]:
        return self._t("H_concurrent", concurrent=True, ticker=True)

    def B(self) -> Dict[str, Any]:
        n = self.sizes["B_tasks"]
        size = self.sizes["B_bytes"]
        payload = os.urandom(size)
        c = self.c
        c.open(1)
        try:
            _check(c.call(tasks.echo, payload), payload, "B warm-up")

            def once() -> Tuple[float, Dict[str, float]]:
                def loop() -> Any:
                    for _ in range(n):
                        back = c.call(tasks.echo, payload)
                        if len(back) != size:
                            raise AssertionError("B: wrong size")
                    return back
                back, dt = _timed(loop)
                _check(bytes(back), payload, "B")
                # Bytes moved both ways.
                return 2 * n * size / dt / MB, {"seconds": dt}
            return self._repeat("B", once)
        finally:
            c.close()

    def R(self) -> Dict[str, Any]:
        n = self.sizes["R_tasks"]
        c = self.c
        c.open(1, max_reqs=1)
        try:
            for i in range(2):
                c.call(tasks.double, i)

            return self._repeat("R", lambda: self._sequential_calls(n, "R", 1e3))
        finally:
            c.close()

    def S(self) -> Dict[str, Any]:
        c = self.c

        def once() -> Tuple[float, Dict[str, float]]:
            gc.collect()
            t0 = time.perf_counter()
            c.open(1)
            try:
                result = c.call(tasks.double, 21)
                dt = time.perf_counter() - t0
            finally:
                c.close()   # not timed
            _check(result, 42, "S")
            return dt * 1e3, {}
        return self._repeat("S", once)
