"""Who ran what, when: one record per map call, folded from the cluster's events.

``CallRecorder`` is an observer like ``StatusModel``: it learns everything
from ``cluster.events`` and nothing else, so the timeline shows what the
events said, and a test can hold the two side by side. Times are seconds
since the call started, taken with ``time.perf_counter()`` (or an injected
clock) when each event arrives in this process: ``assigned`` when the
scheduler placed the slice, ``sent`` when its data had been written,
``started`` when the worker said it began, ``done`` when its result arrived.
``compute`` is what the worker itself measured around ``mapfunc``.

A slice whose worker died mid-call keeps its record on that worker with
outcome ``"lost"``, and gets a new record on the worker that ran it in the
end; ``CallRecord.done_slices()`` has exactly one record per slice index
once a call succeeded. Nothing here draws: ``qjam_nb.ui.timeline`` does.
"""

from __future__ import annotations

import pickle
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash

from .. import events as ev

#: Calls a cluster remembers (``cluster.calls``), and the slice records they may hold together
#: (older calls are forgotten first; a record takes ~85 bytes, so 100,000 take ~9 MB).
KEEP_CALLS = 20
KEEP_RECORDS = 100_000

DONE, LOST, CANCELLED, ERROR = "done", "lost", "cancelled", "error"


@dataclass(slots=True)  # made on demand (CallRecord.slices): ~180 bytes each
class SliceRecord:
    """One slice on one worker. Times are seconds since the call started, None if it never happened."""

    call: int
    index: int
    worker: str
    cached: bool  # served from the worker's cache (no slice bytes travelled)
    key: str | None = None  # the slice's content hash; None in calls without a dataset
    nbytes: int = 0  # the slice's size (what the cache saved, when cached)
    nbytes_sent: int = 0  # slice bytes that travelled to the worker for this record
    assigned: float | None = None
    sent: float | None = None
    started: float | None = None
    done: float | None = None
    ended: float | None = None  # when the outcome was known (done, lost, cancelled or error)
    compute: float = 0.0  # seconds the worker measured around mapfunc
    outcome: str | None = None  # "done" | "lost" | "cancelled" | "error"; None while it runs

    @property
    def transfer(self) -> float:
        """Seconds spent moving things for this slice: shipping its data, and its result coming back."""
        ship = (self.sent - self.assigned) if self.sent is not None and self.assigned is not None else 0.0
        back = (self.done - self.started - self.compute) if self.done is not None and self.started is not None else 0.0
        return ship + max(0.0, back)


TIMES = ("assigned", "sent", "started", "done", "ended", "compute")
OUTCOMES = (None, DONE, LOST, CANCELLED, ERROR)
_DONE, _LOST, _CANCELLED, _ERROR = 1, 2, 3, 4  # their places in OUTCOMES
_NAN = float("nan")
_KEY_BYTES = 16  # slice keys are 128-bit hashes, in hex


class _Rows:
    """A call's slice records as columns: 100,000 records take ~9 MB and a few objects, not 100,000 objects.

    ``SliceRecord`` objects are made on demand (``get``); times are NaN for None.
    """

    def __init__(self, capacity: int = 0) -> None:
        """``capacity``: rows to allocate at once (a call's slice count), so the columns are not regrown."""
        self.n = 0
        self.index = array("I")
        self.worker = array("H")
        self.names: list[str] = []
        self._ids: dict[str, int] = {}
        self.cached = bytearray()
        self.keys = bytearray()  # _KEY_BYTES per row; a key that is not 32 hex digits goes to odd_keys
        self.odd_keys: dict[int, str | None] = {}
        self.nbytes = array("q")
        self.nbytes_sent = array("q")
        self.times = {name: array("d") for name in TIMES}
        self.outcome = bytearray()
        self._grow(capacity)

    def __len__(self) -> int:
        return self.n

    def _grow(self, extra: int) -> None:
        for column in (self.index, self.worker, self.nbytes, self.nbytes_sent):
            column.frombytes(bytes(column.itemsize * extra))
        for column in self.times.values():
            column.extend(array("d", [_NAN]) * extra)
        self.cached += bytes(extra)
        self.outcome += bytes(extra)
        self.keys += bytes(_KEY_BYTES * extra)

    def add(self, index: int, worker: str, cached: bool, key: str | None, nbytes: int, assigned: float) -> int:
        """A new record, as the scheduler assigns a slice; returns its row."""
        row = self.n
        if row == len(self.index):
            self._grow(max(16, row))
        self.n += 1
        wid = self._ids.get(worker)
        if wid is None:
            wid = self._ids[worker] = len(self.names)
            self.names.append(worker)
        self.index[row] = index
        self.worker[row] = wid
        self.cached[row] = cached
        if key is not None and len(key) == 2 * _KEY_BYTES:  # set_key, for a new row
            try:
                self.keys[row * _KEY_BYTES:(row + 1) * _KEY_BYTES] = bytes.fromhex(key)
            except ValueError:
                self.odd_keys[row] = key
        else:
            self.odd_keys[row] = key
        self.nbytes[row] = nbytes
        self.times["assigned"][row] = assigned
        return row

    def append(self, r: SliceRecord) -> int:
        """A record as a whole (for records made by hand)."""
        row = self.add(r.index, r.worker, r.cached, r.key, r.nbytes, _NAN if r.assigned is None else r.assigned)
        self.nbytes_sent[row] = r.nbytes_sent
        for name in TIMES[1:]:
            value = getattr(r, name)
            self.times[name][row] = _NAN if value is None else value
        self.outcome[row] = OUTCOMES.index(r.outcome)
        return row

    def set_key(self, row: int, key: str | None) -> None:
        if key is not None and len(key) == 2 * _KEY_BYTES:
            try:
                self.keys[row * _KEY_BYTES:(row + 1) * _KEY_BYTES] = bytes.fromhex(key)
                self.odd_keys.pop(row, None)
                return
            except ValueError:
                pass
        self.odd_keys[row] = key

    def key(self, row: int) -> str | None:
        if row in self.odd_keys:
            return self.odd_keys[row]
        return self.keys[row * _KEY_BYTES:(row + 1) * _KEY_BYTES].hex()

    def get(self, row: int) -> SliceRecord:
        times = {name: self.times[name][row] for name in TIMES}
        times = {name: (None if t != t else t) for name, t in times.items()}  # NaN is None
        return SliceRecord(
            0, self.index[row], self.names[self.worker[row]], bool(self.cached[row]), self.key(row),
            self.nbytes[row], self.nbytes_sent[row], times["assigned"], times["sent"], times["started"],
            times["done"], times["ended"], times["compute"] or 0.0, OUTCOMES[self.outcome[row]],
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
        self._columns: _Rows | None = None
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
    def _rows(self) -> _Rows:
        if self._pending:
            self._fold()
        return self._columns_now()

    def _columns_now(self) -> _Rows:
        if self._columns is None:
            self._columns = _Rows(self.n_slices)
        return self._columns

    def _fold(self) -> None:
        """Fold the pending events into the columns, in order (once, whichever thread asks first).

        A slice's two usual events, assigned and done, are folded inline (~2 µs a slice where
        a method per event took ~10); the rest by their ``_FOLDS`` method.
        """
        with self._lock:
            pending, rows, folds, opened, t0 = self._pending, self._columns_now(), _FOLDS, self._open, self._t0
            times = rows.times
            assigned, sent, started, done, ended, compute = (times[name] for name in TIMES)
            outcome, add = rows.outcome, rows.add
            t = None
            while pending:
                event, t = pending.popleft()
                now = t - t0
                kind = type(event)
                if kind is ev.SliceAssigned:
                    opened[(event.index, event.worker)] = add(
                        event.index, event.worker, event.cached, event.key, event.nbytes, now)
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
                        outcome[row] = _DONE
                        ended[row] = now
                else:
                    folds[kind](self, rows, event, now)
            if t is not None and self.ok is None:
                self._seconds = t - t0

    def _sent(self, rows: _Rows, event: ev.SliceSent, now: float) -> None:
        row = self._open.get((event.index, event.worker), -1)
        if row >= 0:
            rows.cached[row] = False  # also when the worker said NEED: it had lost the slice after all
            if rows.key(row) != event.key:
                rows.set_key(row, event.key)
            rows.nbytes_sent[row] += event.nbytes
            rows.times["sent"][row] = now

    def _slice_started(self, rows: _Rows, event: ev.SliceStarted, now: float) -> None:
        row = self._open.get((event.index, event.worker), -1)
        if row >= 0:
            rows.times["started"][row] = now

    def _lost(self, rows: _Rows, event: ev.SliceLost, now: float) -> None:
        if (event.index, event.worker) in self._open:
            self._close(rows, event, _LOST, now)

    def _error(self, rows: _Rows, event: ev.ErrorEvent, now: float) -> None:
        if (event.index, event.worker) in self._open:
            self._close(rows, event, _ERROR, now)

    def _finished(self, rows: _Rows, event: ev.CallFinished, now: float) -> None:
        """Slices still open when the call ended were cancelled."""
        for row in self._open.values():
            rows.outcome[row] = _CANCELLED
            rows.times["ended"][row] = now
        self._open.clear()

    def _close(self, rows: _Rows, event: Any, outcome: int, now: float) -> None:
        row = self._open.pop((event.index, event.worker))
        rows.outcome[row] = outcome
        rows.times["ended"][row] = now

    def __repr__(self) -> str:
        state = "running" if self.ok is None else ("ok" if self.ok else "failed")
        return (f"<CallRecord call {self.call}: {self.n_slices} slices, {self._count} records on "
                f"{len(self.workers)} workers, {state}, {self.seconds:.3f} s>")

    @property
    def slices(self) -> list[SliceRecord]:
        """Every record, in the order the slices were assigned (a moved slice has a lost and a done one)."""
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

    def slice_keys(self) -> dict[str, set[int]]:
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
        """Slice indexes that were assigned to more than one worker (their first worker died)."""
        seen: dict[int, set[int]] = {}
        n = len(self._rows)
        for index, worker in zip(self._rows.index[:n], self._rows.worker[:n], strict=True):
            seen.setdefault(index, set()).add(worker)
        return sorted(i for i, w in seen.items() if len(w) > 1)

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
        return {
            "seconds": self.seconds,
            "slices": self.n_slices,
            "done": len(done),
            "shipped": sum(1 for r in done if not r.cached),
            "cached": sum(1 for r in done if r.cached),
            "lost": sum(1 for r in slices if r.outcome == LOST),
            "moved": len(self.moved()),
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
            line = (f"  {worker:<16} {len(done):>5} done ({len(done) - cached} shipped, {cached} cached), "
                    f"compute {sum(r.compute for r in done):.3f} s")
            if lost:
                line += f"; lost {format_ranges(lost)} (moved)"
            lines.append(line)
        t = self.totals()
        lines.append(
            f"  sent {format_size(t['bytes_sent'])} ({format_size(t['slice_bytes_sent'])} of slices), "
            f"saved by the cache {format_size(t['bytes_saved'])}; compute {t['compute_seconds']:.3f} s, "
            f"transfer {t['transfer_seconds']:.3f} s, reduce {t['reduce_seconds']:.3f} s"
        )
        return "\n".join(lines)


class CallRecorder:
    """Observer that builds a ``CallRecord`` per call and keeps the last ``keep``.

    ``calls[-1]`` is the call running now, or the last one. Older calls are
    forgotten first when the calls kept would hold more than ``keep_records``
    slice records. ``clock`` is injectable for tests. A slice's events are
    kept as they come, with the time (~0.3 µs each), and folded into the
    record's columns when the record is read, every ``FOLD_EVERY`` events,
    and when a call with over ``KEEP_PENDING`` of them ends: a loop of small
    calls that nobody looks at pays almost nothing for its timeline (folding
    the ~6 events of a 2-slice call as they came cost ~40 µs a call).
    """

    def __init__(self, keep: int = KEEP_CALLS, clock: Callable[[], float] = time.perf_counter,
                 keep_records: int = KEEP_RECORDS) -> None:
        self.calls: deque[CallRecord] = deque(maxlen=keep)
        self.keep_records = keep_records
        self.clock = clock
        self._record: CallRecord | None = None  # the call running now
        self._kept = 0  # records of the calls kept before it

    @property
    def kinds(self) -> frozenset:
        """The events it records (the bus routes only these to it)."""
        return _KEPT | {ev.CallStarted}

    #: Stamped as they are emitted, not when a held batch is let go (see ``EventBus``).
    live = True

    @property
    def last(self) -> CallRecord | None:
        return self.calls[-1] if self.calls else None

    def __call__(self, event: ev.Event) -> None:
        kind = type(event)
        if kind in _KEPT:
            record = self._record
            if record is not None and event.call == record.call:
                pending = record._pending
                pending.append((event, self.clock()))
                if kind is ev.SliceAssigned:
                    record._count += 1
                elif kind is ev.CallFinished:
                    self._finished(record, event)
                    if len(pending) > KEEP_PENDING:
                        record._fold()
                if len(pending) >= FOLD_EVERY:
                    record._fold()
        elif kind is ev.CallStarted:
            self._call_started(event)

    def _call_started(self, event: ev.CallStarted) -> None:
        if self._record is not None:  # the last call never finished: its records are all there now
            self._kept += self._record.n_records
        while self.calls and (len(self.calls) == self.calls.maxlen
                              or self._kept + event.n_slices > self.keep_records):
            self._kept -= self.calls.popleft().n_records
        self._record = CallRecord(event.call, event.n_slices, tuple(event.workers), time.time(), event.params_hash)
        self._record._t0 = self.clock()
        self.calls.append(self._record)

    def _finished(self, record: CallRecord, event: ev.CallFinished) -> None:
        record.seconds = event.seconds
        record.bytes_sent = event.bytes_sent
        record.slice_bytes_sent = event.slice_bytes_sent
        record.slice_bytes_cached = event.slice_bytes_cached
        record.reduce_seconds = event.reduce_seconds
        record.ok = event.ok
        self._kept += record.n_records
        self._record = None


#: Events kept by a running call's record until it is read: how each folds into its columns.
_FOLDS: dict[type, Callable[[CallRecord, _Rows, Any, float], None]] = {
    ev.SliceSent: CallRecord._sent, ev.SliceStarted: CallRecord._slice_started, ev.SliceLost: CallRecord._lost,
    ev.ErrorEvent: CallRecord._error, ev.CallFinished: CallRecord._finished,
}
_KEPT = frozenset({ev.SliceAssigned, ev.SliceDone, *_FOLDS})  # (assigned and done are folded inline)
#: Pending events a running record folds at once, so they stay few (~0.2 KB each), and those a
#: finished record may keep unfolded until read.
FOLD_EVERY = 4096
KEEP_PENDING = 64


class _HasCache(Protocol):
    name: str
    cache: Mapping[str, int]


def cache_map(record: CallRecord | None, workers: Iterable[_HasCache]) -> dict[str, list[int]]:
    """Per worker, the slice indexes of ``record``'s dataset it holds in its cache now.

    Pure: reads the record's slice keys and each worker's ``cache`` (key -> bytes).
    A call without a dataset (or no call yet) holds no slices.
    """
    keys = record.slice_keys() if record is not None else {}
    out = {}
    for w in workers:
        out[w.name] = sorted(i for key in w.cache if key in keys for i in keys[key])
    return out


def format_ranges(indexes: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 7, 8]`` -> ``"0-3, 5, 7-8"``; empty -> ``"none"``."""
    items = sorted(set(indexes))
    if not items:
        return "none"
    parts = []
    start = prev = items[0]
    for i in items[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def cache_map_text(record: CallRecord | None, workers: Iterable[_HasCache]) -> str:
    """The cache map as lines of text: ``local/0  holds slices 0-12, 14 of call 3``."""
    held = cache_map(record, workers)
    if record is None or not record.has_dataset:
        return "cache map: no dataset in the last call"
    return "\n".join([f"cache map (slices of call {record.call}'s dataset, {record.n_slices} slices):"] + [
        f"  {name:<16} {format_ranges(indexes)}" for name, indexes in held.items()
    ])


def params_hash(params_part: tuple) -> str:
    """XXH3-128 of the params as shipped (their pickle and out-of-band buffers), to tell calls' params apart
    (the hash of slice keys: ~15 GB/s, where SHA-256 cost 0.6 ms a call for 1 MiB of params)."""
    data, buffers = params_part
    h = xxhash.xxh3_128()
    for part in (data, *buffers):
        h.update(part.raw() if isinstance(part, pickle.PickleBuffer) else memoryview(part).cast("B"))
    return h.hexdigest()


def format_size(nbytes: int) -> str:
    """Bytes as B, KiB or MiB, for people."""
    if nbytes < 2**10:
        return f"{nbytes} B"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB"
