"""What every live view shares: a redraw throttle, and a base that follows a cluster's events.

A call of 10,000 small slices must not spend its time redrawing: views redraw
at most every ``min_interval`` seconds, and always on state changes and at a
call's start and end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ipywidgets as widgets

from .. import events as ev
from ..cluster.cluster import Cluster
from ..cluster.status import StatusModel

#: Events that redraw at once, whatever the throttle says.
URGENT = (ev.WorkerStateChanged, ev.CallStarted, ev.CallFinished, ev.ErrorEvent)


class Throttle:
    """Says whether to redraw now: always when urgent, else once per ``min_interval``."""

    def __init__(self, min_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval = min_interval
        self.clock = clock
        self.last = float("-inf")

    def __call__(self, urgent: bool) -> bool:
        now = self.clock()
        if urgent or now - self.last >= self.min_interval:
            self.last = now
            return True
        return False


class _View:
    """Subscribes to a cluster and redraws from its status model, throttled; displays ``box``."""

    box: widgets.Widget
    #: Events that redraw at once, whatever the throttle says.
    urgent: tuple = URGENT

    def __init__(self, cluster: Cluster, min_interval: float, clock: Callable[[], float]) -> None:
        self.cluster = cluster
        self.model: StatusModel = cluster.status
        self.throttle = Throttle(min_interval, clock)
        self.redraws = 0
        self._unsubscribe = cluster.events.subscribe(self._on_event)

    def _on_event(self, event: ev.Event) -> None:
        if self.throttle(isinstance(event, self.urgent)):
            self.redraws += 1
            self.redraw()

    def redraw(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._unsubscribe()

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)
