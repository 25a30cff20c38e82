"""gprocpool: a process pool for gevent programs.

Blocking-style ``pool.process()`` and ``pool.map()`` from any greenlet: while a worker
process computes, only the calling greenlet waits and the rest of the program runs.
"""
from __future__ import annotations

from ._deferred import Deferred, Pipeline
from ._errors import (AcquireTimeout, PipelineClosed, PoolError, RemoteError,
                      SerializationError, TaskCancelled, TaskTimeout, WorkerInitError,
                      WorkerLost)
from ._pool import Pool

__version__ = "0.1.0.dev0"

__all__ = [
    "AcquireTimeout",
    "Deferred",
    "Pipeline",
    "Pool",
    "PipelineClosed",
    "PoolError",
    "RemoteError",
    "SerializationError",
    "TaskCancelled",
    "TaskTimeout",
    "WorkerInitError",
    "WorkerLost",
    "__version__",
]
