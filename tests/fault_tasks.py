"""Task functions and hostile objects for the fault-injection tests.

Module level, so workers import them by reference.  Objects that must misbehave on one
side only tell the parent from a worker by ``GPROCPOOL_WORKER``, which the pool sets in
every worker it forks.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time


def in_worker() -> bool:
    return os.environ.get("GPROCPOOL_WORKER") == "1"


def crash_interpreter() -> None:
    """Dereferences NULL: SIGSEGV, no Python cleanup, no exception."""
    import ctypes
    ctypes.string_at(0)


def misbehave(mode: str, who: str = "") -> None:
    """Fails in the way ``mode`` names."""
    if mode == "raise":
        raise ValueError(f"{who} refuses")
    if mode == "exit":
        sys.exit(7)
    if mode == "keyboard":
        raise KeyboardInterrupt(f"{who} interrupts")
    if mode == "os_exit":
        os._exit(9)
    if mode == "segfault":
        crash_interpreter()
    raise AssertionError(f"unknown mode {mode!r}")


# -- markers: let the test see that a task started, and where -------------------------

def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def touch(path):
    """Proves it ran: creates path."""
    _write_atomic(path, str(os.getpid()))
    return os.getpid()


def mark_and_sleep(path, seconds, value=None):
    """Writes this worker's pid to path, then sleeps; returns value."""
    _write_atomic(path, str(os.getpid()))
    time.sleep(seconds)
    return value


def mark_ignore_sigterm_and_sleep(path, seconds):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write_atomic(path, str(os.getpid()))
    time.sleep(seconds)
    return "finished"


class MarkIfLong:
    """For map(): sleeps item seconds; an item of a second or more first marks its worker."""

    def __init__(self, path):
        self.path = path

    def __call__(self, seconds):
        if seconds >= 1:
            return mark_and_sleep(self.path, seconds)
        return sleep_return_pid(seconds)


def pid_after(seconds, value=None):
    time.sleep(seconds)
    return os.getpid(), value


def tagged(i, seconds=0.0):
    """(i, pid): lets a test match every result to its call."""
    if seconds:
        time.sleep(seconds)
    return i, os.getpid()


def announce_and_sleep(seconds, ignore_sigterm=False):
    """For subprocess scripts: prints the worker's pid on stdout, then sleeps."""
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(1, f"WORKER {os.getpid()}\n".encode())   # one write: lines never interleave
    time.sleep(seconds)
    return os.getpid()


SHARED_LOCK = threading.Lock()


def take_shared_lock(timeout=5.0):
    """False if SHARED_LOCK stays held: what a worker forked while a thread of the parent
    held it would see (the lock is copied held, and no thread is left to release it)."""
    if not SHARED_LOCK.acquire(timeout=timeout):
        return False
    SHARED_LOCK.release()
    return True


def sleep_return_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


# -- BaseExceptions and deaths ----------------------------------------------------------

def sys_exit_with(code):
    sys.exit(code)


def os_exit_with(code):
    os._exit(code)


def kill_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(30)


def segfault():
    crash_interpreter()


def raise_base(kind):
    raise {"KeyboardInterrupt": KeyboardInterrupt, "GeneratorExit": GeneratorExit,
           "SystemExitNoCode": SystemExit}[kind]("raised by the task")


# -- serialization in the parent ---------------------------------------------------------

class RaisesOnReduce:
    """Fails while the parent serializes it (pickle and dill both call __reduce_ex__)."""

    def __reduce_ex__(self, protocol):
        raise ValueError("RaisesOnReduce cannot be serialized")


class CallableRaisesOnReduce:
    """A task callable that cannot be serialized."""

    def __call__(self, *args):
        return args

    def __reduce_ex__(self, protocol):
        raise ValueError("CallableRaisesOnReduce cannot be serialized")


# -- deserialization in the worker -------------------------------------------------------

class FailsInWorker:
    """Serializes fine; rebuilding it in a worker misbehaves as ``mode`` says."""

    def __init__(self, mode):
        self.mode = mode

    def __getstate__(self):
        return {"mode": self.mode}

    def __setstate__(self, state):
        self.mode = state["mode"]
        if in_worker():
            misbehave(self.mode, "FailsInWorker.__setstate__")


class CallableFailsInWorker(FailsInWorker):
    """A task callable whose rebuild in the worker misbehaves."""

    def __call__(self, *args):
        return args


def identity(x):
    return x


def arg_type_name(x):
    return type(x).__name__


# -- results -----------------------------------------------------------------------------

class Unpicklable:
    def __reduce_ex__(self, protocol):
        raise TypeError("Unpicklable refuses to be pickled")


class ExitsOnReduce:
    """A result whose serialization in the worker calls sys.exit."""

    def __reduce_ex__(self, protocol):
        sys.exit(4)


def return_unpicklable():
    return Unpicklable()


def return_generator():
    return (i for i in range(3))


def return_exits_on_reduce():
    return ExitsOnReduce()


class FailsInParent:
    """Serializes fine in the worker; rebuilding it in the parent misbehaves."""

    def __init__(self, mode):
        self.mode = mode

    def __getstate__(self):
        return {"mode": self.mode}

    def __setstate__(self, state):
        self.mode = state["mode"]
        if not in_worker():
            misbehave(self.mode, "FailsInParent.__setstate__")


def return_fails_in_parent(mode):
    return FailsInParent(mode)


def _rebuild_error(mode, message):
    if not in_worker():
        misbehave(mode, "ErrorFailsInParent rebuild")
    return ErrorFailsInParent(mode, message)


class ErrorFailsInParent(Exception):
    """An exception that pickles in the worker but cannot be rebuilt in the parent."""

    def __init__(self, mode, message):
        super().__init__(message)
        self.mode = mode

    def __reduce__(self):
        return (_rebuild_error, (self.mode, self.args[0]))


def raise_error_failing_in_parent(mode):
    raise ErrorFailsInParent(mode, "the original message")


class ErrorExitsOnReduce(Exception):
    """An exception whose serialization in the worker calls sys.exit."""

    def __reduce__(self):
        sys.exit(4)


def raise_error_exiting_on_reduce():
    raise ErrorExitsOnReduce("exits when pickled")


class ErrorWithUnpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.payload = Unpicklable()


def raise_unpicklable_error():
    raise ErrorWithUnpicklable("carries an unpicklable payload")


# -- large payloads ----------------------------------------------------------------------

def pattern(n, seed=0):
    """n bytes, position- and seed-dependent, so a shifted or truncated copy differs."""
    block = hashlib.sha256(str(seed).encode()).digest() * 4 + bytes(range(256))
    reps = n // len(block) + 1
    return (block * reps)[:n]


def digest(data):
    return len(data), hashlib.sha256(data).hexdigest()


def make_big(n, seed=0):
    return pattern(n, seed)


def echo_big(data):
    return data


def big_result_after_marker(path, n):
    data = pattern(n, 1)
    _write_atomic(path, str(os.getpid()))
    return data


# -- memory ------------------------------------------------------------------------------

_HOG = []


def hog(mb, value):
    """Keeps mb MiB of touched memory alive in this worker; returns (value, pid)."""
    _HOG.append(b"\x01" * (mb * 1024 * 1024))
    return value, os.getpid()


def hog_120(value):
    return hog(120, value)


# -- the soak ----------------------------------------------------------------------------

def soak_task(i, kind):
    if kind == "ok":
        return i * 3 + 1, os.getpid()
    if kind == "exit":
        os._exit(17)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)
    if kind == "timeout":
        time.sleep(30)
    if kind == "exception":
        raise ValueError(f"fault {i}")
    if kind == "unpicklable":
        return Unpicklable()
    raise AssertionError(kind)
