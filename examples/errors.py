"""What goes wrong, and what the caller gets: gprocpool's error types.

Run it from a checkout:  python examples/errors.py

Each fault fails only the call it hit; the pool replaces a lost worker and goes on.
Every error gprocpool raises itself subclasses gprocpool.PoolError; an exception raised
by the task comes back with its own type.  (Workers that die log a warning on the
"gprocpool" logger; this script leaves logging unconfigured, so Python prints them.)
"""
from __future__ import annotations

import os
import signal
import time

import gevent

import gprocpool


def parse(text):
    return int(text)


def die(code):
    os._exit(code)  # the worker process ends abruptly, mid-task


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def make_generator():
    return (i for i in range(3))  # generators cannot be pickled


class NeedsTwoArgs(Exception):
    """An exception pickle cannot rebuild: its __init__ wants two arguments."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def raise_needs_two_args():
    raise NeedsTwoArgs("disk", "full")


def bad_init():
    raise RuntimeError("no database connection")


def show(title, exc):
    print(f"{title}: {type(exc).__name__}: {exc}")


def main() -> None:
    with gprocpool.Pool(max_procs=1) as pool:
        # 1. A task's own exception: same type and args, the worker's traceback as __cause__.
        try:
            pool.process(parse, ("forty-two",))
        except ValueError as exc:
            show("task exception", exc)
            remote = str(exc.__cause__)
            print(f"  __cause__ holds the worker's traceback: {'Traceback' in remote}, "
                  f"names the task function: {'in parse' in remote}")

        # 2. An exception that cannot be rebuilt in the parent: RemoteError keeps its text.
        try:
            pool.process(raise_needs_two_args)
        except gprocpool.RemoteError as exc:
            show("unrebuildable exception", exc)
            print(f"  type_name={exc.type_name!r}, traceback included: {'Traceback' in exc.traceback}")

        # 3. AcquireTimeout: `timeout` bounds only the wait for a free worker.
        busy = pool.defer(time.sleep, (1.0,))
        gevent.sleep(0.1)  # let the deferred task take the only worker
        try:
            pool.process(parse, ("1",), timeout=0.1)
        except gprocpool.AcquireTimeout as exc:
            show("acquire timeout", exc)
            print(f"  also a TimeoutError: {isinstance(exc, TimeoutError)}")
        busy()

        # 4. TaskTimeout: `task_timeout` bounds the run time; the worker is killed and replaced.
        try:
            pool.process(time.sleep, (10,), task_timeout=0.5)
        except gprocpool.TaskTimeout as exc:
            show("task timeout", exc)
            print(f"  also a TimeoutError: {isinstance(exc, TimeoutError)}")

        # 5. WorkerLost: the worker died while running the task (os._exit, signal, segfault).
        for task, args in ((die, (3,)), (kill_myself, ())):
            try:
                pool.process(task, args)
            except gprocpool.WorkerLost as exc:
                show("worker lost", exc)
                print(f"  pid={exc.pid} exitcode={exc.exitcode} signal={exc.signal}")

        # 6. SerializationError: an argument or a result that cannot travel.
        try:
            pool.process(len, (make_generator(),))
        except gprocpool.SerializationError as exc:
            show("unserializable argument", exc)
            print(f"  stage={exc.stage!r}")
        try:
            pool.process(make_generator)
        except gprocpool.SerializationError as exc:
            show("unserializable result", exc)
            print(f"  stage={exc.stage!r}")

        # 7. TaskCancelled: Deferred.cancel() on a queued or running task.
        running = pool.defer(time.sleep, (10,))
        queued = pool.defer(time.sleep, (10,))
        gevent.sleep(0.2)  # the first task is now running, the second waits for the worker
        for name, d in (("running", running), ("queued", queued)):
            d.cancel()
            try:
                d()
            except gprocpool.TaskCancelled as exc:
                show(f"cancelled ({name})", exc)

        # After all that, the pool works as before.
        print(f"the pool still works: parse('42') = {pool.process(parse, ('42',))}")

    # 8. WorkerInitError: the initializer raised in a new worker; the task fails, no hang.
    with gprocpool.Pool(1, initializer=bad_init) as pool:
        try:
            pool.process(parse, ("1",))
        except gprocpool.WorkerInitError as exc:
            show("initializer failed", exc)

    print(f"every one of these is a PoolError except the task's own: "
          f"{all(issubclass(t, gprocpool.PoolError) for t in (gprocpool.AcquireTimeout, gprocpool.TaskTimeout, gprocpool.WorkerLost, gprocpool.SerializationError, gprocpool.RemoteError, gprocpool.TaskCancelled, gprocpool.WorkerInitError))}")
    print("errors done")


if __name__ == "__main__":
    main()
