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

import hashlib
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import events as ev

#: Calls a cluster remembers (``cluster.calls``), and the slice records they may hold together
#: (older calls are forgotten first: 200,000 records are about 70 MB).
KEEP_CALLS = 20
KEEP_RECORDS = 200_000

DONE, LOST, CANCELLED, ERROR = "done", "lost", "cancelled", "error"


@dataclass(slots=True)  # a call of 10,000 slices keeps 10,000 of these
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


@dataclass
class CallRecord:
    """One map call: its slices in the order they were assigned, and the call's totals."""

    call: int
    n_slices: int
    workers: tuple
    started: float  # time.time() when the call started
    params_hash: str = ""
    seconds: float = 0.0  # so far, while it runs
    ok: bool | None = None  # None while the call runs
    bytes_sent: int = 0
    slice_bytes_sent: int = 0
    slice_bytes_cached: int = 0
    reduce_seconds: float = 0.0
    slices: list[SliceRecord] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.ok is not None

    def done_slices(self) -> list[SliceRecord]:
        """One record per finished slice index (the one that finished), by index."""
        return sorted((r for r in self.slices if r.outcome == DONE), key=lambda r: r.index)

    def moved(self) -> list[int]:
        """Slice indexes that were assigned to more than one worker (their first worker died)."""
        seen: dict[int, set[str]] = {}
        for r in self.slices:
            seen.setdefault(r.index, set()).add(r.worker)
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
        done = [r for r in self.slices if r.outcome == DONE]
        return {
            "seconds": self.seconds,
            "slices": self.n_slices,
            "done": len(done),
            "shipped": sum(1 for r in done if not r.cached),
            "cached": sum(1 for r in done if r.cached),
            "lost": sum(1 for r in self.slices if r.outcome == LOST),
            "moved": len(self.moved()),
            "bytes_sent": self.bytes_sent,
            "slice_bytes_sent": self.slice_bytes_sent,
            "bytes_saved": self.slice_bytes_cached,
            "compute_seconds": sum(r.compute for r in done),
            "transfer_seconds": sum(r.transfer for r in self.slices),
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

    ``calls[-1]`` is the call running now, or the last one; ``clock`` is
    injectable for tests.
    """

    def __init__(self, keep: int = KEEP_CALLS, clock: Callable[[], float] = time.perf_counter,
                 keep_records: int = KEEP_RECORDS) -> None:
        self.calls: deque[CallRecord] = deque(maxlen=keep)
        self.keep_records = keep_records
        self.clock = clock
        self._t0 = 0.0
        self._open: dict[tuple[int, str], SliceRecord] = {}  # (index, worker) -> its unfinished record

    @property
    def last(self) -> CallRecord | None:
        return self.calls[-1] if self.calls else None

    def _now(self) -> float:
        return self.clock() - self._t0

    def _current(self, call: int) -> CallRecord | None:
        record = self.last
        return record if record is not None and record.call == call and not record.finished else None

    def _close(self, record: SliceRecord, outcome: str) -> None:
        record.outcome = outcome
        record.ended = self._now()
        self._open.pop((record.index, record.worker), None)

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.CallStarted):
            self._t0 = self.clock()
            self._open.clear()
            while self.calls and sum(len(c.slices) for c in self.calls) + event.n_slices > self.keep_records:
                self.calls.popleft()
            self.calls.append(CallRecord(event.call, event.n_slices, tuple(event.workers), time.time(),
                                         event.params_hash))
            return
        call = getattr(event, "call", None)
        record = self._current(call) if isinstance(call, int) else None
        if record is None:
            return
        record.seconds = self._now()
        if isinstance(event, ev.SliceAssigned):
            r = SliceRecord(event.call, event.index, event.worker, event.cached, event.key, event.nbytes,
                            assigned=self._now())
            record.slices.append(r)
            self._open[(event.index, event.worker)] = r
            return
        r = self._open.get((getattr(event, "index", -1), getattr(event, "worker", "")))
        if isinstance(event, ev.SliceSent) and r is not None:
            r.cached = False  # also when the worker said NEED: it had lost the slice after all
            r.key = event.key
            r.nbytes_sent += event.nbytes
            r.sent = self._now()
        elif isinstance(event, ev.SliceStarted) and r is not None:
            r.started = self._now()
        elif isinstance(event, ev.SliceDone) and r is not None:
            r.done = self._now()
            r.compute = event.seconds
            self._close(r, DONE)
        elif isinstance(event, ev.SliceLost) and r is not None:
            self._close(r, LOST)
        elif isinstance(event, ev.ErrorEvent) and r is not None:
            self._close(r, ERROR)
        elif isinstance(event, ev.CallFinished):
            for r in list(self._open.values()):
                self._close(r, CANCELLED)
            record.seconds = event.seconds
            record.bytes_sent = event.bytes_sent
            record.slice_bytes_sent = event.slice_bytes_sent
            record.slice_bytes_cached = event.slice_bytes_cached
            record.reduce_seconds = event.reduce_seconds
            record.ok = event.ok


class _HasCache(Protocol):
    name: str
    cache: Mapping[str, int]


def cache_map(record: CallRecord | None, workers: Iterable[_HasCache]) -> dict[str, list[int]]:
    """Per worker, the slice indexes of ``record``'s dataset it holds in its cache now.

    Pure: reads the record's slice keys and each worker's ``cache`` (key -> bytes).
    A call without a dataset (or no call yet) holds no slices.
    """
    keys: dict[str, set[int]] = {}
    if record is not None:
        for r in record.slices:
            if r.key is not None:
                keys.setdefault(r.key, set()).add(r.index)
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
    if record is None or not any(r.key for r in record.slices):
        return "cache map: no dataset in the last call"
    return "\n".join([f"cache map (slices of call {record.call}'s dataset, {record.n_slices} slices):"] + [
        f"  {name:<16} {format_ranges(indexes)}" for name, indexes in held.items()
    ])


def params_hash(params_part: tuple) -> str:
    """SHA-256 of the params as shipped (their pickle and out-of-band buffers), to tell calls' params apart."""
    data, buffers = params_part
    h = hashlib.sha256()
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
