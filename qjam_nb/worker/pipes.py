"""Writing a whole message to a pipe in as few system calls as it allows.

Used by the worker for its stdout and by the master for local workers' stdin.
One ``writev`` per message, not one ``write`` per chunk (header, pickle,
buffers): every write wakes the reader on the other side, and on a small
machine each wake-up can cost a context switch (a worker round trip took
~25% less this way).
"""

from __future__ import annotations

import os

#: At most this many buffers per writev (Linux's limit, UIO_MAXIOV, is 1024).
IOV_MAX = 512


def write_all(fd: int, chunks: list) -> None:
    """Write every byte of ``chunks`` (bytes-like objects), in order, to ``fd`` (blocking)."""
    views = [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        done = 0
        while done < len(views) and n >= views[done].nbytes:
            n -= views[done].nbytes
            done += 1
        del views[:done]
        if n:
            views[0] = views[0][n:]
