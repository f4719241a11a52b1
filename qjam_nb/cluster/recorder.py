"""The timeline's observer: one ``CallRecord`` per map call, built from the cluster's events.

``CallRecorder`` is an observer like ``StatusModel``: it learns everything
from ``cluster.events`` and nothing else, so the timeline shows what the
events said, and a test can hold the two side by side. Times are seconds
since the call started, taken with ``time.perf_counter()`` (or an injected
clock) when each event arrives in this process: ``assigned`` when the
scheduler placed the slice, ``sent`` when its data had been written,
``started`` when the worker said it began, ``done`` when its result arrived.
``compute`` is what the worker itself measured around ``mapfunc``.

Rules: the recorder decides which calls are kept and when a record folds;
what an event means for a record is ``callrecord``'s.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from .. import events as ev
from .callrecord import KEPT_EVENTS, CallRecord

#: Calls a cluster remembers (``cluster.calls``), and the slice records they may hold together
#: (older calls are forgotten first; a record takes ~85 bytes, so 100,000 take ~9 MB).
KEEP_CALLS = 20
KEEP_RECORDS = 100_000
#: Pending events a running record folds at once, so they stay few (~0.2 KB each), and those a
#: finished record may keep unfolded until read.
FOLD_EVERY = 4096
KEEP_PENDING = 64


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
        return KEPT_EVENTS | {ev.CallStarted}

    #: Stamped as they are emitted, not when a held batch is let go (see ``EventBus``).
    live = True

    @property
    def last(self) -> CallRecord | None:
        return self.calls[-1] if self.calls else None

    def __call__(self, event: ev.Event) -> None:
        kind = type(event)
        if kind in KEPT_EVENTS:
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
