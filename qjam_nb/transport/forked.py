"""Local workers forked by a fork server (``worker/forkserver.py``), the master's side.

A ``ForkServer`` is one child process of the master, started once per
``LocalTransport``; ``spawn`` makes the worker's three pipes here and has the
server fork a worker onto them. A ``ForkedProcess`` is then the same byte
streams and process control as a ``LocalProcess``, but the worker is the
server's child: its signals go through a pidfd (never to a reused pid), and
its exit status comes from the server, which reaps it.

Why not ``multiprocessing``'s forkserver: its children import the master's
``__main__`` again (a script without a ``__main__`` guard would run twice),
and it hands a process object to a function rather than a fresh worker its
stdio, which the worker and the ssh transport share.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time

from ..worker.pipes import widen
from .base import (
    WORKER_PACKAGE,
    CpuState,
    PipeStreams,
    forget,
    forget_in_children,
    forkserver_code,
    kill_group,
    local_cpu_state,
)

#: Seconds for the server to start Python and import the worker package.
START_TIMEOUT = 30.0


class ForkServerError(OSError):
    """The fork server could not start or answer; the caller starts workers the slow way."""


def _recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``, with the descriptors close-on-exec from the start, as every descriptor
    to a worker is (Python 3.11's ``recv_fds`` drops its ``flags``)."""
    fds = array.array("i")
    message, ancdata, _, _ = sock.recvmsg(bufsize, socket.CMSG_LEN(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)


class ForkServer:
    """The master's end of one fork server: starts it, asks it for workers, keeps the exit statuses it reports."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [python, "-c", forkserver_code(str(WORKER_PACKAGE), theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        forget_in_children(self)
        self.exits: dict[int, int] = {}  # pid -> status, as the server reported them
        self._lock = threading.Lock()
        try:
            ready, _ = self._next(time.monotonic() + START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        if "ready" not in ready:
            self.close()
            raise ForkServerError(f"the fork server said {ready!r}, not that it was ready")

    def spawn(self, name: str, env: dict[str, str], cwd: str) -> ForkedProcess:
        """Fork a worker named ``name``; raises ForkServerError (nothing left behind) if the server cannot."""
        ends = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # stdin, stdout, stderr
        theirs = [ends[0][0], ends[1][1], ends[2][1]]
        for fd in (ends[0][1], ends[1][0]):
            widen(fd)
        try:
            with self._lock:
                socket.send_fds(self.sock, [json.dumps({"name": name, "env": env, "cwd": cwd}).encode()], theirs)
                reply, fds = self._next(time.monotonic() + START_TIMEOUT)
        except BaseException:
            for fd in (ends[0][1], ends[1][0], ends[2][0]):
                os.close(fd)
            raise
        finally:
            for fd in theirs:  # the worker's now (or nobody's)
                os.close(fd)
        if "pid" not in reply or len(fds) != 1:
            for fd in (ends[0][1], ends[1][0], ends[2][0], *fds):
                os.close(fd)
            raise ForkServerError(f"the fork server answered {reply!r} to a fork")
        return ForkedProcess(name, reply["pid"], fds[0], ends[0][1], ends[1][0], ends[2][0], self)

    def exit_status(self, pid: int, timeout: float = 0.0) -> int | None:
        """The worker's exit status once the server reported it (waiting up to ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while pid not in self.exits:
                try:
                    _, fds = self._receive(deadline)
                except (TimeoutError, ForkServerError):
                    return None
                for fd in fds:  # a late answer to a fork that had given up waiting for it
                    os.close(fd)
            return self.exits[pid]

    def _next(self, deadline: float) -> tuple[dict, list[int]]:
        """The next message that is not an exit report; ``deadline`` is monotonic."""
        while True:
            body, fds = self._receive(deadline)
            if "exited" not in body:
                return body, fds

    def _receive(self, deadline: float) -> tuple[dict, list[int]]:
        """The next message (an exit report is recorded too). Raises TimeoutError at the deadline,
        ForkServerError if the server is gone."""
        left = deadline - time.monotonic()
        if self.sock.fileno() < 0:
            raise ForkServerError("the fork server was closed")
        if not select.select([self.sock], [], [], max(0.0, left))[0]:
            raise TimeoutError("the fork server did not answer in time")
        try:
            message, fds = _recv_fds(self.sock, 1 << 16, 1)
        except OSError as e:
            raise ForkServerError(f"the fork server is gone ({e})") from e
        if not message:
            raise ForkServerError("the fork server is gone")
        body = json.loads(message)
        if "exited" in body:
            self.exits[body["exited"]] = body["status"]
        return body, fds

    def forget_in_child(self) -> None:
        forget([self.sock.fileno()])  # -1 once closed: skipped

    def close(self) -> None:
        """End the server (its workers run on until their stdin closes) and reap it."""
        self.sock.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class ForkedProcess(PipeStreams):
    """A worker forked by the ``ForkServer``, talking over its stdin/stdout pipes (as a LocalProcess)."""

    def __init__(self, name: str, pid: int, pidfd: int, stdin: int, stdout: int, stderr: int,
                 server: ForkServer) -> None:
        super().__init__(stdin, stdout, stderr)
        self.name = name
        self.pid = pid
        self._pidfd = pidfd
        self._server = server
        self._open = [stdin, stdout, stderr, pidfd]

    def held_fds(self) -> list[int]:
        return list(self._open)

    def close(self) -> None:
        self._close(self._stdin)

    def kill(self) -> None:
        kill_group(self.pid)  # its helpers too (the worker is its group's leader)
        self._signal(signal.SIGKILL)

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def cpu_state(self) -> CpuState | None:
        return local_cpu_state(self.pid) if self.exit_status() is None else None

    def exit_status(self) -> int | None:
        return self._server.exit_status(self.pid)

    def release(self) -> None:
        for fd in list(self._open):
            self._close(fd)

    def wait(self, timeout: float | None = None) -> int | None:
        return self._server.exit_status(self.pid, 1e9 if timeout is None else timeout)

    def drop(self) -> None:
        """Nothing beyond ``close``: its stdin closes once what was queued is written."""

    def _signal(self, sig: int) -> None:
        if self._pidfd in self._open and self.exit_status() is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:  # it ended a moment ago
                pass

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.remove(fd)
            try:
                os.close(fd)
            except OSError:
                pass
