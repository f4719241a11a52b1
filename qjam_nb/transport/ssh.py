"""Workers on other machines, over ssh (paramiko): one Transport per host, one channel per worker.

Connecting to a host goes through four stages, and an error names the one
that failed: resolving the name (``~/.ssh/config``: HostName, User, Port,
IdentityFile, ProxyJump), opening the connection, checking the host key
(``hostkeys``), logging in (the given identity, IdentityFile entries, the ssh
agent, the default keys; never a password), then bootstrapping: the host's
Python is probed, and the worker payload (``payload``) is uploaded through
that Python into ``~/.cache/qjam_nb/`` unless it is already there. Only then
do workers start, each on its own channel of the host's one Transport.

Nothing listens on any port: the worker's stdin/stdout are the channel.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from paramiko.pkey import UnknownKeyType

from ..errors import HostError
from . import hostkeys
from .base import bootstrap_code
from .payload import PROBE, UNPACK, payload

#: Flow-control window and packet size: large, so bulk data is not throttled
#: by round trips (measured on this machine: 2-4x the paramiko defaults).
WINDOW_SIZE = 64 << 20
PACKET_SIZE = 256 << 10
#: Fast ciphers first; paramiko falls back to the rest if the server lacks them.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


@dataclass
class SshOptions:
    """What the user may say about every ssh host of a cluster."""

    user: str | None = None
    port: int | None = None
    identity: str | None = None
    python: str | None = None
    accept_new_host: bool = False
    timeout: float = 30.0


@dataclass
class SshTarget:
    """A host name resolved through ``~/.ssh/config`` and the options."""

    alias: str
    hostname: str
    port: int
    user: str
    identities: list[str] = field(default_factory=list)
    known_hosts: list[Path] = field(default_factory=list)
    proxy_jump: str | None = None


def ssh_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".ssh"


def resolve(alias: str, options: SshOptions) -> SshTarget:
    """Apply ``~/.ssh/config``. Precedence: explicit options, then ``QJAM_USER``, then the config."""
    config = paramiko.SSHConfig()
    path = ssh_dir() / "config"
    if path.exists():
        config = paramiko.SSHConfig.from_path(str(path))
    entry = config.lookup(alias)
    user = options.user or os.environ.get("QJAM_USER") or entry.get("user") or getpass.getuser()
    identities = [options.identity] if options.identity else []
    identities += entry.get("identityfile", [])
    known = [os.path.expanduser(p) for p in entry.get("userknownhostsfile", "").split()] or [
        str(ssh_dir() / "known_hosts")
    ]
    jump = entry.get("proxyjump")
    return SshTarget(
        alias=alias,
        hostname=entry.get("hostname", alias),
        port=int(options.port or entry.get("port", 22)),
        user=user,
        identities=[os.path.expanduser(p) for p in identities],
        known_hosts=[Path(p) for p in known],
        proxy_jump=None if jump in (None, "none") else jump,
    )


def connect(target: SshTarget, options: SshOptions) -> tuple[paramiko.Transport, list[paramiko.Transport]]:
    """An authenticated Transport to ``target`` (and the jump hosts' Transports it rides on)."""
    jumps: list[paramiko.Transport] = []
    sock = transport = None
    try:
        sock = _open_socket(target, options, jumps)
        transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, default_max_packet_size=PACKET_SIZE)
        security = transport.get_security_options()
        offered = set(security.ciphers)
        security.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
            c for c in security.ciphers if c not in PREFERRED_CIPHERS
        )
        # Ask for a key type known_hosts already holds for this host (as ssh does), or a host that also has
        # the key type paramiko prefers would look unknown.
        security.key_types = hostkeys.preferred_key_types(
            security.key_types, hostkeys.known_types(target.hostname, target.port, target.known_hosts))
        try:
            transport.start_client(timeout=options.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostError(target.alias, "starting the ssh session",
                            f"{target.hostname}:{target.port} did not speak ssh ({exc})") from None
        hostkeys.check(target.alias, target.hostname, target.port, transport.get_remote_server_key(),
                       target.known_hosts, options.accept_new_host)
        _authenticate(transport, target)
        transport.set_keepalive(15)
        return transport, jumps
    except BaseException:
        # Nothing half open: the target's Transport thread (refused host key, failed login) and socket too.
        if transport is not None:
            transport.close()
        elif sock is not None:
            sock.close()
        for t in reversed(jumps):
            t.close()
        raise


def _open_socket(target: SshTarget, options: SshOptions, jumps: list) -> socket.socket | paramiko.Channel:
    if target.proxy_jump:
        hop = target.proxy_jump.split(",")[-1]
        user, _, hostport = hop.rpartition("@")
        name, _, port = hostport.partition(":")
        hop_options = SshOptions(user=user or None, port=int(port) if port else None,
                                 accept_new_host=options.accept_new_host, timeout=options.timeout)
        hop_target = resolve(name, hop_options)
        if ",".join(target.proxy_jump.split(",")[:-1]):
            hop_target.proxy_jump = ",".join(target.proxy_jump.split(",")[:-1])
        jump, more = connect(hop_target, hop_options)
        jumps.extend([*more, jump])
        try:
            return jump.open_channel("direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                                     timeout=options.timeout)
        except paramiko.SSHException as exc:
            raise HostError(target.alias, f"jumping through {name}",
                            f"{name} would not forward to {target.hostname}:{target.port} ({exc})") from None
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=options.timeout)
        # Small frames (a TASK, a RESULT) must not wait for Nagle's algorithm: ~40 ms a call otherwise.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except socket.gaierror:
        raise HostError(target.alias, "resolving its name",
                        f"unknown host name {target.hostname!r}: check the spelling, or add a Host entry "
                        "with a HostName to ~/.ssh/config") from None
    except ConnectionRefusedError:
        raise HostError(target.alias, "connecting",
                        f"connection refused by {target.hostname} port {target.port}: is sshd running "
                        "there, and is that the right port (--port, or Port in ~/.ssh/config)?") from None
    except TimeoutError:
        raise HostError(target.alias, "connecting",
                        f"no answer from {target.hostname}:{target.port} within {options.timeout:.0f} s") from None
    except OSError as exc:
        raise HostError(target.alias, "connecting", f"{target.hostname}:{target.port}: {exc}") from None


def _candidate_keys(target: SshTarget) -> tuple[list[tuple[str, paramiko.PKey]], list[str]]:
    keys: list[tuple[str, paramiko.PKey]] = []
    skipped: list[str] = []
    paths = list(target.identities) + [str(ssh_dir() / name) for name in DEFAULT_KEYS]
    seen = set()
    for path in paths:
        if path in seen:
            continue
        seen.add(path)
        if not os.path.exists(path):
            if path in target.identities:  # named by identity= or IdentityFile: say so, as ssh does
                skipped.append(f"{path} (no such file)")
            continue
        try:
            keys.append((path, paramiko.PKey.from_path(path)))
        except (paramiko.PasswordRequiredException, TypeError) as exc:
            if isinstance(exc, TypeError) and "password" not in str(exc).lower():
                raise  # cryptography says "no password given" with a TypeError; any other is a bug
            skipped.append(f"{path} (needs a passphrase: add it to your ssh agent)")
        except (paramiko.SSHException, ValueError, OSError, UnknownKeyType, UnsupportedAlgorithm) as exc:
            skipped.append(f"{path} ({exc or type(exc).__name__})")
    try:
        for agent_key in paramiko.Agent().get_keys():
            keys.append((f"agent key {agent_key.get_name()} {hostkeys.fingerprint(agent_key)}", agent_key))
    except paramiko.SSHException:
        pass
    return keys, skipped


def _authenticate(transport: paramiko.Transport, target: SshTarget) -> None:
    keys, skipped = _candidate_keys(target)
    tried = []
    for label, key in keys:
        try:
            transport.auth_publickey(target.user, key)
        except paramiko.AuthenticationException:
            tried.append(label)
            continue
        except paramiko.SSHException as exc:
            tried.append(f"{label} ({exc})")
            continue
        if transport.is_authenticated():
            return
    transport.close()
    detail = "; ".join(tried) if tried else (
        "no key" if skipped else "no key at all (no identity given, none in ~/.ssh, no agent)")
    extra = f"; skipped {'; '.join(skipped)}" if skipped else ""
    raise HostError(
        target.alias, f"logging in as {target.user!r}",
        f"authentication refused; tried {detail}{extra}. Put your public key in ~{target.user}/.ssh/authorized_keys "
        "on the host, or name the right key with identity= (--identity) or IdentityFile in ~/.ssh/config; "
        "passwords are never used.",
    )


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


class SshProcess:
    """A worker on an ssh channel: the channel's stdin/stdout carry the frames."""

    def __init__(self, name: str, channel: paramiko.Channel, host: SshTransport) -> None:
        self.name = name
        self.channel = channel
        self.host = host
        self.pid: int | None = None  # the remote pid, learnt from the worker's hello

    def readinto(self, buffer: memoryview) -> int:
        data = self.channel.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: memoryview) -> None:
        self.channel.sendall(memoryview(data).cast("B"))

    def read_stderr(self) -> bytes:
        return self.channel.recv_stderr(65536)

    def close(self) -> None:
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def kill(self) -> None:
        if self.pid is not None and self.host.transport.is_active():
            try:
                run(self.host.transport, f"kill -KILL {self.pid}", timeout=5)
            except (OSError, EOFError, paramiko.SSHException):
                pass
        self.channel.close()

    def exit_status(self) -> int | None:
        return self.channel.recv_exit_status() if self.channel.exit_status_ready() else None

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
        self.lock = threading.Lock()
        try:
            self.python, self.directory, self.uploaded = self._bootstrap()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        t = self.target
        return f"<SshTransport {t.alias} = {t.user}@{t.hostname}:{t.port}>"

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
                channel.exec_command(f"cd && exec {shlex.quote(self.python)} -c {shlex.quote(code)}")
            except (paramiko.SSHException, OSError, EOFError) as exc:
                for p in procs:
                    p.channel.close()
                raise HostError(self.host, f"starting worker {name}",
                                f"{exc}; if many workers share one host, raise MaxSessions in its "
                                "sshd_config") from None
            procs.append(SshProcess(name, channel, self))
        return procs

    def close(self) -> None:
        self.transport.close()
        for jump in reversed(self._jumps):
            jump.close()
