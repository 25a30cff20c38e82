"""The parent's handle on the template process, which forks the pool's workers.

See :mod:`gprocpool._template` for the control protocol.  One greenlet reads the control
socket for the template's whole life and routes each message: spawn replies to the
greenlet that asked, exit reports to whoever waits for that pid.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import socket as _stdsocket
import sys
from typing import Any, Dict, Optional, Tuple

import gevent
import gevent.socket
import gevent.subprocess
from gevent.event import AsyncResult

from . import _wire
from ._channel import close_fd, sever_fd
from ._errors import PoolError

log = logging.getLogger("gprocpool")

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports the package's worker-side modules without running gprocpool/__init__.py, so that
# workers do not import gevent; the stub package is dropped again so that a task may still
# `import gprocpool` for real.
_BOOTSTRAP = (
    "import sys, types\n"
    "pkg = types.ModuleType('gprocpool'); pkg.__path__ = [sys.argv[1] + '/gprocpool']\n"
    "sys.modules['gprocpool'] = pkg\n"
    "import gprocpool._template as t\n"
    "del sys.modules['gprocpool']\n"
    "t.main()\n"
)

START_TIMEOUT = 60.0
# A fork takes milliseconds; this only keeps a lost reply from hanging a caller forever.
SPAWN_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0


class Template:
    """A running template process.

    Args:
        config: picklable dict with ``sys_path`` and ``initializer`` (dill bytes or None).
    """

    def __init__(self, config: Dict[str, Any]) -> None:
        self._config = config
        self._requests: Dict[int, AsyncResult] = {}
        self._exits: Dict[int, AsyncResult] = {}
        self._ids = itertools.count(1)
        self._reader: Optional[gevent.Greenlet] = None
        self._proc: Optional[gevent.subprocess.Popen] = None
        self._sock: Optional[gevent.socket.socket] = None
        self.pid = 0
        self.dead = False

    def start(self) -> None:
        """Starts the template and waits (cooperatively) until it is ready.

        Raises:
            PoolError: the template did not start.
        """
        parent_sock, child_sock = _stdsocket.socketpair(_stdsocket.AF_UNIX, _stdsocket.SOCK_SEQPACKET)
        try:
            self._proc = gevent.subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PKG_DIR, str(child_sock.fileno()), str(os.getpid())],
                stdin=gevent.subprocess.PIPE, pass_fds=(child_sock.fileno(),), close_fds=True)
        finally:
            child_sock.close()
        self._sock = gevent.socket.socket(fileno=parent_sock.detach())
        try:
            self._proc.stdin.write(pickle.dumps(self._config))
            self._proc.stdin.close()
            with gevent.Timeout(START_TIMEOUT, PoolError("the worker template process did not start")):
                msg = self._recv()
            if msg is None or msg[0] != "ready":
                raise PoolError(f"the worker template process failed to start (exit code {self._proc.wait()})")
        except BaseException:
            self._abort()
            raise
        self.pid = msg[1]
        self._reader = gevent.spawn(self._read_loop)
        log.debug("template process %d started", self.pid)

    def _recv(self) -> Optional[Tuple[Any, ...]]:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except OSError:
            return None
        return pickle.loads(data) if data else None

    def _read_loop(self) -> None:
        while True:
            msg = self._recv()
            if msg is None:
                break
            if msg[0] == "spawned":
                waiter = self._requests.pop(msg[1], None)
                if waiter is not None:
                    # Registered here, not by the spawner, because the exit report may
                    # arrive before the spawning greenlet runs again.
                    self._exits[msg[2]] = AsyncResult()
                    waiter.set(msg[2])
            elif msg[0] == "exited":
                result = self._exits.get(msg[1])
                if result is not None:
                    result.set(msg[2])
        self.dead = True
        err = PoolError("the worker template process exited")
        for waiter in self._requests.values():
            waiter.set_exception(err)
        self._requests.clear()
        # Workers die with the template (PR_SET_PDEATHSIG); nobody will report them now.
        for pid, result in self._exits.items():
            if not result.ready():
                result.set(None)

    def spawn(self) -> Tuple[int, int, int]:
        """Forks a new worker; returns (pid, read_fd, write_fd) of the parent's pipe ends.

        Raises:
            PoolError: the template is gone.
        """
        if self.dead or self._sock is None:
            raise PoolError("the worker template process is not running")
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        for fd in (task_w, result_r):
            _wire.enlarge_pipe(fd)
        request = next(self._ids)
        waiter = self._requests[request] = AsyncResult()
        try:
            try:
                _stdsocket.send_fds(self._sock, [pickle.dumps(("spawn", request))], [task_r, result_w])
            finally:
                close_fd(task_r)
                close_fd(result_w)
            pid = waiter.get(timeout=SPAWN_TIMEOUT)
        except BaseException:
            self._requests.pop(request, None)
            # The worker may still be forked; with both parent ends closed it reads EOF and exits.
            close_fd(task_w)
            close_fd(result_r)
            raise
        return pid, result_r, task_w

    def wait_exit(self, pid: int, timeout: Optional[float]) -> Optional[int]:
        """Waits for a worker's exit status (negative: signal); None if not known in time."""
        result = self._exits.get(pid)
        if result is None:
            return None
        result.wait(timeout)
        if not result.ready():
            return None
        self._exits.pop(pid, None)
        return result.value

    def exited(self, pid: int) -> bool:
        """True once the template reported that pid exited (or the template is gone)."""
        result = self._exits.get(pid)
        return result is None or result.ready()

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Asks the template to exit once its workers have, and reaps it (kills it if it hangs)."""
        if self._sock is not None and not self.dead:
            try:
                self._sock.send(pickle.dumps(("stop",)))
            except OSError:
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except gevent.subprocess.TimeoutExpired:
                log.warning("template process %d did not exit; killing it", self.pid)
                self._proc.kill()
                self._proc.wait()
        self._abort()

    def sever(self) -> None:
        """In a just-forked child: the inherited reader must not read the parent's socket.

        It now reads a private pipe instead, fails (not a socket) and ends.
        """
        if self._sock is not None:
            sever_fd(self._sock.fileno(), readable=True)
        self.dead = True

    def detach_after_fork(self) -> None:
        """Closes the control socket without waiting (forked child, or a pool being collected).

        The template sees EOF, stops its workers and exits; gevent reaps it.
        """
        sock, self._sock = self._sock, None
        self.dead = True
        if sock is not None:
            try:
                close_fd(sock.detach())
            except OSError:
                pass

    def _abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            if self._reader is not gevent.getcurrent():
                self._reader.kill()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.dead = True
