"""The Ray gateway: the one child process through which a ``backend="ray"`` pool uses Ray.

Ray cannot run inside a monkey-patched gevent process (its threads become greenlets and
a blocking gRPC poll freezes the hub), so the pool never imports Ray.  It starts this
program instead, by exec, in a fresh interpreter that imports neither gevent nor the
package's ``__init__``, and talks to it over two pipes with the ``GW_*`` frames of
:mod:`gprocpool._wire`::

    pool (gevent)              gateway main thread               Ray worker
    -------------              -------------------               ----------
    GW_TASK(id, task) -------> remote.remote(...) ------------> gprocpool_task(...)
                                                                 run_whole_task (_child)
                               future callback (Ray's thread)  <-- (flags, body, exit, pid)
                                 -> outbox queue
    GW_REPLY(id, body) <------ writer thread (the only writer)
    GW_CANCEL(id) -----------> ray.cancel(ref, force=True)

Every task is a Ray task with ``max_retries=0`` (never silently run twice) and, when the
pool has ``max_reqs``, ``max_calls=max_reqs``.  Items run with the same code as in a pool
worker, so a task's exception travels back as itself with its traceback; only the
failures of Ray itself (a worker that died, a task cancelled outside the pool) are
turned into ``STATUS_LOST`` or ``STATUS_ERROR`` entries here.

EOF on the task pipe (pool shutdown, or the pool's process died) stops the gateway:
in-flight tasks are cancelled, Ray is shut down and, if the gateway started Ray, the
temporary folder it gave Ray is removed.
"""
from __future__ import annotations

import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import threading
import traceback
import uuid
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from . import _wire
from ._child import FN_CACHE_SIZE, TASK_PREFIX, _flush_stdio
from ._template import set_parent_death_signal

# Ray's failures that mean "the process running the task is gone" (WorkerLost).
_LOST_ERRORS = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                "OutOfMemoryError", "ObjectLostError", "TaskCancelledError")
_STOP: Any = object()


def gprocpool_task(setup: Tuple[str, str, List[str], Optional[bytes]], fn_blob: bytes, mode: int,
                   flags: int, payload: bytes) -> Tuple[int, bytes, Optional[int], int]:
    """The Ray task (its name prefixes the task's output in Ray's logs).

    Shipped by value (see register_pickle_by_value), it runs in a Ray worker.
    """
    key, pkg_dir, sys_path, initializer = setup
    # Like a pool worker, see the pool's sys.path (first), so tasks import alike.
    for path in reversed(sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    child = sys.modules.get("gprocpool._child")
    if child is None:
        child = _import_child(pkg_dir)
    return child.run_whole_task(fn_blob, mode, flags, payload, initializer, key)


def _import_child(pkg_dir: str) -> Any:
    import importlib
    import types
    here = os.path.join(pkg_dir, "gprocpool")
    if "gprocpool" in sys.modules or not os.path.isfile(os.path.join(here, "_child.py")):
        # Another machine of a cluster: gprocpool as installed there.
        return importlib.import_module("gprocpool._child")
    # As in the pool's template: the worker-side modules without the package's
    # __init__ (which imports gevent); a task may still `import gprocpool` for real.
    stub = types.ModuleType("gprocpool")
    stub.__path__ = [here]  # type: ignore[attr-defined]
    sys.modules["gprocpool"] = stub
    try:
        return importlib.import_module("gprocpool._child")
    finally:
        if sys.modules.get("gprocpool") is stub:
            del sys.modules["gprocpool"]


class Gateway:
    """The gateway's state: Ray's handles of the tasks in flight, and the one writer."""

    def __init__(self, task_fd: int, result_fd: int, config: Dict[str, Any]) -> None:
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.config = config
        self.lock = threading.Lock()
        self.inflight: Dict[int, Any] = {}      # task id -> ObjectRef
        self.fns: "OrderedDict[int, bytes]" = OrderedDict()
        self.outbox: "queue.Queue[Any]" = queue.Queue()
        self.writer: Optional[threading.Thread] = None
        self.remote: Any = None
        self.setup_ref: Any = None
        self.ray: Any = None

    # -- starting -------------------------------------------------------------------------

    def start_ray(self) -> Dict[str, Any]:
        config = self.config
        address = config["address"]
        if address is None:
            # A private, loopback-only Ray: with this (Ray's own switch for single-machine
            # use) the node's address is 127.0.0.1 and every Ray server binds to it.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            os.environ.pop("RAY_ADDRESS", None)
            if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
                # Token auth on, with a token of this Ray's own: nothing written to ~/.ray.
                os.environ["RAY_AUTH_MODE"] = "token"
                os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex + uuid.uuid4().hex
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # ray.init() waits minutes for an address where nothing listens.
            _check_reachable(address)
        import ray
        import ray.cloudpickle
        self.ray = ray
        kwargs: Dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
        if address is None:
            kwargs.update(include_dashboard=False, num_cpus=config["num_cpus"],
                          _temp_dir=config["temp_dir"])
        kwargs.update(config["init_kwargs"])
        kwargs["address"] = address
        context = ray.init(**kwargs)
        # The Ray task must not need gprocpool's __init__ (gevent) in the Ray worker.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        options: Dict[str, Any] = {"max_retries": 0}
        if config["max_calls"]:
            options["max_calls"] = config["max_calls"]
        self.remote = ray.remote(**options)(gprocpool_task)
        self.setup_ref = ray.put((uuid.uuid4().hex, config["pkg_dir"], config["sys_path"],
                                  config["initializer"]))
        info = dict(getattr(context, "address_info", {}) or {})
        return {"pid": os.getpid(), "address": info.get("address") or info.get("gcs_address"),
                "session_dir": info.get("session_dir")}

    # -- the main loop --------------------------------------------------------------------

    def serve(self) -> None:
        self.writer = threading.Thread(target=self._write_loop, name="gprocpool-gateway-writer",
                                       daemon=True)
        self.writer.start()
        while True:
            frame = _wire.read_frame(self.task_fd)
            if frame is None:
                return
            kind, flags, body = frame
            if kind == _wire.GW_TASK:
                self._submit(flags, body)
            elif kind == _wire.GW_CANCEL:
                self._cancel(_wire.TASK_ID.unpack_from(body)[0])
            else:
                raise RuntimeError(f"unexpected frame kind {kind}")

    def _submit(self, flags: int, body: bytearray) -> None:
        view = memoryview(body)
        task_id, = _wire.TASK_ID.unpack_from(view)
        start = _wire.TASK_ID.size
        fid, blob_len, mode = TASK_PREFIX.unpack_from(view, start)
        start += TASK_PREFIX.size
        # The pool mirrors this cache (same size, same order) and sends a function's
        # bytes only when it is not in here.
        if blob_len:
            blob = self.fns[fid] = bytes(view[start:start + blob_len])
            if len(self.fns) > FN_CACHE_SIZE:
                self.fns.popitem(last=False)
        elif fid in self.fns:
            blob = self.fns[fid]
            self.fns.move_to_end(fid)
        else:  # the caches disagree: a bug, reported for this task only
            self._reply_entries(task_id, [(_wire.ALL_ITEMS, _wire.STATUS_ERROR, (
                None, "KeyError", f"the Ray gateway does not know function id {fid}", ""))])
            return
        payload = bytes(view[start + blob_len:])
        del view, body
        try:
            ref = self.remote.remote(self.setup_ref, blob, mode, flags, payload)
        except Exception as exc:  # noqa: BLE001 - e.g. an argument Ray refuses
            self._reply_entries(task_id, [(_wire.ALL_ITEMS, _wire.STATUS_ERROR, _ray_error(exc))])
            return
        with self.lock:
            self.inflight[task_id] = ref
        ref.future().add_done_callback(lambda future: self._done(task_id, future))

    def _cancel(self, task_id: int) -> None:
        with self.lock:
            ref = self.inflight.pop(task_id, None)
        if ref is not None:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - it finished meanwhile
                pass

    def _done(self, task_id: int, future: Any) -> None:
        # Runs in a thread of Ray's: only hands the result to the writer.
        with self.lock:
            if self.inflight.pop(task_id, None) is None:
                return  # the pool cancelled it and has already failed it
        try:
            flags, body, exit_code, pid = future.result()
        except BaseException as exc:  # noqa: BLE001 - Ray's errors, never the task's
            if any(cls.__name__ in _LOST_ERRORS for cls in type(exc).__mro__):
                entry = (_wire.ALL_ITEMS, _wire.STATUS_LOST,
                         (f"the Ray worker running the task was lost: {type(exc).__name__}: "
                          f"{_first_line(exc)}", None, None, None))
            else:
                entry = (_wire.ALL_ITEMS, _wire.STATUS_ERROR, _ray_error(exc))
            self._reply_entries(task_id, [entry])
            return
        self.outbox.put((_wire.GW_REPLY, flags, [_wire.TASK_ID.pack(task_id), body]))
        if exit_code is not None:
            # Unlike a pool worker, a Ray worker is not ours to end: the items after the
            # sys.exit() fail as they would in a worker that exited.
            self._reply_entries(task_id, [(_wire.ALL_ITEMS, _wire.STATUS_LOST, (
                f"the task called sys.exit({exit_code}) in Ray worker {pid}", pid, exit_code, None))])

    def _reply_entries(self, task_id: int, entries: List[Tuple[int, int, Any]]) -> None:
        body = pickle.dumps(entries, protocol=5)
        self.outbox.put((_wire.GW_REPLY, 0, [_wire.TASK_ID.pack(task_id), body]))

    def _write_loop(self) -> None:
        while True:
            item = self.outbox.get()
            if item is _STOP:
                return
            kind, flags, parts = item
            try:
                _wire.write_frame_parts(self.result_fd, kind, flags, parts)
            except OSError:
                return  # the pool is gone; the main loop sees EOF and stops

    # -- stopping -------------------------------------------------------------------------

    def stop(self) -> None:
        ray = self.ray
        if ray is not None:
            with self.lock:
                refs = list(self.inflight.values())
                self.inflight.clear()
            for ref in refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001
                    pass
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the folder goes anyway
                traceback.print_exc()
        if self.writer is not None:
            self.outbox.put(_STOP)
            self.writer.join(2.0)
        if self.config["address"] is None and self.config["temp_dir"]:
            shutil.rmtree(self.config["temp_dir"], ignore_errors=True)


def _check_reachable(address: str) -> None:
    """Fails fast if a ``host:port`` address has no listener ("auto", "ray://..." pass)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach a Ray cluster at {address}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _ray_error(exc: BaseException) -> Tuple[None, str, str, str]:
    """A STATUS_ERROR payload that the pool turns into RemoteError."""
    cls = type(exc)
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    return None, f"{cls.__module__}.{cls.__qualname__}", str(exc), tb


def main() -> None:
    task_fd, result_fd, parent_pid = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)  # the pool's process died before PR_SET_PDEATHSIG took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    gateway: Optional[Gateway] = None
    code = 0
    try:
        frame = _wire.read_frame(task_fd)
        if frame is None or frame[0] != _wire.GW_START:
            os._exit(1)
        config = pickle.loads(frame[2])
        gateway = Gateway(task_fd, result_fd, config)
        try:
            info = gateway.start_ray()
        except BaseException as exc:  # noqa: BLE001 - reported to the pool, which raises it
            message = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ImportError) and "ray" in str(exc):
                message += " (install the 'ray' extra: pip install 'gprocpool[ray]')"
            _wire.write_frame(result_fd, _wire.GW_READY, 0, pickle.dumps(("error", message)))
            code = 1
            return
        _wire.write_frame(result_fd, _wire.GW_READY, 0, pickle.dumps(("ok", info)))
        # ray.init() installed its own SIGTERM handler; ours stops the loop the same way.
        signal.signal(signal.SIGTERM, _terminate)
        gateway.serve()
    except SystemExit:
        pass
    except BrokenPipeError:
        code = 1  # the pool is gone (or gave up waiting for Ray to start)
    except BaseException:  # noqa: BLE001 - the pool sees EOF and fails the tasks in flight
        traceback.print_exc()
        code = 1
    finally:
        # A second SIGTERM (e.g. the parent-death signal after EOF) must not cut this short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if gateway is not None:
            gateway.stop()
        _flush_stdio()
        os._exit(code)


def _terminate(*_: Any) -> None:
    raise SystemExit(0)
