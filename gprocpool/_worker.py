"""The parent's handle on one worker process: send a task, collect its replies, retire it.

A Worker is held by exactly one greenlet at a time (whoever took it from the pool's
idle queue), so its channel and counters need no locking.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

from gevent import Timeout

from . import _serial, _wire
from ._channel import Channel, ChannelClosed
from ._child import FN_CACHE_SIZE, TASK_PREFIX
from ._errors import (RemoteError, SerializationError, TaskTimeout, WorkerInitError,
                      WorkerLost)

if TYPE_CHECKING:
    from ._pool import _Call
    from ._spawner import Template

log = logging.getLogger("gprocpool")

# How long a worker told to stop (SIGTERM, or EOF on its task pipe) gets before SIGKILL.
KILL_GRACE = 1.0
RETIRE_GRACE = 5.0
# How long to wait for the template's exit report after a worker's pipe closed.
EXIT_REPORT_WAIT = 2.0


class _RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class Failure:
    """An item's outcome when it failed: wraps the exception to raise to the caller."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


PENDING: Any = object()


def _with_cause(exc: BaseException, tb: str) -> BaseException:
    if tb:
        exc.__cause__ = _RemoteTraceback(tb)
    return exc


def rebuild_error(blob: Any, type_name: str, message: str, tb: str) -> BaseException:
    """The exception a caller sees for a task that raised in the worker."""
    if blob is not None:
        try:
            exc = _serial.decode_exception(blob)
        except BaseException as err:  # noqa: BLE001 - e.g. a custom __init__ (cpython gh-79492);
            # a SystemExit from a __setstate__ must not stop the parent either
            exc = RemoteError(type_name, f"{message} (the exception could not be rebuilt in the "
                                         f"parent: {type(err).__name__}: {err})", tb)
        else:
            if not isinstance(exc, Exception):
                # KeyboardInterrupt, GeneratorExit, ... raised by a task must not stop the
                # parent: they come back as RemoteError.
                exc = RemoteError(type_name, message, tb)
    else:
        exc = RemoteError(type_name, message, tb)
    return _with_cause(exc, tb)


class FunctionMirror:
    """Mirror of a worker's function cache (same size, same LRU order as _child's), so a
    function is sent once per worker and referred to by its short id afterwards."""

    def __init__(self) -> None:
        self._fids: "OrderedDict[int, None]" = OrderedDict()

    def blob_to_send(self, fid: int, fn_blob: bytes) -> bytes:
        """The function's bytes if the other side lacks them, else b"" (use the cached one)."""
        fids = self._fids
        if fid in fids:
            fids.move_to_end(fid)
            return b""
        fids[fid] = None
        if len(fids) > FN_CACHE_SIZE:
            fids.popitem(last=False)
        return fn_blob


class Worker:
    """A live worker process.

    Attributes:
        pid: the process id.
        served: how many items it has run.
        usable: False once it must not take more tasks (retired, killed, dead).
        retire_reason: why it was taken out of service (``max_reqs``, ``max_memory``,
            ``crash``, ``timeout``, ``cancelled``, ``shutdown``) or None.
    """

    def __init__(self, pid: int, read_fd: int, write_fd: int, template: "Template") -> None:
        self.pid = pid
        self.channel = Channel(read_fd, write_fd)
        self.template = template
        self.served = 0
        self.usable = True
        self.busy = False
        self.retire_reason: Optional[str] = None
        self.started = time.monotonic()
        self.failures = 0          # items of the current call that failed
        self._known = FunctionMirror()

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} served={self.served}>"

    # -- running a task --------------------------------------------------------------

    def run(self, call: "_Call") -> bool:
        """Runs call's items here and fills ``call.results``.

        Worker failures (death, timeout, undecodable replies) are recorded as the
        outcome of the items they hit; the worker is then taken out of service.  Only
        exceptions thrown into the calling greenlet (cancellation, greenlet kill,
        gevent.Timeout) propagate, after the worker has been killed.

        Returns:
            False if the task could not be sent because the worker had already died
            (while idle): the task did not run and may be given to another worker.
        """
        self.busy = True
        self.failures = 0
        try:
            try:
                self._send(call)
            except ChannelClosed:
                # A worker only stops reading when it is gone, and it runs nothing
                # before it has read the whole frame.
                log.info("worker %d had exited while idle; replacing it", self.pid)
                self.channel.close()
                self.usable = False
                self.retire_reason = "crash"
                return False
            self._collect(call)
        except ChannelClosed:
            self._lost(call)
        except BaseException:
            # Interrupted with the task in flight: its result must never reach another task.
            self.kill("cancelled")
            raise
        finally:
            self.busy = False
        return True

    def _send(self, call: "_Call") -> None:
        fid = call.fid
        blob = self._known.blob_to_send(fid, call.fn_blob)
        prefix = TASK_PREFIX.pack(fid, len(blob), call.mode) + blob
        self.channel.send(_wire.TASK, call.flags, [prefix, *call.payload])

    def _collect(self, call: "_Call") -> None:
        results = call.results
        pending = call.count
        task_timeout = call.task_timeout
        on_done = call.on_done
        while pending:
            timer = Timeout(task_timeout) if task_timeout else None
            if timer is not None:
                timer.start()
            try:
                _kind, flags, body = self.channel.recv()
            except Timeout as t:
                if t is not timer:
                    raise
                self._timed_out(call, task_timeout)
                return
            finally:
                if timer is not None:
                    timer.close()
            try:
                entries = _serial.loads(body, bool(flags & _wire.FLAG_DILL))
                if getattr(body, "remaining", 0):
                    raise ValueError(f"{body.remaining} bytes left after the reply's pickle")
            except ChannelClosed:
                raise   # the worker died while a streamed reply was arriving
            except BaseException as exc:  # noqa: BLE001 - a result that fails to unpickle here
                # (even with SystemExit or KeyboardInterrupt: it must not stop the parent)
                err = SerializationError(
                    f"a result could not be deserialized in the parent: {type(exc).__name__}: {exc}",
                    stage="result (in parent)")
                err.__cause__ = exc
                self._fail_pending(call, err)
                # The rest of the reply stream cannot be trusted: replace the worker.
                self.kill("crash")
                return
            before = pending
            for index, status, payload in entries:
                if status == _wire.STATUS_OK:
                    n = len(payload)
                    results[index:index + n] = payload
                    pending -= n
                    self.served += n
                    continue
                error = self._entry_error(status, payload)
                if index == _wire.ALL_ITEMS:
                    n = self._fail_pending(call, error)   # reports its own progress
                    pending -= n
                    before -= n
                    if status == _wire.STATUS_INIT:
                        self.usable = False
                        self.retire_reason = "init"
                else:
                    results[index] = Failure(error)
                    pending -= 1
                    self.served += 1
                    self.failures += 1
            if on_done is not None:
                on_done(before - pending)

    def _entry_error(self, status: int, payload: Any) -> BaseException:
        if status == _wire.STATUS_ERROR:
            return rebuild_error(*payload)
        if status == _wire.STATUS_SERIAL:
            stage, type_name, message, tb = payload
            return _with_cause(SerializationError(f"{stage}: {type_name}: {message}" if type_name
                                                  else f"{stage}: {message}", stage=stage), tb)
        type_name, message, tb = payload
        return _with_cause(WorkerInitError(
            f"the pool's initializer failed in worker {self.pid}: {type_name}: {message}"), tb)

    def _fail_pending(self, call: "_Call", error: BaseException) -> int:
        results = call.results
        n = 0
        for i, value in enumerate(results):
            if value is PENDING:
                results[i] = Failure(error)
                n += 1
        self.failures += n
        if n and call.on_done is not None:
            call.on_done(n)
        return n

    def _timed_out(self, call: "_Call", task_timeout: float) -> None:
        self._fail_pending(call, TaskTimeout(
            f"task ran longer than its task_timeout of {task_timeout} s; worker {self.pid} was killed"))
        self.kill("timeout")

    def _lost(self, call: "_Call") -> None:
        self.channel.close()
        self.usable = False
        self.retire_reason = "crash"
        code = self.template.wait_exit(self.pid, EXIT_REPORT_WAIT)
        if code is None:
            # Alive but its pipe is gone (a task closed it?): it cannot serve anyone.
            self._signal(signal.SIGKILL)
            code = self.template.wait_exit(self.pid, EXIT_REPORT_WAIT)
        exitcode = sig = None
        if code is None:
            how = "exited"
        elif code < 0:
            sig = -code
            try:
                how = f"was killed by signal {sig} ({signal.Signals(sig).name})"
            except ValueError:
                how = f"was killed by signal {sig}"
        else:
            exitcode = code
            how = f"exited with code {code}"
        log.warning("worker %d %s while running a task", self.pid, how)
        self._fail_pending(call, WorkerLost(f"worker process {self.pid} {how} while running the task",
                                            pid=self.pid, exitcode=exitcode, signal=sig))

    # -- taking it out of service -----------------------------------------------------

    def _signal(self, sig: int) -> None:
        if not self.template.exited(self.pid):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def retire(self, reason: str) -> None:
        """Graceful: closes the pipes, the worker sees EOF and exits by itself."""
        if self.usable or self.retire_reason is None:
            self.retire_reason = reason
        self.usable = False
        self.channel.close()

    def kill(self, reason: str) -> None:
        """Stops the worker now: SIGTERM, and SIGKILL later if it ignores that (see reap)."""
        self.retire(reason)
        self._signal(signal.SIGTERM)

    def reap(self, grace: float) -> Optional[int]:
        """Waits for the worker to exit, SIGKILLs it after grace; returns its exit status."""
        code = self.template.wait_exit(self.pid, grace)
        if code is None and not self.template.exited(self.pid):
            log.info("worker %d did not exit within %.1f s; killing it", self.pid, grace)
            self._signal(signal.SIGKILL)
            code = self.template.wait_exit(self.pid, EXIT_REPORT_WAIT)
        return code

    def rss(self) -> Optional[int]:
        try:
            import psutil
            return psutil.Process(self.pid).memory_info().rss
        except Exception:  # noqa: BLE001 - the process may be gone
            return None
