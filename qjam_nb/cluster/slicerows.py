"""Slice records, stored: one ``SliceRecord`` per slice on a worker, kept as columns (``SliceRows``).

A call of 100,000 slices keeps its records in a few arrays (~9 MB), not
100,000 objects; ``SliceRecord`` objects are made on demand. Rules: pure
storage (no events, no clock, no locks: ``callrecord`` folds events into
rows, under its lock); times are seconds since the call started, NaN in a
column for None.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from .scheduler import REBALANCED, SPECULATIVE, STOLEN

DONE, LOST, CANCELLED, ERROR, DROPPED = "done", "lost", "cancelled", "error", "dropped"


@dataclass(slots=True)  # made on demand (CallRecord.slices): ~180 bytes each
class SliceRecord:
    """One slice on one worker. Times are seconds since the call started, None if it never happened."""

    call: int
    index: int
    worker: str
    cached: bool  # served from the worker's cache (no slice bytes travelled)
    key: bytes | None = None  # the slice's content hash (16 bytes); None in calls without a dataset
    nbytes: int = 0  # the slice's size (what the cache saved, when cached)
    nbytes_sent: int = 0  # slice bytes that travelled to the worker for this record
    assigned: float | None = None
    sent: float | None = None
    started: float | None = None
    done: float | None = None
    ended: float | None = None  # when the outcome was known (done, lost, cancelled or error)
    compute: float = 0.0  # seconds the worker measured around mapfunc
    outcome: str | None = None  # "done" | "lost" | "cancelled" | "error" | "dropped"; None while it runs
    # How the schedule healed with it (``events.SliceTaken``): "stolen", "speculative" (a copy of a slice
    # ``source`` ran too) or "rebalanced"; None for a slice placed the usual way. A copy that lost its race
    # ends "dropped" when the winner's result came.
    how: str | None = None
    source: str | None = None  # the worker it was taken from (or copied from)

    @property
    def replicated(self) -> bool:
        """Taken from another worker, and its data shipped here: this worker caches it too from now on."""
        return self.how is not None and not self.cached

    @property
    def transfer(self) -> float:
        """Seconds spent moving things for this slice: shipping its data, and its result coming back."""
        ship = (self.sent - self.assigned) if self.sent is not None and self.assigned is not None else 0.0
        back = (self.done - self.started - self.compute) if self.done is not None and self.started is not None else 0.0
        return ship + max(0.0, back)


TIMES = ("assigned", "sent", "started", "done", "ended", "compute")
OUTCOMES = (None, DONE, LOST, CANCELLED, ERROR, DROPPED)
#: Outcomes as stored in ``SliceRows.outcome``: their places in OUTCOMES (0: still running).
DONE_CODE, LOST_CODE, CANCELLED_CODE, ERROR_CODE, DROPPED_CODE = 1, 2, 3, 4, 5
#: How a slice came to its worker, as stored in ``SliceRows.how`` (0: placed the usual way).
HOWS = (None, STOLEN, SPECULATIVE, REBALANCED)
NAN = float("nan")
_KEY_BYTES = 16  # slice keys are 128-bit hashes


class SliceRows:
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
        self.keys = bytearray()  # _KEY_BYTES per row; a key of another length (or None) goes to odd_keys
        self.odd_keys: dict[int, bytes | None] = {}
        self.nbytes = array("q")
        self.nbytes_sent = array("q")
        self.times = {name: array("d") for name in TIMES}
        self.outcome = bytearray()
        self.how = bytearray()  # places in HOWS
        self.source = array("H")  # the source's worker id + 1 (0: none)
        self._grow(capacity)

    def __len__(self) -> int:
        return self.n

    def _grow(self, extra: int) -> None:
        for column in (self.index, self.worker, self.nbytes, self.nbytes_sent, self.source):
            column.frombytes(bytes(column.itemsize * extra))
        for column in self.times.values():
            column.extend(array("d", [NAN]) * extra)
        self.cached += bytes(extra)
        self.outcome += bytes(extra)
        self.how += bytes(extra)
        self.keys += bytes(_KEY_BYTES * extra)

    def add(self, index: int, worker: str, cached: bool, key: bytes | None, nbytes: int, assigned: float) -> int:
        """A new record, as the scheduler assigns a slice; returns its row."""
        row = self.n
        if row == len(self.index):
            self._grow(max(16, row))
        self.n += 1
        wid = self._ids.get(worker)
        if wid is None:
            wid = self._id(worker)
        self.index[row] = index
        self.worker[row] = wid
        self.cached[row] = cached
        if type(key) is bytes and len(key) == _KEY_BYTES:  # set_key, for a new row
            self.keys[row * _KEY_BYTES:(row + 1) * _KEY_BYTES] = key
        else:
            self.odd_keys[row] = key
        self.nbytes[row] = nbytes
        self.times["assigned"][row] = assigned
        return row

    def _id(self, worker: str) -> int:
        wid = self._ids.get(worker)
        if wid is None:
            wid = self._ids[worker] = len(self.names)
            self.names.append(worker)
        return wid

    def set_how(self, row: int, how: str | None, source: str | None) -> None:
        """Row ``row``'s slice was taken from ``source`` (``how``: one of HOWS)."""
        self.how[row] = HOWS.index(how)
        self.source[row] = 0 if source is None else self._id(source) + 1

    def append(self, r: SliceRecord) -> int:
        """A record as a whole (for records made by hand)."""
        row = self.add(r.index, r.worker, r.cached, r.key, r.nbytes, NAN if r.assigned is None else r.assigned)
        self.nbytes_sent[row] = r.nbytes_sent
        for name in TIMES[1:]:
            value = getattr(r, name)
            self.times[name][row] = NAN if value is None else value
        self.outcome[row] = OUTCOMES.index(r.outcome)
        if r.how is not None or r.source is not None:
            self.set_how(row, r.how, r.source)
        return row

    def set_key(self, row: int, key: bytes | None) -> None:
        if type(key) is bytes and len(key) == _KEY_BYTES:
            self.keys[row * _KEY_BYTES:(row + 1) * _KEY_BYTES] = key
            self.odd_keys.pop(row, None)
        else:
            self.odd_keys[row] = key

    def key(self, row: int) -> bytes | None:
        if row in self.odd_keys:
            return self.odd_keys[row]
        return bytes(self.keys[row * _KEY_BYTES:(row + 1) * _KEY_BYTES])

    def get(self, row: int) -> SliceRecord:
        times = {name: self.times[name][row] for name in TIMES}
        times = {name: (None if t != t else t) for name, t in times.items()}  # NaN is None
        source = self.source[row]
        return SliceRecord(
            0, self.index[row], self.names[self.worker[row]], bool(self.cached[row]), self.key(row),
            self.nbytes[row], self.nbytes_sent[row], times["assigned"], times["sent"], times["started"],
            times["done"], times["ended"], times["compute"] or 0.0, OUTCOMES[self.outcome[row]],
            HOWS[self.how[row]], self.names[source - 1] if source else None,
        )
