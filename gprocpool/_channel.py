"""The parent's end of a worker's two pipes: framed, non-blocking, gevent-cooperative.

Only the calling greenlet waits: reads and writes that would block park the greenlet on
a libev/libuv I/O watcher and let the hub run everything else.  A channel is used by
one greenlet at a time (the one holding the worker), so it needs no locking.
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

from gevent import monkey
from gevent.hub import get_hub

from . import _wire

# The unpatched os.close.  Under monkey.patch_all() (gevent >= 25.8.1) os.close defers the
# close to a later turn of the event loop; a worker would then not see EOF on its task pipe
# until something else woke the loop.  Our fds' watchers are closed (or the loop told via
# closing_fd) before the fd itself, which is what the deferral protects against.
close_fd = monkey.get_original("os", "close")


class ChannelClosed(Exception):
    """The other end of the pipe is gone (the worker exited or was killed)."""


class Channel:
    """Owns the parent ends of one worker's pipes.

    Args:
        read_fd: the read end of the worker's result pipe.
        write_fd: the write end of the worker's task pipe.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._rfd = read_fd
        self._wfd = write_fd
        hub = get_hub()
        self._hub = hub
        self._read_watcher = hub.loop.io(read_fd, 1)
        self._write_watcher = hub.loop.io(write_fd, 2)
        self._buf = bytearray()
        self._pos = 0
        self._scratch = memoryview(bytearray(_wire.READ_SCRATCH))

    @property
    def closed(self) -> bool:
        return self._rfd < 0

    def send(self, kind: int, flags: int, parts: List[bytes]) -> None:
        """Writes one frame whose body is the concatenation of parts.

        The calling greenlet waits while the pipe is full.  Large parts are written from
        their own buffers, never copied into one.

        Raises:
            ChannelClosed: the worker closed its end.
        """
        length = 0
        for part in parts:
            length += len(part)
        head = _wire.pack_header(kind, flags, length)
        if length < 65536:
            self._write_all(memoryview(head + b"".join(parts)))
            return
        self._write_all(memoryview(head))
        for part in parts:
            self._write_all(memoryview(part))

    def _write_all(self, data: memoryview) -> None:
        while data:
            if self._wfd < 0:
                raise ChannelClosed("channel closed")
            try:
                data = data[os.write(self._wfd, data):]
            except BlockingIOError:
                self._hub.wait(self._write_watcher)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed("worker closed its task pipe") from exc

    def recv(self) -> Tuple[int, int, Any]:
        """Reads one frame: (kind, flags, body); the calling greenlet waits for it.

        A body of ``_wire.STREAM_MIN`` bytes or more is a ``_wire.FrameBody`` that must
        be consumed (or drained) before the next recv().

        Raises:
            ChannelClosed: EOF, the worker is gone.
        """
        header_size = _wire.HEADER_SIZE
        while len(self._buf) - self._pos < header_size:
            self._fill()
        kind, flags, _nbuf, length = _wire.HEADER.unpack_from(self._buf, self._pos)
        start = self._pos + header_size
        have = len(self._buf) - start
        if have >= length:
            body = memoryview(bytes(memoryview(self._buf)[start:start + length]))
            self._pos = start + length
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            return kind, flags, body
        head = bytes(memoryview(self._buf)[start:])
        self._buf.clear()
        self._pos = 0
        if length >= _wire.STREAM_MIN:
            # Unpickled as it arrives; the caller consumes it before the next recv().
            return kind, flags, _wire.FrameBody(head, length, self._readinto)
        # Read the rest straight into a buffer of the right size.
        out = bytearray(length)
        view = memoryview(out)
        view[:have] = head
        got = have
        while got < length:
            got += self._readinto(view[got:])
        return kind, flags, view

    def _fill(self) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        while True:
            if self._rfd < 0:
                raise ChannelClosed("channel closed")
            try:
                # Into a reusable buffer: os.read() would allocate one per call.
                n = os.readv(self._rfd, [self._scratch])
            except BlockingIOError:
                self._hub.wait(self._read_watcher)
                continue
            if not n:
                raise ChannelClosed("worker closed its result pipe")
            self._buf += self._scratch[:n]
            return

    def _readinto(self, view: memoryview) -> int:
        while True:
            if self._rfd < 0:
                raise ChannelClosed("channel closed")
            try:
                n = os.readv(self._rfd, [view])
            except BlockingIOError:
                self._hub.wait(self._read_watcher)
                continue
            if n == 0:
                raise ChannelClosed("worker closed its result pipe")
            return n

    def close(self) -> None:
        """Closes both pipe ends; a greenlet waiting on them gets ChannelClosed."""
        if self._rfd < 0:
            return
        exc = ChannelClosed("channel closed")
        # cancel_wait only throws into a greenlet that is still parked on the watcher.
        self._hub.cancel_wait(self._read_watcher, exc, True)
        self._hub.cancel_wait(self._write_watcher, exc, True)
        rfd, wfd = self._rfd, self._wfd
        self._rfd = self._wfd = -1
        loop = self._hub.loop
        for fd in (rfd, wfd):
            loop.closing_fd(fd)
            try:
                close_fd(fd)
            except OSError:
                pass

    def sever(self) -> None:
        """In a just-forked child: stop sharing the worker's pipes with the parent.

        The fd numbers stay taken (gevent may still watch them) but now name private
        pipes: reads see EOF and writes fail, so nothing in the child can steal or inject
        the parent's frames, and the worker still sees EOF when the parent closes.
        """
        sever_fd(self._rfd, readable=True)
        sever_fd(self._wfd, readable=False)

    def detach_after_fork(self) -> None:
        """Closes this process's copies of the fds without touching gevent watchers.

        For a forked child (whose hub is not the one the watchers belong to) and for
        finalizers, where switching greenlets is not allowed.
        """
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                try:
                    close_fd(fd)
                except OSError:
                    pass
        self._rfd = self._wfd = -1

    def __del__(self) -> None:
        # Last resort for a channel dropped without close(): never leak the fds.
        if getattr(self, "_rfd", -1) >= 0:
            self.detach_after_fork()


def sever_fd(fd: int, readable: bool) -> None:
    """Replaces fd by the closed end of a private pipe (EOF to read, EPIPE to write)."""
    if fd < 0:
        return
    r, w = os.pipe()
    keep, drop = (r, w) if readable else (w, r)
    close_fd(drop)
    os.dup2(keep, fd, inheritable=False)
    close_fd(keep)
