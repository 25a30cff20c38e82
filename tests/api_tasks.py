"""Task functions for the API tests: module level, so workers import them by reference.

Only tests/test_api.py, tests/test_upstream.py and tests/test_deferred_pipeline.py use
these; the shared ones live in gp_tasks.py.
"""
from __future__ import annotations

import os
import sys
import time


def double_pair(x):
    """The upstream pipeline task: returns [x, 2x]."""
    return [x, 2 * x]


def double_all(values):
    """The upstream "large tasks" task: doubles every element of a list."""
    return [v * 2 for v in values]


def sleep_return(item):
    """map() task: item is (seconds, value); sleeps, then returns (value, finish time)."""
    seconds, value = item
    time.sleep(seconds)
    return value, time.monotonic()


def fail_some(item):
    """map() task: item is (seconds, value, fail); sleeps, then returns value or raises."""
    seconds, value, fail = item
    time.sleep(seconds)
    if fail:
        raise ValueError(f"bad item {value}")
    return value


def raise_with_args(*args):
    raise ValueError(*args)


class CustomError(Exception):
    """A picklable exception type defined outside builtins."""


def raise_custom(text):
    raise CustomError(text)


def touch(path, value=None):
    """Writes a marker file (proves that the task ran), returns value."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, path)  # atomic: a reader never sees it empty
    return value


def touch_then_sleep(path, seconds, value=None):
    """Writes a marker file at start (the task is running), then sleeps."""
    touch(path)
    time.sleep(seconds)
    return value


def append_pid(path):
    """An initializer: appends the worker's pid to a file, one line per call."""
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")


def fail_once(path):
    """An initializer that raises the first time (creating path), then succeeds."""
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write("failed once")
        raise RuntimeError("initializer failed once")


def worker_env():
    """What the worker sees: its cwd, sys.path and pid."""
    return os.getcwd(), list(sys.path), os.getpid()


def import_and_call(module, attr, *args):
    """Imports module in the worker and calls module.attr(*args)."""
    import importlib
    return getattr(importlib.import_module(module), attr)(*args)


def write_fds(text):
    """Writes to fd 1 and fd 2 directly and through sys.stdout/sys.stderr."""
    print(f"{text} print")
    sys.stderr.write(f"{text} sys.stderr\n")
    os.write(1, f"{text} fd1\n".encode())
    os.write(2, f"{text} fd2\n".encode())
    return text


def print_lots(n):
    """Prints n lines (more than a pipe buffer holds) and returns n."""
    for i in range(n):
        print(f"line {i:06d} " + "x" * 40)
    return n


class Scaler:
    """An instance whose bound method is a task."""

    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return x * self.factor


class CallableAdder:
    """A callable object: calling it is the task."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x):
        return self.base + x


class UnpicklableCallable:
    """A callable neither pickle nor dill can serialize."""

    def __reduce__(self):
        raise TypeError("UnpicklableCallable refuses to be pickled")

    def __call__(self):
        return "never"


def _explode_on_load():
    raise RuntimeError("this object cannot be rebuilt")


class ExplodesOnLoad:
    """Pickles fine, but unpickling it raises (in whichever process loads it)."""

    def __reduce__(self):
        return (_explode_on_load, ())


def _rebuild_only_in_worker():
    if os.environ.get("GPROCPOOL_WORKER") != "1":
        raise RuntimeError("this result cannot be rebuilt in the parent")
    return "rebuilt"


class LoadsOnlyInWorker:
    def __reduce__(self):
        return (_rebuild_only_in_worker, ())


def return_loads_only_in_worker():
    return LoadsOnlyInWorker()


class FortyTwo:
    """Upstream's t::TestTask: __init__ ignores its arguments, run() returns 42."""

    def __init__(self, *args, **kwargs):
        pass

    def run(self):
        return 42


class KwTask:
    """A task class taking keyword arguments."""

    def __init__(self, a, b=0):
        self.a = a
        self.b = b

    def run(self):
        return self.a * 10 + self.b


def return_falsy(kind):
    return {"zero": 0, "none": None, "empty": "", "false": False, "bytes": b"", "list": []}[kind]


def touch_ignore_sigterm_sleep(path, seconds):
    """Ignores SIGTERM, writes a marker file (it is running), then sleeps."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    touch(path)
    time.sleep(seconds)
    return "finished"



def raise_unsendable():
    """Raises an exception whose argument (a generator) neither pickle nor dill can carry."""
    raise ValueError((x for x in range(3)))
