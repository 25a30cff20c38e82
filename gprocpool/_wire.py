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

This module also holds the blocking frame I/O used inside worker processes, which never
run gevent.  The parent's cooperative side lives in :mod:`gprocpool._channel`.
"""
from __future__ import annotations

import os
import struct
from typing import Optional, Tuple

HEADER = struct.Struct("<BB2xIQ")
HEADER_SIZE = HEADER.size

# Frame kinds.
TASK = 1
REPLY = 10

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
# An entry with index ALL_ITEMS answers every item of the task not answered yet.
ALL_ITEMS = -1

# Reads are at most this large: enough to take many small replies in one system call,
# small enough that a reader never holds a huge idle buffer.
READ_CHUNK = 256 * 1024
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
