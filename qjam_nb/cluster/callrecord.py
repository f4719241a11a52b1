"""One map call's record: its slices on the workers, and the call's totals, folded from its events.

``CallRecord`` is what ``cluster.last_call`` and ``cluster.calls`` hand out:
the record API (``slices``, ``done_slices``, ``moved``, ``by_worker``,
``totals``, ``summary``). ``CallRecorder`` (``recorder``) appends each of the
call's events to the record's pending queue as it comes; the record folds
them into its columns (``slicerows.SliceRows``) when it is read, in order,
under its lock, whichever thread reads first.

A slice whose worker died mid-call keeps its record on that worker with
outcome ``"lost"``, and gets a new record on the worker that ran it in the
end. A slice the schedule healed with (``SliceTaken``: stolen, copied or
rebalanced) says so in its record (``how``, ``source``); a copy that lost
its race ends ``"dropped"`` when the winner's result came. ``done_slices()``
has exactly one record per slice index once a call succeeded. Rules:
nothing here draws (``qjam_nb.ui.timeline`` does) or subscribes to the
bus (the recorder does); the record learns only from the events it is
handed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .. import events as ev
from ..formats import format_ranges, format_size
from .slicerows import (
    CANCELLED_CODE,
    DONE,
    DONE_CODE,
    DROPPED,
    DROPPED_CODE,
    ERROR_CODE,
    LOST,
    LOST_CODE,
    REBALANCED,
    SPECULATIVE,
    STOLEN,
    TIMES,
    SliceRecord,
    SliceRows,
)


class CallRecord:
    """One map call: its slices in the order they were assigned, and the call's totals.

    ``slices`` makes a fresh list of ``SliceRecord`` each time (the record
    keeps them as columns): take it once into a variable when looping.
    """

    def __init__(
        self, call: int, n_slices: int, workers: tuple, started: float, params_hash: str = "",
        seconds: float = 0.0, ok: bool | None = None, bytes_sent: int = 0, slice_bytes_sent: int = 0,
        slice_bytes_cached: int = 0, reduce_seconds: float = 0.0, slices: Iterable[SliceRecord] = (),
    ) -> None:
        self.call = call
        self.n_slices = n_slices
        self.workers = tuple(workers)
        self.started = started  # time.time() when the call started
        self.params_hash = params_hash  # XXH3-128 of the params as shipped
        self.ok = ok  # None while the call runs
        self.bytes_sent = bytes_sent
        self.slice_bytes_sent = slice_bytes_sent
        self.slice_bytes_cached = slice_bytes_cached
        self.reduce_seconds = reduce_seconds
        self._seconds = seconds
        # The recorder's events for this call, not folded into columns yet (see CallRecorder).
        self._pending: deque[tuple[Any, float]] = deque()
        self._lock = threading.Lock()
        self._t0 = 0.0  # the recorder's clock when the call started
        self._open: dict[tuple[int, str], int] = {}  # (index, worker) -> the row of its unfinished record
        self._taken: dict[tuple[int, str], tuple[str, str]] = {}  # (index, worker) -> (how, source), until assigned
        self._columns: SliceRows | None = None
        self._count = 0  # records, folded or not
        for r in slices:
            self._columns_now().append(r)
            self._count += 1

    @property
    def seconds(self) -> float:
        """The call's wall time; while it runs, until the last event seen."""
        if self.ok is None and self._pending:
            self._fold()
        return self._seconds

    @seconds.setter
    def seconds(self, value: float) -> None:
        self._seconds = value

    @property
    def _rows(self) -> SliceRows:
        if self._pending:
            self._fold()
        return self._columns_now()

    def _columns_now(self) -> SliceRows:
        if self._columns is None:
            self._columns = SliceRows(self.n_slices)
        return self._columns

    def _fold(self) -> None:
        """Fold the pending events into the columns, in order (once, whichever thread asks first).

        A slice's two usual events, assigned and done, are folded inline (~2 µs a slice where
        a method per event took ~10); the rest by their ``_FOLDS`` method.
        """
        with self._lock:
            pending, rows, folds, opened, t0 = self._pending, self._columns_now(), _FOLDS, self._open, self._t0
            taken = self._taken
            times = rows.times
            assigned, sent, started, done, ended, compute = (times[name] for name in TIMES)
            outcome, add = rows.outcome, rows.add
            t = None
            while pending:
                event, t = pending.popleft()
                now = t - t0
                kind = type(event)
                if kind is ev.SliceAssigned:
                    row = opened[(event.index, event.worker)] = add(
                        event.index, event.worker, event.cached, event.key, event.nbytes, now)
                    if taken:
                        healed = taken.pop((event.index, event.worker), None)
                        if healed is not None:
                            rows.set_how(row, *healed)
                elif kind is ev.SliceDone:
                    row = opened.pop((event.index, event.worker), -1)
                    if row >= 0:
                        done[row] = now
                        compute[row] = event.seconds
                        if started[row] != started[row]:  # NaN: a short slice, no STARTED came
                            before = assigned[row]
                            if sent[row] > before:  # (False for NaN: not sent)
                                before = sent[row]
                            started[row] = max(before, now - event.seconds)
                        outcome[row] = DONE_CODE
                        ended[row] = now
                else:
                    folds[kind](self, rows, event, now)
            if t is not None and self.ok is None:
                self._seconds = t - t0

    def _sent(self, rows: SliceRows, event: ev.SliceSent, now: float) -> None:
        row = self._open.get((event.index, event.worker), -1)
        if row >= 0:
            rows.cached[row] = False  # also when the worker said NEED: it had lost the slice after all
            if rows.key(row) != event.key:
                rows.set_key(row, event.key)
            rows.nbytes_sent[row] += event.nbytes
            rows.times["sent"][row] = now

    def _slice_started(self, rows: SliceRows, event: ev.SliceStarted, now: float) -> None:
        row = self._open.get((event.index, event.worker), -1)
        if row >= 0:
            rows.times["started"][row] = now

    def _taken_event(self, rows: SliceRows, event: ev.SliceTaken, now: float) -> None:
        """Said just before the slice's ``SliceAssigned``: kept until that makes the record."""
        self._taken[(event.index, event.worker)] = (event.how, event.source)

    def _dropped(self, rows: SliceRows, event: ev.SliceDropped, now: float) -> None:
        """A copy lost its race: its record ends now, where the winner's result came (a later STARTED
        or result of it finds no open record, and changes nothing)."""
        if (event.index, event.worker) in self._open:
            self._close(rows, event, DROPPED_CODE, now)

    def _lost(self, rows: SliceRows, event: ev.SliceLost, now: float) -> None:
        if (event.index, event.worker) in self._open:
            self._close(rows, event, LOST_CODE, now)

    def _error(self, rows: SliceRows, event: ev.ErrorEvent, now: float) -> None:
        if (event.index, event.worker) in self._open:
            self._close(rows, event, ERROR_CODE, now)

    def _finished(self, rows: SliceRows, event: ev.CallFinished, now: float) -> None:
        """Slices still open when the call ended were cancelled."""
        for row in self._open.values():
            rows.outcome[row] = CANCELLED_CODE
            rows.times["ended"][row] = now
        self._open.clear()

    def _close(self, rows: SliceRows, event: Any, outcome: int, now: float) -> None:
        row = self._open.pop((event.index, event.worker))
        rows.outcome[row] = outcome
        rows.times["ended"][row] = now

    def __repr__(self) -> str:
        state = "running" if self.ok is None else ("ok" if self.ok else "failed")
        return (f"<CallRecord call {self.call}: {self.n_slices} slices, {self._count} records on "
                f"{len(self.workers)} workers, {state}, {self.seconds:.3f} s>")

    @property
    def slices(self) -> list[SliceRecord]:
        """Every record, in the order the slices were assigned (a moved slice has a lost and a done one,
        a copied slice a done and a dropped one)."""
        out = [self._rows.get(row) for row in range(len(self._rows))]
        for r in out:
            r.call = self.call
        return out

    @property
    def n_records(self) -> int:
        return self._count

    @property
    def finished(self) -> bool:
        return self.ok is not None

    @property
    def has_dataset(self) -> bool:
        """False for calls without a dataset (every worker ran once), whose slices have no keys."""
        odd = self._rows.odd_keys
        return len(odd) < len(self._rows) or any(key is not None for key in odd.values())

    def slice_keys(self) -> dict[bytes, set[int]]:
        """Content hash -> the slice indexes with that content (equal slices share a key)."""
        out: dict[str, set[int]] = {}
        rows = self._rows
        for row in range(len(rows)):
            key = rows.key(row)
            if key is not None:
                out.setdefault(key, set()).add(rows.index[row])
        return out

    def done_slices(self) -> list[SliceRecord]:
        """One record per finished slice index (the one that finished), by index."""
        return sorted((r for r in self.slices if r.outcome == DONE), key=lambda r: r.index)

    def moved(self) -> list[int]:
        """Slice indexes whose worker died with them (a ``"lost"`` record) and that another worker then
        ran: moved after a death. Stolen and copied slices are not "moved" (``healed()`` says which)."""
        rows = self._rows
        n = len(rows)
        lost: dict[int, set[int]] = {}
        for row in range(n):
            if rows.outcome[row] == LOST_CODE:
                lost.setdefault(rows.index[row], set()).add(rows.worker[row])
        if not lost:
            return []
        moved = set()
        for index, worker in zip(rows.index[:n], rows.worker[:n], strict=True):
            if index in lost and worker not in lost[index]:
                moved.add(index)
        return sorted(moved)

    def healed(self) -> dict[str, list[SliceRecord]]:
        """The records of slices the schedule healed with, by how: ``"stolen"``, ``"speculative"`` (copies,
        won or dropped), ``"rebalanced"``; and ``"dropped"``: every copy that lost its race (a copy, or the
        original a copy beat)."""
        out: dict[str, list[SliceRecord]] = {STOLEN: [], SPECULATIVE: [], REBALANCED: [], DROPPED: []}
        rows = self._rows
        for row in range(len(rows)):
            how = rows.how[row]
            if how or rows.outcome[row] == DROPPED_CODE:
                r = rows.get(row)
                r.call = self.call
                if r.how is not None:
                    out[r.how].append(r)
                if r.outcome == DROPPED:
                    out[DROPPED].append(r)
        return out

    def by_worker(self) -> dict[str, list[SliceRecord]]:
        """Records per worker, every worker of the call present (in the call's order)."""
        out: dict[str, list[SliceRecord]] = {w: [] for w in self.workers}
        for r in self.slices:
            out.setdefault(r.worker, []).append(r)
        return out

    def totals(self) -> dict[str, Any]:
        """What travelled and where the time went: the numbers under the timeline.

        ``compute_seconds`` and ``transfer_seconds`` add up over slices (workers run
        in parallel, so they can exceed ``seconds``, the call's wall time).
        """
        slices = self.slices
        done = [r for r in slices if r.outcome == DONE]
        how = {STOLEN: 0, SPECULATIVE: 0, REBALANCED: 0}
        for r in slices:
            if r.how is not None:
                how[r.how] += 1
        return {
            "seconds": self.seconds,
            "slices": self.n_slices,
            "done": len(done),
            "shipped": sum(1 for r in done if not r.cached),
            "cached": sum(1 for r in done if r.cached),
            "lost": sum(1 for r in slices if r.outcome == LOST),
            "moved": len(self.moved()),
            "stolen": how[STOLEN],  # slices taken from another worker's queue
            "speculative": how[SPECULATIVE],  # copies run of slices running slowly elsewhere
            "rebalanced": how[REBALANCED],  # placed at the start on a worker below its share
            "replicated": sum(1 for r in slices if r.replicated),  # taken and shipped: cached on two workers now
            "dropped": sum(1 for r in slices if r.outcome == DROPPED),  # copies that lost their race
            "bytes_sent": self.bytes_sent,
            "slice_bytes_sent": self.slice_bytes_sent,
            "bytes_saved": self.slice_bytes_cached,
            "compute_seconds": sum(r.compute for r in done),
            "transfer_seconds": sum(r.transfer for r in slices),
            "reduce_seconds": self.reduce_seconds,
        }

    def summary(self) -> str:
        """A few lines of plain text: per worker, then the totals (for terminals and %qjam_timeline)."""
        state = "running" if not self.finished else ("done" if self.ok else "failed")
        lines = [f"call {self.call}: {self.n_slices} slices on {len(self.workers)} workers, {state} "
                 f"in {self.seconds:.3f} s"]
        for worker, records in self.by_worker().items():
            done = [r for r in records if r.outcome == DONE]
            cached = sum(1 for r in done if r.cached)
            lost = [r.index for r in records if r.outcome == LOST]
            dropped = [r.index for r in records if r.outcome == DROPPED]
            line = (f"  {worker:<16} {len(done):>5} done ({len(done) - cached} shipped, {cached} cached), "
                    f"compute {sum(r.compute for r in done):.3f} s")
            if lost:
                line += f"; lost {format_ranges(lost)} (moved)"
            if dropped:
                line += f"; dropped {format_ranges(dropped)} (another copy won)"
            lines.append(line)
        t = self.totals()
        lines.append(
            f"  sent {format_size(t['bytes_sent'])} ({format_size(t['slice_bytes_sent'])} of slices), "
            f"saved by the cache {format_size(t['bytes_saved'])}; compute {t['compute_seconds']:.3f} s, "
            f"transfer {t['transfer_seconds']:.3f} s, reduce {t['reduce_seconds']:.3f} s"
        )
        healing = self.healing_text()
        if healing:
            lines.append(f"  healed: {healing}")
        return "\n".join(lines)

    def healing_text(self) -> str:
        """How the schedule healed, in words ("3 stolen from local/0, 2 copies (1 won), 1 dropped, ..."),
        or "" if it did not; the summary and the timeline's totals say it."""
        healed = self.healed()
        parts = []
        for how in (STOLEN, REBALANCED):
            if healed[how]:
                sources: dict[str, int] = {}
                for r in healed[how]:
                    sources[r.source] = sources.get(r.source, 0) + 1
                said = [f"{n} from {source}" for source, n in sources.items()]
                said[0] = said[0].replace(" from ", f" {how} from ", 1)  # "3 stolen from a and 1 from b"
                parts.append(" and ".join(said))
        copies = healed[SPECULATIVE]
        if copies:
            won = sum(1 for r in copies if r.outcome == DONE)
            parts.append(f"{len(copies)} {'copy' if len(copies) == 1 else 'copies'} ({won} won)")
        if healed[DROPPED]:
            parts.append(f"{len(healed[DROPPED])} dropped")
        replicas = sum(1 for records in (healed[STOLEN], healed[SPECULATIVE], healed[REBALANCED])
                       for r in records if r.replicated)
        if replicas:
            parts.append(f"{replicas} now cached on two workers")
        return ", ".join(parts)


#: Events kept by a running call's record until it is read: how each folds into its columns.
_FOLDS: dict[type, Callable[[CallRecord, SliceRows, Any, float], None]] = {
    ev.SliceSent: CallRecord._sent, ev.SliceStarted: CallRecord._slice_started, ev.SliceLost: CallRecord._lost,
    ev.ErrorEvent: CallRecord._error, ev.CallFinished: CallRecord._finished,
    ev.SliceTaken: CallRecord._taken_event, ev.SliceDropped: CallRecord._dropped,
}
KEPT_EVENTS = frozenset({ev.SliceAssigned, ev.SliceDone, *_FOLDS})  # (assigned and done are folded inline)
