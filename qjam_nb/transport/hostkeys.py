"""Host keys: checked against known_hosts as OpenSSH checks them, never added without being asked.

We read the known hosts files ourselves, as OpenSSH does: ``[host]:port``
names, hashed names (``|1|salt|hash``), several names or ``*``/``?`` patterns
(and ``!`` negations) on one line, ``@revoked`` lines, and ``@cert-authority``
lines, which we skip (we do not check host certificates). paramiko's
``HostKeys`` crashes on marker lines and only looks at the first line for a
name, so a stale line before the right one would look like a changed key.

Where (``KnownHosts``): the user's files (``UserKnownHostsFile``, default
``~/.ssh/known_hosts ~/.ssh/known_hosts2``), then the system's
(``GlobalKnownHostsFile``, default ``/etc/ssh/ssh_known_hosts{,2}``), all
read as one list. Under which name: ``HostKeyAlias`` if set (lower case),
else ``host`` or ``[host]:port``.

The policy (OpenSSH 9.2's ``check_host_key``, checked against ``ssh`` in
tests/ssh/test_ssh_config.py): a key revoked for the name is refused; a key
found on any line for the name is known; any other key recorded for the name,
whatever its type, means the key has CHANGED, refused loudly whatever the
caller accepts; with no line for ``[host]:port`` (and no alias), a line for
the bare ``host`` holding the offered key makes it known; any other key is
unknown, refused with its fingerprint and the way to accept it. Accepting
appends one line to the first user file (hashed under ``HashKnownHosts``;
paramiko's own save would rewrite the whole file and drop the user's
comments). ``preferred_key_types`` lets the connection ask the host for a key
type already on record, as ssh does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from ..errors import HostKeyError

#: The host key algorithms that prove a key recorded under a known_hosts key type.
ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
#: OpenSSH's defaults (readconf.c): UserKnownHostsFile and GlobalKnownHostsFile.
USER_FILES = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_FILES = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


@dataclass(frozen=True)
class KnownHosts:
    """Where a host's keys are looked up, and how an accepted one is recorded (in the first user file)."""

    user_files: tuple[Path, ...]
    global_files: tuple[Path, ...] = tuple(Path(p) for p in GLOBAL_FILES)
    hash_names: bool = False  # HashKnownHosts: record ``|1|salt|hash`` rather than the name

    @property
    def files(self) -> tuple[Path, ...]:
        return self.user_files + self.global_files


@dataclass(frozen=True)
class KnownKey:
    """One usable line of a known_hosts file."""

    marker: str  # "" or "@revoked" (``@cert-authority`` lines are skipped)
    patterns: tuple[str, ...]
    key: paramiko.PKey
    path: Path
    number: int  # the line's

    @property
    def where(self) -> str:
        return f"{self.path} line {self.number}"


def known_hosts_name(hostname: str, port: int) -> str:
    """The name OpenSSH files a key under: ``host``, or ``[host]:port`` off port 22 (lower case, as ssh does)."""
    hostname = hostname.lower()
    return hostname if port == 22 else f"[{hostname}]:{port}"


def lookup_name(hostname: str, port: int, host_key_alias: str | None = None) -> str:
    """The name ssh looks the host's keys up under: ``HostKeyAlias`` alone (lower case, no port), or as above."""
    return host_key_alias.lower() if host_key_alias else known_hosts_name(hostname, port)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load(paths: Sequence[Path]) -> list[KnownKey]:
    """Every line of the files that holds a key we can read; unreadable files and odd lines are skipped, as by ssh."""
    out = []
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else ""
            if marker not in ("", "@revoked") or len(fields) < 3:
                continue
            try:
                key = paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2], validate=True))
            except Exception:  # a key type paramiko lacks, bad base64, a truncated blob: not a line for us
                continue
            out.append(KnownKey(marker, tuple(fields[0].split(",")), key, Path(path), number))
    return out


def matches(patterns: Sequence[str], name: str) -> bool:
    """OpenSSH's rule: some pattern matches ``name`` and no ``!pattern`` does."""
    name = name.lower()
    hit = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _matches_one(pattern[1:] if negated else pattern, name):
            if negated:
                return False
            hit = True
    return hit


def _matches_one(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            return paramiko.HostKeys.hash_host(name, pattern) == pattern
        except (ValueError, IndexError):  # a mangled salt
            return False
    glob = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(glob, name) is not None


def known_types(hostname: str, port: int, known: KnownHosts, host_key_alias: str | None = None) -> list[str]:
    """Key types on record for the host's lookup name, in file order (as ssh orders its host key algorithms)."""
    name = lookup_name(hostname, port, host_key_alias)
    types = [k.key.get_name() for k in load(known.files) if not k.marker and matches(k.patterns, name)]
    return list(dict.fromkeys(types))


def preferred_key_types(available: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``available`` host key algorithms, those proving a ``known`` key type first (the order ssh asks in)."""
    wanted = {algorithm for kind in known for algorithm in ALGORITHMS.get(kind, (kind,))}
    return tuple([a for a in available if a in wanted] + [a for a in available if a not in wanted])


def _same(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


def _status(lines: Sequence[KnownKey], name: str, key: paramiko.PKey) -> tuple[str, KnownKey | None]:
    """OpenSSH's verdict on ``key`` for ``name``: revoked, known, changed (any other key on record) or new."""
    entries = [k for k in lines if matches(k.patterns, name)]
    revoked = [k for k in entries if k.marker == "@revoked" and _same(k.key, key)]
    if revoked:
        return "revoked", revoked[0]
    plain = [k for k in entries if not k.marker]
    same = [k for k in plain if _same(k.key, key)]
    if same:
        return "known", same[0]
    return ("changed", plain[0]) if plain else ("new", None)


def check(
    alias: str, hostname: str, port: int, key: paramiko.PKey, known: KnownHosts, accept_new: bool,
    host_key_alias: str | None = None,
) -> str:
    """Return what happened (``"known"`` or ``"added"``), or raise ``HostKeyError``."""
    name = lookup_name(hostname, port, host_key_alias)
    lines = load(known.files)
    status, line = _status(lines, name, key)
    offered = f"{key.get_name()} {fingerprint(key)}"
    if status == "new" and host_key_alias is None and port != 22:
        # OpenSSH's "checking without port identifier": only a known key counts, nothing is refused by it.
        if _status(lines, hostname.lower(), key)[0] == "known":
            return "known"
    if status == "revoked":
        raise HostKeyError(
            alias, "checking its host key",
            f"THE HOST KEY OF {name} IS REVOKED: it offers {offered}, marked @revoked in {line.where}. "
            "Do not connect until the host's administrator has given it a new key.",
        )
    if status == "known":
        return "known"
    if status == "changed":
        raise HostKeyError(
            alias, "checking its host key",
            f"THE HOST KEY OF {name} HAS CHANGED. It now offers {offered}, which differs from the "
            f"{line.key.get_name()} key recorded in {line.where}. Someone may be intercepting the connection, or "
            f"the host was reinstalled. If you know why it changed, remove the old line with "
            f"`{_remove_command(line.path, name)}` and connect again with accept_new_host=True (--accept-new-host).",
        )
    first, *others = [str(p) for p in known.user_files[:1]] + [
        str(p) for p in known.user_files[1:] + known.global_files if p.exists()] or ["any known hosts file"]
    where = f"{first} (nor in {', '.join(others)})" if others else first
    if not known.user_files:
        raise HostKeyError(
            alias, "checking its host key",
            f"{name} is not in {where}: it offers {offered}, and UserKnownHostsFile is none in ~/.ssh/config, so "
            "there is nowhere to record it. Name a file there (UserKnownHostsFile ~/.ssh/known_hosts), or add "
            "the host's key to a GlobalKnownHostsFile.",
        )
    if not accept_new:
        raise HostKeyError(
            alias, "checking its host key",
            f"{name} is not in {where}: it offers {offered}. If that is the right key, accept it once with "
            f"accept_new_host=True (%qjam_hosts --accept-new-host), which records it in {known.user_files[0]}, "
            "or run `ssh` to it once yourself.",
        )
    record(known.user_files[0], name, key, hashed=known.hash_names)
    return "added"


def _remove_command(path: Path, name: str) -> str:
    default = Path(os.path.expanduser("~")) / ".ssh" / "known_hosts"
    return f"ssh-keygen -R '{name}'" if path == default else f"ssh-keygen -f '{path}' -R '{name}'"


def record(path: Path, name: str, key: paramiko.PKey, hashed: bool = False) -> None:
    """Append ``name``'s key to a known_hosts file (its name hashed, if asked), creating the file privately."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write("\n")
        f.write(f"{paramiko.HostKeys.hash_host(name) if hashed else name} {key.get_name()} {key.get_base64()}\n")


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
