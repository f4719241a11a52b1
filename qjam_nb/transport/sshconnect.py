"""Reaching an ssh host: ``~/.ssh/config``, the connection, its host key, the login.

Each stage raises a ``HostError`` naming the host, the stage and the fix:
resolving the name (``~/.ssh/config``'s HostName, User, Port, IdentityFile,
IdentitiesOnly, ProxyJump, HostKeyAlias, UserKnownHostsFile,
GlobalKnownHostsFile and HashKnownHosts, read as OpenSSH reads them; other
keys are ignored), opening the connection (directly, or through ProxyJump
hosts), starting ssh with a large window and AES-GCM preferred, checking the
host key (``hostkeys``), and logging in with keys only, never a password.
The keys, in OpenSSH's order: the agent's keys (those of a configured
identity first, the others only without ``IdentitiesOnly``), then the
identity files (``identity=``, then the config's IdentityFile entries; the
default ``~/.ssh/id_*`` files only when none is configured). An identity
file whose private half is missing or locked is still used when the agent
holds its key (matched by ``path.pub``).

paramiko's ``SSHConfig`` gives the keys lower-cased and expands tokens in
IdentityFile only; the known hosts files are expanded here as ssh does:
a leading ``~`` in each file, then ``%`` tokens and ``${VAR}`` in
UserKnownHostsFile (``~`` only in GlobalKnownHostsFile).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shlex
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
#: The default identity files paramiko can use, in ssh's order (readconf.c), tried only when none is configured.
DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ed25519")


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
    known_hosts: hostkeys.KnownHosts
    host_key_alias: str | None = None
    identities: list[str] = field(default_factory=list)  # configured: identity=, then IdentityFile
    identities_only: bool = False
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
    hostname = entry.get("hostname", alias)
    port = int(options.port or entry.get("port", 22))
    host_key_alias = entry.get("hostkeyalias", "").lower() or None
    identities = [options.identity] if options.identity else []
    identities += entry.get("identityfile", [])
    tokens = _tokens(alias, hostname, port, user, host_key_alias)
    known = hostkeys.KnownHosts(
        user_files=_files(alias, entry, "UserKnownHostsFile", hostkeys.USER_FILES, tokens),
        global_files=_files(alias, entry, "GlobalKnownHostsFile", hostkeys.GLOBAL_FILES, None),
        hash_names="hashknownhosts" in entry and entry.as_bool("hashknownhosts"),
    )
    jump = entry.get("proxyjump")
    return SshTarget(
        alias=alias,
        hostname=hostname,
        port=port,
        user=user,
        identities=[os.path.expanduser(p) for p in identities],
        identities_only="identitiesonly" in entry and entry.as_bool("identitiesonly"),
        known_hosts=known,
        host_key_alias=host_key_alias,
        proxy_jump=None if jump in (None, "none") else jump,
    )


def _tokens(alias: str, hostname: str, port: int, user: str, host_key_alias: str | None) -> dict[str, str]:
    """The ``%`` tokens ssh expands in UserKnownHostsFile (OpenSSH 9.2's DEFAULT_CLIENT_PERCENT_EXPAND_ARGS)."""
    this_host = socket.gethostname()
    port_text = str(port)
    return {
        "C": hashlib.sha1((this_host + hostname.lower() + port_text + user).encode()).hexdigest(),
        "L": this_host.split(".")[0], "i": str(os.getuid()), "k": host_key_alias or alias, "l": this_host,
        "n": alias, "p": port_text, "d": os.path.expanduser("~"), "h": hostname.lower(), "r": user,
        "u": getpass.getuser(),
    }


def _files(alias: str, entry: paramiko.SSHConfigDict, key: str, default: tuple[str, ...],
           tokens: dict[str, str] | None) -> tuple[Path, ...]:
    """A known hosts file list from the config (``none``: no file), each file expanded as ssh does."""
    value = entry.get(key.lower())
    try:
        words = shlex.split(value) if value else list(default)
    except ValueError:  # an unbalanced quote: ssh would stop on it too
        raise HostError(alias, "reading ~/.ssh/config", f"{key} {value!r} cannot be parsed") from None
    if words[0].lower() == "none":
        if len(words) > 1:
            raise HostError(alias, "reading ~/.ssh/config",
                            f"{key} {value!r}: \"none\" must appear alone, as ssh requires")
        return ()
    return tuple(Path(_expand(alias, key, os.path.expanduser(word), tokens)) for word in words)


def _expand(alias: str, key: str, text: str, tokens: dict[str, str] | None) -> str:
    """``%x`` tokens and ``${VAR}`` as ssh expands them; an unknown one is an error, as in ssh."""
    if tokens is None:
        return text

    def one(match: re.Match) -> str:
        if match.group(1) is not None:
            if match.group(1) == "%":
                return "%"
            if match.group(1) in tokens:
                return tokens[match.group(1)]
            raise HostError(alias, "reading ~/.ssh/config", f"{key} {text!r}: unknown token %{match.group(1)}")
        if match.group(2) in os.environ:
            return os.environ[match.group(2)]
        raise HostError(alias, "reading ~/.ssh/config", f"{key} {text!r}: ${{{match.group(2)}}} is not set")

    return re.sub(r"%(.)|\$\{(\w+)\}", one, text)


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
        security.key_types = hostkeys.preferred_key_types(security.key_types, hostkeys.known_types(
            target.hostname, target.port, target.known_hosts, target.host_key_alias))
        try:
            transport.start_client(timeout=options.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostError(target.alias, "starting the ssh session",
                            f"{target.hostname}:{target.port} did not speak ssh ({exc})") from None
        hostkeys.check(target.alias, target.hostname, target.port, transport.get_remote_server_key(),
                       target.known_hosts, options.accept_new_host, target.host_key_alias)
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


@dataclass
class _Identity:
    """An identity file: its public key (from the file or ``path.pub``) and its private key, when it loads."""

    path: str
    public: bytes | None = None
    key: paramiko.PKey | None = None
    problem: str | None = None  # why the private key cannot be used here


def _identity(path: str, configured: bool) -> _Identity | None:
    found = _Identity(path)
    try:
        found.public = paramiko.PublicBlob.from_file(path + ".pub").key_blob
    except (OSError, ValueError):
        pass
    if not os.path.exists(path):
        if found.public is None and not configured:
            return None  # a default key name this user does not have
        found.problem = "no such file" if configured else None  # ssh names a missing file only if configured
        return found
    try:
        found.key = paramiko.PKey.from_path(path)
        found.public = found.key.asbytes()
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        if isinstance(exc, TypeError) and "password" not in str(exc).lower():
            raise  # cryptography says "no password given" with a TypeError; any other is a bug
        found.problem = "needs a passphrase: add it to your ssh agent"
    except (paramiko.SSHException, ValueError, OSError, UnknownKeyType, UnsupportedAlgorithm) as exc:
        found.problem = str(exc) or type(exc).__name__
    return found


def _candidate_keys(target: SshTarget, agent_keys: list) -> tuple[list[tuple[str, paramiko.PKey]], list[str]]:
    """The keys to offer, in OpenSSH's order (sshconnect2.c pubkey_prepare), and the keys skipped, with why."""
    configured = bool(target.identities)
    paths = target.identities or [str(ssh_dir() / name) for name in DEFAULT_KEYS]
    files = [i for i in (_identity(p, configured) for p in dict.fromkeys(paths)) if i is not None]
    keys: list[tuple[str, paramiko.PKey]] = []
    others: list[tuple[str, paramiko.PKey]] = []
    for agent_key in agent_keys:
        label = f"agent key {agent_key.get_name()} {hostkeys.fingerprint(agent_key)}"
        mine = [i for i in files if i.public == agent_key.asbytes()]
        if mine:  # the agent signs for a configured identity, whether or not its private file is usable here
            files.remove(mine[0])
            keys.append((f"{mine[0].path} ({label})", agent_key))
        elif not target.identities_only:
            others.append((label, agent_key))
    held_back = len(agent_keys) - len(keys) - len(others)
    keys += others + [(i.path, i.key) for i in files if i.key is not None]
    skipped = [f"{i.path} ({i.problem})" for i in files if i.key is None and i.problem]
    if held_back:
        skipped.append(f"{held_back} agent key{'s' if held_back > 1 else ''} (IdentitiesOnly yes in ~/.ssh/config)")
    return keys, skipped


def _authenticate(transport: paramiko.Transport, target: SshTarget) -> None:
    try:
        agent: paramiko.Agent | None = paramiko.Agent()
    except paramiko.SSHException:
        agent = None
    try:
        _log_in(transport, target, agent.get_keys() if agent is not None else [])
    finally:
        if agent is not None:
            agent.close()


def _log_in(transport: paramiko.Transport, target: SshTarget, agent_keys: list) -> None:
    keys, skipped = _candidate_keys(target, agent_keys)
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


