"""The events a cluster emits, and the small observer bus that carries them.

The widget, the tqdm bar, the stream echo and the tests all learn what happens
from these, and only from these. Events are emitted on the thread that called
``map`` (or started the cluster), in the order things happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger("qjam_nb")


def _event(cls: type) -> type:
    """An event is a named tuple (immutable, ~0.5 µs to make, where a frozen dataclass took ~1.7) that
    equals only an event of its own kind with the same fields, never a plain tuple."""

    def __eq__(self: tuple, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)

    def __ne__(self: tuple, other: object) -> bool:
        return not __eq__(self, other)

    def __hash__(self: tuple) -> int:
        return hash((type(self).__name__, *self))

    cls.__eq__, cls.__ne__, cls.__hash__ = __eq__, __ne__, __hash__
    return cls


@_event
class WorkerStateChanged(NamedTuple):
    worker: str
    state: str
    previous: str
    reason: str = ""


@_event
class WorkerThreads(NamedTuple):
    """What a started worker's BLAS/OpenMP libraries run with, as its HELLO said ("1 (2 cores // 2 workers)")."""

    worker: str
    threads: str


@_event
class HostReady(NamedTuple):
    """A host is connected and bootstrapped; ``uploaded_bytes`` is 0 when it had the worker already."""

    host: str
    detail: str
    uploaded_bytes: int
    seconds: float


@_event
class CallStarted(NamedTuple):
    call: int
    n_slices: int
    workers: tuple
    params_hash: str = ""  # XXH3-128 of the params' pickle, as shipped


@_event
class SliceAssigned(NamedTuple):
    call: int
    index: int
    worker: str
    cached: bool
    key: bytes | None = None  # the slice's content hash, 16 bytes (None in calls without a dataset)
    nbytes: int = 0  # the slice's size: what the cache saves when ``cached``


@_event
class SliceSent(NamedTuple):
    """Slice data travelled to a worker: ``nbytes`` of slice on the wire."""

    call: int
    index: int
    worker: str
    key: bytes  # 16 bytes
    nbytes: int


@_event
class SliceStarted(NamedTuple):
    call: int
    index: int
    worker: str


@_event
class SliceDone(NamedTuple):
    call: int
    index: int
    worker: str
    seconds: float


@_event
class SliceLost(NamedTuple):
    """The worker running (or holding) this slice died; it goes back to be assigned to another."""

    call: int
    index: int
    worker: str


@_event
class SliceTaken(NamedTuple):
    """The schedule healed: slice ``index`` goes to ``worker`` although ``source`` had it, because
    ``how`` is "stolen" (``source`` had it queued and would finish it later), "speculative" (a copy:
    ``source`` runs it too, slowly or late; the first result wins) or "rebalanced" (``source``
    caches it, but had its share of the call). ``SliceAssigned`` follows."""

    call: int
    index: int
    worker: str
    how: str
    source: str


@_event
class SliceDropped(NamedTuple):
    """``worker``'s copy of slice ``index`` lost the race to ``winner``'s: its result, if it comes, is ignored."""

    call: int
    index: int
    worker: str
    winner: str


@_event
class CacheChanged(NamedTuple):
    worker: str
    n_slices: int
    nbytes: int


@_event
class StreamOutput(NamedTuple):
    worker: str
    stream: str
    text: str
    call: int
    index: int


@_event
class ErrorEvent(NamedTuple):
    worker: str
    call: int
    index: int
    message: str


@_event
class CallFinished(NamedTuple):
    call: int
    seconds: float
    bytes_sent: int
    slice_bytes_sent: int
    slice_bytes_cached: int
    ok: bool
    reduce_seconds: float = 0.0  # spent folding results here, in the calling thread


Event = (
    WorkerStateChanged | HostReady | CallStarted | SliceAssigned | SliceSent | SliceStarted
    | SliceDone | SliceLost | SliceTaken | SliceDropped | CacheChanged | StreamOutput | ErrorEvent | CallFinished
)
Observer = Callable[[Event], None]


class EventBus:
    """Calls every subscriber with every event it wants; a failing subscriber is logged, not fatal.

    An observer with a ``kinds`` attribute (a collection of event classes) gets
    only those: the stream echo and the progress bar skip the two events of
    every slice they do not use. Without one, an observer gets every event.

    An observer with ``live = True`` gets its events as they are emitted even while the
    bus holds the rest back (``hold()``): the timeline recorder, which stamps each event
    with the time it comes. Delivered at ``release()``, a call's first events were stamped
    up to a slice's run time late (the master's core taken by the workers it had just woken)
    and slices showed as done before they had computed. A live observer must be cheap.
    """

    def __init__(self) -> None:
        # A tuple, replaced on (un)subscribe: emit iterates it without copying, and an
        # observer that unsubscribes during an emit does not disturb that emit.
        self._observers: tuple[Observer, ...] = ()
        self._routes: dict[type, tuple[Observer, ...]] = {}  # event class -> who wants it, built on first use
        self._held: list | None = None  # events kept back by hold()
        self._split: dict[type, tuple[tuple[Observer, ...], tuple[Observer, ...]]] = {}  # kind -> (live, held)

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Add ``observer``; returns a function that removes it again."""
        self._observers += (observer,)
        self._routes, self._split = {}, {}
        return lambda: self.unsubscribe(observer)

    def unsubscribe(self, observer: Observer) -> None:
        if observer in self._observers:
            observers = list(self._observers)
            observers.remove(observer)
            self._observers = tuple(observers)
            self._routes, self._split = {}, {}

    def hold(self) -> None:
        """Keep the events emitted from now on, in order, until ``release()``."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Deliver what ``hold()`` kept (nothing if not holding)."""
        held, self._held = self._held, None
        for event in held or ():
            split = self._split.get(type(event)) or self._split_route(type(event))
            self._deliver(split[1], event)

    def emit(self, event: Event) -> None:
        if self._held is not None:
            split = self._split.get(type(event)) or self._split_route(type(event))
            self._deliver(split[0], event)
            if split[1]:
                self._held.append(event)
            return
        route = self._routes.get(type(event))
        if route is None:
            route = self._route(type(event))
        self._deliver(route, event)

    @staticmethod
    def _deliver(route: tuple[Observer, ...], event: Event) -> None:
        for observer in route:
            try:
                observer(event)
            except Exception:  # a broken view must not break the computation
                log.exception("qjam_nb event observer %r failed on %r", observer, event)

    def _route(self, kind: type) -> tuple[Observer, ...]:
        route = self._routes[kind] = tuple(
            o for o in self._observers if getattr(o, "kinds", None) is None or kind in o.kinds)
        return route

    def _split_route(self, kind: type) -> tuple[tuple[Observer, ...], tuple[Observer, ...]]:
        route = self._routes.get(kind) or self._route(kind)
        split = self._split[kind] = (tuple(o for o in route if getattr(o, "live", False)),
                                     tuple(o for o in route if not getattr(o, "live", False)))
        return split
