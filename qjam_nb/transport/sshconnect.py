"""Reaching an ssh host: ``~/.ssh/config``, the connection, its host key, the login.

Each stage raises a ``HostError`` naming the host, the stage and the fix:
resolving the name (HostName, User, Port, IdentityFile, UserKnownHostsFile,
ProxyJump), opening the connection (directly, or through ProxyJump hosts),
starting ssh with a large window and AES-GCM preferred, checking the host key
(``hostkeys``), and logging in with keys only (the given identity, the
config's IdentityFile entries, the default keys, the agent; never a password).
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from paramiko.pkey import UnknownKeyType

from ..errors import HostError
from . import hostkeys

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


def _ignore(thing: object) -> None:
    pass


#: Called with each socket and Transport made while connecting (see ``connect``).
Track = Callable[[object], None]


def connect(target: SshTarget, options: SshOptions, track: Track | None = None,
            ) -> tuple[paramiko.Transport, list[paramiko.Transport]]:
    """An authenticated Transport to ``target`` (and the jump hosts' Transports it rides on).

    ``track`` is given each socket and Transport as soon as it exists, so that another thread
    can close them to abandon a connection that waits (Ctrl-C: ``ssh.Opening``).
    """
    track = track or _ignore
    jumps: list[paramiko.Transport] = []
    sock = transport = None
    try:
        sock = _open_socket(target, options, jumps, track)
        transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, default_max_packet_size=PACKET_SIZE)
        track(transport)
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


def _open_socket(target: SshTarget, options: SshOptions, jumps: list, track: Track,
                 ) -> socket.socket | paramiko.Channel:
    if target.proxy_jump:
        hop = target.proxy_jump.split(",")[-1]
        user, _, hostport = hop.rpartition("@")
        name, _, port = hostport.partition(":")
        hop_options = SshOptions(user=user or None, port=int(port) if port else None,
                                 accept_new_host=options.accept_new_host, timeout=options.timeout)
        hop_target = resolve(name, hop_options)
        if ",".join(target.proxy_jump.split(",")[:-1]):
            hop_target.proxy_jump = ",".join(target.proxy_jump.split(",")[:-1])
        jump, more = connect(hop_target, hop_options, track)
        jumps.extend([*more, jump])
        try:
            return jump.open_channel("direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                                     timeout=options.timeout)
        except paramiko.SSHException as exc:
            raise HostError(target.alias, f"jumping through {name}",
                            f"{name} would not forward to {target.hostname}:{target.port} ({exc})") from None
    try:
        sock = _tcp_connect(target.hostname, target.port, options.timeout, track)
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


def _tcp_connect(hostname: str, port: int, timeout: float, track: Track) -> socket.socket:
    """``socket.create_connection``, with each socket tracked before it connects (a ``shutdown``
    from another thread ends a connect that waits)."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(hostname, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        track(sock)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"{hostname} has no address")


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


