"""The pool: the one owner of the workers, the idle queue and the accounting.

Data flow::

    caller greenlet                      Pool                          worker process
    ---------------                      ----                          --------------
    process(f, args) --encode f, args--> _Call
                     <--- slot (LIFO) ---  _slots: LifoQueue of Worker|None
                       None: spawn -----> Template --fork--> new worker (blocking loop)
                     --- TASK frame ---------------------------------> task pipe
                       (only this greenlet waits on the result pipe)
                     <-- REPLY frame(s) ------------------------------ result pipe
                     --- slot back ---->  _slots
    result / error <--

``_slots`` holds exactly ``max_procs`` tokens: a live idle Worker, or None for a worker
not started yet.  Taking a token is the only way to use a worker, so ``max_procs`` is
never exceeded, and waiting for a token is where the acquisition ``timeout`` applies.
Live workers are taken before None tokens (LIFO), so workers start only when needed.

``defer`` and ``queue`` run the same path in a greenlet of their own; ``map`` runs it
in up to ``max_procs`` lane greenlets, each sending chunks of items.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import types
import weakref
from collections import OrderedDict, deque
from itertools import count
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Union

import dill
import gevent
from gevent import getcurrent
from gevent.event import Event
from gevent.hub import get_hub
from gevent.lock import Semaphore
from gevent.queue import Empty, LifoQueue, Queue

from . import _serial, _wire
from ._deferred import Deferred, Pipeline
from ._errors import AcquireTimeout, SerializationError, TaskCancelled
from ._spawner import Template
from ._worker import PENDING, Failure, Worker

log = logging.getLogger("gprocpool")

_UNSET: Any = object()
# A map sends chunks sized so one takes about this long in the worker: long enough to
# amortise the round trip, short enough to balance the load and keep results flowing.
CHUNK_TARGET = 0.02
MAX_CHUNK = 10000
# Distinct functions remembered by id per pool (each keeps its encoded bytes).
FID_TABLE_SIZE = 1024

TaskFunction = Union[Callable[..., Any], str]
REPLACE_REASONS = ("max_reqs", "max_memory", "crash", "timeout", "cancelled", "init")

# Every pool of this process, so a forked child can cut its ties to them at once.
_live_pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Runs right after fork() in the child (gevent.fork, os.fork, multiprocessing...).
    # Greenlets of the parent live on in a gevent.fork child; without this, one of them
    # could read the parent's replies or the template's reports.  The pools start
    # afresh in the child on first use.
    for pool in list(_live_pools):
        try:
            pool._sever_after_fork()
        except Exception:  # noqa: BLE001 - never break the child's fork
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Call:
    """One unit of work on one worker: a process/defer/queue call, or a chunk of a map."""

    __slots__ = ("fid", "fn_blob", "mode", "payload", "flags", "count", "acquire_timeout",
                 "task_timeout", "results", "greenlet", "cancelled", "finished", "event",
                 "running", "on_done", "failed")

    def __init__(self, fid: int, fn_blob: bytes, mode: int, payload: List[Any], flags: int,
                 count: int, acquire_timeout: Optional[float], task_timeout: Optional[float]) -> None:
        self.fid = fid
        self.fn_blob = fn_blob
        self.mode = mode
        self.payload = payload
        self.flags = flags
        self.count = count
        self.acquire_timeout = acquire_timeout
        self.task_timeout = task_timeout
        self.results: List[Any] = [PENDING] * count
        self.greenlet: Any = None
        self.cancelled: Optional[BaseException] = None
        self.finished = False
        self.event: Optional[Event] = None
        self.running = False       # a worker has it
        self.failed = 0            # how many of its items failed (set when it ends)
        # Called with the number of items that just finished (progress reporting).
        self.on_done: Optional[Callable[[int], None]] = None

    def finish(self) -> None:
        self.finished = True
        if self.event is not None:
            self.event.set()

    def wait(self, timeout: Optional[float]) -> bool:
        if self.finished:
            return True
        if self.event is None:
            self.event = Event()
        return self.event.wait(timeout)

    def outcome(self, index: int = 0) -> Any:
        value = self.results[index]
        if isinstance(value, Failure):
            raise value.exc
        return value


def _check_number(name: str, value: Any, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if value < 0 or math.isnan(value):
        raise ValueError(f"{name} must be >= 0, not {value!r}")
    return float(value)


BACKENDS = ("local", "ray")


def _check_backend(backend: Any, ray_address: Any, ray_init_kwargs: Any, max_memory: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
    if backend != "ray":
        if ray_address is not None or ray_init_kwargs is not None:
            raise TypeError("ray_address and ray_init_kwargs apply only to backend='ray'")
        return
    if ray_address is not None and not isinstance(ray_address, str):
        raise TypeError(f"ray_address must be a string or None, not {type(ray_address).__name__}")
    if ray_init_kwargs is not None:
        if not isinstance(ray_init_kwargs, dict):
            raise TypeError(f"ray_init_kwargs must be a dict or None, not {type(ray_init_kwargs).__name__}")
        if "address" in ray_init_kwargs:
            raise ValueError("pass the cluster's address as ray_address, not in ray_init_kwargs")
        import pickle
        try:
            pickle.dumps(ray_init_kwargs)  # they travel to the gateway process
        except Exception as exc:
            raise TypeError(f"ray_init_kwargs must be picklable: {type(exc).__name__}: {exc}") from None
    if max_memory is not None:
        raise ValueError("max_memory does not apply to backend='ray' (Ray's own memory monitor does)")
    import importlib.util
    if importlib.util.find_spec("ray") is None:  # looked up, never imported here
        raise ImportError("backend='ray' needs Ray: pip install 'gprocpool[ray]'")


def _check_callable(f: Any) -> None:
    if isinstance(f, str):
        _serial.check_task_name(f)
    elif not callable(f):
        raise TypeError(f"f must be a callable or a task name string, not {type(f).__name__}")


def _check_args(args: Any, kwargs: Any) -> None:
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"args must be a list or tuple of positional arguments, not "
                        f"{type(args).__name__} (for one argument x, pass args=(x,))")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, not {type(kwargs).__name__}")


class Pool:
    """A pool of worker processes for gevent programs.

    Workers start lazily, as tasks need them, up to ``max_procs``.  Every blocking method
    blocks only the calling greenlet; the rest of the program keeps running.

    Args:
        max_procs: most worker processes at once; None or 0 means the CPU count.
        max_reqs: replace a worker after it has run this many tasks; 0 or None: never.
        include: directories put at the front of the workers' ``sys.path``.
        initializer: called as ``initializer(*initargs)`` once in each new worker.
        initargs: arguments for ``initializer``.
        task_timeout: default run-time limit of each task in seconds (None: no limit).
        max_memory: replace a worker whose RSS exceeds this many bytes after a task.
        backend: ``"local"``: worker processes on this machine; ``"ray"``: tasks run
            on Ray through one gateway process (needs the ``ray`` extra; ``max_reqs``
            becomes Ray's ``max_calls``; ``max_memory`` does not apply).
        ray_address: with ``backend="ray"``: a cluster's address, or None to start a
            private local Ray on first use (loopback only, stopped on shutdown).
        ray_init_kwargs: with ``backend="ray"``: more keyword arguments for ``ray.init``.

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
    """

    def __init__(self, max_procs: Optional[int] = None, max_reqs: Optional[int] = 0,
                 include: Sequence[str] = (), *, initializer: Optional[Callable[..., Any]] = None,
                 initargs: Sequence[Any] = (), task_timeout: Optional[float] = None,
                 max_memory: Optional[int] = None, backend: str = "local",
                 ray_address: Optional[str] = None,
                 ray_init_kwargs: Optional[Dict[str, Any]] = None) -> None:
        if max_procs is not None and (isinstance(max_procs, bool) or not isinstance(max_procs, int)):
            raise TypeError(f"max_procs must be an int or None, not {type(max_procs).__name__}")
        if max_procs is not None and max_procs < 0:
            raise ValueError(f"max_procs must be >= 0 (0 or None: the CPU count), not {max_procs}")
        if max_reqs is not None and (isinstance(max_reqs, bool) or not isinstance(max_reqs, int)):
            raise TypeError(f"max_reqs must be an int or None, not {type(max_reqs).__name__}")
        if max_reqs is not None and max_reqs < 0:
            raise ValueError(f"max_reqs must be >= 0 (0 or None: unlimited), not {max_reqs}")
        if isinstance(include, str) or not isinstance(include, (list, tuple)):
            raise TypeError(f"include must be a list or tuple of directories, not {type(include).__name__}")
        for path in include:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"include entries must be paths, not {type(path).__name__}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        if not isinstance(initargs, (list, tuple)):
            raise TypeError(f"initargs must be a list or tuple, not {type(initargs).__name__}")
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                       or max_memory <= 0):
            raise ValueError(f"max_memory must be a positive number of bytes or None, not {max_memory!r}")
        _check_backend(backend, ray_address, ray_init_kwargs, max_memory)

        self.max_procs: int = max_procs or os.cpu_count() or 1
        self.max_reqs: int = max_reqs or 0
        self.include: List[str] = [os.path.abspath(os.fspath(p)) for p in include]
        self.task_timeout: Optional[float] = _check_number("task_timeout", task_timeout)
        self.max_memory: Optional[int] = max_memory
        self._initializer_blob: Optional[bytes] = None
        if initializer is not None:
            try:
                self._initializer_blob = dill.dumps((initializer, tuple(initargs)),
                                                    protocol=_serial.PROTOCOL, recurse=True)
            except Exception as exc:
                raise SerializationError(f"the initializer or its initargs could not be serialized: "
                                         f"{type(exc).__name__}: {exc}", stage="initializer") from exc
        self._reset_state()
        self._shutdown_lock = Semaphore()
        _live_pools.add(self)
        self.backend = backend
        self._ray: Any = None
        if backend == "ray":
            from ._ray import RayBackend
            self._ray = RayBackend(self.max_procs, self.max_reqs, ray_address, ray_init_kwargs or {},
                                   self._worker_sys_path, self.include, self._initializer_blob)

    def _reset_state(self) -> None:
        # The process that owns the workers: a forked child must not touch them.
        self._owner_pid = os.getpid()
        self._slots: LifoQueue = LifoQueue()
        for _ in range(self.max_procs):
            self._slots.put(None)
        self._template: Optional[Template] = None
        self._template_lock = Semaphore()
        self._workers: Dict[int, Worker] = {}
        self._reapers: Set[gevent.Greenlet] = set()
        # Every call submitted and not finished yet (join waits for a snapshot of it).
        self._calls: Set[_Call] = set()
        self._fids: "OrderedDict[bytes, int]" = OrderedDict()
        self._fid_counter = count(1)
        self._by_reference: "weakref.WeakKeyDictionary[Any, bytes]" = weakref.WeakKeyDictionary()
        # Counters for stats().
        self._waiting = 0
        self._completed = 0
        self._failed = 0
        self._started = 0
        self._replaced: Dict[str, int] = {reason: 0 for reason in REPLACE_REASONS}

    # -- public API -----------------------------------------------------------------------

    def process(self, f: TaskFunction, args: Sequence[Any] = (), timeout: Optional[float] = None, *,
                kwargs: Optional[Dict[str, Any]] = None, task_timeout: Optional[float] = _UNSET) -> Any:
        """Runs ``f(*args, **kwargs)`` in a worker and returns its result.

        Only the calling greenlet waits.  ``f`` may be any callable dill can carry or a
        task name (``"pkg.module:Name"``); a class name runs ``Name(*args, **kwargs).run()``.

        Args:
            f: the function, callable or task name.
            args: positional arguments, a list or tuple.
            timeout: bounds only the wait for a free worker (seconds).
            kwargs: keyword arguments.
            task_timeout: run-time limit for this call (default: the pool's).

        Raises:
            AcquireTimeout: no worker was free within ``timeout``; nothing ran.
            TaskTimeout: the task ran past ``task_timeout``.
            WorkerLost: the worker died while running the task.
            SerializationError: the function, an argument or the result cannot travel.
            RemoteError: the task's exception could not be carried back as itself.
            Exception: whatever the task raised, with the worker's traceback as ``__cause__``.
        """
        call = self._make_call(f, args, kwargs, timeout, task_timeout)
        self._execute(call)
        return call.outcome()

    def defer(self, f: TaskFunction, args: Sequence[Any] = (), timeout: Optional[float] = None, *,
              kwargs: Optional[Dict[str, Any]] = None, task_timeout: Optional[float] = _UNSET) -> Deferred:
        """Submits a task and returns a :class:`Deferred` at once, without yielding.

        The task's error (or AcquireTimeout, WorkerLost, ...) is raised only when the
        result is asked for.  Bad arguments (wrong types, unserializable values) raise here.
        """
        call = self._make_call(f, args, kwargs, timeout, task_timeout)
        return self._submit(Deferred(call))

    def queue(self, f: TaskFunction, args: Sequence[Any] = (), callback: Optional[Callable[[Any], Any]] = None,
              error_callback: Optional[Callable[[BaseException], Any]] = None, *,
              kwargs: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None,
              task_timeout: Optional[float] = _UNSET) -> Deferred:
        """Submits a task without yielding; ``callback(result)`` or ``error_callback(exc)`` runs when it ends.

        A failure with no ``error_callback`` is logged on the ``gprocpool`` logger.
        Callbacks run in the task's own greenlet and may block cooperatively.
        """
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if error_callback is not None and not callable(error_callback):
            raise TypeError(f"error_callback must be callable, not {type(error_callback).__name__}")
        call = self._make_call(f, args, kwargs, timeout, task_timeout)
        return self._submit(Deferred(call, callback, error_callback, log_errors=True))

    def map(self, f: TaskFunction, iterable: Iterable[Any], *, timeout: Optional[float] = None,
            task_timeout: Optional[float] = _UNSET, chunksize: Optional[int] = None,
            progress: Any = None) -> List[Any]:
        """Returns ``[f(x) for x in iterable]`` computed in the workers, in input order.

        Each item gives exactly one result (a task returning a list stays one item).
        Items are sent in chunks sized from measured task times (or ``chunksize``).
        If items fail, raises the error of the first failing item in input order, after
        every item sent so far has finished.

        Args:
            progress: None; True for a tqdm progress bar (needs the ``progress`` extra);
                or a callable ``progress(done, total)`` called as items finish.

        Raises:
            The first failing item's error, or AcquireTimeout / SerializationError.
        """
        _check_callable(f)
        try:
            items = list(iterable)
        except TypeError:
            if not hasattr(iterable, "__iter__"):
                raise TypeError(f"map() needs an iterable, not {type(iterable).__name__}") from None
            raise
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                      or chunksize < 1):
            raise ValueError(f"chunksize must be a positive int or None, not {chunksize!r}")
        acquire_timeout = _check_number("timeout", timeout)
        run_timeout = self._task_timeout(task_timeout)
        reporter = _Progress.make(progress, len(items))
        if not items:
            reporter.close()
            return []
        fid, blob = self._encode_fn(f)
        try:
            return _MapRun(self, fid, blob, items, acquire_timeout, run_timeout, chunksize, reporter).run()
        finally:
            reporter.close()

    def imap(self, f: TaskFunction, iterable: Iterable[Any], ordered: bool = True,
             max_inflight: Optional[int] = None, *, timeout: Optional[float] = None,
             task_timeout: Optional[float] = _UNSET, progress: Any = None) -> Iterator[Any]:
        """Yields ``f(x)`` for each x as results become ready, consuming the input lazily.

        At most ``max_inflight`` items (default ``2 * max_procs``) are submitted ahead of
        what has been yielded, so an endless input is fine and memory stays bounded.
        Breaking out of the loop (or closing the iterator) cancels the tasks still queued.

        Args:
            ordered: True: results in input order; False: in completion order.
            max_inflight: most items submitted and not yet yielded.
            progress: as for :meth:`map` (the total is ``len(iterable)`` if it has one).

        Raises:
            A failed item's error when that item's turn comes (then the iteration ends);
            whatever the input iterator raises.
        """
        _check_callable(f)
        if max_inflight is None:
            max_inflight = 2 * self.max_procs
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"max_inflight must be a positive int, not {max_inflight!r}")
        try:
            source = iter(iterable)
        except TypeError:
            raise TypeError(f"imap() needs an iterable, not {type(iterable).__name__}") from None
        acquire_timeout = _check_number("timeout", timeout)
        run_timeout = self._task_timeout(task_timeout)
        try:
            total: Optional[int] = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        reporter = _Progress.make(progress, total)
        fid, blob = self._encode_fn(f)
        return self._imap(fid, blob, source, ordered, max_inflight, acquire_timeout, run_timeout, reporter)

    def _imap(self, fid: int, blob: bytes, source: Iterator[Any], ordered: bool, max_inflight: int,
              acquire_timeout: Optional[float], task_timeout: Optional[float],
              reporter: "_Progress") -> Iterator[Any]:
        inflight: "deque[Deferred]" = deque()
        finished: Queue = Queue()
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < max_inflight:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        payload, used_dill = _serial.dumps_parts([item])
                    except SerializationError as exc:
                        raise SerializationError(f"an input item could not be serialized: {exc}",
                                                 stage="arguments") from exc.__cause__
                    call = _Call(fid, blob, _wire.MODE_MAP, payload, _wire.FLAG_DILL if used_dill else 0,
                                 1, acquire_timeout, task_timeout)
                    call.on_done = reporter.advance
                    self._calls.add(call)
                    deferred = self._submit(Deferred(call))
                    if not ordered:
                        deferred.rawlink(finished.put)
                    inflight.append(deferred)
                if not inflight:
                    return
                if ordered:
                    deferred = inflight.popleft()
                else:
                    deferred = finished.get()
                    inflight.remove(deferred)
                yield deferred.get()
        finally:
            # Closed early (break, error, garbage collection): what has not started never will;
            # what runs finishes on its own and its result is dropped.
            for deferred in inflight:
                if not deferred._call.running:
                    deferred.cancel()
            reporter.close()

    def stats(self) -> Dict[str, Any]:
        """A JSON-serializable snapshot of the pool.

        Returns:
            ``max_procs``; ``workers`` (live processes), ``idle``, ``busy``; ``queued``
            (calls waiting for a worker); ``tasks_completed`` and ``tasks_failed`` (items);
            ``workers_started``; ``workers_replaced`` by reason (``max_reqs``,
            ``max_memory``, ``crash``, ``timeout``, ``cancelled``, ``init``); and
            ``per_worker``: a list of ``{pid, tasks, rss, busy, age}`` (rss in bytes from
            psutil, None if unknown; age in seconds).
        """
        now = time.monotonic()
        live = [w for w in self._workers.values() if w.usable]
        per_worker = [{"pid": w.pid, "tasks": w.served, "rss": w.rss(), "busy": w.busy,
                       "age": round(now - w.started, 3)} for w in live]
        busy = sum(1 for w in live if w.busy)
        return {
            "max_procs": self.max_procs,
            "workers": len(live),
            "idle": len(live) - busy,
            "busy": busy,
            "queued": self._waiting,
            "tasks_completed": self._completed,
            "tasks_failed": self._failed,
            "workers_started": self._started,
            "workers_replaced": dict(self._replaced),
            "per_worker": per_worker,
        }

    def join(self, timeout: Optional[float] = None) -> bool:
        """Waits until every task outstanding at this call has finished.

        Returns:
            True if they all finished, False if ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for call in list(self._calls):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not call.wait(remaining):
                return False
        return True

    def pipeline(self, auto_shutdown: bool = False) -> Pipeline:
        """Returns a :class:`Pipeline` on this pool: queue tasks, iterate results as they complete."""
        return Pipeline(self, auto_shutdown=auto_shutdown)

    def shutdown(self, wait: bool = True) -> None:
        """Stops every worker; the pool can be used again afterwards (workers respawn on demand).

        Args:
            wait: True: tasks already submitted finish and deliver their results first.
                False: queued and running tasks fail with TaskCancelled and workers are
                killed (SIGTERM, then SIGKILL after a short grace).
        """
        if self._owner_pid != os.getpid():
            self._forget_inherited()   # the parent's workers are not ours to stop
        with self._shutdown_lock:
            if (self._template is None and not self._workers and not self._calls
                    and not (self._ray is not None and self._ray.running)):
                return
            if wait:
                self.join()
            else:
                for call in list(self._calls):
                    self._cancel_call(call, TaskCancelled("the pool was shut down (wait=False)"))
            # Taking every token guarantees nobody is using a worker any more.
            tokens = [self._slots.get() for _ in range(self.max_procs)]
            for worker in tokens:
                if worker is not None:
                    if wait:
                        worker.retire("shutdown")
                    else:
                        worker.kill("shutdown")
                    self._start_reaper(worker)
            for reaper in list(self._reapers):
                reaper.join()
            template = self._template
            self._template = None
            if template is not None:
                template.stop()
            if self._ray is not None:
                self._ray.stop()
            for _ in tokens:
                self._slots.put(None)
            log.debug("pool shut down")

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown(wait=True)

    def _sever_after_fork(self) -> None:
        for worker in self._workers.values():
            worker.channel.sever()
        if self._template is not None:
            self._template.sever()

    def _forget_inherited(self) -> None:
        """In a forked child: drop the parent's workers (closing only our copies of their fds)."""
        log.debug("pool used in a forked child process; starting afresh")
        for worker in self._workers.values():
            worker.channel.detach_after_fork()
        if self._template is not None:
            self._template.detach_after_fork()
        if self._ray is not None:
            self._ray.detach_after_fork()
        self._reset_state()

    def __del__(self) -> None:
        # A pool dropped without shutdown(): close the pipes and the template's control
        # socket without waiting; workers read EOF and exit, the template sees EOF, kills
        # what is left and exits.  Nothing here may block or switch greenlets.
        try:
            if getattr(self, "_owner_pid", None) != os.getpid():
                return
            for worker in list(self._workers.values()):
                worker.channel.detach_after_fork()
            if self._template is not None:
                self._template.detach_after_fork()
            if getattr(self, "_ray", None) is not None:
                self._ray.detach_after_fork()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down
            pass

    def __repr__(self) -> str:
        return (f"<gprocpool.Pool max_procs={self.max_procs} max_reqs={self.max_reqs} "
                f"workers={len(self._workers)}>")

    # -- building calls -------------------------------------------------------------------

    def _task_timeout(self, task_timeout: Any) -> Optional[float]:
        if task_timeout is _UNSET:
            return self.task_timeout
        return _check_number("task_timeout", task_timeout)

    def _encode_fn(self, f: TaskFunction) -> tuple:
        """Returns (fid, blob): the function's bytes and the pool's short id for them."""
        # A function sent by reference (module and name) encodes the same forever, so its
        # bytes are remembered.  Anything sent by value is encoded on every call, so a
        # closure or __main__ function carries the current values of what it captured;
        # the bytes key the function id, so an unchanged one is still not sent again.
        plain = type(f) is types.FunctionType
        blob = self._by_reference.get(f) if plain else None
        if blob is None:
            blob = _serial.encode_callable(f)
            if plain and blob[:1] == b"P":
                self._by_reference[f] = blob
        fids = self._fids
        fid = fids.get(blob)
        if fid is None:
            fid = fids[blob] = next(self._fid_counter)
            if len(fids) > FID_TABLE_SIZE:
                fids.popitem(last=False)
        else:
            fids.move_to_end(blob)
        return fid, blob

    def _make_call(self, f: TaskFunction, args: Any, kwargs: Any, timeout: Any, task_timeout: Any) -> _Call:
        _check_callable(f)
        _check_args(args, kwargs)
        acquire_timeout = _check_number("timeout", timeout)
        run_timeout = self._task_timeout(task_timeout)
        fid, blob = self._encode_fn(f)
        item = (tuple(args), kwargs or None)
        try:
            payload, used_dill = _serial.dumps_parts([item])
        except SerializationError as exc:
            raise _explain([(f"argument {i}", v) for i, v in enumerate(args)] +
                           [(f"keyword argument {k!r}", v) for k, v in (kwargs or {}).items()],
                           "the arguments") from exc.__cause__
        call = _Call(fid, blob, _wire.MODE_CALL, payload, _wire.FLAG_DILL if used_dill else 0, 1,
                     acquire_timeout, run_timeout)
        self._calls.add(call)
        return call

    # -- running calls --------------------------------------------------------------------

    def _execute(self, call: _Call) -> None:
        """Runs call on a worker in the calling greenlet; its outcome lands in call.results."""
        call.greenlet = getcurrent()
        self._calls.add(call)
        worker: Optional[Worker] = None
        acquired = False   # we hold a token from _slots (with or without a live worker)
        try:
            if call.cancelled is not None:
                raise call.cancelled
            worker = self._acquire(call)
            acquired = True
            call.running = True
            if not worker.run(call):
                # It had died while idle, so the task never reached it: one fresh try.
                dead, worker = worker, None
                self._start_reaper(dead)
                worker = self._spawn()
                if not worker.run(call):
                    worker._lost(call)
            self._after_run(worker)
        except BaseException:
            self._failed += sum(1 for r in call.results if r is PENDING or isinstance(r, Failure))
            raise
        else:
            failed = call.failed = worker.failures
            self._failed += failed
            self._completed += call.count - failed
        finally:
            if acquired:
                self._release(worker)
            call.finish()
            self._calls.discard(call)

    def _acquire(self, call: _Call) -> Worker:
        if self._owner_pid != os.getpid():
            self._forget_inherited()
        self._waiting += 1
        try:
            token = self._slots.get(timeout=call.acquire_timeout)
        except Empty:
            raise AcquireTimeout(f"no worker became free within {call.acquire_timeout} s "
                                 f"(max_procs={self.max_procs})") from None
        finally:
            self._waiting -= 1
        try:
            if call.cancelled is not None:
                raise call.cancelled
            if (token is not None and self.max_reqs and self._ray is None
                    and token.served + call.count > self.max_reqs):
                # Would pass max_reqs: no worker pid ever serves more than max_reqs tasks.
                token.retire("max_reqs")
                self._start_reaper(token)
                token = None
            if token is None or not token.usable:
                token = self._spawn()
            return token
        except BaseException:
            self._slots.put(token if token is not None and token.usable else None)
            raise

    def _release(self, worker: Optional[Worker]) -> None:
        if worker is not None and worker.usable:
            self._slots.put(worker)
            return
        if worker is not None:
            self._start_reaper(worker)
        self._slots.put(None)

    def _after_run(self, worker: Worker) -> None:
        if not worker.usable or self._ray is not None:
            return  # Ray recycles its own workers (max_calls)
        if self.max_reqs and worker.served >= self.max_reqs:
            log.debug("worker %d served %d tasks (max_reqs); replacing it", worker.pid, worker.served)
            worker.retire("max_reqs")
        elif self.max_memory is not None:
            rss = worker.rss()
            if rss is not None and rss > self.max_memory:
                log.info("worker %d uses %d bytes (max_memory %d); replacing it",
                         worker.pid, rss, self.max_memory)
                worker.retire("max_memory")

    def _spawn(self) -> Worker:
        if self._ray is not None:
            return self._ray.slot()
        template = self._template
        if template is None or template.dead:
            with self._template_lock:
                template = self._template
                if template is None or template.dead:
                    template = Template({"sys_path": self._worker_sys_path(),
                                         "initializer": self._initializer_blob})
                    template.start()
                    self._template = template
        pid, read_fd, write_fd = template.spawn()
        worker = Worker(pid, read_fd, write_fd, template)
        self._workers[pid] = worker
        self._started += 1
        log.debug("worker %d started", pid)
        return worker

    def _worker_sys_path(self) -> List[str]:
        # Relative entries ('' included) resolve against the parent's working directory,
        # which the workers inherit too.
        path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        return self.include + [p for p in path if p not in self.include]

    def _start_reaper(self, worker: Worker) -> None:
        if worker.pid not in self._workers:
            return
        if worker.retire_reason in self._replaced:
            self._replaced[worker.retire_reason] += 1
        reaper = gevent.spawn(self._reap, worker)
        self._reapers.add(reaper)

    def _reap(self, worker: Worker) -> None:
        from ._worker import KILL_GRACE, RETIRE_GRACE
        try:
            code = worker.reap(KILL_GRACE if worker.retire_reason in ("timeout", "cancelled", "crash")
                               else RETIRE_GRACE)
            log.debug("worker %d exited (status %s, %s)", worker.pid, code, worker.retire_reason)
        finally:
            self._workers.pop(worker.pid, None)
            self._reapers.discard(getcurrent())

    @classmethod
    def _cancel_call(cls, call: _Call, exc: BaseException) -> None:
        """Fails call with exc: at once if queued, by killing its worker if running."""
        if call.finished or call.cancelled is not None:
            return
        call.cancelled = exc
        if call.greenlet is not None:
            get_hub().loop.run_callback(cls._throw_if_waiting, call)

    @staticmethod
    def _throw_if_waiting(call: _Call) -> None:
        # Runs in the hub: the call's greenlet is parked, and if the call has not finished
        # it is parked inside _execute, the only place the exception is meant to land.
        if not call.finished and call.greenlet is not None and not call.greenlet.dead:
            call.greenlet.throw(call.cancelled)

    def _submit(self, deferred: Deferred) -> Deferred:
        deferred._greenlet = gevent.spawn(self._run_deferred, deferred)
        return deferred

    def _run_deferred(self, deferred: Deferred) -> None:
        call = deferred._call
        try:
            self._execute(call)
            value = call.outcome()
        except Exception as exc:  # noqa: BLE001 - handed to whoever asks the Deferred
            deferred._settle(None, exc)
        except BaseException as exc:
            # Someone killed this greenlet: its waiters must not hang.
            deferred._settle(None, TaskCancelled(f"the task's greenlet was interrupted ({exc!r})"))
            raise
        else:
            deferred._settle(value, None)


def _explain(labelled: Iterable[Any], what: str) -> SerializationError:
    """Names the first (label, value) that cannot be serialized (only on the error path)."""
    for label, value in labelled:
        try:
            _serial.dumps(value)
        except SerializationError as exc:
            return SerializationError(f"{label} could not be serialized: {exc}", stage="arguments")
    return SerializationError(f"{what} could not be serialized", stage="arguments")


class _MapRun:
    """One map() call: lanes take chunks of the input and run them on workers."""

    def __init__(self, pool: Pool, fid: int, blob: bytes, items: List[Any],
                 acquire_timeout: Optional[float], task_timeout: Optional[float],
                 chunksize: Optional[int], reporter: "_Progress") -> None:
        self.pool = pool
        self.reporter = reporter
        self.fid = fid
        self.blob = blob
        self.items = items
        self.acquire_timeout = acquire_timeout
        self.task_timeout = task_timeout
        self.fixed_chunk = chunksize
        self.results: List[Any] = [PENDING] * len(items)
        self.next = 0
        self.first_failure = len(items)
        self.per_item: Optional[float] = None
        self.lanes = min(pool.max_procs, len(items))
        self.error: Optional[BaseException] = None

    def run(self) -> List[Any]:
        lanes = [gevent.spawn(self._lane) for _ in range(self.lanes)]
        try:
            gevent.joinall(lanes)
        finally:
            # Only if the caller was interrupted: stop the lanes (each kills its worker if
            # a chunk is in flight, so no result arrives later).
            gevent.killall([g for g in lanes if not g.dead], block=True)
        if self.error is not None:
            raise self.error
        results = self.results
        if self.first_failure < len(results):
            raise results[self.first_failure].exc
        return results

    def _chunk_size(self) -> int:
        remaining = len(self.items) - self.next
        if self.fixed_chunk:
            size = self.fixed_chunk
        elif self.per_item is None:
            # A small probe measures the task time; tiny tasks then get big chunks.
            size = max(1, min(16, len(self.items) // (8 * self.lanes)))
        else:
            # Capped by a share of the whole input, not of what remains: shrinking with
            # the remainder made the tail a long series of small round trips.
            size = int(CHUNK_TARGET / max(self.per_item, 1e-7))
            size = min(size, MAX_CHUNK, max(1, math.ceil(len(self.items) / (4 * self.lanes))))
        if self.pool.max_reqs:
            size = min(size, self.pool.max_reqs)
        return max(1, min(size, remaining))

    def _lane(self) -> None:
        # A lane never raises: a failure the hub would report as a crashed greenlet is
        # kept for run() to raise, and the other lanes stop after their current chunk.
        try:
            self._run_chunks()
        except Exception as exc:  # noqa: BLE001 - raised by run() in the caller
            if self.error is None:
                self.error = exc

    def _run_chunks(self) -> None:
        pool = self.pool
        while self.error is None and self.next < min(len(self.items), self.first_failure):
            start = self.next
            size = self._chunk_size()
            self.next = start + size
            chunk = self.items[start:start + size]
            try:
                payload, used_dill = _serial.dumps_parts(chunk)
            except SerializationError as exc:
                raise _explain(((f"item {start + i} of the input", v) for i, v in enumerate(chunk)),
                               "the input items") from exc.__cause__
            call = _Call(self.fid, self.blob, _wire.MODE_MAP, payload,
                         _wire.FLAG_DILL if used_dill else 0, size, self.acquire_timeout, self.task_timeout)
            call.on_done = self.reporter.advance
            pool._calls.add(call)
            began = time.monotonic()
            pool._execute(call)
            if not self.fixed_chunk:
                self.per_item = (time.monotonic() - began) / size
            self.results[start:start + size] = call.results
            if call.failed:
                for offset, value in enumerate(call.results):
                    if isinstance(value, Failure):
                        self.first_failure = min(self.first_failure, start + offset)
                        break


class _Progress:
    """Progress reporting for map/imap: a tqdm bar, a user callable, or nothing."""

    def __init__(self, callback: Optional[Callable[[int, Optional[int]], Any]], bar: Any,
                 total: Optional[int]) -> None:
        self.callback = callback
        self.bar = bar
        self.total = total
        self.done = 0

    @classmethod
    def make(cls, progress: Any, total: Optional[int]) -> "_Progress":
        if progress is None or progress is False:
            return cls(None, None, total)
        if progress is True:
            try:
                from tqdm import tqdm
            except ImportError:
                raise ImportError("progress=True needs tqdm: install the 'progress' extra "
                                  "(pip install 'gprocpool[progress]')") from None
            return cls(None, tqdm(total=total), total)
        if callable(progress):
            return cls(progress, None, total)
        raise TypeError(f"progress must be None, True or a callable(done, total), not {type(progress).__name__}")

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.callback is not None:
            try:
                self.callback(self.done, self.total)
            except Exception:  # noqa: BLE001 - a progress callback must not break the map
                log.exception("the progress callback raised")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
