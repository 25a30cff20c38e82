"""gprocpool: a process pool for gevent programs.

Blocking-style ``pool.process()`` and ``pool.map()`` from any greenlet: while a worker
process computes, only the calling greenlet waits and the rest of the program runs.
"""
from __future__ import annotations

from ._deferred import Deferred, Pipeline
from ._errors import (AcquireTimeout, PipelineClosed, PoolError, RemoteError,
                      SerializationError, TaskCancelled, TaskTimeout, WorkerInitError,
                      WorkerLost)
from ._executor import Executor
from ._pool import Pool

# Bind the worker-side modules as attributes too: in a worker they were imported before
# this package (see _spawner._BOOTSTRAP), so `gprocpool._serial` would otherwise be
# missing from a later `import gprocpool` there.
from . import _child, _serial, _template, _wire  # noqa: E402,F401

__version__ = "0.1.0.dev0"

__all__ = [
    "AcquireTimeout",
    "Deferred",
    "Executor",
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
