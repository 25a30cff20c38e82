"""``gprocpool.Executor``: the pool behind the ``concurrent.futures.Executor`` interface.

Data flow::

    submit(fn, *args) --> _WorkItem --> _pending (deque)     futures are PENDING here,
                                            |                 so cancel() succeeds
                                            | popped by one of max_workers lane greenlets
                                            v
                          fut.set_running_or_notify_cancel()  --> RUNNING (or skipped)
                          pool.process(fn, args, kwargs)          only the lane waits
                          fut.set_result() / set_exception()      in the lane: done
                                                                  callbacks run there

A task reaches the pool only when a lane is free, and there are as many lanes as
workers, so a future is PENDING exactly until a worker is about to run it: the stdlib's
cancel semantics, with no need to cancel anything inside the pool.

Waiting.  ``Future.result()``, ``concurrent.futures.wait()`` and ``as_completed()``
block on ``threading`` primitives.  In a monkey-patched program those are gevent-aware:
the waiting greenlet parks and the hub keeps running the lanes.  Without monkey
patching they would block the whole thread, hub included, so the lanes could never
finish the future: a deadlock.  The futures made here avoid that: when ``threading`` is
not patched and the waiter is in the executor's own thread, ``result()`` and
``exception()`` wait on a gevent Event, and a ``wait()``/``as_completed()`` waiter gets a
gevent Event in place of its ``threading.Event`` when it registers with one of these
futures (``Future._waiters``, unchanged in CPython since 3.2).  From any other thread,
waiting is the stdlib's own.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures._base as _cf
import itertools
import os
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import gevent
from gevent import getcurrent, monkey
from gevent.event import Event

from ._pool import Pool

# The real thread id and Event class, even if the program is monkey-patched.
_real_get_ident = monkey.get_original("_thread", "get_ident")
_RealEvent = monkey.get_original("threading", "Event")


def _must_wait_cooperatively(owner_thread: int) -> bool:
    """True if a wait in this thread must yield to the hub by itself (threading unpatched)."""
    return not monkey.is_module_patched("threading") and _real_get_ident() == owner_thread


class _WaiterList(list):
    """``Future._waiters``: gives a wait()/as_completed() waiter a gevent Event when needed."""

    def __init__(self, owner_thread: int) -> None:
        super().__init__()
        self.owner_thread = owner_thread

    def append(self, waiter: Any) -> None:
        # Called by concurrent.futures.wait()/as_completed() in the waiting thread, before
        # they block on waiter.event; a gevent Event has the same wait/set/clear/is_set.
        if type(getattr(waiter, "event", None)) is _RealEvent and _must_wait_cooperatively(self.owner_thread):
            waiter.event = Event()
        super().append(waiter)


class _Future(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` whose waiting never blocks the gevent hub."""

    def __init__(self, owner_thread: int) -> None:
        super().__init__()
        self._gp_thread = owner_thread
        self._gp_event: Optional[Event] = None
        self._waiters = _WaiterList(owner_thread)

    def _gp_wait(self, timeout: Optional[float]) -> None:
        if self.done():
            return
        if self._gp_event is None:
            self._gp_event = Event()
        self._gp_event.wait(None if timeout is None else max(0.0, timeout))

    def _gp_notify(self) -> None:
        if self._gp_event is not None:
            self._gp_event.set()

    def result(self, timeout: Optional[float] = None) -> Any:
        if _must_wait_cooperatively(self._gp_thread):
            self._gp_wait(timeout)
            timeout = 0
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if _must_wait_cooperatively(self._gp_thread):
            self._gp_wait(timeout)
            timeout = 0
        return super().exception(timeout)

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._gp_notify()

    def set_exception(self, exception: Optional[BaseException]) -> None:
        super().set_exception(exception)
        self._gp_notify()

    def cancel(self) -> bool:
        """Cancels the future if it is still pending; returns whether it is cancelled."""
        if not super().cancel():
            return False
        with self._condition:
            if self._state == _cf.CANCELLED:
                # Tell wait()/as_completed() now rather than when a lane reaches the item:
                # that may be only after every task submitted before it.
                self.set_running_or_notify_cancel()
        self._gp_notify()
        return True


def _make_chunk_runner() -> Callable[..., List[Any]]:
    # Defined in a function so that it travels by value (dill): a worker that imported
    # gprocpool._executor by reference would pull in gevent for nothing.
    def run_chunk(fn: Callable[..., Any], chunk: List[Tuple[Any, ...]]) -> List[Any]:
        return [fn(*args) for args in chunk]
    return run_chunk


_run_chunk = _make_chunk_runner()


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: _Future, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def run(self, pool: Pool) -> None:
        try:
            value = pool.process(self.fn, self.args, kwargs=self.kwargs or None)
        except BaseException as exc:
            self.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # the lane itself was killed
        else:
            self.future.set_result(value)
        finally:
            self.fn = self.args = self.kwargs = None


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` that runs tasks in a :class:`gprocpool.Pool`.

    A drop-in for ``ProcessPoolExecutor``: ``submit()`` returns real
    ``concurrent.futures.Future`` objects, and ``result()``, ``wait()``, ``as_completed()``
    only block the calling greenlet, with or without monkey patching.  Use it from the
    thread that created it (any greenlet of that thread).

    Args:
        max_workers: most worker processes; None means the CPU count.
        pool_options: passed to :class:`gprocpool.Pool` (``max_reqs``, ``initializer``,
            ``initargs``, ``task_timeout``, ``max_memory``, ``include``).
            ``ProcessPoolExecutor``'s ``max_tasks_per_child`` is accepted as ``max_reqs``,
            and its ``mp_context`` is accepted and ignored (workers are always forked
            from a fresh template process, like the ``forkserver`` method).

    Raises:
        ValueError: ``max_workers`` is not positive.
        TypeError: an option is unknown or has the wrong type.

    A task's own exception comes back through its future with its own type (the
    worker's traceback as ``__cause__``); pool failures are :class:`PoolError`
    subclasses (``WorkerLost``, ``TaskTimeout``, ``WorkerInitError``, ...).
    """

    def __init__(self, max_workers: Optional[int] = None, **pool_options: Any) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if "max_procs" in pool_options:
            raise TypeError("give the number of workers as max_workers, not max_procs")
        pool_options.pop("mp_context", None)
        per_child = pool_options.pop("max_tasks_per_child", None)
        if per_child is not None:
            if "max_reqs" in pool_options:
                raise TypeError("give max_tasks_per_child or max_reqs, not both")
            if isinstance(per_child, bool) or not isinstance(per_child, int):
                raise TypeError("max_tasks_per_child must be an int or None")
            if per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            pool_options["max_reqs"] = per_child
        self._pool = Pool(max_workers, **pool_options)
        self._thread = _real_get_ident()
        self._pid = os.getpid()
        self._pending: Deque[_WorkItem] = deque()
        self._lanes: Set[gevent.Greenlet] = set()
        self._shutdown = False
        self._closer: Optional[gevent.Greenlet] = None
        _live.add(self)

    @property
    def pool(self) -> Pool:
        """The :class:`gprocpool.Pool` that runs the tasks (for ``stats()`` and the like)."""
        return self._pool

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedules ``fn(*args, **kwargs)`` in a worker; returns its Future at once, without yielding.

        Raises:
            RuntimeError: the executor is shut down, the interpreter is exiting, or the
                call comes from another thread than the one that created the executor.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if _real_get_ident() != self._thread:
            raise RuntimeError("gprocpool.Executor.submit() must be called from the thread that "
                               "created the executor (its gevent hub runs the tasks)")
        future = _Future(self._thread)
        self._pending.append(_WorkItem(future, fn, args, kwargs))
        self._add_lane()
        return future

    def _add_lane(self) -> None:
        if len(self._lanes) < self._pool.max_procs:
            self._lanes.add(gevent.spawn(self._lane))

    def _lane(self) -> None:
        # Runs queued items one after the other; ends when the queue is empty (submit()
        # starts a new lane when one is needed).
        pending = self._pending
        try:
            while pending:
                item = pending.popleft()
                future = item.future
                # Cancelled futures were already notified by _Future.cancel().
                if future._state != _cf.CANCELLED_AND_NOTIFIED and future.set_running_or_notify_cancel():
                    item.run(self._pool)
                del item, future
        finally:
            self._lanes.discard(getcurrent())
            if pending:
                self._add_lane()  # this lane was killed: the queue still needs one

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: Optional[float] = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Returns an iterator of ``fn(*args)`` for ``args`` in ``zip(*iterables)``, in order.

        Every task is submitted at once; results are yielded as they are asked for.
        ``chunksize > 1`` sends that many calls to a worker as one task.

        Raises (from the iterator):
            TimeoutError (``concurrent.futures.TimeoutError``): a result was not ready
                ``timeout`` seconds after the map() call; the tasks not started are cancelled.
            The first failing call's exception, in input order.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else time.monotonic() + timeout
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in zip(*iterables)]
        else:
            calls = zip(*iterables)
            futures = []
            while True:
                chunk = list(itertools.islice(calls, chunksize))
                if not chunk:
                    break
                futures.append(self.submit(_run_chunk, fn, chunk))
        return _results(futures, end_time, chunked=chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accepts no more tasks and stops the workers once the pending tasks have run.

        Args:
            wait: block the calling greenlet until every pending task has finished and
                every worker has exited; with False this happens in the background.
            cancel_futures: cancel the futures whose tasks have not started.

        Raises:
            RuntimeError: ``wait=True`` from a done callback of this executor's futures
                (the shutdown would wait for the callback itself).
        """
        self._shutdown = True
        if cancel_futures:
            while self._pending:
                self._pending.popleft().future.cancel()
        if self._closer is None:
            self._closer = gevent.spawn(self._close)
        if not wait or self._closer is getcurrent():
            return
        if getcurrent() in self._lanes:
            raise RuntimeError("shutdown(wait=True) from a done callback would wait for itself; "
                               "use shutdown(wait=False)")
        self._closer.get()

    def _close(self) -> None:
        while self._lanes:
            gevent.joinall(list(self._lanes))
        self._pool.shutdown(wait=True)
        _live.discard(self)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return (f"<gprocpool.Executor max_workers={self._pool.max_procs} {state} "
                f"pending={len(self._pending)}>")


def _results(futures: List[concurrent.futures.Future], end_time: Optional[float],
             chunked: bool) -> Iterator[Any]:
    try:
        futures.reverse()  # pop() from the end is O(1), and drops each reference as we go
        while futures:
            future = futures.pop()
            try:
                if end_time is None:
                    value = future.result()
                else:
                    value = future.result(end_time - time.monotonic())
            except BaseException:
                future.cancel()
                raise
            finally:
                del future
            if chunked:
                yield from value
            else:
                yield value
    finally:
        for future in futures:
            future.cancel()


# Like the stdlib, the program does not exit before the pending tasks have run.
_live: "weakref.WeakSet[Executor]" = weakref.WeakSet()
_exiting = False


def _shutdown_at_exit() -> None:
    global _exiting
    _exiting = True
    for executor in list(_live):
        # Not in a forked child (whose copy of the pool is not its own), nor in another thread.
        if executor._pid == os.getpid() and executor._thread == _real_get_ident():
            executor.shutdown(wait=True)


atexit.register(_shutdown_at_exit)
