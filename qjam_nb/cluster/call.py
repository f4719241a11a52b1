"""One ``map`` call, driven by the face: placement, the ordered fold, blame, the deadline.

Whatever the executor, these stay here (``executors.base``): the
``Scheduler`` says which slice runs where, results are folded in slice
order, a slice whose workers died ``MAX_SLICE_DEATHS`` times is not tried
again, a call with no worker left fails, and a call past its ``timeout``
stops. The executor carries out the tasks and reports back (``CallReports``,
implemented by ``CallDriver``), on the call's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .. import events as ev
from ..errors import CallTimeoutError, RemoteError, WorkerError
from ..executors.base import CallRun, CallSpec, Executor, WorkerHandle
from .reduce import OrderedFold
from .scheduler import MEASURABLE, Scheduler
from .speeds import SpeedBook
from .tracebacks import code_spans, restore

#: Tasks a worker may have in flight when a call starts (``Scheduler.observe`` adapts it).
WINDOW = 4
#: Deaths a slice may cause before it is not tried again.
MAX_SLICE_DEATHS = 2


class CallDriver:
    """A call's face-side state, and the ``CallReports`` its executor reports to."""

    def __init__(self, spec: CallSpec, workers: list[WorkerHandle], reduce: Any, mapfunc: Callable,
                 events: ev.EventBus, chaos: Any, speeds: SpeedBook | None = None) -> None:
        self.spec = spec
        self.id = spec.id
        self.events = events
        self.mapfunc = mapfunc  # for pointing a remote traceback back at the cell (code_spans)
        self.chaos = chaos  # its armed actions fire from here (``Chaos.progress``), as slices finish
        data = spec.data
        keys = [k for k, _ in spec.keyed] if data is not None else [None] * len(workers)
        self.speeds = speeds = speeds if speeds is not None else SpeedBook()
        links = speeds.links
        for w in workers:
            if w.name not in links:
                speeds.link(w.name, w.ship_guess)
        self.sched = Scheduler([w.name for w in workers], keys, CacheHolders(workers), WINDOW, pinned=data is None,
                               costs=speeds, sizes=[n for _, n in spec.keyed] if data is not None else None)
        self.fold = OrderedFold(len(keys), reduce)
        self.started_at = time.perf_counter()
        self.deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
        self.deaths: list[str] = []
        self.blame: dict[int, int] = {}  # slice -> workers that died running it
        self.hungry = False  # results came in since the windows were last filled
        self.run: CallRun | None = None

    def feed(self) -> None:
        """Hand out what the windows allow."""
        self.hungry = False
        sched = self.sched
        tasks = sched.assign(time.monotonic())
        if sched.moves:  # stolen, copied or rebalanced: said before the executor says they were assigned
            for worker, index, how, source in sched.moves:
                self.events.emit(ev.SliceTaken(self.id, index, worker, how, source))
            sched.moves.clear()
        if tasks:
            self.run.assign(tasks)

    def drive(self, executor_run: CallRun) -> Any:
        """Wait for results, feeding the windows once per read, until every slice is folded."""
        run = executor_run
        fold = self.fold
        sched = self.sched
        while not fold.complete:
            deadline = self.deadline
            check = sched.next_check(time.monotonic()) if sched.healing else None
            if check is not None and (deadline is None or check < deadline):
                deadline = check
            if not run.wait(deadline):
                if deadline is check:  # time to look for a copy to run (``Scheduler.next_check``)
                    self.feed()
                    run.flush()
                    continue
                missing = fold.n - fold.next
                raise CallTimeoutError(
                    f"call {self.id} did not finish within {self.spec.timeout:g} s: {missing} of {fold.n} slices "
                    "had no result yet; the call was stopped on every worker. Give map a larger timeout=, "
                    "or use smaller slices."
                )
            if self.hungry and not fold.complete:  # once for all the results of this read
                self.feed()
            run.flush()
        return fold.value

    def check_keys(self, true: list) -> None:
        """The slices' true keys, hashed while the workers computed; redo those whose guess was wrong.

        A slice that changed in place since the last call was handed out under
        its old key: its worker computes on the old content. If that task is
        still queued here, it is placed again by its true key; if it went out,
        the worker's answer to it is dropped when it comes (``disown``) and the
        slice, reported lost, is handed out again (its new data shipped).
        """
        run = self.run
        for index, ((guess, _), (key, _)) in enumerate(zip(self.spec.keyed, true, strict=True)):
            if guess == key:
                continue
            running = [w for w, held in self.sched.in_flight.items() if index in held]
            self.sched.rekey(index, key, running)
            for holder in running:
                run.disown(holder, index)
                self.events.emit(ev.SliceLost(self.id, index, holder))
        run.rekeyed(true)
        self.feed()
        run.flush()

    # -- CallReports -------------------------------------------------------------------------
    def started(self, worker: str, index: int) -> None:
        self.sched.started(worker, index, time.monotonic())
        self.events.emit(ev.SliceStarted(self.id, index, worker))

    def finished(self, worker: str, index: int, value: Any, seconds: float) -> None:
        sched = self.sched
        if sched.done(worker, index, time.monotonic(), seconds):
            self.events.emit(ev.SliceDone(self.id, index, worker, seconds))
            sched.observe(seconds)
            self.fold.add(index, value)
            self.hungry = True
            if sched.dropped:  # the other copies of this slice: their results will be ignored
                for loser, dropped in sched.dropped:
                    self.events.emit(ev.SliceDropped(self.id, dropped, loser, worker))
                sched.dropped.clear()
            if self.chaos.armed:
                self.chaos.progress(self)

    def learn(self) -> None:
        """The call is over: what it measured of the workers' speeds and links goes to the speed book."""
        sched = self.sched
        if sched.longest < MEASURABLE and not sched.lagging:
            return  # slices this short time the machine's noise, not the workers
        self.speeds.learn(sched.measured(time.monotonic()))
        for worker, nbytes, overhead in sched.link_samples:
            self.speeds.link(worker).learn(nbytes, overhead)

    def failed(self, worker: str, index: int, error: dict) -> None:
        err = RemoteError(worker, index if self.spec.data is not None else -1, error["type"],
                          error["message"] + _hint(error), restore(error["traceback"], code_spans(self.mapfunc)),
                          error["where"])
        self.events.emit(ev.ErrorEvent(worker, self.id, err.index, str(err.args[0])))
        raise err

    def lost(self, worker: str, running: int | None, why: str) -> None:
        """A worker died mid-call: blame the slice it was running, and give its slices to the others."""
        sched = self.sched
        # No STARTED (a slice under 3 ms): it ran its tasks in order, so the oldest unfinished one.
        blamed = running if running is not None else min(sched.in_flight.get(worker, ()), default=None)
        if blamed is not None and sched.finished[blamed]:
            blamed = None  # a copy of it finished elsewhere: whatever killed this worker, not that slice
        what = f"{worker} died running slice {blamed}" if blamed is not None else f"{worker} died"
        self.deaths.append(f"{what}: {why}")
        if blamed is not None:
            self.blame[blamed] = self.blame.get(blamed, 0) + 1
            if self.blame[blamed] >= MAX_SLICE_DEATHS:
                raise WorkerError(
                    f"slice {blamed} killed {self.blame[blamed]} workers in turn, so it is not tried again: "
                    + "; ".join(d for d in self.deaths if f"running slice {blamed}:" in d)
                    + ". Dead workers are started again for the next call."
                )
        if not sched.alive - {worker}:
            raise WorkerError("every worker died during the call: " + "; ".join(self.deaths)
                              + ". Dead workers are started again for the next call.")
        in_flight = sorted(sched.in_flight.get(worker, ()))
        sched.lost(worker)
        for index in in_flight:  # before they are assigned again, so a timeline shows the move in order
            self.events.emit(ev.SliceLost(self.id, index, worker))
        self.feed()


def begin(executor: Executor, driver: CallDriver, workers: list[WorkerHandle]) -> CallRun:
    """Start the call on its executor and hand out the first tasks."""
    driver.run = executor.begin(driver.spec, workers, driver)
    driver.feed()
    driver.run.flush()
    return driver.run


class CacheHolders(Mapping):
    """Slice key -> the call's workers that cache it, looked up as the scheduler places each slice:
    the cost follows the call's slices, not the size of every worker's cache."""

    def __init__(self, workers: list[WorkerHandle]) -> None:
        self._caches = [(w.name, w.cache) for w in workers]

    def get(self, key: bytes, default: Any = ()) -> Any:
        found = ()
        for name, cache in self._caches:  # (a loop, not a generator: this runs once a slice)
            if key in cache:
                found += (name,)
        return found or default

    def __getitem__(self, key: bytes) -> tuple[str, ...]:
        found = self.get(key)
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[bytes]:
        return iter(dict.fromkeys(key for _, cache in self._caches for key in cache))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _hint(error: dict) -> str:
    """What to do about the usual remote errors that are not the mapfunc's own fault."""
    if error["where"] == "pickling the result":
        return ". Results travel back pickled: return plain data (numbers, arrays, lists, dicts)"
    if error["type"] == "ModuleNotFoundError" and not error["where"].startswith("running"):
        return (". The worker cannot import that module: functions and classes from modules are shipped by "
                "reference. Install the module there, define the code in the notebook, or call "
                "cloudpickle.register_pickle_by_value(module) first")
    return ""
