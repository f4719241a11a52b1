"""Host entries (``local:2``, ``node1``, ``bob@node2:4``, ``ssh://node3:2222:4``), parsed and checked.

An entry names a host and how many workers to start there. ``ssh://[user@]host:port``
(OpenSSH's own URI form) also carries the host's ssh port, for that host alone:
it overrides ``Cluster(port=)`` and ``~/.ssh/config``'s ``Port``, so one host may
appear twice with two ports (two sshds, two hosts). Its worker count, if any,
comes after the port: ``ssh://node3:2222:4``. Opening them is the transport
registry's (``transport.registry.open_hosts``).

A Dask cluster is named by one entry of its own, alone in the list
(``dask_target``): ``dask://HOST:PORT`` (a scheduler), ``dask:PATH`` (its
``--scheduler-file``) or ``dask:local:N`` (a ``LocalCluster`` of N processes
here); its workers are the scheduler's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import WorkerError
from ..transport.registry import LOCAL

__all__ = ["LOCAL", "dask_target", "parse_hosts"]

HOST_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]@]+$")
DASK = "dask:"
DASK_URI = re.compile(r"^dask://(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d+)$")
SSH_URI = re.compile(r"^ssh://(?P<alias>[A-Za-z0-9_.\-@]+)(?::(?P<port>\d+))?(?::(?P<count>\d+))?$")


def parse_hosts(hosts: Sequence[str] | str, workers_per_host: int = 1) -> list[tuple[str, int]]:
    """``["local:2", "node1"]`` -> ``[("local", 2), ("node1", workers_per_host)]``, checking every entry."""
    if isinstance(hosts, str):
        hosts = hosts.split()
    if isinstance(workers_per_host, bool) or not isinstance(workers_per_host, int) or workers_per_host < 1:
        raise WorkerError(f"workers_per_host must be a whole number of at least 1, not {workers_per_host!r}")
    out = []
    for spec in hosts:
        if str(spec).startswith("ssh://"):
            out.append(_parse_uri(str(spec), workers_per_host))
            continue
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


def _parse_uri(spec: str, workers_per_host: int) -> tuple[str, int]:
    """``ssh://[user@]host[:port][:N]`` -> (``ssh://[user@]host:port`` or ``[user@]host``, N)."""
    m = SSH_URI.match(spec)
    if not m or (m["port"] is not None and not 1 <= int(m["port"]) <= 65535) or m["count"] == "0":
        raise WorkerError(
            f"bad host entry {spec!r}: write ssh://[user@]host:port, optionally followed by ':N' workers "
            "(a port from 1 to 65535, N at least 1)"
        )
    n = int(m["count"]) if m["count"] else workers_per_host
    return (f"ssh://{m['alias']}:{int(m['port'])}" if m["port"] else m["alias"]), n


def dask_target(hosts: Sequence[str] | str | None, workers_per_host: int = 1) -> tuple[str, object] | None:
    """The Dask cluster a host list names, as ``executors.dask.DaskExecutor`` takes it, or None if it
    names none: ``("address", "tcp://host:port")``, ``("file", path)`` or ``("local", N)``."""
    if hosts is None:
        return None
    if isinstance(hosts, str):
        hosts = hosts.split()
    entries = [str(h) for h in hosts]
    dask = [h for h in entries if h.startswith(DASK)]
    if not dask:
        return None
    if len(entries) > 1:
        raise WorkerError(f"bad host list {entries!r}: a Dask entry ({dask[0]!r}) names a whole cluster; give it "
                          "alone (its workers are the scheduler's), in a Cluster of its own")
    spec = dask[0]
    if spec.startswith("dask://"):
        m = DASK_URI.match(spec)
        if not m or not 1 <= int(m["port"]) <= 65535:
            raise WorkerError(f"bad host entry {spec!r}: write dask://HOST:PORT, the Dask scheduler's address "
                              "(e.g. dask://127.0.0.1:8786)")
        return "address", f"tcp://{m['host']}:{int(m['port'])}"
    rest = spec[len(DASK):]
    if rest == "local" or rest.startswith("local:"):
        count = rest[len("local:"):] if rest != "local" else str(workers_per_host)
        if not count.isdigit() or int(count) < 1:
            raise WorkerError(f"bad host entry {spec!r}: write dask:local:N, N (at least 1) Dask worker processes "
                              "started here")
        return "local", int(count)
    if not rest:
        raise WorkerError(f"bad host entry {spec!r}: write dask://HOST:PORT (a scheduler), dask:PATH (its scheduler "
                          "file) or dask:local:N (N worker processes here)")
    return "file", rest
