"""Deferred results and pipelines: the asynchronous faces of the pool."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional

from gevent.event import AsyncResult
from gevent.queue import Queue

from ._errors import PipelineClosed, TaskCancelled

if TYPE_CHECKING:
    from ._pool import Pool, _Call

log = logging.getLogger("gprocpool")

_END: Any = object()


class Deferred:
    """The future result of a task submitted with ``Pool.defer`` or ``Pool.queue``.

    Calling it (``d()``) waits, in the calling greenlet only, and returns the result or
    raises the task's error.  It works with ``gevent.wait([...])`` and ``gevent.iwait``.
    """

    def __init__(self, call: "_Call", callback: Optional[Callable[[Any], Any]] = None,
                 error_callback: Optional[Callable[[BaseException], Any]] = None,
                 log_errors: bool = False) -> None:
        self._call = call
        self._result = AsyncResult()
        self._callback = callback
        self._error_callback = error_callback
        self._log_errors = log_errors
        self._links: Dict[Callable[[Any], Any], Callable[[Any], Any]] = {}
        self._greenlet: Any = None
        self._pool: Optional["Pool"] = None

    def __call__(self) -> Any:
        return self.get()

    def get(self, timeout: Optional[float] = None) -> Any:
        """Waits for the task and returns its result or raises its error.

        Raises:
            TimeoutError: the task did not finish within ``timeout`` seconds (it keeps running).
        """
        if not self._result.ready():
            self._result.wait(timeout)
            if not self._result.ready():
                raise TimeoutError(f"the task did not finish within {timeout} s")
        return self._result.get(block=False)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits until the task has finished; returns whether it has."""
        self._result.wait(timeout)
        return self._result.ready()

    def ready(self) -> bool:
        """True once the task has finished (successfully or not)."""
        return self._result.ready()

    def successful(self) -> bool:
        """True if the task finished and returned a result."""
        return self._result.successful()

    @property
    def exception(self) -> Optional[BaseException]:
        """The task's error once it failed; None while pending or after success."""
        return self._result.exception

    @property
    def value(self) -> Any:
        """The result once it succeeded; None otherwise."""
        return self._result.value

    def cancel(self) -> bool:
        """Cancels the task: a queued one never runs, a running one has its worker killed.

        Returns:
            False if the task had already finished, else True (waiters get TaskCancelled).
        """
        if self._result.ready():
            return False
        from ._pool import Pool
        Pool._cancel_call(self._call, TaskCancelled("the task was cancelled"))
        return True

    # gevent.wait()/iwait() protocol: callbacks receive this Deferred, not the AsyncResult.
    def rawlink(self, callback: Callable[[Any], Any]) -> None:
        def relay(_result: Any, callback: Callable[[Any], Any] = callback) -> None:
            callback(self)
        self._links[callback] = relay
        self._result.rawlink(relay)

    def unlink(self, callback: Callable[[Any], Any]) -> None:
        relay = self._links.pop(callback, None)
        if relay is not None:
            self._result.unlink(relay)

    def _settle(self, value: Any, exc: Optional[BaseException]) -> None:
        if self._result.ready():
            return
        if exc is None:
            self._result.set(value)
            if self._callback is not None:
                self._run_callback(self._callback, value)
            return
        self._result.set_exception(exc)
        if self._error_callback is not None:
            self._run_callback(self._error_callback, exc)
        elif self._log_errors:
            log.error("a queued task failed and has no error_callback: %s: %s",
                      type(exc).__name__, exc, exc_info=exc)

    @staticmethod
    def _run_callback(callback: Callable[[Any], Any], arg: Any) -> None:
        try:
            callback(arg)
        except Exception:  # noqa: BLE001 - a callback's bug must not break the pool
            log.exception("a task callback raised")

    def __repr__(self) -> str:
        state = "pending"
        if self._result.ready():
            state = "done" if self._result.successful() else f"failed ({type(self.exception).__name__})"
        return f"<gprocpool.Deferred {state}>"


class Pipeline:
    """Queue tasks and iterate their results in completion order.

    ``for result in pipe`` (or ``next(pipe)``) yields each result as its task completes,
    raising a failed task's error at that point.  Iteration ends once the pipeline is
    shut down and every queued result has been taken.

    Args:
        pool: the pool that runs the tasks.
        auto_shutdown: close the pipeline when the last pending task completes.
    """

    def __init__(self, pool: "Pool", auto_shutdown: bool = False) -> None:
        if pool is None:
            raise TypeError("Pipeline needs a pool")
        self._pool = pool
        self._auto_shutdown = bool(auto_shutdown)
        self._done: Queue = Queue()
        self._pending = 0
        self._closed = False
        self._ended = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Tasks queued whose results have not completed yet."""
        return self._pending

    def queue(self, f: Any, args: Any = (), *, kwargs: Optional[Dict[str, Any]] = None,
              timeout: Optional[float] = None, **options: Any) -> Deferred:
        """Submits a task; returns its Deferred.

        Raises:
            PipelineClosed: the pipeline was shut down.
        """
        if self._closed:
            raise PipelineClosed("the pipeline is shut down; no more tasks can be queued")
        deferred = self._pool.defer(f, args, timeout, kwargs=kwargs, **options)
        self._pending += 1
        deferred.rawlink(self._completed)
        return deferred

    def _completed(self, deferred: Deferred) -> None:
        self._pending -= 1
        self._done.put(deferred)
        if self._pending == 0 and (self._closed or self._auto_shutdown):
            self._close()

    def shutdown(self) -> None:
        """Closes the pipeline: no more tasks; iteration ends after the pending results."""
        if not self._closed:
            self._closed = True
            if self._pending == 0:
                self._close()

    def _close(self) -> None:
        self._closed = True
        if not self._ended:
            self._ended = True
            self._done.put(_END)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._done.get()
        if item is _END:
            self._done.put(_END)  # every later next() ends too
            raise StopIteration
        return item.get()

    next = __next__
