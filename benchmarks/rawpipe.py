"""The floor: a minimal gevent ping-pong over a raw pipe pair, with no pool logic.

What any pool built on pipes must at least pay::

    parent (gevent, non-blocking fds)               child (plain blocking loop)
    pickle.dumps((f, args)) --[u64 length|body]-->  pickle.loads, f(*args), pickle.dumps
    pickle.loads(result)    <--[u64 length|body]--

In ``echo`` mode the child sends the body back untouched (no pickling on either side):
the raw bandwidth of the pipe for B.  The pipes are enlarged like gprocpool's (1 MiB) so
that the comparison measures the pool, not the pipe size.  There are no function ids, no
errors, no timeouts, no accounting: one process per pipe pair, started by exec (L, T, B, S)
or by a fork of the benchmark process per task (R).

This module imports only the standard library at the top: the child runs it without gevent.
"""
from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

HEADER = struct.Struct("<Q")
# The parent reads at most this much per system call (as gprocpool does).
READ_CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
PROTOCOL = 5

_CHILD_CODE = ("import sys\n"
               "from benchmarks.rawpipe import serve\n"
               "serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])\n")


def _enlarge(fd: int) -> None:
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        pass


# -- child side: blocking --------------------------------------------------------------

def _read_exact(fd: int, n: int) -> Optional[bytearray]:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            return None
        got += k
    return buf


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_frame(fd: int, body: Any) -> None:
    if len(body) < 65536:
        _write_all(fd, HEADER.pack(len(body)) + body)
    else:
        _write_all(fd, HEADER.pack(len(body)))
        _write_all(fd, body)


def serve(rfd: int, wfd: int, mode: str, once: bool = False) -> None:
    """The child's loop: answer frames until EOF (or after one frame if once); never returns."""
    try:
        while True:
            head = _read_exact(rfd, HEADER.size)
            if head is None:
                break
            (length,) = HEADER.unpack(head)
            body = _read_exact(rfd, length)
            if body is None:
                break
            if mode == "echo":
                out: Any = body
            else:
                f, args = pickle.loads(body)
                out = pickle.dumps(f(*args), protocol=PROTOCOL)
            _write_frame(wfd, out)
            if once:
                break
    finally:
        os._exit(0)


# -- parent side: gevent-cooperative ---------------------------------------------------

class Peer:
    """The parent's ends of one child's two pipes; only the calling greenlet waits."""

    def __init__(self, rfd: int, wfd: int, proc: Any = None, pid: int = 0) -> None:
        from gevent.hub import get_hub
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.rfd, self.wfd = rfd, wfd
        self.proc, self.pid = proc, pid
        self._hub = get_hub()
        self._rw = self._hub.loop.io(rfd, 1)
        self._ww = self._hub.loop.io(wfd, 2)
        self._buf = bytearray()

    def _write(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.wfd, view):]
            except BlockingIOError:
                self._hub.wait(self._ww)

    def send(self, body: Any) -> None:
        if len(body) < 65536:
            self._write(HEADER.pack(len(body)) + body)
        else:
            self._write(HEADER.pack(len(body)))
            self._write(body)

    def _read(self) -> bytes:
        while True:
            try:
                data = os.read(self.rfd, READ_CHUNK)
            except BlockingIOError:
                self._hub.wait(self._rw)
                continue
            if not data:
                raise EOFError("the raw-pipe child closed its pipe")
            return data

    def recv(self) -> Any:
        buf = self._buf
        while len(buf) < HEADER.size:
            buf += self._read()
        (length,) = HEADER.unpack_from(buf)
        end = HEADER.size + length
        if len(buf) >= end:
            body = bytes(buf[HEADER.size:end])
            del buf[:end]
            return body
        # A large frame: read the rest straight into a buffer of the right size.
        out = bytearray(length)
        view = memoryview(out)
        have = len(buf) - HEADER.size
        view[:have] = buf[HEADER.size:]
        buf.clear()
        while have < length:
            try:
                k = os.readv(self.rfd, [view[have:]])
            except BlockingIOError:
                self._hub.wait(self._rw)
                continue
            if not k:
                raise EOFError("the raw-pipe child closed its pipe")
            have += k
        return out

    def call(self, f: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
        self.send(pickle.dumps((f, args), protocol=PROTOCOL))
        return pickle.loads(self.recv())

    def echo(self, payload: Any) -> Any:
        self.send(payload)
        return self.recv()

    def close(self) -> None:
        """Closes the pipes; the child reads EOF and exits; reaps it."""
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1
        if self.proc is not None:
            self.proc.wait()
        elif self.pid:
            os.waitpid(self.pid, 0)


def _pipes() -> Tuple[int, int, int, int]:
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    return task_r, task_w, result_r, result_w


def _child_env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def start_exec(mode: str = "pickle") -> Peer:
    """Starts a fresh interpreter serving frames (cooperatively: only this greenlet waits)."""
    import gevent.subprocess
    task_r, task_w, result_r, result_w = _pipes()
    for fd in (task_w, result_r):
        _enlarge(fd)
    try:
        proc = gevent.subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(task_r), str(result_w), mode],
                                       pass_fds=(task_r, result_w), close_fds=True, env=_child_env())
    finally:
        os.close(task_r)
        os.close(result_w)
    return Peer(result_r, task_w, proc=proc)


def start_fork(mode: str = "pickle", once: bool = True) -> Peer:
    """Forks this process; the child serves one frame (by default) and exits."""
    task_r, task_w, result_r, result_w = _pipes()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(task_w)
            os.close(result_r)
            serve(task_r, result_w, mode, once=once)
        finally:
            os._exit(70)
    os.close(task_r)
    os.close(result_w)
    return Peer(result_r, task_w, pid=pid)


def split(items: Sequence[Any], parts: int) -> List[Sequence[Any]]:
    """Contiguous, nearly equal slices (the floor of map: one batch per child)."""
    n = len(items)
    bounds = [n * i // parts for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]
