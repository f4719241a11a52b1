"""Opening hosts: which transport serves a host entry, and opening many at once.

The one door through which the layers above reach a host. ``open_host(entry,
options)`` picks the transport registered for the entry (``local``, an ssh
alias, an ``ssh://[user@]host:port`` URI as ``cluster.hosts`` parses them) and
opens it; ``reopen_host`` does the same for a host that was lost, with a
shorter timeout; ``open_hosts`` opens several at once, each on its own thread.
What a host is reached by shows in its transport's ``describe()``.

A new transport goes in ``transport/`` and is registered here (``register``):
a test of the entry and a function that opens it. Nothing above this module
names a transport; ``SshOptions`` is re-exported from here because the
cluster's users give them (``Cluster(ssh=SshOptions(...))``) and every
transport is handed them (only ssh reads them today).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from ..errors import HostError, WorkerError
from .base import Transport
from .local import LocalTransport
from .memory import MEMORY, MemoryTransport
from .ssh import Opening, SshOptions, SshTransport

__all__ = ["LOCAL", "RECONNECT_TIMEOUT", "SshOptions", "Transport", "open_host", "open_hosts", "register",
           "reopen_host"]

LOCAL = "local"
#: Seconds at most to reach a lost host again: a lost host must cost a call seconds, not the full timeout.
RECONNECT_TIMEOUT = 10.0
#: Seconds to wait for the connecting threads once their connections are closed (they end at once).
ABANDON_WAIT = 10.0

#: ``(matches(entry), open(entry, options, opening))``, tried in order; the last one takes any entry.
Opener = Callable[[str, SshOptions, Opening], Transport]
_registry: list[tuple[Callable[[str], bool], Opener]] = []


def register(matches: Callable[[str], bool], opener: Opener) -> None:
    """Serve the host entries ``matches`` accepts with ``opener`` (tried before those registered earlier)."""
    _registry.insert(0, (matches, opener))


def ssh_destination(entry: str, options: SshOptions) -> tuple[str, SshOptions]:
    """The alias to resolve and the options for a host entry: an ``ssh://`` entry's port is its own."""
    if not entry.startswith("ssh://"):
        return entry, options
    alias, _, port = entry[len("ssh://"):].rpartition(":")
    return alias, dataclasses.replace(options, port=int(port))


def _open_ssh(entry: str, options: SshOptions, opening: Opening) -> Transport:
    return SshTransport(*ssh_destination(entry, options), opening)


def _open_local(entry: str, options: SshOptions, opening: Opening) -> Transport:
    return LocalTransport()


def _open_memory(entry: str, options: SshOptions, opening: Opening) -> Transport:
    return MemoryTransport()


register(lambda entry: True, _open_ssh)  # a host name or ssh:// URI: what is not another transport's
register(lambda entry: entry == LOCAL, _open_local)
register(lambda entry: entry == MEMORY, _open_memory)  # workers as threads of this process (tests)


def open_host(entry: str, options: SshOptions, opening: Opening | None = None) -> Transport:
    """Open the host ``entry`` names with the transport registered for it. ``opening`` lets another thread
    abandon it mid-way (``open_hosts``)."""
    opener = next(open_ for matches, open_ in _registry if matches(entry))
    return opener(entry, options, opening if opening is not None else Opening())


def reopen_host(entry: str, options: SshOptions) -> Transport:
    """Open a host again after it was lost, within ``RECONNECT_TIMEOUT`` at most."""
    return open_host(entry, dataclasses.replace(options, timeout=min(options.timeout, RECONNECT_TIMEOUT)))


def open_hosts(entries: Sequence[str], options: SshOptions) -> dict[str, Transport]:
    """Connect to every distinct host at once; all of them, or an error naming each that failed.

    Each host opens on a thread of its own. Anything raised in the calling
    thread meanwhile (Ctrl-C's ``KeyboardInterrupt``) abandons them all: every
    socket and ssh connection made so far is closed, which ends each thread's
    wait within a moment; the threads are joined, and the exception goes on.
    Nothing is left running in a kernel that lives on.
    """
    opened: dict[str, Transport] = {}
    errors: dict[str, BaseException] = {}
    distinct = list(dict.fromkeys(entries))
    openings = {h: Opening() for h in distinct}

    finished = {h: threading.Event() for h in distinct}

    def open_one(host: str) -> None:
        try:
            opened[host] = open_host(host, options, openings[host])
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
            transport.close(deadline)
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
