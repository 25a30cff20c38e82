"""The exceptions gprocpool raises.

Every error the pool itself raises subclasses :class:`PoolError`, so a caller can tell a
pool failure from an exception raised by the task (which is re-raised with its own type).
"""
from __future__ import annotations

from typing import Optional


class PoolError(Exception):
    """Base class of every error raised by gprocpool itself."""


class AcquireTimeout(PoolError, TimeoutError):
    """No worker became free within the ``timeout`` given to the call; the task never ran."""


class TaskTimeout(PoolError, TimeoutError):
    """The task ran longer than its ``task_timeout``; its worker was killed and replaced."""


class TaskCancelled(PoolError):
    """The task was cancelled (``Deferred.cancel()``, ``shutdown(wait=False)``, a broken pipeline)."""


class PipelineClosed(PoolError):
    """``Pipeline.queue()`` was called after the pipeline was shut down."""


class WorkerLost(PoolError):
    """The worker process died while it ran the task.

    Attributes:
        pid: the worker's process id.
        exitcode: its exit status if it exited, else ``None``.
        signal: the number of the signal that killed it, else ``None``.
    """

    def __init__(self, message: str, pid: Optional[int] = None,
                 exitcode: Optional[int] = None, signal: Optional[int] = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal

    def __reduce__(self):
        return (type(self), (self.args[0], self.pid, self.exitcode, self.signal))


class RemoteError(PoolError):
    """A task raised an exception that could not be carried back as itself.

    Attributes:
        type_name: the qualified name of the exception's type in the worker.
        message: ``str()`` of the exception in the worker.
        traceback: the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.traceback))


class SerializationError(PoolError):
    """A function, argument, result or exception could not be serialized or deserialized.

    Attributes:
        stage: which step failed, for example ``"function"``, ``"arguments"``,
            ``"arguments (in worker)"``, ``"result"`` or ``"result (in parent)"``.
    """

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage

    def __reduce__(self):
        return (type(self), (self.args[0], self.stage))


class WorkerInitError(PoolError):
    """The pool's ``initializer`` raised in a new worker, so the task could not run there."""
