"""A gevent WSGI server that hands its CPU work to a gprocpool.Pool.

    python examples/wsgi_server.py [--host 127.0.0.1] [--port 8000] [--workers N]

(``WSGI_HOST`` and ``WSGI_PORT`` in the environment set the defaults; port 0 picks a
free port.)  It prints ``listening on HOST:PORT`` once it accepts connections.

    GET /work?n=600000&items=3   sums i*i for i < n, n+1, ... (one item per worker task,
                                 with pool.map); answers {"results": [...]} as JSON
    GET /health                  answers "ok" at once, even while every worker computes

A request waiting for its results parks only its own greenlet, so the server keeps
accepting and answering.  SIGTERM or SIGINT stops it cleanly: no new connections,
requests in flight get ``STOP_GRACE`` seconds to finish, then the pool shuts down and
the process exits with status 0 and no worker left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from urllib.parse import parse_qs

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer

import gprocpool

# Bounds on one request's work, so that a client cannot occupy the pool for hours.
MAX_N = 20_000_000
MAX_ITEMS = 64
STOP_GRACE = 10.0
BACKLOG = 1024
# Workers compute at a lower CPU priority, so that on a small machine the server process
# (which only parses requests and waits) wins the CPU whenever it has something to do.
WORKER_NICENESS = 10


def sum_of_squares(n):
    """CPU-bound on purpose: a plain Python loop, run in a worker process."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def make_app(pool):
    def reply(start_response, status, body, content_type="text/plain"):
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return reply(start_response, "200 OK", b"ok\n")
        if path == "/work":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            try:
                n = int(query.get("n", ["600000"])[0])
                items = int(query.get("items", ["3"])[0])
            except ValueError:
                return reply(start_response, "400 Bad Request", b"n and items must be integers\n")
            if not (0 <= n <= MAX_N and 1 <= items <= MAX_ITEMS):
                return reply(start_response, "400 Bad Request",
                             f"need 0 <= n <= {MAX_N} and 1 <= items <= {MAX_ITEMS}\n".encode())
            # Only this request's greenlet waits here; /health and the others keep running.
            results = pool.map(sum_of_squares, [n + i for i in range(items)])
            body = json.dumps({"results": results}).encode() + b"\n"
            return reply(start_response, "200 OK", body, "application/json")
        return reply(start_response, "404 Not Found", b"not found\n")

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("WSGI_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("WSGI_PORT", "8000")),
                        help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    args = parser.parse_args(argv)

    pool = gprocpool.Pool(args.workers, initializer=os.nice, initargs=(WORKER_NICENESS,))
    # A deep accept queue: with gevent's default (128) a burst of connections overflows it
    # and the kernel drops SYNs, which clients retry only a second later.
    server = WSGIServer((args.host, args.port), make_app(pool), log=None, backlog=BACKLOG)
    server.start()  # binds now, so the real port is known
    host, port = server.address[:2]
    print(f"listening on {host}:{port} with {pool.max_procs} workers", flush=True)

    stopping = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    stopping.wait()

    print("stopping", flush=True)
    server.stop(timeout=STOP_GRACE)  # requests still running after the grace are killed
    pool.shutdown(wait=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
