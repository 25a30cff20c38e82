"""The SYNOPSIS of Perl's Coro::ProcessPool, ported to gprocpool.

Run it from a checkout:  python examples/synopsis.py

Every call below blocks only the greenlet that makes it; here that is the main greenlet,
so the script reads like ordinary sequential code.
"""
from __future__ import annotations

import gevent
from gevent.event import Event

import gprocpool

# The script's own directory is sys.path[0]; workers get the parent's sys.path, so they
# can import tasks_example by name too.
import tasks_example


def main() -> None:
    pool = gprocpool.Pool(max_procs=4, max_reqs=100)
    print(f"pool with max_procs={pool.max_procs}, max_reqs={pool.max_reqs}")

    # A lambda defined in __main__: it travels to the workers by value (dill).
    double = lambda x: x * 2  # noqa: E731

    # Process in sequence.
    result = {}
    for i in range(1, 1001):
        result[i] = pool.process(double, (i,))
    assert all(result[i] == 2 * i for i in result)
    print(f"process in sequence: {len(result)} results, result[21] = {result[21]}")

    # Process as a batch: one result per item, in input order.
    results = pool.map(double, range(1, 1001))
    assert results == [2 * i for i in range(1, 1001)]
    print(f"map: {len(results)} results, first five {results[:5]}")

    # Defer waiting for the result: defer() returns a Deferred at once; calling it waits.
    deferred = {i: pool.defer(double, (i,)) for i in range(1, 1001)}
    total = 0
    for i, d in deferred.items():
        value = d()
        assert value == 2 * i
        total += value
    print(f"defer: {len(deferred)} deferreds resolved, sum = {total}")

    # Deferreds also work with gevent.wait().
    pending = [pool.defer(double, (n,)) for n in (5, 6, 7)]
    gevent.wait(pending)
    print(f"gevent.wait on deferreds: {[d.get() for d in pending]}")

    # A "task class" by name: the worker imports tasks_example and runs Doubler(21).run().
    print(f"task class tasks_example:Doubler(21).run() = {pool.process('tasks_example:Doubler', (21,))}")
    # A function by name, and the same function by reference.
    print(f"task function tasks_example.double(21) = {pool.process('tasks_example.double', (21,))}")
    print(f"module function by reference: {pool.process(tasks_example.double, (21,))}")

    # Queue with callbacks: queue() returns at once; callbacks run when each task ends.
    n_tasks = 5
    finished = []
    all_done = Event()

    def make_callback(n):
        def callback(result):
            print(f"callback: 2 * {n} = {result}")
            finished.append(n)
            if len(finished) == n_tasks:
                all_done.set()
        return callback

    for n in range(1, n_tasks + 1):
        pool.queue(double, (n,), make_callback(n))
    all_done.wait()
    print(f"queue: {len(finished)} callbacks ran")

    # Or wait for everything outstanding with join().
    pool.queue(double, (100,), callback=lambda r: print(f"callback: {r}"))
    pool.queue(int, ("not a number",),
               error_callback=lambda exc: print(f"error_callback: {type(exc).__name__}: {exc}"))
    pool.join()
    print("join: every queued task has finished")

    # A pipeline: queue tasks, read the results as they complete.
    pipe = pool.pipeline()
    for n in range(1, 11):
        pipe.queue(double, (n,))
    pipe.shutdown()  # no more tasks; iteration ends after the pending results
    print(f"pipeline: {sorted(pipe)}")

    # Shut down: the workers stop, and the pool is as new (workers respawn on demand).
    pool.shutdown()
    print(f"after shutdown, the pool still works: {pool.process(double, (50,))}")
    pool.shutdown()

    # Or let a with block shut the pool down.
    with gprocpool.Pool(2) as pool2:
        pid = pool2.process(tasks_example.whoami)
    print(f"with block: ran in worker {pid}, pool shut down on exit")
    print("synopsis done")


if __name__ == "__main__":
    main()
