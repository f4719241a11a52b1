"""What the cluster looks like right now, folded from its events.

``StatusModel`` is an observer: feed it every event and read ``rows`` (one per
worker) and ``call`` (the current or last call). The widget, ``%qjam_status``
and the text table all render this one model, so they cannot disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import events as ev
from ..formats import format_size
from ..states import STARTING


@dataclass
class WorkerRow:
    name: str
    state: str = STARTING
    reason: str = ""
    done: int = 0
    assigned: int = 0
    cached_slices: int = 0
    cached_bytes: int = 0
    threads: str = ""  # its BLAS threads, and why (``handshake.describe_threads``)


@dataclass
class CallRow:
    call: int = 0
    n_slices: int = 0
    done: int = 0
    running: bool = False
    started: float = 0.0
    seconds: float = 0.0
    slice_bytes_sent: int = 0
    slice_bytes_cached: int = 0
    errors: list = field(default_factory=list)
    # How the schedule healed (``SliceTaken``): slices stolen, copies run, slices rebalanced.
    stolen: int = 0
    copies: int = 0
    rebalanced: int = 0

    def healing_text(self) -> str:
        """ "3 stolen, 2 copies, 1 rebalanced" (what is non-zero), or "" if the call moved nothing."""
        parts = [f"{self.stolen} stolen" if self.stolen else "",
                 f"{self.copies} {'copy' if self.copies == 1 else 'copies'}" if self.copies else "",
                 f"{self.rebalanced} rebalanced" if self.rebalanced else ""]
        return ", ".join(p for p in parts if p)


class StatusModel:
    """Folds events into rows; ``version`` grows with every change, for cheap redraw checks."""

    def __init__(self) -> None:
        self.rows: dict[str, WorkerRow] = {}
        self.hosts: dict[str, ev.HostReady] = {}
        self.call = CallRow()
        self.version = 0

    def row(self, name: str) -> WorkerRow:
        if name not in self.rows:
            self.rows[name] = WorkerRow(name)
        return self.rows[name]

    def __call__(self, event: ev.Event) -> None:
        self.version += 1
        kind = type(event)
        if kind is ev.SliceAssigned:  # the two events of every slice, without a method call
            row = self.rows.get(event.worker) or self.row(event.worker)
            row.assigned += 1
        elif kind is ev.SliceDone:
            row = self.rows.get(event.worker) or self.row(event.worker)
            row.done += 1
            self.call.done += 1
        else:
            fold = self._folds.get(kind)
            if fold is not None:
                fold(self, event)

    def _host_ready(self, event: ev.HostReady) -> None:
        self.hosts[event.host] = event

    def _threads(self, event: ev.WorkerThreads) -> None:
        self.row(event.worker).threads = event.threads

    def _state_changed(self, event: ev.WorkerStateChanged) -> None:
        row = self.row(event.worker)
        row.state, row.reason = event.state, event.reason

    def _call_started(self, event: ev.CallStarted) -> None:
        self.call = CallRow(event.call, event.n_slices, running=True, started=time.monotonic())
        for row in self.rows.values():
            row.done = row.assigned = 0

    def _slice_assigned(self, event: ev.SliceAssigned) -> None:
        self.row(event.worker).assigned += 1

    def _slice_done(self, event: ev.SliceDone) -> None:
        self.row(event.worker).done += 1
        self.call.done += 1

    def _slice_taken(self, event: ev.SliceTaken) -> None:
        call = self.call
        if event.how == "stolen":
            call.stolen += 1
        elif event.how == "speculative":
            call.copies += 1
        else:
            call.rebalanced += 1

    def _slice_dropped(self, event: ev.SliceDropped) -> None:
        """A copy that lost its race will never be done: no longer one of its worker's tasks."""
        row = self.row(event.worker)
        row.assigned = max(row.done, row.assigned - 1)

    def _cache_changed(self, event: ev.CacheChanged) -> None:
        row = self.row(event.worker)
        row.cached_slices, row.cached_bytes = event.n_slices, event.nbytes

    def _error(self, event: ev.ErrorEvent) -> None:
        self.call.errors.append(event.message)

    def _call_finished(self, event: ev.CallFinished) -> None:
        self.call.running = False
        self.call.seconds = event.seconds
        self.call.slice_bytes_sent = event.slice_bytes_sent
        self.call.slice_bytes_cached = event.slice_bytes_cached

    #: How each kind of event changes the model (by type: five events a slice, no isinstance chain).
    _folds = {
        ev.HostReady: _host_ready,
        ev.WorkerStateChanged: _state_changed,
        ev.WorkerThreads: _threads,
        ev.CallStarted: _call_started,
        ev.SliceAssigned: _slice_assigned,
        ev.SliceDone: _slice_done,
        ev.SliceTaken: _slice_taken,
        ev.SliceDropped: _slice_dropped,
        ev.CacheChanged: _cache_changed,
        ev.ErrorEvent: _error,
        ev.CallFinished: _call_finished,
    }

    #: The events that change the model: the bus routes only these here (not SliceSent, StreamOutput...).
    kinds = frozenset(_folds)

    def text(self) -> str:
        """A plain table, for terminals and logs."""
        lines = [f"{'worker':<16} {'state':<9} {'done/total':>10} {'cached':>8} {'bytes':>10}  BLAS"]
        for row in self.rows.values():
            lines.append(
                f"{row.name:<16} {row.state:<9} {f'{row.done}/{row.assigned}':>10} "
                f"{row.cached_slices:>8} {format_size(row.cached_bytes):>10}  {row.threads or '?'}"
            )
        for host in self.hosts.values():
            lines.append(f"{host.host}: {host.detail}")
        c = self.call
        if c.call:
            verb = "running" if c.running else f"done in {c.seconds:.3f} s"
            healed = c.healing_text()
            lines.append(
                f"call {c.call}: {c.done}/{c.n_slices} slices, {verb}; "
                f"{format_size(c.slice_bytes_sent)} of slices shipped, "
                f"{format_size(c.slice_bytes_cached)} served from cache" + (f"; healed: {healed}" if healed else "")
            )
        return "\n".join(lines)

