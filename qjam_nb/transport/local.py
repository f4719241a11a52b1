"""Workers as child processes of this Python: ``local:N``, no ssh, no set-up."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from ..worker.pipes import write_all, write_some
from .base import WORKER_PACKAGE, bootstrap_code


class LocalProcess:
    """A worker running as a child process, talking over its stdin/stdout pipes."""

    shares_memory = True  # same machine: large array slices go through /dev/shm (worker.sharedmem)

    def __init__(self, name: str, popen: subprocess.Popen) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self._fds = (popen.stdout.fileno(), popen.stderr.fileno())
        for pipe in (popen.stdin, popen.stdout, popen.stderr):  # only this process uses these ends
            os.set_blocking(pipe.fileno(), False)

    def poll_fds(self) -> tuple[int, ...]:
        return self._fds

    def read_ready(self, buffer: memoryview) -> int | None:
        try:
            return os.readv(self._fds[0], [buffer])
        except BlockingIOError:
            return None

    def read_stderr_ready(self) -> bytes | None:
        try:
            return os.read(self._fds[1], 65536)
        except BlockingIOError:
            return None

    def write(self, chunks: list) -> None:
        write_all(self.popen.stdin.fileno(), chunks)

    def write_ready(self, chunks: list, size: int) -> int:
        return write_some(self.popen.stdin.fileno(), chunks, size)

    def close(self) -> None:
        try:
            self.popen.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def interrupt(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGINT)

    def exit_status(self) -> int | None:
        return self.popen.poll()

    def release(self) -> None:
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


PIPE_SIZE = 1 << 20


def widen(fd: int) -> None:
    """Give a pipe a 1 MiB buffer instead of Linux's 64 KiB: about twice the throughput for slices."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over /proc/sys/fs/pipe-max-size for this user: keep the default
            pass


class LocalTransport:
    """Starts workers with this interpreter, in this directory, seeing this ``sys.path``.

    The notebook's ``sys.path`` travels in ``QJAM_EXTRA_PATH`` (appended by the
    worker), so a module the notebook imports from a path it added imports on
    the worker too.
    """

    host = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable

    def start(self, names: Sequence[str]) -> list[LocalProcess]:
        env = dict(os.environ)
        env["QJAM_EXTRA_PATH"] = os.pathsep.join(p for p in sys.path if p)
        procs = []
        for name in names:
            popen = subprocess.Popen(
                [self.python, "-c", bootstrap_code(str(WORKER_PACKAGE), name)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches the master only
            )
            for pipe in (popen.stdin, popen.stdout):
                widen(pipe.fileno())
            procs.append(LocalProcess(name, popen))
        return procs

    alive = True  # nothing to lose: no connection

    def close(self) -> None:
        """Nothing to close: each worker's pipes close with it."""
