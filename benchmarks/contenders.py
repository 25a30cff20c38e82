"""One adapter per contender, all with the same small interface.

Every workload in :mod:`benchmarks.workloads` is written once against this interface,
so each contender is measured by exactly the same code:

    open(workers, max_reqs)    a pool of ``workers`` processes (max_reqs=1: one task per process)
    call(f, *args)             one task, blocking the caller until its result is back
    map(f, items)              the contender's own map, with its default chunk size
    concurrent(f, items, n)    n callers each doing call() over their share of the items:
                               greenlets for gevent-aware contenders, threads for the others
    close()                    shut the pool down and wait for its processes

Peers that are not gevent-aware run WITHOUT monkey patching, as a gevent program would
call them: their blocking calls block the hub (H measures exactly that).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Type


class NotApplicable(Exception):
    """This contender has no equivalent of the workload (the reason is the message)."""


class Contender:
    key = ""
    label = ""
    gevent_aware = False
    # A reference figure rather than a pool: the table omits its not-applicable rows.
    reference = False
    # Workloads this contender takes part in (None: all), and why it sits the others out.
    workloads: Optional[Sequence[str]] = None
    not_applicable = ""
    note = ""

    def open(self, workers: int, max_reqs: int = 0) -> None:
        raise NotImplementedError

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def concurrent(self, f: Callable[[Any], Any], items: List[Any], callers: int) -> List[Any]:
        """callers threads each run call() over items[i::callers]; returns results in order."""
        results: List[Any] = [None] * len(items)
        errors: List[BaseException] = []

        def caller(start: int) -> None:
            try:
                for i in range(start, len(items), callers):
                    results[i] = self.call(f, items[i])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    @classmethod
    def version(cls) -> str:
        return ""

    @classmethod
    def available(cls) -> Optional[str]:
        """None if the contender can run here, else why not."""
        return None


class GprocpoolContender(Contender):
    key = "gprocpool"
    label = "gprocpool"
    gevent_aware = True
    note = "concurrent: greenlets calling process()"

    def open(self, workers: int, max_reqs: int = 0) -> None:
        import gprocpool
        self.pool = gprocpool.Pool(workers, max_reqs)

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        return self.pool.process(f, args)

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        return self.pool.map(f, items)

    def concurrent(self, f: Callable[[Any], Any], items: List[Any], callers: int) -> List[Any]:
        import gevent
        results: List[Any] = [None] * len(items)
        process = self.pool.process

        def caller(start: int) -> None:
            for i in range(start, len(items), callers):
                results[i] = process(f, (items[i],))

        gevent.joinall([gevent.spawn(caller, i) for i in range(callers)], raise_error=True)
        return results

    def close(self) -> None:
        self.pool.shutdown()

    @classmethod
    def version(cls) -> str:
        import gprocpool
        return gprocpool.__version__


class MultiprocessingContender(Contender):
    key = "mp_pool"
    label = "multiprocessing.Pool"

    def open(self, workers: int, max_reqs: int = 0) -> None:
        import multiprocessing
        self.pool = multiprocessing.Pool(workers, maxtasksperchild=max_reqs or None)

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply(f, args)

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        return self.pool.map(f, items)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    @classmethod
    def version(cls) -> str:
        import multiprocessing
        return f"stdlib, start method {multiprocessing.get_start_method()}"


class ProcessPoolExecutorContender(Contender):
    key = "ppe"
    label = "ProcessPoolExecutor"

    def open(self, workers: int, max_reqs: int = 0) -> None:
        from concurrent.futures import ProcessPoolExecutor
        if max_reqs and sys.version_info < (3, 11):
            raise NotApplicable("max_tasks_per_child needs Python 3.11")
        # max_tasks_per_child cannot use fork; CPython then picks spawn by itself.
        kwargs: Dict[str, Any] = {"max_tasks_per_child": max_reqs} if max_reqs else {}
        self.pool = ProcessPoolExecutor(workers, **kwargs)

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(f, *args).result()

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        return list(self.pool.map(f, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    @classmethod
    def version(cls) -> str:
        import multiprocessing
        return (f"stdlib, start method {multiprocessing.get_start_method()} "
                "(spawn with max_tasks_per_child)")


class PebbleContender(Contender):
    key = "pebble"
    label = "pebble.ProcessPool"

    def open(self, workers: int, max_reqs: int = 0) -> None:
        import pebble
        self.pool = pebble.ProcessPool(max_workers=workers, max_tasks=max_reqs or 0)

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(f, args).result()

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        return list(self.pool.map(f, items).result())

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    @classmethod
    def version(cls) -> str:
        import multiprocessing

        import pebble
        return f"{pebble.__version__}, start method {multiprocessing.get_start_method()}"

    @classmethod
    def available(cls) -> Optional[str]:
        return _importable("pebble")


class LokyContender(Contender):
    key = "loky"
    label = "loky.ProcessPoolExecutor"
    workloads = ("L", "L_free", "T_map", "T_concurrent", "B", "S", "H_map", "H_concurrent")
    not_applicable = "loky has no per-worker task limit"

    def open(self, workers: int, max_reqs: int = 0) -> None:
        import loky
        self.pool = loky.ProcessPoolExecutor(max_workers=workers)

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(f, *args).result()

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        return list(self.pool.map(f, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    @classmethod
    def version(cls) -> str:
        import loky
        return f"{loky.__version__}, start method loky (fork+exec)"

    @classmethod
    def available(cls) -> Optional[str]:
        return _importable("loky")


class RawPipeContender(Contender):
    """The floor (see :mod:`benchmarks.rawpipe`)."""

    key = "raw"
    label = "raw pipe (floor)"
    gevent_aware = True
    note = ("exec'd child per pipe pair; map: one batch per child; concurrent: one greenlet "
            "per child, item by item; B: echo without pickling; R: a fork per task")

    def open(self, workers: int, max_reqs: int = 0) -> None:
        from benchmarks import rawpipe
        self.fork_per_task = bool(max_reqs)
        self.unreaped: List[int] = []
        self.peers = [] if self.fork_per_task else [rawpipe.start_exec("pickle") for _ in range(workers)]
        self.echo_peer: Optional[Any] = None

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        from benchmarks import rawpipe, tasks
        if f is tasks.echo:
            if self.echo_peer is None:
                self.echo_peer = rawpipe.start_exec("echo")
            return self.echo_peer.echo(*args)
        if not self.fork_per_task:
            return self.peers[0].call(f, args)
        self._reap(os.WNOHANG)
        peer = rawpipe.start_fork("pickle")
        try:
            return peer.call(f, args)
        finally:
            # Reaped later, off the critical path, as a pool would do.
            pid, peer.pid = peer.pid, 0
            peer.close()
            self.unreaped.append(pid)

    def _reap(self, flags: int) -> None:
        for pid in list(self.unreaped):
            try:
                done = os.waitpid(pid, flags)[0]
            except ChildProcessError:
                done = pid  # gevent's SIGCHLD watcher reaped it already
            if done:
                self.unreaped.remove(pid)

    def map(self, f: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        import gevent
        from benchmarks import rawpipe, tasks
        batches = rawpipe.split(items, len(self.peers))
        jobs = [gevent.spawn(peer.call, tasks.map_chunk, (f, batch))
                for peer, batch in zip(self.peers, batches)]
        gevent.joinall(jobs, raise_error=True)
        return [x for job in jobs for x in job.value]

    def concurrent(self, f: Callable[[Any], Any], items: List[Any], callers: int) -> List[Any]:
        import gevent
        results: List[Any] = [None] * len(items)
        todo = iter(range(len(items)))

        def drive(peer: Any) -> None:
            for i in todo:
                results[i] = peer.call(f, (items[i],))

        gevent.joinall([gevent.spawn(drive, peer) for peer in self.peers], raise_error=True)
        return results

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        if self.echo_peer is not None:
            self.echo_peer.close()
        self._reap(0)


class ExecContender(Contender):
    """Reference for R and S: a fresh interpreter start, `python -c pass`, no pool, no task."""

    key = "exec"
    label = "exec `python -c pass`"
    reference = True
    workloads = ("R", "S")
    not_applicable = "reference for R and S only"
    note = "a fresh interpreter start and exit; no task"

    def open(self, workers: int, max_reqs: int = 0) -> None:
        pass

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return f(*args)  # in this process: the workloads check results

    def close(self) -> None:
        pass


def _importable(name: str) -> Optional[str]:
    import importlib.util
    return None if importlib.util.find_spec(name) else f"{name} is not installed (pip install '.[bench]')"


CONTENDERS: Dict[str, Type[Contender]] = {
    c.key: c for c in (GprocpoolContender, RawPipeContender, MultiprocessingContender,
                       ProcessPoolExecutorContender, PebbleContender, LokyContender, ExecContender)
}
