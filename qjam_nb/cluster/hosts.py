"""Host entries (``local:2``, ``node1``, ``bob@node2:4``, ``ssh://node3:2222:4``); opening their transports at once.

An entry names a host and how many workers to start there. ``ssh://[user@]host:port``
(OpenSSH's own URI form) also carries the host's ssh port, for that host alone:
it overrides ``Cluster(port=)`` and ``~/.ssh/config``'s ``Port``, so one host may
appear twice with two ports (two sshds, two hosts). Its worker count, if any,
comes after the port: ``ssh://node3:2222:4``.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Sequence

from ..errors import HostError, WorkerError
from ..transport.local import LocalTransport
from ..transport.ssh import Opening, SshOptions, SshTransport

LOCAL = "local"
HOST_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]@]+$")
SSH_URI = re.compile(r"^ssh://(?P<alias>[A-Za-z0-9_.\-@]+)(?::(?P<port>\d+))?(?::(?P<count>\d+))?$")
#: Seconds to wait for the connecting threads once their connections are closed (they end at once).
ABANDON_WAIT = 10.0


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


def ssh_destination(host: str, options: SshOptions) -> tuple[str, SshOptions]:
    """The alias to resolve and the options for a host entry: an ``ssh://`` entry's port is its own."""
    if not host.startswith("ssh://"):
        return host, options
    alias, _, port = host[len("ssh://"):].rpartition(":")
    return alias, dataclasses.replace(options, port=int(port))


def open_transports(hosts: Sequence[str], options: SshOptions) -> dict[str, LocalTransport | SshTransport]:
    """Connect to every distinct host at once; all of them, or an error naming each that failed.

    Each host opens on a thread of its own. Anything raised in the calling
    thread meanwhile (Ctrl-C's ``KeyboardInterrupt``) abandons them all: every
    socket and ssh connection made so far is closed, which ends each thread's
    wait within a moment; the threads are joined, and the exception goes on.
    Nothing is left running in a kernel that lives on.
    """
    opened: dict[str, LocalTransport | SshTransport] = {}
    errors: dict[str, BaseException] = {}
    distinct = list(dict.fromkeys(hosts))
    openings = {h: Opening() for h in distinct if h != LOCAL}

    finished = {h: threading.Event() for h in distinct}

    def open_one(host: str) -> None:
        try:
            if host == LOCAL:
                opened[host] = LocalTransport()
            else:
                opened[host] = SshTransport(*ssh_destination(host, options), openings[host])
        except BaseException as exc:  # reported below, on the caller's thread
            errors[host] = exc
        finally:
            finished[host].set()

    threads = [threading.Thread(target=open_one, args=(h,), name=f"qjam-connect-{h}", daemon=True)
               for h in distinct]
    try:
        for t in threads:
            t.start()
        # Not Thread.join: interrupted by Ctrl-C, it takes the thread for ended (CPython
        # gh-90882, 3.11) and a later join returns at once, the thread still running.
        for done in finished.values():
            done.wait()
    except BaseException:
        for opening in openings.values():
            opening.abandon()
        deadline = time.monotonic() + ABANDON_WAIT
        for t in threads:
            if t.ident is not None:  # started
                t.join(max(0.0, deadline - time.monotonic()))
        for transport in list(opened.values()):
            if isinstance(transport, SshTransport):
                transport.close(deadline)
            else:
                transport.close()
        for opening in openings.values():
            opening.wait(deadline)
        raise
    if errors:
        for transport in opened.values():
            transport.close()
        if len(errors) == 1:
            raise next(iter(errors.values()))
        raise WorkerError("could not open these hosts: " + "; ".join(
            str(e) if isinstance(e, HostError) else f"{h}: {type(e).__name__}: {e}" for h, e in errors.items()
        ))
    return opened
