"""The wire format between the pool and its worker processes, in one place.

Every message on a worker's two pipes is one frame::

    +------+-------+---------+-----------+----------------------+
    | kind | flags | (pad 2) | nbuf: u32 | length: u64 | body  |
    +------+-------+---------+-----------+----------------------+
       1      1        2          4           8        length bytes

``kind`` says what the body is (see the constants below); ``flags`` bit 0 says the body
was written by dill rather than the C pickler.  ``nbuf`` is reserved for out-of-band
buffers and is 0 today.  The length is 64-bit so that payloads over 4 GiB are possible.

Parent to worker:
    TASK   body = serialized ``(fid, fn_blob_or_None, mode, items)``
Worker to parent:
    REPLY  body = serialized list of ``(index, status, payload)`` entries (see STATUS_*)

A reply frame may answer part of a TASK (results are flushed as they are ready), so the
parent keeps reading until every item of the task has an entry.

The Ray backend's gateway process multiplexes many tasks over one pair of pipes, so its
frames (kinds ``GW_*``) carry a task id: the body opens with ``task_id: u64``::

    Parent to gateway:
        GW_START   body = pickled config dict (the first frame, once)
        GW_TASK    body = task_id | TASK_PREFIX | function blob | items  (as a TASK body)
        GW_CANCEL  body = task_id            (stop that task: ray.cancel(force=True))
    Gateway to parent:
        GW_READY   body = pickled ("ok", info dict) or ("error", message)   (once)
        GW_REPLY   body = task_id | REPLY body

Replies for one task id come in order; a task answered by several GW_REPLY frames is
read like a TASK answered by several REPLY frames.  Closing the parent's pipe ends stops
the gateway.

This module also holds the blocking frame I/O used inside worker processes, which never
run gevent.  The parent's cooperative side lives in :mod:`gprocpool._channel`.
"""
from __future__ import annotations

import os
import struct
from typing import Any, List, Optional, Tuple

HEADER = struct.Struct("<BB2xIQ")
HEADER_SIZE = HEADER.size

# Frame kinds.
TASK = 1
REPLY = 10
# Frame kinds between the pool and the Ray gateway (see the module docstring).
GW_START = 20
GW_TASK = 21
GW_CANCEL = 22
GW_READY = 30
GW_REPLY = 31
TASK_ID = struct.Struct("<Q")

# Header flags.
FLAG_DILL = 1

# Task modes: how the worker calls the function on each item.
MODE_CALL = 0   # items are (args, kwargs) pairs: f(*args, **kwargs)
MODE_MAP = 1    # items are single values: f(item)

# Reply entry statuses.
STATUS_OK = 0        # payload: list of results for items index, index+1, ...
STATUS_ERROR = 1     # payload: (exception blob or None, type name, message, traceback)
STATUS_SERIAL = 2    # payload: (stage, type name, message, traceback)
STATUS_INIT = 3      # payload: (type name, message, traceback) of the failed initializer
STATUS_LOST = 4      # payload: (message, pid, exit code, signal): the process running it died
# An entry with index ALL_ITEMS answers every item of the task not answered yet.
ALL_ITEMS = -1

# Reads are at most this large: enough to take many small replies in one system call,
# small enough that a reader never holds a huge idle buffer.
READ_CHUNK = 256 * 1024
# Size of the reusable buffer small reads land in.
READ_SCRATCH = 64 * 1024
# Pipes are enlarged to this (Linux F_SETPIPE_SZ, unprivileged maximum by default) so that
# bulk payloads need fewer wake-ups; failure to enlarge is harmless.
PIPE_SIZE = 1024 * 1024


def pack_header(kind: int, flags: int, length: int) -> bytes:
    return HEADER.pack(kind, flags, 0, length)


def enlarge_pipe(fd: int) -> None:
    """Best effort: make the pipe buffer bigger (Linux only)."""
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        pass


# Bodies at least this large are unpickled as they come off the pipe (see FrameBody),
# instead of being gathered in a buffer first: one copy and 10 MB of page faults less.
STREAM_MIN = 1 << 20


class FrameBody:
    """A large frame body consumed as it arrives: a file object for pickle.Unpickler.

    pickle reads its small frames with read() and fills large bytes objects with
    readinto(), straight from the pipe.  Whoever reads a FrameBody must consume it all
    (or call drain()) before reading the next frame.

    Args:
        head: the first bytes of the body, already read.
        length: the whole body's length.
        raw_readinto: reads at least one byte from the pipe into a view; raises at EOF.
    """

    def __init__(self, head: bytes, length: int, raw_readinto) -> None:
        self._head = memoryview(head)
        self._raw_readinto = raw_readinto
        self.remaining = length

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        want = min(len(view), self.remaining)
        got = 0
        while got < want:
            if self._head:
                k = min(len(self._head), want - got)
                view[got:got + k] = self._head[:k]
                self._head = self._head[k:]
            else:
                k = self._raw_readinto(view[got:want])
            got += k
        self.remaining -= got
        return got

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.remaining:
            n = self.remaining
        buf = bytearray(n)
        self.readinto(buf)
        return bytes(buf)

    def readline(self) -> bytes:
        # Protocol 5 pickles never need it; kept for the file-object contract.
        line = bytearray()
        while self.remaining:
            c = self.read(1)
            line += c
            if c == b"\n":
                break
        return bytes(line)

    def drain(self) -> None:
        scratch = memoryview(bytearray(min(self.remaining, 1 << 16)))
        while self.remaining:
            self.readinto(scratch[:min(len(scratch), self.remaining)])


# -- blocking I/O, for worker processes -------------------------------------------------

def _read_exact(fd: int, n: int) -> Optional[bytearray]:
    """Reads exactly n bytes, or returns None on EOF before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            if got == 0:
                return None
            raise EOFError("pipe closed in the middle of a frame")
        got += k
    return buf


def read_frame(fd: int) -> Optional[Tuple[int, int, bytearray]]:
    """Blocks until a whole frame arrives; returns (kind, flags, body), or None on EOF."""
    head = _read_exact(fd, HEADER_SIZE)
    if head is None:
        return None
    kind, flags, _nbuf, length = HEADER.unpack(head)
    body = _read_exact(fd, length) if length else bytearray()
    if body is None:
        raise EOFError("pipe closed in the middle of a frame")
    return kind, flags, body


def _readinto_blocking(fd: int, view: memoryview) -> int:
    n = os.readv(fd, [view])
    if n == 0:
        raise EOFError("pipe closed in the middle of a frame")
    return n


class FrameReader:
    """Blocking, buffered frame reader for a worker's task pipe.

    One read usually brings a whole small frame, header and body, in one system call.
    A body of STREAM_MIN bytes or more comes as a FrameBody, to be consumed before the
    next frame is asked for.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._pos = 0
        # Reads land here: os.read() would allocate (and for large sizes mmap) a fresh
        # buffer on every call, which costs more than the read itself.
        self._scratch = bytearray(READ_SCRATCH)
        self._view = memoryview(self._scratch)

    def _fill(self, need: int) -> bool:
        """Makes at least need unread bytes available; False on EOF before any of them."""
        if len(self._buf) - self._pos >= need:
            return True
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        while len(self._buf) < need:
            n = os.readv(self.fd, [self._view])
            if not n:
                if not self._buf:
                    return False
                raise EOFError("pipe closed in the middle of a frame")
            self._buf += self._view[:n]
        return True

    def next_frame(self) -> Optional[Tuple[int, int, Any]]:
        """Blocks for the next frame: (kind, flags, body), or None on EOF."""
        if not self._fill(HEADER_SIZE):
            return None
        kind, flags, _nbuf, length = HEADER.unpack_from(self._buf, self._pos)
        self._pos += HEADER_SIZE
        if length >= STREAM_MIN:
            head = bytes(self._buf[self._pos:])
            self._buf.clear()
            self._pos = 0
            return kind, flags, FrameBody(head, length, lambda view: _readinto_blocking(self.fd, view))
        if length and not self._fill(length):
            raise EOFError("pipe closed in the middle of a frame")
        body = bytes(memoryview(self._buf)[self._pos:self._pos + length])
        self._pos += length
        return kind, flags, body


def write_frame_parts(fd: int, kind: int, flags: int, parts: List[bytes]) -> None:
    """Blocks until the whole frame, whose body is the concatenation of parts, is written."""
    length = sum(len(p) for p in parts)
    if length < 65536:
        write_frame(fd, kind, flags, b"".join(parts))
        return
    for data in [pack_header(kind, flags, length)] + parts:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def write_frame(fd: int, kind: int, flags: int, body: bytes) -> None:
    """Blocks until the whole frame is written."""
    head = pack_header(kind, flags, len(body))
    if len(body) < 65536:
        data = memoryview(head + body)
        while data:
            data = data[os.write(fd, data):]
        return
    data = memoryview(head)
    while data:
        data = data[os.write(fd, data):]
    data = memoryview(body)
    while data:
        data = data[os.write(fd, data):]
