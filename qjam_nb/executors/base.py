"""The seam between the cluster's face and whatever carries its calls out.

Rules of this seam:

* The face (``qjam_nb.cluster``) checks arguments, places slices (its
  ``Scheduler``), folds results in slice order, keeps replay, the timeline
  and chaos's plans. It describes each call as a ``CallSpec`` and hands it to
  its executor; it never sees a link, a frame or a process.
* An executor starts, revives and stops workers, moves slices, runs the tasks
  it is handed, and says what happened: to observers as events
  (``qjam_nb.events``), and to the face through ``CallReports`` while a call
  runs. It never decides where a slice runs, and never folds.
* A call runs on one thread: the one that called ``map`` (or the background
  thread of a future). The executor emits events and calls ``CallReports`` on
  that thread only, from inside ``CallRun.wait`` (or the other ``CallRun``
  methods); threads of its own only read, and hand over through a queue.

Today's executor is ``frames`` (our workers over byte streams: local pipes,
ssh, memory); a new one (Dask) implements ``Executor`` and ``CallRun`` here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import events as ev
from .. import states
from ..codec import Pickled
from ..dataset import DataSet


@dataclass(eq=False)
class CallSpec:
    """One ``map`` call, as the face hands it over: what to run on what."""

    id: int
    func: bytes  # the mapfunc, pickled (``cluster.shipping.dumps_function``)
    params: Pickled  # pickled once, for every worker (``cluster.shipping.dumps_params``)
    data: DataSet | None  # None: every worker runs mapfunc(params, []) once
    keyed: list  # (slice key, bytes) per slice; guessed keys until ``CallRun.rekeyed``
    timeout: float | None = None
    delays: Mapping[str, float] = field(default_factory=dict)  # worker -> seconds slept before each slice (chaos)


class WorkerHandle:
    """What the face and its observers know of one worker, whatever the executor: its name and
    host, state (changed only by its executor, along ``states``' table, with an event), its hello,
    and what it caches."""

    def __init__(self, name: str, host: str) -> None:
        self.name = name
        self.host = host
        self.state = states.STARTING
        self.reason = ""
        self.hello: dict = {}
        self.cache: dict[bytes, int] = {}  # slice key -> its size in bytes; change it through remember/forget
        self.cached_bytes = 0
        self.starts = 0  # times its process was started (by its executor: a restart counts)
        # The executor's guess of what shipping a slice here costs, (latency s, bytes/s), until measured
        # (``cluster.speeds``).
        self.ship_guess: tuple[float, float] = (0.002, 50e6)

    def __repr__(self) -> str:
        return f"<worker {self.name} {self.state}>"

    def remember(self, key: bytes, nbytes: int) -> None:
        self.cached_bytes += nbytes - self.cache.get(key, 0)
        self.cache[key] = nbytes

    def forget(self, key: bytes | None = None) -> None:
        """Forget one cached slice, or (no key) all of them."""
        if key is None:
            self.cache.clear()
            self.cached_bytes = 0
        else:
            self.cached_bytes -= self.cache.pop(key, 0)


def set_state(events: ev.EventBus, worker: WorkerHandle, new: str, reason: str) -> None:
    """Move ``worker`` along ``states``' table and say so (``WorkerStateChanged``); the same state again
    says nothing. Every executor changes a worker's state through this."""
    old = worker.state
    if old == new:
        return
    worker.state = states.transition(old, new)
    worker.reason = reason
    events.emit(ev.WorkerStateChanged(worker.name, new, old, reason))


def cache_changed(events: ev.EventBus, worker: WorkerHandle) -> None:
    """Say what ``worker`` caches now (``CacheChanged``)."""
    events.emit(ev.CacheChanged(worker.name, len(worker.cache), worker.cached_bytes))


class CallReports(Protocol):
    """What the face is told while a call runs (on the call's thread, from inside ``CallRun``)."""

    def started(self, worker: str, index: int) -> None:
        """``worker`` began slice ``index`` (announced by slices that run 3 ms or more)."""

    def finished(self, worker: str, index: int, value: Any, seconds: float) -> None:
        """Slice ``index``'s result."""

    def failed(self, worker: str, index: int, error: dict) -> None:
        """mapfunc raised on ``worker``: ``error`` has "type", "message", "traceback", "where". Raises."""

    def lost(self, worker: str, running: int | None, why: str) -> None:
        """``worker`` died (already marked dead); ``running``: the slice it said it ran, if any; ``why``
        its obituary. Its slices in flight are the face's to place again."""


class CallRun(Protocol):
    """One call being carried out. The face feeds it tasks and waits; it reports through ``CallReports``."""

    bytes_sent: int  # every byte sent for the call, slices included
    slice_bytes_sent: int  # slice bytes shipped
    slice_bytes_cached: int  # slice bytes that ran where they were cached

    def assign(self, tasks: Sequence[tuple[str, int]]) -> None:
        """Run these (worker, slice) tasks, in order, shipping the slices the workers lack."""

    def flush(self) -> None:
        """Send what was held back (tasks of one pass leave together), and report cache changes."""

    def wait(self, deadline: float | None) -> bool:
        """Take what the workers said, reporting it; False once ``deadline`` (time.monotonic) passed first."""

    def disown(self, worker: str, index: int) -> None:
        """Slice ``index``, sent to ``worker`` under a wrongly guessed key: drop its answer when it comes."""

    def rekeyed(self, keyed: list) -> None:
        """The slices' true (key, bytes), replacing the guessed ones."""

    def lose(self, worker: str, how: str, reason: str) -> None:
        """Kill (``how="kill"``) or disconnect (``"drop"``) ``worker`` now, and report it lost (chaos)."""

    def cancel(self, grace: float) -> None:
        """Stop the call on every worker (after an error, interrupt or timeout): within ``grace`` s, or kill."""

    def close(self) -> None:
        """The call is over: let go of what it held, and mark its busy workers idle."""


class CallRunBase:
    """What every executor's ``CallRun`` keeps alike: the call, its workers by name, the byte counts,
    and the answers to drop of tasks sent under a wrongly guessed key (``disown``)."""

    def __init__(self, spec: CallSpec, workers: Sequence[WorkerHandle], reports: CallReports) -> None:
        self.spec = spec
        self.id = spec.id
        self.reports = reports
        self.workers = {w.name: w for w in workers}
        self.bytes_sent = 0
        self.slice_bytes_sent = 0
        self.slice_bytes_cached = 0
        self.stale: dict[tuple[str, int], int] = {}  # (worker, slice) -> answers to drop (guessed wrong)

    def disown(self, worker: str, index: int) -> None:
        self.stale[(worker, index)] = self.stale.get((worker, index), 0) + 1
        self.slice_bytes_cached -= self.spec.keyed[index][1]

    def _stale(self, worker: WorkerHandle, index: int) -> bool:
        """An answer to a task sent under a wrongly guessed key (of old data, so of no use): dropped."""
        left = self.stale.get((worker.name, index))
        if left is None:
            return False
        if left > 1:
            self.stale[(worker.name, index)] = left - 1
        else:
            del self.stale[(worker.name, index)]
        return True


class Executor(Protocol):
    """Starts and stops a cluster's workers, and carries out its calls."""

    workers: list[WorkerHandle]
    max_slice_bytes: int  # a bigger slice cannot travel: the face refuses it before the call

    def start(self, timeout: float) -> None:
        """Start every worker; raise (naming the host or worker) if any cannot be."""

    def revive(self, timeout: float, now: bool = False) -> list[WorkerHandle]:
        """Start dead workers again where their host allows (``now``: ignoring backoff); those that came back."""

    def drain(self) -> None:
        """Take in what workers said between calls (output, deaths)."""

    def alive(self) -> list[WorkerHandle]:
        """The workers a call may use."""

    def obituaries(self) -> str:
        """Why the dead workers died, in one line."""

    def set_call(self, call: int) -> None:
        """The call now starting: events between calls carry it."""

    def begin(self, spec: CallSpec, workers: list[WorkerHandle], reports: CallReports) -> CallRun:
        """Start ``spec`` on ``workers`` (its function and params go out; no task yet)."""

    def lose(self, worker: str, how: str, reason: str) -> None:
        """Kill or disconnect an idle worker between calls (chaos); it is marked dead."""

    def stop(self) -> None:
        """Stop every worker and let go of every host."""
