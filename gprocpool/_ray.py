"""The Ray backend, parent side: the gateway process, and the pool's slots on it.

The pool never imports Ray.  It starts one gateway process (see
:mod:`gprocpool._ray_gateway`) and multiplexes every task over that one pair of pipes::

    caller greenlet (Pool._execute)          RayGateway                     gateway process
    ---------------------------------        ----------                     ---------------
    slot = token from _slots (RaySlot)
    slot.run(call)  (Worker.run, _collect)
      submit: GW_TASK(id) --> outbox --> writer greenlet ------------------> Ray task
      wait on the task's mailbox  <---- reader greenlet <--- GW_REPLY(id) -- completion
      timeout / cancel: GW_CANCEL(id) --> outbox -------------------------> ray.cancel(force)

A :class:`RaySlot` is one of the pool's ``max_procs`` tokens, so at most ``max_procs``
tasks are in flight.  It is a :class:`~gprocpool._worker.Worker` whose ``channel`` is the
current task's mailbox: the inherited ``run``/``_collect`` wait for replies, apply
``task_timeout`` and turn every failure into the same errors as the local backend.

If the gateway dies, the reader closes every mailbox (the tasks in flight fail with
``WorkerLost``), the slots on it become unusable, and the next task starts a new gateway.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import gevent
import gevent.subprocess
import psutil
from gevent.lock import Semaphore
from gevent.queue import Queue

from . import _wire
from ._channel import Channel, ChannelClosed
from ._child import TASK_PREFIX
from ._errors import PoolError, TaskTimeout, WorkerLost
from ._spawner import _PKG_DIR
from ._worker import EXIT_REPORT_WAIT, FunctionMirror, Worker

if TYPE_CHECKING:
    from ._pool import _Call

log = logging.getLogger("gprocpool")

# As for the template: the gateway imports the package's modules without its __init__,
# so it never imports gevent.
_BOOTSTRAP = (
    "import sys, types\n"
    "pkg = types.ModuleType('gprocpool'); pkg.__path__ = [sys.argv[1] + '/gprocpool']\n"
    "sys.modules['gprocpool'] = pkg\n"
    "import gprocpool._ray_gateway as g\n"
    "del sys.modules['gprocpool']\n"
    "g.main()\n"
)

# Starting a local Ray takes 2-4 s; connecting to a busy cluster can take much longer.
START_TIMEOUT = 120.0
# ray.shutdown() takes 1-2 s.
STOP_TIMEOUT = 30.0
FAILED_START_GRACE = 2.0
# Ray puts socket paths (limited to 107 bytes) about 60 bytes deep into its folder.
_MAX_TEMP_ROOT = 40

_CLOSED: Any = object()
_STOP: Any = object()


class _Mailbox:
    """One task's reply frames, as the reader greenlet routes them; recv() like a Channel's."""

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames: Queue = Queue()

    def put(self, frame: Any) -> None:
        self._frames.put(frame)

    def recv(self) -> Tuple[int, int, Any]:
        """Waits (this greenlet only) for the next reply frame.

        Raises:
            ChannelClosed: the gateway is gone.
        """
        frame = self._frames.get()
        if frame is _CLOSED:
            self._frames.put(_CLOSED)
            raise ChannelClosed("the Ray gateway process exited")
        return frame

    def close(self) -> None:
        pass  # the slot forgets the task (RayGateway.forget); nothing to release here


class RayGateway:
    """The gateway process and the two greenlets that multiplex its pipes.

    Args:
        config: what the gateway needs (see RayBackend._config), picklable.
    """

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.pid = 0
        self.dead = False
        self._proc: Optional[gevent.subprocess.Popen] = None
        self._channel: Optional[Channel] = None
        self._reader: Optional[gevent.Greenlet] = None
        self._writer: Optional[gevent.Greenlet] = None
        self._cleaner: Optional[gevent.Greenlet] = None
        self._stopping = False
        # When the gateway was last known not to be reaped (see _kill_session).
        self._cutoff: Optional[float] = None
        self._outbox: Queue = Queue()
        self._mailboxes: Dict[int, _Mailbox] = {}
        self._ids = itertools.count(1)
        # Mirror of the gateway's function cache.
        self._known = FunctionMirror()
        self.info: Dict[str, Any] = {}

    def start(self) -> None:
        """Starts the gateway and waits (this greenlet only) until Ray is up.

        Raises:
            PoolError: the gateway or Ray did not start (the message says why).
        """
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        for fd in (task_w, result_r):
            _wire.enlarge_pipe(fd)
        try:
            # A session of its own: a Ctrl-C in the terminal reaches the pool's process,
            # not the gateway or Ray's processes (the pool decides what to cancel).
            self._proc = gevent.subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PKG_DIR, str(task_r), str(result_w), str(os.getpid())],
                stdin=gevent.subprocess.DEVNULL, pass_fds=(task_r, result_w), close_fds=True,
                start_new_session=True)
        except BaseException:
            os.close(task_w)
            os.close(result_r)
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        self.pid = self._proc.pid
        self._channel = Channel(result_r, task_w)
        try:
            with gevent.Timeout(START_TIMEOUT, PoolError(f"Ray did not start within {START_TIMEOUT} s")):
                self._channel.send(_wire.GW_START, 0, [pickle.dumps(self.config)])
                kind, _flags, body = self._channel.recv()
            if kind != _wire.GW_READY:
                raise PoolError(f"the Ray gateway sent an unexpected frame (kind {kind})")
            status, info = pickle.loads(body)
            if status != "ok":
                raise PoolError(f"the Ray backend could not start: {info}")
        except ChannelClosed:
            self.stop(FAILED_START_GRACE)
            raise PoolError(f"the Ray gateway process exited while starting "
                            f"(exit status {self._proc.returncode})") from None
        except BaseException:
            # It may be stuck in ray.init(): no long grace.
            self.stop(FAILED_START_GRACE)
            raise
        self.info = info
        self._reader = gevent.spawn(self._read_loop)
        self._writer = gevent.spawn(self._write_loop)
        log.debug("Ray gateway %d started (Ray at %s)", self.pid, info.get("address"))

    # -- tasks ----------------------------------------------------------------------------

    def submit(self, call: "_Call") -> Tuple[int, _Mailbox]:
        """Queues call for the gateway without yielding; returns its task id and mailbox.

        Raises:
            ChannelClosed: the gateway is gone.
        """
        if self.dead:
            raise ChannelClosed("the Ray gateway process is not running")
        task_id = next(self._ids)
        mailbox = self._mailboxes[task_id] = _Mailbox()
        fid = call.fid
        blob = self._known.blob_to_send(fid, call.fn_blob)
        prefix = _wire.TASK_ID.pack(task_id) + TASK_PREFIX.pack(fid, len(blob), call.mode) + blob
        # Frames go out through one writer greenlet, so a caller interrupted while the
        # pipe is full never leaves half a frame behind.
        self._outbox.put((_wire.GW_TASK, call.flags, [prefix, *call.payload]))
        return task_id, mailbox

    def cancel(self, task_id: int) -> None:
        """Stops the task in Ray (``ray.cancel(force=True)``) and drops its replies; never yields."""
        if self._mailboxes.pop(task_id, None) is not None and not self.dead:
            self._outbox.put((_wire.GW_CANCEL, 0, [_wire.TASK_ID.pack(task_id)]))

    def forget(self, task_id: int) -> None:
        """The task's caller has all it needs: later replies for it are dropped."""
        self._mailboxes.pop(task_id, None)

    def _read_loop(self) -> None:
        assert self._channel is not None
        try:
            while True:
                kind, flags, body = self._channel.recv()
                if kind != _wire.GW_REPLY:
                    log.error("the Ray gateway sent an unexpected frame (kind %d)", kind)
                    continue
                if hasattr(body, "readinto"):
                    # A large body streamed off the pipe: it must be consumed before the
                    # next recv(), so it is read here rather than by the waiting caller.
                    task_id, = _wire.TASK_ID.unpack(body.read(_wire.TASK_ID.size))
                    reply = body.read()
                else:
                    task_id, = _wire.TASK_ID.unpack_from(body)
                    reply = body[_wire.TASK_ID.size:]
                mailbox = self._mailboxes.get(task_id)
                if mailbox is not None:
                    mailbox.put((_wire.REPLY, flags, reply))
        except ChannelClosed:
            pass
        finally:
            if self._cutoff is None:
                self._cutoff = time.time()
            self._mark_dead()
            if not self._stopping:
                # It died on its own: clean up after it now, not at the next use.
                self._cleaner = gevent.spawn(self._clean_up)

    def _write_loop(self) -> None:
        assert self._channel is not None
        try:
            while True:
                item = self._outbox.get()
                if item is _STOP:
                    return
                kind, flags, parts = item
                self._channel.send(kind, flags, parts)
        except ChannelClosed:
            pass  # the reader sees EOF too and fails what is in flight

    def _mark_dead(self) -> None:
        if not self.dead:
            self.dead = True
            if self._mailboxes:
                log.warning("the Ray gateway process %d exited with %d task(s) in flight",
                            self.pid, len(self._mailboxes))
        mailboxes = list(self._mailboxes.values())
        self._mailboxes.clear()
        for mailbox in mailboxes:
            mailbox.put(_CLOSED)

    # -- the process ----------------------------------------------------------------------

    def exit_status(self, timeout: float) -> Optional[int]:
        """Waits up to timeout for the gateway to exit; its status (negative: signal) or None."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except gevent.subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stops the gateway (it cancels what runs and shuts Ray down) and reaps it.

        Only the calling greenlet waits.  A gateway that does not exit within timeout is
        killed, and so is whatever is left in its session (see _kill_session).
        """
        self._stopping = True
        if self._cutoff is None:
            self._cutoff = time.time()
        writer = self._writer
        if writer is not None and not writer.dead:
            # What is queued (cancellations from shutdown(wait=False)) goes out first.
            self._outbox.put(_STOP)
            writer.join(min(timeout, 5.0))
            writer.kill()
        if self._channel is not None:
            self._channel.close()   # EOF: the gateway stops
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill()
        self._mark_dead()
        cleaner = self._cleaner
        if cleaner is not None and cleaner is not gevent.getcurrent():
            cleaner.join()
        self._clean_up(timeout)

    def _clean_up(self, timeout: float = STOP_TIMEOUT) -> None:
        """Reaps the gateway, then removes what a killed gateway would leave behind."""
        proc = self._proc
        if proc is None:
            return
        if self.exit_status(timeout) is None:
            log.warning("the Ray gateway process %d did not stop within %.0f s; killing it",
                        self.pid, timeout)
            proc.kill()
            self.exit_status(EXIT_REPORT_WAIT)
        _kill_session(proc.pid, self._cutoff if self._cutoff is not None else time.time())
        temp_dir = self.config.get("temp_dir")
        if temp_dir:
            # The gateway removes it itself; this covers a gateway that was killed.
            shutil.rmtree(temp_dir, ignore_errors=True)

    def detach_after_fork(self) -> None:
        """Closes this process's copies of the pipes without waiting or switching greenlets.

        In a forked child the gateway belongs to the parent and is left alone; for a
        pool dropped without shutdown, the gateway reads EOF and stops by itself.
        """
        self.dead = True
        self._mailboxes.clear()
        if self._channel is not None:
            self._channel.detach_after_fork()


def _kill_session(sid: int, created_before: float) -> None:
    """SIGKILLs what is left of the gateway's session (sid: the gateway's pid).

    Ray's agents and workers outlive a gateway that was killed (the workers even run on
    until their task ends).  They all stay in the session the gateway leads, and no new
    process can take that id while any of them lives.  After a clean stop it is empty;
    then the id may be reused, but only by a process started after the gateway was
    reaped, hence after ``created_before``.
    """
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).create_time() <= created_before:
                os.kill(pid, signal.SIGKILL)
        except (OSError, psutil.Error):
            pass


class RaySlot(Worker):
    """One of the pool's ``max_procs`` tokens on the Ray backend: one task at a time.

    Implements the :class:`~gprocpool._worker.Worker` interface that ``Pool._execute``
    uses; ``run`` and the reply handling are Worker's own, with ``channel`` being the
    current task's mailbox.  Killing a slot cancels its task in Ray; a slot is cheap and
    is replaced rather than reused after that.
    """

    def __init__(self, gateway: RayGateway) -> None:  # noqa: super().__init__ opens pipes
        self.gateway = gateway
        self.pid = gateway.pid
        self.template = None
        self.served = 0
        self._usable = True
        self.busy = False
        self.retire_reason: Optional[str] = None
        self.started = time.monotonic()
        self.failures = 0
        self.channel: Any = _Mailbox()   # replaced by each task's own
        self._task_id: Optional[int] = None

    def __repr__(self) -> str:
        return f"<RaySlot gateway={self.pid} served={self.served}>"

    @property  # type: ignore[override]
    def usable(self) -> bool:
        return self._usable and not self.gateway.dead

    @usable.setter
    def usable(self, value: bool) -> None:
        self._usable = value

    def run(self, call: "_Call") -> bool:
        try:
            return super().run(call)
        finally:
            if self._task_id is not None:
                self.gateway.forget(self._task_id)
                self._task_id = None

    def _send(self, call: "_Call") -> None:
        self._task_id, self.channel = self.gateway.submit(call)

    def _entry_error(self, status: int, payload: Any) -> BaseException:
        if status == _wire.STATUS_LOST:
            message, pid, exitcode, sig = payload
            log.warning("%s", message)
            return WorkerLost(message, pid=pid, exitcode=exitcode, signal=sig)
        return super()._entry_error(status, payload)

    def _timed_out(self, call: "_Call", task_timeout: float) -> None:
        self._fail_pending(call, TaskTimeout(
            f"task ran longer than its task_timeout of {task_timeout} s; its Ray task was cancelled"))
        self.kill("timeout")

    def _lost(self, call: "_Call") -> None:
        self._usable = False
        self.retire_reason = "crash"
        code = self.gateway.exit_status(EXIT_REPORT_WAIT)
        exitcode = sig = None
        if code is None:
            how = "exited"
        elif code < 0:
            sig = -code
            how = f"was killed by signal {sig}"
        else:
            exitcode = code
            how = f"exited with code {code}"
        self._fail_pending(call, WorkerLost(
            f"the Ray gateway process {self.pid} {how} while running the task",
            pid=self.pid, exitcode=exitcode, signal=sig))

    def retire(self, reason: str) -> None:
        if self._usable or self.retire_reason is None:
            self.retire_reason = reason
        self._usable = False

    def kill(self, reason: str) -> None:
        if self._task_id is not None:
            self.gateway.cancel(self._task_id)
            self._task_id = None
        self.retire(reason)

    def reap(self, grace: float) -> Optional[int]:
        return None

    def rss(self) -> Optional[int]:
        return None


class RayBackend:
    """The pool's access to Ray: starts the gateway on first use and after it died.

    Args:
        max_procs: tasks in flight at most; also the CPUs of a local Ray started here.
        max_reqs: Ray's ``max_calls`` (0: unlimited).
        address: a Ray cluster's address, or None to start a private local Ray.
        init_kwargs: more keyword arguments for ``ray.init`` (they win over ours).
        sys_path: returns the pool's worker ``sys.path`` (a local Ray's workers get it).
        include: the pool's include directories (a cluster's workers get these only).
        initializer: the pool's encoded initializer, or None.
    """

    def __init__(self, max_procs: int, max_reqs: int, address: Optional[str],
                 init_kwargs: Dict[str, Any], sys_path: Callable[[], List[str]],
                 include: List[str], initializer: Optional[bytes]) -> None:
        self.max_procs = max_procs
        self.max_reqs = max_reqs
        self.address = address
        self.init_kwargs = dict(init_kwargs)
        self._sys_path = sys_path
        self._include = include
        self._initializer = initializer
        self._gateway: Optional[RayGateway] = None
        self._lock = Semaphore()

    @property
    def running(self) -> bool:
        """True while a gateway process exists (alive, or dead and not reaped yet)."""
        return self._gateway is not None

    @property
    def gateway(self) -> Optional[RayGateway]:
        return self._gateway

    def slot(self) -> RaySlot:
        """A new slot; starts the gateway first if needed (only the calling greenlet waits).

        Raises:
            PoolError: the gateway or Ray could not start.
        """
        gateway = self._gateway
        if gateway is None or gateway.dead:
            with self._lock:
                gateway = self._gateway
                if gateway is None or gateway.dead:
                    if gateway is not None:
                        self._gateway = None
                        gateway.stop()
                    gateway = RayGateway(self._config())
                    gateway.start()
                    self._gateway = gateway
        return RaySlot(gateway)

    def stop(self) -> None:
        """Stops the gateway (and a Ray it started); only the calling greenlet waits."""
        with self._lock:
            gateway, self._gateway = self._gateway, None
            if gateway is not None:
                gateway.stop()

    def detach_after_fork(self) -> None:
        """Forgets the gateway without stopping it (see RayGateway.detach_after_fork)."""
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway.detach_after_fork()

    def _config(self) -> Dict[str, Any]:
        local = self.address is None
        temp_dir = None
        if local:
            root = tempfile.gettempdir()
            if len(root) > _MAX_TEMP_ROOT and os.path.isdir("/tmp"):
                root = "/tmp"
            temp_dir = tempfile.mkdtemp(prefix="gpray-", dir=root)
        return {
            "address": self.address,
            "init_kwargs": self.init_kwargs,
            "num_cpus": self.max_procs,
            "max_calls": self.max_reqs,
            "temp_dir": temp_dir,
            "pkg_dir": _PKG_DIR,
            # Paths of this machine mean nothing on a cluster's other machines.
            "sys_path": self._sys_path() if local else list(self._include),
            "initializer": self._initializer,
        }
