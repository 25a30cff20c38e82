"""Task functions and a task class for the examples, importable by name in the workers.

A task name such as ``"tasks_example:Doubler"`` is resolved inside the worker, which sees
the parent's ``sys.path``: running ``python examples/synopsis.py`` puts ``examples/`` at
``sys.path[0]``, so the workers can import this module too.
"""
from __future__ import annotations

import os


class Doubler:
    """A task class: the worker runs ``Doubler(*args, **kwargs).run()``."""

    def __init__(self, n):
        self.n = n

    def run(self):
        return self.n * 2


def double(n):
    """A plain module-level function: it travels by reference (module and name)."""
    return n * 2


def whoami():
    """Returns the worker's process id."""
    return os.getpid()
