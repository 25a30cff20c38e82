"""A legacy-style script: monkey-patched, written with threads and time.sleep, using the pool.

Run it from a checkout:  python examples/monkey_patched_legacy.py

After ``monkey.patch_all()`` every ``threading.Thread`` is a greenlet and ``time.sleep``
yields to the gevent hub.  multiprocessing.Pool hangs or stalls the hub in such a program;
gprocpool does not: while the workers spin the CPU, only the threads that called the pool
wait, and the ticker below keeps ticking.
"""
from gevent import monkey

monkey.patch_all()

import queue  # noqa: E402  (imports after patch_all, as legacy scripts do)
import threading  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import gprocpool  # noqa: E402

TICK = 0.01


def crunch(seconds):
    """Keeps one CPU busy for ``seconds`` (in a worker, where time is not patched)."""
    end = time.monotonic() + seconds
    loops = 0
    while time.monotonic() < end:
        loops += 1
    return loops


def ticker(stop, gaps):
    """Ticks every 10 ms and records how late each tick was."""
    last = time.monotonic()
    while not stop.is_set():
        time.sleep(TICK)  # patched: yields to the hub
        now = time.monotonic()
        gaps.append(now - last)
        last = now


def job(pool, n, results):
    """A legacy worker thread: blocks on pool.process() as if it were a plain call."""
    loops = pool.process(crunch, (0.5,))
    results.put((n, loops))


def main():
    stop = threading.Event()
    gaps = []
    tick = gevent.spawn(ticker, stop, gaps)

    pool = gprocpool.Pool(max_procs=2)
    started = time.monotonic()
    results = queue.Queue()
    threads = [threading.Thread(target=job, args=(pool, n, results)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    done = sorted(results.get()[0] for _ in threads)
    print(f"threads: jobs {done} finished, 4 x 0.5 s of CPU on 2 workers took {elapsed:.2f} s")

    # map() from the main thread, while another thread sleeps in time.sleep().
    slept = []
    sleeper = threading.Thread(target=lambda: (time.sleep(0.2), slept.append(True)))
    sleeper.start()
    counts = pool.map(crunch, [0.25] * 4)
    sleeper.join()
    print(f"map: {len(counts)} results; the sleeping thread woke up meanwhile: {bool(slept)}")

    stop.set()
    tick.join()
    pool.shutdown()
    print(f"ticker: {len(gaps)} ticks, longest gap {max(gaps) * 1000:.0f} ms "
          f"(a tick is {TICK * 1000:.0f} ms)")
    print("the program kept running while the workers computed")


if __name__ == "__main__":
    main()
