"""Workers on other machines, over ssh: one Transport per host, one channel per worker.

``SshTransport`` connects (``sshconnect``), then bootstraps the host: its
Python is probed, and the worker payload (``payload``) is uploaded through
that Python into ``~/.cache/qjam_nb/`` unless it is already there. Workers
then start, each on its own channel of the host's one Transport, whose
stdin/stdout carry the frames. Nothing listens on any port.

Rules: every remote program (probe, upload, workers) is started by the same
command, the ``--python`` one if given, from the home directory, with the
home directory off its ``sys.path``. No EOF is ever sent on a channel on its
own: a channel ends with ``Channel.close`` (see ``run`` and ``SshProcess.close``).
A host being opened can be abandoned from another thread (``Opening``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Sequence

import paramiko

from ..errors import HostError
from .base import CpuState, bootstrap_code, forget, forget_in_children, parse_stat
from .payload import PROBE, PROBE_MARK, UNPACK, UPLOAD_ERROR, payload
from .sshconnect import PACKET_SIZE, PREFERRED_CIPHERS, WINDOW_SIZE, SshOptions, connect, resolve

__all__ = ["PACKET_SIZE", "PREFERRED_CIPHERS", "WINDOW_SIZE", "Opening", "SshOptions", "SshProcess", "SshTransport",
           "run"]


def run(transport: paramiko.Transport, command: str, stdin: bytes = b"", timeout: float = 60.0) -> tuple[int, str, str]:
    """Run one command on the host; (exit status, stdout, stderr).

    ``stdin`` is sent but never followed by an EOF: the command must know how much to read
    (the upload is told its length). paramiko's ``shutdown_write`` prepares the EOF under the
    channel's lock and sends it after, when the transport thread may have answered the
    command's end with CLOSE already: sshd then drops the whole connection ("ieof packet
    referred to nonexistent channel"), every worker of the host with it. A quick command
    (``kill``) ends within that gap now and then on a busy machine.
    """
    channel = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
    channel.settimeout(timeout)
    channel.exec_command(command)
    if stdin:
        channel.sendall(stdin)
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


#: Seconds a channel's close waits for a write under way to finish (see ``SshProcess._close``).
CLOSE_WAIT = 0.1


class SshProcess:
    """A worker on an ssh channel: the channel's stdin/stdout carry the frames."""

    shares_memory = False

    def __init__(self, name: str, channel: paramiko.Channel, host: SshTransport) -> None:
        self.name = name
        self.channel = channel
        self.host = host
        self.pid: int | None = None  # the remote pid, learnt from the worker's hello
        self._writing = threading.Lock()  # held by ``write``: the channel closes between writes (``_close``)
        forget_in_children(self)

    def forget_in_child(self) -> None:
        self._writing = threading.Lock()
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
        with self._writing:
            self._write(chunks)

    def _write(self, chunks: list) -> None:
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
        """Send nothing more; the channel stays open, to read what the worker still says.

        No EOF is sent: paramiko's ``shutdown_write`` prepares it under the channel's lock and
        sends it after, so a CLOSE (ours from another thread, or the transport thread's answer
        to the worker's end) can go out first, and sshd drops the whole connection for a packet
        naming a channel it freed. The worker ends on BYE, or when its channel closes
        (``kill``, ``release``: ``Channel.close`` prepares EOF and CLOSE together, under one
        hold of that lock, and sends them in that order).
        """

    def kill(self) -> None:
        self._signal("KILL", group=True)
        self._close()

    def interrupt(self) -> None:
        self._signal("INT")

    def release(self) -> None:
        self._close()

    def drop(self) -> None:
        """Close the channel itself (once no write is under way): the worker sees EOF, we see the end."""
        self._close()

    def _close(self) -> None:
        """Close the channel once no write is under way, or after ``CLOSE_WAIT`` at most.

        A data packet is prepared under the channel's lock and sent after it, as an EOF is
        (see ``close``): one still on its way when the CLOSE goes out would reach sshd after
        it, and sshd drops the connection for it. A writer that waits for the window (the
        worker reads nothing) has nothing prepared: the close wakes it, and it stops.
        """
        writing = self._writing.acquire(timeout=CLOSE_WAIT)
        try:
            close_channel(self.channel)
        finally:
            if writing:
                self._writing.release()

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


class Abandoned(Exception):
    """The host's opening was abandoned by another thread (Ctrl-C while connecting)."""


class Opening:
    """A host being opened on one thread, which another may abandon (Ctrl-C while connecting).

    Every socket and Transport the opening makes is recorded as soon as it
    exists; ``abandon`` closes them all, which ends whatever the opening thread
    waits on (a TCP connect, the ssh handshake, the login, the probe) within a
    moment, and anything made after that is closed at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: list = []
        self._closed: list = []
        self.abandoned = False

    def made(self, thing: object) -> None:
        with self._lock:
            if not self.abandoned:
                self._made.append(thing)
                return
        _close_quietly(thing)
        raise Abandoned("abandoned while connecting")

    def abandon(self) -> None:
        """Close everything made so far (and anything made from now on)."""
        with self._lock:
            self.abandoned = True
            made, self._made = self._made, []
        for thing in made:
            if isinstance(thing, threading.Thread) and thing.ident is not None:
                _QUIET.add(thing.ident)  # its "Error reading SSH protocol banner" is our doing
        for thing in reversed(made):
            _close_quietly(thing)
        self._closed = made

    def wait(self, deadline: float) -> None:
        """Until the closed Transports' threads have ended (a moment: ``close`` does not wait for them)."""
        for thing in self._closed:
            if isinstance(thing, threading.Thread) and thing.ident is not None:
                thing.join(max(0.0, deadline - time.monotonic()))
                if not thing.is_alive():
                    _QUIET.discard(thing.ident)


#: Threads of abandoned Transports, whose errors paramiko would log (and print, where logging is
#: not set up: in a notebook) although nothing went wrong but the abandon itself.
_QUIET: set[int] = set()
logging.getLogger("paramiko.transport").addFilter(lambda record: record.thread not in _QUIET)


def _close_quietly(thing: object) -> None:
    try:
        if isinstance(thing, socket.socket):
            try:
                thing.shutdown(socket.SHUT_RDWR)  # wakes a connect() in progress (close alone does not)
            except OSError:
                pass
        thing.close()
    except Exception:  # already closed, half made: it is gone either way
        pass


class SshTransport:
    """One host over ssh: connected, checked, logged in and bootstrapped by the constructor."""

    def __init__(self, alias: str, options: SshOptions | None = None, opening: Opening | None = None) -> None:
        """``opening`` lets another thread abandon this constructor mid-way (see ``Opening``)."""
        self.host = alias
        self.options = options or SshOptions()
        self.target = resolve(alias, self.options)
        self.transport, self._jumps = connect(self.target, self.options, opening.made if opening else None)
        forget_in_children(self)
        try:
            self.command, self.python, self.directory, self.uploaded = self._bootstrap()
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

    def describe(self) -> str:
        t = self.target
        upload = f"uploaded {self.uploaded / 1024:.0f} KiB to" if self.uploaded else "found the worker in"
        return f"{t.user}@{t.hostname}:{t.port} ({self.cipher}); {upload} {self.directory}; Python {self.python}"

    def _bootstrap(self) -> tuple[str, str, str, int]:
        """(the command that starts Python there, how to name it, the worker's directory, bytes uploaded)."""
        version, data = payload()
        explicit = self.options.python or os.environ.get("QJAM_REMOTE_PYTHON")
        candidates = [explicit] if explicit else [sys.executable, "python3"]
        loop = " ".join(shlex.quote(c) for c in candidates)
        # From the home directory, as the workers run: the same shell start-up, the same PATH.
        probe = (
            f"cd && for p in {loop}; do if command -v \"$p\" >/dev/null 2>&1; then "
            f"exec \"$p\" -c {shlex.quote(PROBE)} {shlex.quote(version)} \"$p\"; fi; done; "
            "echo 'qjam_nb: no python' >&2; exit 127"
        )
        status, out, err = run(self.transport, probe, timeout=self.options.timeout)
        if status == 127 and "qjam_nb: no python" in err:
            what = f"{explicit!r} (from --python or QJAM_REMOTE_PYTHON)" if explicit else " nor ".join(candidates)
            raise HostError(self.host, "finding a Python",
                            f"neither {what} runs there: install Python 3 or point --python "
                            "(or QJAM_REMOTE_PYTHON) at an interpreter on that host")
        greeting, _, answer = out.rpartition(PROBE_MARK)
        try:
            info = json.loads(answer)
        except ValueError:
            raise HostError(self.host, "probing its Python",
                            f"unexpected answer (status {status}): {(out + err).strip()[-500:]}") from None
        if greeting:
            raise HostError(self.host, "starting a command there", greeting_message(greeting, info.get("shell", "")))
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
        # The command the probe ran (a wrapper that loads modules or activates an environment
        # before it execs Python) starts the upload and the workers too, never the bare executable.
        command, root = info.get("command") or info["executable"], info["root"]
        shown = info["executable"] if command == info["executable"] else f"{info['executable']} (started by {command})"
        uploaded = 0
        if not info["ready"]:
            status, out, err = run(
                self.transport,
                f"cd && {shlex.quote(command)} -c {shlex.quote(UNPACK)} {shlex.quote(root)} {shlex.quote(version)} "
                f"{len(data)}",
                stdin=data, timeout=max(self.options.timeout, 60),
            )
            if status != 0 or "ok" not in out:
                raise HostError(self.host, f"uploading the worker to {root}", upload_failed(err or out, root))
            uploaded = len(data)
        return command, shown, f"{root}/{version}", uploaded

    def start(self, names: Sequence[str], env: dict[str, str] | None = None) -> list[SshProcess]:
        """Start the workers, ``env`` added to the environment they get on the host (by the program
        itself, so any login shell runs it); the notebook's own environment does not travel."""
        procs = []
        for name in names:
            code = bootstrap_code(f"{self.directory}/qjam_worker", name, f"{self.directory}/deps", safe_path=True,
                                  env=env)
            try:
                channel = self.transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
                # Not ``exec``: the shell stays to turn a death by signal into exit status 128+N,
                # since ssh reports signals separately and paramiko drops that report.
                channel.exec_command(f"cd && {shlex.quote(self.command)} -c {shlex.quote(code)}; exit $?")
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

    def close(self, deadline: float | None = None) -> None:
        """Close the connection (and its jump hosts'); with a ``deadline`` (``time.monotonic``), wait
        until then for paramiko's threads to end (``Transport.close`` does not wait for them)."""
        transports = [self.transport, *reversed(self._jumps)]
        for transport in transports:
            transport.close()
        if deadline is not None:
            for transport in transports:
                if transport.ident is not None:
                    transport.join(max(0.0, deadline - time.monotonic()))


#: Where a login shell's start-up files print, by shell (non-interactive ``ssh host command``).
STARTUP_FILES = {
    "bash": "~/.bashrc and /etc/bash.bashrc (and ~/.profile, ~/.bash_profile or ~/.bash_login where a "
            "start-up file sources them)",
    "zsh": "~/.zshenv and /etc/zsh/zshenv",
    "csh": "~/.cshrc (or ~/.tcshrc) and /etc/csh.cshrc",
    "fish": "~/.config/fish/config.fish",
}
STARTUP_FIXES = {
    "bash": "put `[[ $- == *i* ]] || return` (or, in any POSIX shell, `case $- in *i*) ;; *) return;; esac`) "
            "at the top of the file that prints, or wrap what prints in `if [[ $- == *i* ]]; then ... fi`",
    "zsh": "put `[[ -o interactive ]] || return` before what prints, or move it to ~/.zshrc",
    "csh": "wrap what prints in `if ( $?prompt ) then ... endif`",
    "fish": "wrap what prints in `if status is-interactive ... end`",
}


def greeting_message(greeting: str, shell: str) -> str:
    """What to say when a login shell printed before running the command: which files, and the fix."""
    kind = os.path.basename(shell)
    kind = "csh" if kind == "tcsh" else kind
    if kind not in STARTUP_FILES:
        kind = "bash"
    files, fix = STARTUP_FILES[kind], STARTUP_FIXES[kind]
    if kind != "bash":
        files += f" (for bash: {STARTUP_FILES['bash']})"
        fix += f" (for bash: {STARTUP_FIXES['bash']})"
    shown = greeting.strip()[:120] or greeting[:40]  # (blank lines alone corrupt the frames too)
    return (f"the login shell{' (' + shell + ')' if shell else ''} printed {shown!r} before running qjam_nb's "
            "command: the workers' frames travel on that same stdout, so it would corrupt them. A shell "
            f"start-up file prints it even for non-interactive ssh commands: look in {files}. Make it print "
            f"only in interactive shells: {fix}; then connect again.")


#: What to do when the upload failed with this error (its errno name, from the host).
UPLOAD_FIXES = {
    "ENOSPC": ("the disk is full", "free some space on that host (df -h ~/.cache)"),
    "EDQUOT": ("your disk quota is used up", "free some space on that host (quota -s; du -sh ~/.cache/*)"),
    "EFBIG": ("a file size limit (ulimit -f) stops the write",
              "raise the file size limit of ssh sessions there (ulimit -f; /etc/security/limits.conf)"),
    "EROFS": ("the file system is read-only", "make the home directory writable there"),
    "EACCES": ("permission denied", "make ~/.cache writable for you there"),
    "EPERM": ("permission denied", "make ~/.cache writable for you there"),
}


def upload_failed(output: str, root: str) -> str:
    """The upload's error (what failed, on the host), why if known, and what to do."""
    found = re.search(rf"^{UPLOAD_ERROR} (\S+) (.*)$", output, re.MULTILINE)
    if found is None:  # not our report: a crash of the Python, a killed process
        return output.strip()[-500:]
    name, what = found.groups()
    why, fix = UPLOAD_FIXES.get(name, ("", f"see what stops writing to {root} there"))
    return (f"{what}{' (' + why + ')' if why else ''}. The upload was undone: nothing was left in {root}. "
            f"To fix it, {fix}; then connect again.")
