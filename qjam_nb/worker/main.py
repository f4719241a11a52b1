"""The worker program: reads frames on stdin, runs mapfunc on slices, writes frames on stdout.

Ground rules of this file: it travels to machines that have nothing but a
Python, so it imports the standard library, cloudpickle and its siblings only,
never anything of the master. The master loads this package under the name
``qjam_worker`` (see ``qjam_nb.transport.base``). It only wires the pieces to
the process's fds and runs them: the decisions are ``core.WorkerCore``'s
(sans-IO), the reading, writing, threads and timer ``io.Shell``'s.

fd 1 is moved aside before anything else runs: the protocol keeps a private
copy of the real stdout, and fds 1 and 2 become pipes whose contents travel to
the master as STREAM messages. A ``print`` in mapfunc or a C library writing
to fd 1 can therefore never corrupt the stream. The real stderr is kept for
what must survive a crash (faulthandler's report, a fatal protocol error).
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import platform
import re
import signal
import socket
import sys
import threading

import cloudpickle

from . import io, protocol, threads
from .core import WorkerCore
from .io import Channel, OutputPump, SharedSlices, Shell
from .messages import Hello

__all__ = ["Channel", "main", "versions"]


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "numpy": numpy_version(),
        "protocol": protocol.PROTOCOL_VERSION,
    }


def numpy_version() -> str | None:
    """numpy's version without importing it: from its ``version.py`` (~1 ms), or else from its
    installed metadata (``importlib.metadata`` alone takes ~60 ms to import: a worker's HELLO waited on it)."""
    try:
        spec = importlib.util.find_spec("numpy")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for place in spec.submodule_search_locations or ():
        try:
            with open(os.path.join(place, "version.py")) as f:
                found = re.search(r"""^version(?:\s*:\s*str)?\s*=\s*['"]([^'"]+)['"]""", f.read(), re.M)
        except OSError:
            continue
        if found:
            return found.group(1)
    try:
        from importlib.metadata import version

        return version("numpy")
    except Exception:
        return None


def keep_temporaries_in_heap() -> None:
    """Let glibc's malloc reuse freed blocks of up to 32 MiB instead of unmapping them.

    A fresh process mmaps every block of 128 KiB or more and gives it back when
    freed, so a mapfunc's numpy temporaries cost their page faults again on every
    slice (a 500-row slice of the sparse autoencoder took 0.79 ms in a new process,
    0.48 ms with these settings). Workers are long-lived compute processes: keeping
    up to 64 MiB of freed heap is the better trade. Elsewhere than glibc: nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError, ImportError):
        pass


def main(name: str | None = None) -> None:
    """Take over this process's stdio and serve the master until stdin closes."""
    name = name or os.environ.get("QJAM_WORKER_NAME") or f"{socket.gethostname()}/{os.getpid()}"
    blas = threads.apply()  # before anything loads numpy here (see threads)
    for entry in os.environ.get("QJAM_EXTRA_PATH", "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)
    keep_temporaries_in_heap()
    try:  # a process group of our own: the master kills it whole (mapfunc's helpers too)
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)
    except OSError:
        pass
    fd_in, fd_out = os.dup(0), os.dup(1)
    io.STDERR_FD = os.dup(2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    faulthandler.enable(file=io.STDERR_FD)
    if protocol.TRACING:
        protocol.TRACE_FILE = os.fdopen(os.dup(io.STDERR_FD), "w", buffering=1)
    channel = Channel(fd_out, name)
    shell = Shell(WorkerCore(name, shared=SharedSlices()), fd_in, channel)
    shell.pump = OutputPump(channel)
    signal.signal(signal.SIGINT, shell.interrupt)
    channel.send(Hello(worker=name, pid=os.getpid(), host=socket.gethostname(), blas=blas, **versions()))
    threading.Thread(target=shell.watch, name="qjam-watch", daemon=True).start()
    shell.serve()
