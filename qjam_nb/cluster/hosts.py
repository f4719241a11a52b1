"""Host entries (``local:2``, ``node1``, ``bob@node2:4``) and opening their transports in parallel."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from ..errors import HostError, WorkerError
from ..transport.local import LocalTransport
from ..transport.ssh import SshOptions, SshTransport

LOCAL = "local"
HOST_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]@]+$")


def parse_hosts(hosts: Sequence[str] | str, workers_per_host: int = 1) -> list[tuple[str, int]]:
    """``["local:2", "node1"]`` -> ``[("local", 2), ("node1", workers_per_host)]``, checking every entry."""
    if isinstance(hosts, str):
        hosts = hosts.split()
    if isinstance(workers_per_host, bool) or not isinstance(workers_per_host, int) or workers_per_host < 1:
        raise WorkerError(f"workers_per_host must be a whole number of at least 1, not {workers_per_host!r}")
    out = []
    for spec in hosts:
        host, _, count = str(spec).rpartition(":") if ":" in str(spec) else (str(spec), "", "")
        if count:
            if not count.isdigit() or int(count) < 1:
                raise WorkerError(f"bad host entry {spec!r}: after ':' comes a number of workers, at least 1")
            n = int(count)
        else:
            n = workers_per_host
        if not HOST_NAME.match(host):
            raise WorkerError(
                f"bad host entry {spec!r}: give 'local', 'local:N', or a host name you can ssh to "
                "(optionally with ':N' workers)"
            )
        out.append((host, n))
    if not out:
        raise WorkerError("no hosts given: name at least one, e.g. 'local:2'")
    return out


def open_transports(hosts: Sequence[str], options: SshOptions) -> dict[str, LocalTransport | SshTransport]:
    """Connect to every distinct host at once; all of them, or an error naming each that failed."""
    opened: dict[str, LocalTransport | SshTransport] = {}
    errors: dict[str, BaseException] = {}

    def open_one(host: str) -> None:
        try:
            opened[host] = LocalTransport() if host == LOCAL else SshTransport(host, options)
        except BaseException as exc:  # reported below, on the caller's thread
            errors[host] = exc

    threads = [threading.Thread(target=open_one, args=(h,), daemon=True) for h in dict.fromkeys(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for transport in opened.values():
            transport.close()
        if len(errors) == 1:
            raise next(iter(errors.values()))
        raise WorkerError("could not open these hosts: " + "; ".join(
            str(e) if isinstance(e, HostError) else f"{h}: {type(e).__name__}: {e}" for h, e in errors.items()
        ))
    return opened
