"""Host keys: checked against known_hosts, never added without being asked.

paramiko's ``HostKeys`` reads ``known_hosts`` (hashed entries and
``[host]:port`` entries included). We add the policy: an unknown host is
refused with its fingerprint and the way to accept it; a changed key is
refused loudly; accepting appends one line to the file (paramiko's own save
would rewrite the whole file and drop the user's comments).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import paramiko

from ..errors import HostKeyError


def known_hosts_name(hostname: str, port: int) -> str:
    """The name OpenSSH files a key under: ``host``, or ``[host]:port`` off port 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check(
    alias: str, hostname: str, port: int, key: paramiko.PKey, known_hosts: list[Path], accept_new: bool
) -> str:
    """Return what happened (``"known"`` or ``"added"``), or raise ``HostKeyError``."""
    name = known_hosts_name(hostname, port)
    keys = paramiko.HostKeys()
    for path in known_hosts:
        if path.exists():
            keys.load(str(path))
    entry = keys.lookup(name)
    if entry is not None and key.get_name() in entry:
        if entry[key.get_name()] == key:
            return "known"
        raise HostKeyError(
            alias, "checking its host key",
            f"THE HOST KEY OF {name} HAS CHANGED. It now offers {key.get_name()} {fingerprint(key)}, "
            f"which differs from the key recorded in {known_hosts[0]}. Someone may be intercepting the "
            "connection, or the host was reinstalled. If you know why it changed, remove the old line with "
            f"`ssh-keygen -R '{name}'` and connect again with accept_new_host=True (--accept-new-host).",
        )
    if not accept_new:
        raise HostKeyError(
            alias, "checking its host key",
            f"{name} is not in {known_hosts[0]}: it offers {key.get_name()} {fingerprint(key)}. If that is "
            "the right key, accept it once with accept_new_host=True (%qjam_hosts --accept-new-host), which "
            "records it in known_hosts, or run `ssh` to it once yourself.",
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
