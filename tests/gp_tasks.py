"""Task functions for the tests: module level, so workers import them by reference."""
from __future__ import annotations

import os
import signal
import sys
import time


def double(x):
    return x * 2


def pid(*_):
    return os.getpid()


def echo(*args, **kwargs):
    return args, kwargs


def add(a, b=0):
    return a + b


def boom(message="some error"):
    raise ValueError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def busy(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def die_exit(code=3):
    os._exit(code)


def die_signal(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)
    time.sleep(10)


def die_segfault():
    import ctypes
    ctypes.string_at(0)


def call_sys_exit(code=5):
    sys.exit(code)


def ignore_sigterm_and_sleep(seconds):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return "finished"


def return_list(x):
    return [x, x]


def identity(x):
    return x


class Doubler:
    """A task class: Doubler(x).run() == 2x."""

    def __init__(self, x):
        self.x = x

    def run(self):
        return self.x * 2


class NoRun:
    def __init__(self, *args):
        pass


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


def return_unpicklable():
    return Unpicklable()


class BadInitError(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments (cpython gh-79492)."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_bad_init():
    raise BadInitError(1, 2)


def raise_base(kind):
    raise {"KeyboardInterrupt": KeyboardInterrupt, "GeneratorExit": GeneratorExit}[kind]()


def print_and_return(text):
    print(text, flush=True)
    os.write(2, (text + " (fd2)\n").encode())
    return text


def read_stdin():
    return sys.stdin.read()


_INIT = []


def remember_init(value):
    _INIT.append(value)


def initialized():
    return list(_INIT)


def fail_init():
    raise RuntimeError("initializer exploded")


def rss_hog(mb):
    global _HOG
    _HOG = bytearray(mb * 1024 * 1024)
    return len(_HOG)
