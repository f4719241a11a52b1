"""Workers on other machines, over ssh: one Transport per host, one channel per worker.

``SshTransport`` connects (``sshconnect``), then bootstraps the host: its
Python is probed, and the worker payload (``payload``) is uploaded through
that Python into ``~/.cache/qjam_nb/`` unless it is already there. Workers
then start, each on its own channel of the host's one Transport, whose
stdin/stdout carry the frames. Nothing listens on any port.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Sequence

import paramiko

from ..errors import HostError
from .base import CpuState, bootstrap_code, forget, forget_in_children, parse_stat
from .payload import PROBE, UNPACK, payload
from .sshconnect import PACKET_SIZE, PREFERRED_CIPHERS, WINDOW_SIZE, SshOptions, connect, resolve

__all__ = ["PACKET_SIZE", "PREFERRED_CIPHERS", "WINDOW_SIZE", "SshOptions", "SshProcess", "SshTransport", "run"]


def run(transport: paramiko.Transport, command: str, stdin: bytes = b"", timeout: float = 60.0) -> tuple[int, str, str]:
    """Run one command on the host; (exit status, stdout, stderr)."""
    channel = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
    channel.settimeout(timeout)
    channel.exec_command(command)
    if stdin:
        channel.sendall(stdin)
    channel.shutdown_write()
    out, err = bytearray(), bytearray()
    while True:
        chunk = channel.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    while chunk := channel.recv_stderr(1 << 16):
        err += chunk
    status = channel.recv_exit_status()
    channel.close()
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def close_channel(channel: paramiko.Channel) -> None:
    """Close a channel whose ``fileno()`` was polled, without killing the host's connection.

    paramiko's ``Channel.close`` closes the pipe behind ``fileno()`` while the
    transport thread may be setting it for data just arrived, unlocked: its
    write then meets a closed fd (or another one reusing the number) and the
    ``EBADF`` ends the transport, every worker of the host with it (paramiko
    issues 1700 and 2271). A worker killed while it still prints hits that
    window. Detaching the pipe from the channel's buffers first, under their
    own locks, leaves the transport thread nothing of it to touch.
    """
    for buffer in (channel.in_buffer, channel.in_stderr_buffer):
        buffer.set_event(threading.Event())
    channel.close()


def quiet_in_child(channel: paramiko.Channel) -> None:
    """In a forked child: let this copy of a channel only close, silently. Its lock may be held
    by a parent's thread, which the child does not have; and a child must send nothing."""
    channel.lock = threading.Lock()
    channel.out_buffer_cv = threading.Condition(channel.lock)
    channel.closed = True


class SshProcess:
    """A worker on an ssh channel: the channel's stdin/stdout carry the frames."""

    shares_memory = False

    def __init__(self, name: str, channel: paramiko.Channel, host: SshTransport) -> None:
        self.name = name
        self.channel = channel
        self.host = host
        self.pid: int | None = None  # the remote pid, learnt from the worker's hello
        forget_in_children(self)

    def forget_in_child(self) -> None:
        quiet_in_child(self.channel)

    def poll_fds(self) -> tuple[int, ...]:
        return (self.channel.fileno(),)  # paramiko's pipe: readable while stdout or stderr data waits

    def read_ready(self, buffer: memoryview) -> int | None:
        ended = self.channel.eof_received or self.channel.closed  # before looking: no data comes after it
        if self.channel.recv_ready():
            data = self.channel.recv(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        return 0 if ended else None

    def read_stderr_ready(self) -> bytes | None:
        ended = self.channel.eof_received or self.channel.closed
        if self.channel.recv_stderr_ready():
            return self.channel.recv_stderr(65536)
        return b"" if ended else None

    def write(self, chunks: list) -> None:
        """Send the chunks in as few ssh packets as they fill (each costs ~25 µs of paramiko's Python here).

        Small chunks (a frame's header, its pickle, a TASK after a CALL) share a packet
        with their neighbours, and a big buffer tops that packet up before going out
        whole: a round trip of 1 MiB params to two workers then sends 70 packets, not 78.
        """
        send, packet = self.channel.sendall, self.channel.out_max_packet_size
        pending: list = []  # pieces of the next packet
        filled = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if filled + view.nbytes < packet:
                pending.append(view)
                filled += view.nbytes
                continue
            if pending:  # top the packet up with this chunk's head
                head = packet - filled
                pending.append(view[:head])
                send(b"".join(pending))
                view, pending, filled = view[head:], [], 0
            whole = view.nbytes - view.nbytes % packet
            if whole:
                send(view[:whole])
            if whole < view.nbytes:
                pending, filled = [view[whole:]], view.nbytes - whole
        if pending:
            send(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_ready(self, chunks: list, size: int) -> int:
        """A message that the channel's open window takes whole: written now, since sending it cannot
        wait for the worker (0 otherwise, for the writer thread). Two 1 MiB params vectors to two
        workers on one host then leave one after the other from the calling thread, as a plain
        paramiko loop sends them; from two writer threads at once they took ~15% longer a round trip
        (median ratio to that loop 1.52 -> 1.30 over six runs each, 20 round trips a sample)."""
        if size > self.channel.out_window_size or not self.channel.send_ready():
            return 0
        self.write(chunks)
        return size

    def close(self) -> None:
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def kill(self) -> None:
        self._signal("KILL", group=True)
        close_channel(self.channel)

    def interrupt(self) -> None:
        self._signal("INT")

    def release(self) -> None:
        close_channel(self.channel)

    def _signal(self, name: str, group: bool = False) -> None:
        """Signal the worker (and, with ``group``, its process group: the helpers it forked)."""
        if self.pid is not None and self.host.alive:
            targets = f"-- -{self.pid} {self.pid} 2>/dev/null" if group else str(self.pid)
            try:
                run(self.host.transport, f"kill -{name} {targets}", timeout=5)
            except (OSError, EOFError, paramiko.SSHException):
                pass

    def cpu_state(self) -> CpuState | None:
        """From the host's ``/proc`` (one exec round trip); None where that cannot be read."""
        if self.pid is None or not self.host.alive:
            return None
        try:
            status, out, _ = run(self.host.transport, f"cat /proc/{self.pid}/stat", timeout=2)
        except (OSError, EOFError, paramiko.SSHException):
            return None
        return parse_stat(out) if status == 0 else None

    def exit_status(self) -> int | None:
        """As ``Popen.returncode``: negative for a signal (the shell reported 128+N)."""
        if not self.channel.exit_status_ready():
            return None
        status = self.channel.recv_exit_status()
        return -(status - 128) if 128 < status <= 128 + 64 else status

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.channel.exit_status_ready():
            if self.channel.closed or (deadline is not None and time.monotonic() >= deadline):
                return self.exit_status()
            time.sleep(0.01)
        return self.exit_status()


class SshTransport:
    """One host over ssh: connected, checked, logged in and bootstrapped by the constructor."""

    def __init__(self, alias: str, options: SshOptions | None = None) -> None:
        self.host = alias
        self.options = options or SshOptions()
        self.target = resolve(alias, self.options)
        self.transport, self._jumps = connect(self.target, self.options)
        forget_in_children(self)
        try:
            self.python, self.directory, self.uploaded = self._bootstrap()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        t = self.target
        return f"<SshTransport {t.alias} = {t.user}@{t.hostname}:{t.port}>"

    @property
    def alive(self) -> bool:
        """False once the connection dropped: the host must be connected again."""
        return self.transport.is_active()

    @property
    def cipher(self) -> str:
        return self.transport.remote_cipher

    def _bootstrap(self) -> tuple[str, str, int]:
        version, data = payload()
        explicit = self.options.python or os.environ.get("QJAM_REMOTE_PYTHON")
        candidates = [explicit] if explicit else [sys.executable, "python3"]
        loop = " ".join(shlex.quote(c) for c in candidates)
        probe = (
            f"for p in {loop}; do if command -v \"$p\" >/dev/null 2>&1; then "
            f"exec \"$p\" -c {shlex.quote(PROBE)} {shlex.quote(version)}; fi; done; "
            "echo 'qjam_nb: no python' >&2; exit 127"
        )
        status, out, err = run(self.transport, probe, timeout=self.options.timeout)
        if status == 127 and "qjam_nb: no python" in err:
            what = f"{explicit!r} (from --python or QJAM_REMOTE_PYTHON)" if explicit else " nor ".join(candidates)
            raise HostError(self.host, "finding a Python",
                            f"neither {what} runs there: install Python 3 or point --python "
                            "(or QJAM_REMOTE_PYTHON) at an interpreter on that host")
        try:
            info = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise HostError(self.host, "probing its Python",
                            f"unexpected answer (status {status}): {(out + err).strip()[-500:]}") from None
        mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
        theirs = ".".join(info["python"].split(".")[:2])
        if theirs != mine:
            raise HostError(
                self.host, "checking its Python",
                f"{info['executable']} is Python {info['python']}, the notebook runs Python "
                f"{sys.version.split()[0]}: shipped functions need the same minor version. Point --python "
                f"(or QJAM_REMOTE_PYTHON) at a Python {mine} on that host.",
            )
        if info.get("unsafe"):
            raise HostError(
                self.host, "checking its cache directory",
                f"{info['unsafe']}, so qjam_nb will not put or run code there (someone else could change "
                "it). Remove it on that host (e.g. rm -rf ~/.cache/qjam_nb) and connect again.",
            )
        python, root = info["executable"], info["root"]
        uploaded = 0
        if not info["ready"]:
            status, out, err = run(
                self.transport,
                f"{shlex.quote(python)} -c {shlex.quote(UNPACK)} {shlex.quote(root)} {shlex.quote(version)}",
                stdin=data, timeout=max(self.options.timeout, 60),
            )
            if status != 0 or "ok" not in out:
                raise HostError(self.host, f"uploading the worker to {root}", (err or out).strip()[-500:])
            uploaded = len(data)
        return python, f"{root}/{version}", uploaded

    def start(self, names: Sequence[str]) -> list[SshProcess]:
        procs = []
        for name in names:
            code = bootstrap_code(f"{self.directory}/qjam_worker", name, f"{self.directory}/deps")
            try:
                channel = self.transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
                # Not ``exec``: the shell stays to turn a death by signal into exit status 128+N,
                # since ssh reports signals separately and paramiko drops that report.
                channel.exec_command(f"cd && {shlex.quote(self.python)} -c {shlex.quote(code)}; exit $?")
            except (paramiko.SSHException, OSError, EOFError) as exc:
                for p in procs:
                    p.channel.close()
                raise HostError(self.host, f"starting worker {name}",
                                f"{exc}; if many workers share one host, raise MaxSessions in its "
                                "sshd_config") from None
            procs.append(SshProcess(name, channel, self))
        return procs

    def forget_in_child(self) -> None:
        """In a forked child: the TCP socket (this host's, or the first jump host's) points at /dev/null,
        and the child's copies of the connections are dead, so they send nothing (``base.forget``)."""
        fds = []
        for t in (self.transport, *self._jumps):
            t.active = False
            if isinstance(t.sock, socket.socket):
                fds.append(t.sock.fileno())
            else:  # a channel of the jump host's connection
                quiet_in_child(t.sock)
        forget(fds)

    def close(self) -> None:
        self.transport.close()
        for jump in reversed(self._jumps):
            jump.close()
