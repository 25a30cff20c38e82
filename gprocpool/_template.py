"""The template process: a fresh interpreter that forks the pool's workers.

The pool starts one template per pool by exec (never by forking the parent: the parent
may run gevent, other threads and servers, none of which a worker should inherit).  The
template imports what every worker needs once, then forks a worker per request, so a
new worker costs a fork, not an interpreter start.

Control protocol, over an AF_UNIX SOCK_SEQPACKET pair (one pickled tuple per message;
it carries no task data and has no address, so nothing outside the pool can reach it):

    parent -> template: ("spawn", request_id) with the worker's two pipe ends attached
                        (SCM_RIGHTS); ("stop",) to exit once the workers have exited
    template -> parent: ("ready", pid); ("spawned", request_id, pid);
                        ("exited", pid, returncode)   # negative: killed by that signal

The template reaps every worker and reports its exit status, so no worker stays a zombie
and a crash can be reported with its exit code.  If the parent dies, the control socket
reaches EOF and the template kills its workers; PR_SET_PDEATHSIG guards both the template
and the workers as well.
"""
from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import socket
import sys
import time
from typing import Dict, Set

from . import _child

GRACE = 0.5


def set_parent_death_signal(sig: int) -> None:
    """Asks Linux to send sig to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def close_fds_except(keep: Set[int]) -> None:
    prev = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(prev, fd)
        prev = fd + 1
    os.closerange(prev, 1 << 20)


def _send(ctl: socket.socket, *msg: object) -> None:
    try:
        ctl.send(pickle.dumps(msg))
    except OSError:
        pass  # the parent is gone; the main loop sees EOF next


def _reap(ctl: socket.socket, children: Set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(ctl, "exited", pid, os.waitstatus_to_exitcode(status))


def _kill_all(ctl: socket.socket, children: Set[int], first: int) -> None:
    for pid in list(children):
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE
    while children and time.monotonic() < deadline:
        _reap(ctl, children)
        time.sleep(0.005)
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        children.discard(pid)
        _send(ctl, "exited", pid, os.waitstatus_to_exitcode(status))


def _spawn(ctl: socket.socket, wake_r: int, wake_w: int, task_fd: int, result_fd: int,
           config: Dict[str, object]) -> int:
    # Objects made so far move to a generation the collector never scans, so a worker's
    # garbage collections do not write to (and copy) every page it shares with us.
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    # In the new worker.
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        set_parent_death_signal(signal.SIGKILL)
        close_fds_except({task_fd, result_fd})
        ctl.detach()
        os.environ["GPROCPOOL_WORKER"] = "1"
        _child.run_worker(task_fd, result_fd, config.get("initializer"))  # type: ignore[arg-type]
    finally:
        os._exit(70)


def main() -> None:
    ctl_fd = int(sys.argv[2])
    parent_pid = int(sys.argv[3])
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before PR_SET_PDEATHSIG took effect
    # Ctrl-C in a terminal reaches the whole process group; only the parent should react.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    config = pickle.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.path[:] = config["sys_path"]
    # Imported once here, so each forked worker has them for free.
    import dill  # noqa: F401

    ctl = socket.socket(fileno=ctl_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    children: Set[int] = set()
    _send(ctl, "ready", os.getpid())
    stopping = False
    while True:
        try:
            readable, _, _ = select.select([ctl, wake_r], [], [], 0.5 if stopping else None)
        except InterruptedError:
            continue
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap(ctl, children)
        if stopping and not children:
            break
        if ctl not in readable:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctl, 65536, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            # The parent is gone (or closed us): its workers must not outlive it.
            _kill_all(ctl, children, signal.SIGTERM)
            break
        msg = pickle.loads(data)
        if msg[0] == "spawn":
            task_fd, result_fd = fds
            pid = _spawn(ctl, wake_r, wake_w, task_fd, result_fd, config)
            os.close(task_fd)
            os.close(result_fd)
            children.add(pid)
            _send(ctl, "spawned", msg[1], pid)
        elif msg[0] == "stop":
            stopping = True
            if not children:
                break
    os._exit(0)
