"""Writing a whole message to a pipe in as few system calls as it allows.

Used by the worker for its stdout and by the master for local workers' stdin.
One ``writev`` per message, not one ``write`` per chunk (header, pickle,
buffers): every write wakes the reader on the other side, and on a small
machine each wake-up can cost a context switch (a worker round trip took
~25% less this way).
"""

from __future__ import annotations

import fcntl
import os
import select

#: A local worker's pipes hold this much (Linux's default is 64 KiB).
PIPE_SIZE = 1 << 20


def widen(fd: int) -> None:
    """Give a pipe a 1 MiB buffer instead of Linux's 64 KiB: about twice the throughput for slices."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over /proc/sys/fs/pipe-max-size for this user: keep the default
            pass


#: At most this many buffers per writev (Linux's limit, UIO_MAXIOV, is 1024).
IOV_MAX = 512


def write_all(fd: int, chunks: list) -> None:
    """Write every byte of ``chunks`` (bytes-like objects), in order, to ``fd``, waiting as needed
    (also when ``fd`` is non-blocking)."""
    if len(chunks) <= IOV_MAX:  # the usual message: one writev of the chunks as they are, no views
        try:
            n = os.writev(fd, chunks)
        except BlockingIOError:
            n = 0
        if n == sum(c.nbytes if isinstance(c, memoryview) else len(c) for c in chunks):
            return
        views = _views(chunks)
        _advance(views, n)
    else:
        views = _views(chunks)
    while views:
        try:
            n = os.writev(fd, views[:IOV_MAX])
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        _advance(views, n)


def write_some(fd: int, chunks: list, size: int | None = None) -> int:
    """Write what a non-blocking ``fd`` takes now of ``chunks``, in order; returns the bytes written.

    With ``size`` (their bytes: chunks of bytes or byte-format memoryviews) the usual case, all of it
    at once, costs one ``writev`` and no views.
    """
    if size is not None and len(chunks) <= IOV_MAX:
        try:
            n = os.writev(fd, chunks)
        except BlockingIOError:
            return 0
        if n == size:
            return n
        views = _views(chunks)
        _advance(views, n)
        return n + write_some(fd, views)
    views = _views(chunks)
    total = 0
    while views:
        try:
            n = os.writev(fd, views[:IOV_MAX])
        except BlockingIOError:
            break
        total += n
        _advance(views, n)
    return total


def remainder(chunks: list, written: int) -> list:
    """What is left of ``chunks`` once their first ``written`` bytes went out."""
    views = _views(chunks)
    _advance(views, written)
    return views


def _views(chunks: list) -> list:
    return [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]


def _advance(views: list, n: int) -> None:
    done = 0
    while done < len(views) and n >= views[done].nbytes:
        n -= views[done].nbytes
        done += 1
    del views[:done]
    if n:
        views[0] = views[0][n:]
