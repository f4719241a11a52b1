"""Workers as child processes of this Python: ``local:N``, no ssh, no set-up."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from ..worker.pipes import widen
from .base import WORKER_PACKAGE, CpuState, PipeStreams, bootstrap_code, kill_group, local_cpu_state
from .forked import ForkedProcess, ForkServer

log = logging.getLogger(__name__)

#: The fork server needs pidfds (Linux 5.3+); tests of the one-interpreter-per-worker path turn it off.
USE_FORK_SERVER = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class LocalProcess(PipeStreams):
    """A worker running as a child process, talking over its stdin/stdout pipes."""

    def __init__(self, name: str, popen: subprocess.Popen) -> None:
        super().__init__(popen.stdin.fileno(), popen.stdout.fileno(), popen.stderr.fileno())
        self.name = name
        self.popen = popen
        self.pid = popen.pid

    def held_fds(self) -> list[int]:
        return [p.fileno() for p in (self.popen.stdin, self.popen.stdout, self.popen.stderr) if not p.closed]

    def close(self) -> None:
        try:
            self.popen.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            kill_group(self.pid)
            self.popen.kill()
        else:  # its helpers, if any outlived it
            kill_group(self.pid)

    def cpu_state(self) -> CpuState | None:
        return local_cpu_state(self.pid) if self.popen.poll() is None else None

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

    def drop(self) -> None:
        """Nothing beyond ``close``: its stdin closes once what was queued is written."""


class LocalTransport:
    """Starts workers with this interpreter, in this directory, seeing this ``sys.path``.

    The notebook's ``sys.path`` travels in ``QJAM_EXTRA_PATH`` (appended by the
    worker), so a module the notebook imports from a path it added imports on
    the worker too.
    """

    host = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable
        self._server: ForkServer | None = None
        self._server_failed = False

    def start(self, names: Sequence[str], env: dict[str, str] | None = None) -> list[LocalProcess | ForkedProcess]:
        """Fork the workers from this transport's fork server (started on first use: Python and the
        worker package once, not once a worker); where it fails, start each as a new interpreter.
        ``env`` is added to this process's environment, which they get."""
        extra = env or {}
        env = dict(os.environ)
        env["QJAM_EXTRA_PATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update(extra)
        procs: list[LocalProcess | ForkedProcess] = []
        for name in names:
            proc = self._fork(name, env)
            if proc is None:
                popen = subprocess.Popen(
                    [self.python, "-c", bootstrap_code(str(WORKER_PACKAGE), name)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    bufsize=0,
                    env=env,
                    start_new_session=True,  # Ctrl-C in a terminal reaches the master only
                )
                proc = LocalProcess(name, popen)
                for pipe in (popen.stdin, popen.stdout):
                    widen(pipe.fileno())
            procs.append(proc)
        return procs

    def _fork(self, name: str, env: dict[str, str]) -> ForkedProcess | None:
        if self._server_failed or not USE_FORK_SERVER:
            return None
        try:
            if self._server is None:
                self._server = ForkServer(self.python, env)
            return self._server.spawn(name, env, os.getcwd())
        except OSError as e:  # ForkServerError, TimeoutError: the slow way, from now on
            # (A server that failed still reports on the workers it forked, if it can; closed with us.)
            log.warning("qjam_nb: local workers start as new interpreters (the fork server failed: %s)", e)
            self._server_failed = True
            return None

    alive = True  # nothing to lose: no connection
    uploaded = 0  # nothing to upload: the worker package is here

    def describe(self) -> str:
        return "worker processes on this machine"

    def close(self, deadline: float | None = None) -> None:
        """End the fork server (each worker's pipes close with it)."""
        if self._server is not None:
            self._server.close()
            self._server = None
