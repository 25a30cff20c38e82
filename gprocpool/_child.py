"""The worker process's main loop.

Workers are plain blocking programs: they never run gevent (the parent does all the
cooperative waiting).  A worker reads one TASK frame at a time from its task pipe, runs
every item, and writes REPLY frames to its result pipe.  It exits on EOF of the task
pipe, which is also how the parent retires it.

Replies are flushed as soon as an item takes a while, and at least every
``FLUSH_INTERVAL`` seconds otherwise, so that a crash loses at most the results of the
tiny items completed in the last few milliseconds (those fail with ``WorkerLost``;
nothing is silently dropped).
"""
from __future__ import annotations

import os
import struct
import sys
import time
from collections import OrderedDict
from itertools import islice
from typing import Any, Callable, List, Optional, Set, Tuple

from . import _serial, _wire

FLUSH_INTERVAL = 0.002
# How many functions a worker keeps decoded.  The parent mirrors this LRU exactly
# (see Worker.encode_task), so both sides agree on what a function id refers to.
FN_CACHE_SIZE = 64

TASK_PREFIX = struct.Struct("<QIB3x")   # fid, length of the function blob (0: cached), mode


class _FnLoadError:
    """Stands in the cache for a function that failed to decode, so the caches stay in step."""

    def __init__(self, status: int, info: Tuple[Any, ...]) -> None:
        self.status = status
        self.info = info


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a task may have closed or replaced them
            pass


class Replies:
    """Collects the reply entries of one task; consecutive results share one entry."""

    def __init__(self) -> None:
        self.entries: List[Tuple[int, int, Any]] = []
        self.ok_start = -1
        self.ok_values: List[Any] = []

    def ok(self, index: int, value: Any) -> None:
        if self.ok_start < 0:
            self.ok_start = index
        self.ok_values.append(value)

    def ok_many(self, index: int, values: List[Any]) -> None:
        """Results of the consecutive items index, index + 1, ..."""
        if not values:
            return
        if self.ok_start < 0:
            self.ok_start = index
        self.ok_values.extend(values)

    def add(self, index: int, status: int, payload: Any) -> None:
        self._close_run()
        self.entries.append((index, status, payload))

    def _close_run(self) -> None:
        if self.ok_start >= 0:
            self.entries.append((self.ok_start, _wire.STATUS_OK, self.ok_values))
            self.ok_start = -1
            self.ok_values = []

    def maybe_flush(self) -> None:
        """Called after each item; replies that stream (see _Replier) send what is ready."""

    def flush(self) -> None:
        self._close_run()

    def take(self) -> List[Tuple[int, int, Any]]:
        """Returns the entries collected so far and forgets them."""
        self._close_run()
        entries, self.entries = self.entries, []
        return entries


class _Replier(Replies):
    """Writes a task's reply entries to the result pipe in as few frames as is safe."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.last_flush = time.monotonic()

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        entries = self.take()
        if not entries:
            return
        try:
            # As parts: a big result is written from its own buffer, never copied.
            parts, used_dill = _serial.dumps_parts(entries)
        except BaseException:  # noqa: BLE001 - _encode_entries finds the culprits
            body, used_dill = _encode_entries(entries)
            parts = [body]
        _flush_stdio()
        _wire.write_frame_parts(self.fd, _wire.REPLY, _wire.FLAG_DILL if used_dill else 0, parts)
        self.last_flush = time.monotonic()


def _encode_entries(entries: List[Tuple[int, int, Any]]) -> Tuple[bytes, bool]:
    try:
        return _serial.dumps(entries)
    except BaseException:  # noqa: BLE001 - find the results that cannot travel
        # (a __reduce__ may even call sys.exit: the worker must survive it)
        pass
    fixed: List[Tuple[int, int, Any]] = []
    for index, status, payload in entries:
        if status != _wire.STATUS_OK:
            fixed.append((index, status, payload))
            continue
        for offset, value in enumerate(payload):
            try:
                _serial.dumps(value)
                fixed.append((index + offset, _wire.STATUS_OK, [value]))
            except BaseException as exc:  # noqa: BLE001
                fixed.append((index + offset, _wire.STATUS_SERIAL,
                              ("result", type(exc).__name__,
                               f"the result ({type(value).__qualname__}) could not be "
                               f"serialized: {exc}", "")))
    return _serial.dumps(fixed)


def _error_info(exc: BaseException) -> Tuple[str, str, str]:
    _blob, type_name, message, tb = _serial.encode_exception(exc)
    return type_name, message, tb


def _load_function(blob: bytes) -> Any:
    try:
        return _serial.decode_callable(blob)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        if blob[:1] == b"N":
            # A task name that does not resolve is the task's own error: it names what is missing.
            return _FnLoadError(_wire.STATUS_ERROR, _serial.encode_exception(exc))
        return _FnLoadError(_wire.STATUS_SERIAL, ("function (in worker)",) + _error_info(exc))
    except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit from a __setstate__
        return _FnLoadError(_wire.STATUS_SERIAL, ("function (in worker)",) + _error_info(exc))


def run_initializer(blob: bytes) -> Optional[Tuple[str, str, str]]:
    """Runs the pool's initializer; returns its error info if it raised (else None)."""
    error = None
    try:
        fn, args = _serial.loads(blob, True)
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - reported on the first task
        error = _error_info(exc)
    _flush_stdio()
    return error


_NO_ITEMS: Any = object()


def load_items(data: Any, used_dill: bool, replies: Replies) -> Any:
    """Decodes a task's items; on failure records the error for every item, returns _NO_ITEMS."""
    try:
        return _serial.loads(data, used_dill)
    except BaseException as exc:  # noqa: BLE001 - includes SystemExit from __setstate__
        replies.add(_wire.ALL_ITEMS, _wire.STATUS_SERIAL, ("arguments (in worker)",) + _error_info(exc))
        return _NO_ITEMS


def _discard(data: Any) -> None:
    if isinstance(data, _wire.FrameBody):
        data.drain()


def run_worker(task_fd: int, result_fd: int, initializer: Optional[bytes]) -> None:
    """Serves tasks until the task pipe reaches EOF; never returns."""
    init_error: Optional[Tuple[str, str, str]] = None
    if initializer is not None:
        init_error = run_initializer(initializer)

    fns: "OrderedDict[int, Any]" = OrderedDict()
    reader = _wire.FrameReader(task_fd)
    code = 0
    try:
        while True:
            frame = reader.next_frame()
            if frame is None:
                break
            kind, flags, body = frame
            if kind != _wire.TASK:
                raise RuntimeError(f"unexpected frame kind {kind}")
            if isinstance(body, _wire.FrameBody):
                # A large task: its items are unpickled as they come off the pipe.
                fid, blob_len, mode = TASK_PREFIX.unpack(body.read(TASK_PREFIX.size))
                blob = body.read(blob_len)
                data: Any = body
            else:
                view = memoryview(body)
                fid, blob_len, mode = TASK_PREFIX.unpack_from(view)
                start = TASK_PREFIX.size
                blob = bytes(view[start:start + blob_len])
                data = view[start + blob_len:]
            if blob_len:
                fns[fid] = _load_function(blob)
                if len(fns) > FN_CACHE_SIZE:
                    fns.popitem(last=False)
            else:
                fns.move_to_end(fid)
            fn = fns[fid]
            replier = _Replier(result_fd)
            if init_error is not None:
                replier.add(_wire.ALL_ITEMS, _wire.STATUS_INIT, init_error)
                replier.flush()
                code = 1
                break
            if isinstance(fn, _FnLoadError):
                _discard(data)
                replier.add(_wire.ALL_ITEMS, fn.status, fn.info)
                replier.flush()
                continue
            items = load_items(data, bool(flags & _wire.FLAG_DILL), replier)
            _discard(data)   # the rest of a streamed frame, if unpickling stopped early
            if items is _NO_ITEMS:
                replier.flush()
                continue
            del data, body
            exit_code = _run_items(fn, mode, items, replier)
            replier.flush()
            if exit_code is not None:
                code = exit_code
                break
    finally:
        _flush_stdio()
    os._exit(code)


def _run_items(fn: Callable[..., Any], mode: int, items: List[Any], replier: Replies) -> Optional[int]:
    """Runs the items; returns an exit code if a task asked the worker to exit."""
    if mode == _wire.MODE_MAP:
        return _run_map(fn, items, replier)
    for index, item in enumerate(items):
        try:
            if mode == _wire.MODE_MAP:
                value = fn(item)
            else:
                args, kwargs = item
                value = fn(*args, **kwargs) if kwargs else fn(*args)
        except SystemExit as exc:
            # The task asked the process to exit: deliver what is done, then do so.  The
            # parent reports WorkerLost with this exit code for the task.
            replier.flush()
            return _exit_code(exc)
        except BaseException as exc:  # noqa: BLE001 - every task error goes back to the caller
            replier.add(index, _wire.STATUS_ERROR, _serial.encode_exception(exc))
        else:
            replier.ok(index, value)
        replier.maybe_flush()
    return None


# A map's items run in runs that double while a run takes less than this, so the clock
# is read once per run instead of once per item (tiny items cost ~50 ns each here).  A
# run that took longer drops back to one item, so a slow item's result is flushed as
# soon as it is ready.
SHORT_RUN = 0.0005


def _run_map(fn: Callable[..., Any], items: List[Any], replier: Replies) -> Optional[int]:
    n = len(items)
    index = 0
    run = 1
    monotonic = time.monotonic
    while index < n:
        stop = min(n, index + run)
        started = monotonic()
        done: List[Any] = []
        try:
            # list.extend keeps what it appended before an item raised, so the results
            # before a failing item are not lost; and the loop runs in C.
            done.extend(map(fn, islice(items, index, stop)))
        except SystemExit as exc:
            replier.ok_many(index, done)
            replier.flush()
            return _exit_code(exc)
        except BaseException as exc:  # noqa: BLE001 - every task error goes back to the caller
            replier.ok_many(index, done)
            failed = index + len(done)
            replier.add(failed, _wire.STATUS_ERROR, _serial.encode_exception(exc))
            index = failed + 1
            run = 1
        else:
            replier.ok_many(index, done)
            index = stop
            run = run * 2 if monotonic() - started < SHORT_RUN else 1
        replier.maybe_flush()
    return None


# -- whole tasks, for processes that are not pool workers (the Ray backend) -------------

# Functions decoded here, by their encoded bytes: a Ray worker may serve several pools, so
# the pool's function ids mean nothing here.
_decoded: "OrderedDict[bytes, Any]" = OrderedDict()
# Keys of the pools whose initializer has run in this process.
_initialized: Set[str] = set()


def run_whole_task(fn_blob: bytes, mode: int, flags: int, payload: bytes,
                   initializer: Optional[bytes] = None,
                   init_key: str = "") -> Tuple[int, bytes, Optional[int], int]:
    """Runs one task in this process, as a worker would, and encodes its replies at once.

    Used by the Ray backend, whose workers run one task per call and hand the replies
    back as a return value instead of frames.  The initializer runs once per process
    and ``init_key``; if it raises, this task fails with its error and the next one
    tries again.

    Returns:
        (frame flags, REPLY body, exit code if a task called sys.exit else None, pid).
    """
    replies = Replies()
    exit_code = None
    if initializer is not None and init_key not in _initialized:
        init_error = run_initializer(initializer)
        if init_error is not None:
            replies.add(_wire.ALL_ITEMS, _wire.STATUS_INIT, init_error)
        else:
            _initialized.add(init_key)
    if not replies.entries:
        fn = _decoded.get(fn_blob)
        if fn is None:
            fn = _decoded[fn_blob] = _load_function(fn_blob)
            if len(_decoded) > FN_CACHE_SIZE:
                _decoded.popitem(last=False)
        else:
            _decoded.move_to_end(fn_blob)
        if isinstance(fn, _FnLoadError):
            replies.add(_wire.ALL_ITEMS, fn.status, fn.info)
        else:
            items = load_items(payload, bool(flags & _wire.FLAG_DILL), replies)
            if items is not _NO_ITEMS:
                del payload
                exit_code = _run_items(fn, mode, items, replies)
    _flush_stdio()
    body, used_dill = _encode_entries(replies.take())
    return (_wire.FLAG_DILL if used_dill else 0), body, exit_code, os.getpid()
