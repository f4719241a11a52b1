"""Host keys: checked against known_hosts, never added without being asked.

We read ``known_hosts`` ourselves, as OpenSSH does: ``[host]:port`` names,
hashed names (``|1|salt|hash``), several names or ``*``/``?`` patterns (and
``!`` negations) on one line, ``@revoked`` lines, and ``@cert-authority``
lines, which we skip (we do not check host certificates). paramiko's
``HostKeys`` crashes on marker lines and only looks at the first line for a
name, so a stale line before the right one would look like a changed key.

The policy: a key revoked for the name is refused; a key found on any line
for the name is known; a key of a type recorded for the name with another
value has CHANGED and is refused loudly, whatever the caller accepts; any
other key is unknown, refused with its fingerprint and the way to accept it.
Accepting appends one line to the file (paramiko's own save would rewrite the
whole file and drop the user's comments). ``preferred_key_types`` lets the
connection ask the host for a key type already on record, as ssh does.
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


@dataclass(frozen=True)
class KnownKey:
    """One usable line of a known_hosts file."""

    marker: str  # "" or "@revoked" (``@cert-authority`` lines are skipped)
    patterns: tuple[str, ...]
    key: paramiko.PKey
    where: str  # "path line N", for messages


def known_hosts_name(hostname: str, port: int) -> str:
    """The name OpenSSH files a key under: ``host``, or ``[host]:port`` off port 22 (lower case, as ssh does)."""
    hostname = hostname.lower()
    return hostname if port == 22 else f"[{hostname}]:{port}"


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
            out.append(KnownKey(marker, tuple(fields[0].split(",")), key, f"{path} line {number}"))
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


def known_types(hostname: str, port: int, known_hosts: Sequence[Path]) -> list[str]:
    """Key types on record for the host, in file order."""
    name = known_hosts_name(hostname, port)
    types = [k.key.get_name() for k in load(known_hosts) if not k.marker and matches(k.patterns, name)]
    return list(dict.fromkeys(types))


def preferred_key_types(available: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``available`` host key algorithms, those proving a ``known`` key type first (the order ssh asks in)."""
    wanted = {algorithm for kind in known for algorithm in ALGORITHMS.get(kind, (kind,))}
    return tuple([a for a in available if a in wanted] + [a for a in available if a not in wanted])


def _same(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


def check(
    alias: str, hostname: str, port: int, key: paramiko.PKey, known_hosts: list[Path], accept_new: bool
) -> str:
    """Return what happened (``"known"`` or ``"added"``), or raise ``HostKeyError``."""
    name = known_hosts_name(hostname, port)
    entries = [k for k in load(known_hosts) if matches(k.patterns, name)]
    offered = f"{key.get_name()} {fingerprint(key)}"
    revoked = [k for k in entries if k.marker == "@revoked" and _same(k.key, key)]
    if revoked:
        raise HostKeyError(
            alias, "checking its host key",
            f"THE HOST KEY OF {name} IS REVOKED: it offers {offered}, marked @revoked in {revoked[0].where}. "
            "Do not connect until the host's administrator has given it a new key.",
        )
    plain = [k for k in entries if not k.marker]
    if any(_same(k.key, key) for k in plain):
        return "known"
    changed = [k for k in plain if k.key.get_name() == key.get_name()]
    if changed:
        raise HostKeyError(
            alias, "checking its host key",
            f"THE HOST KEY OF {name} HAS CHANGED. It now offers {offered}, which differs from the key "
            f"recorded in {changed[0].where}. Someone may be intercepting the connection, or the host was "
            f"reinstalled. If you know why it changed, remove the old line with `ssh-keygen -R '{name}'` and "
            "connect again with accept_new_host=True (--accept-new-host).",
        )
    if not accept_new:
        others = sorted({k.key.get_name() for k in plain})
        also = (f" (known_hosts holds a {', '.join(others)} key for it, which the host did not offer)"
                if others else "")
        raise HostKeyError(
            alias, "checking its host key",
            f"{name} is not in {known_hosts[0]}{also}: it offers {offered}. If that is the right key, accept "
            "it once with accept_new_host=True (%qjam_hosts --accept-new-host), which records it in "
            "known_hosts, or run `ssh` to it once yourself.",
        )
    record(known_hosts[0], name, key)
    return "added"


def record(path: Path, name: str, key: paramiko.PKey) -> None:
    """Append ``name``'s key to a known_hosts file, creating it (and ~/.ssh) privately."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write("\n")
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
