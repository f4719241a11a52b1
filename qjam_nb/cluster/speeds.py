"""What the cluster has measured of its workers, kept across calls: how fast each one runs a
slice, and what shipping bytes to it costs. Pure bookkeeping: no I/O, no clock (times are handed in).

Rules:

* A worker's speed is relative: the fastest worker of the last calls is 1.0, one that
  takes twice as long a slice is 0.5. A call's slices are assumed alike, so a speed
  measured on one function serves the next (an iterative algorithm calls the same one).
  A call moves it part of the way, by how many slices it measured (``BLEND``): one
  noisy call does not make a worker slow; within a call, stealing copes meanwhile.
  A worker's first call (a new process importing, touching its memory) is not counted.
* ``unit`` is the seconds a slice took at speed 1.0 in the last call that finished
  slices: the first guess of the next call, until its own slices are measured.
* A worker that is never measured (new, or never given a slice) counts as the median
  of the others; a worker that restarts under the same name keeps its speed.
* Shipping cost = ``latency + bytes / rate``: the executor's guess for the worker
  (``WorkerHandle.ship_guess``) until a task sent to an idle worker is measured:
  the time from handing it out to its result, less the slice's own run time.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping

from ..formats import format_size

#: How much of a speed measured in one call replaces the old one: ``e / (e + BLEND)`` for e slices' worth
#: of time watched (n slices each k times the fastest worker's count as n * k), a first measurement
#: blended with 1.0 alike. One call's slices can all be slow for a passing reason (a
#: busy machine, a worker's first numpy call), and placement ships cached slices by these speeds.
BLEND = 8.0
#: Weight of a new shipping sample in the running estimate.
SHIP_WEIGHT = 0.3
#: Slowest speed recorded (a stopped worker must not become a division by zero).
MIN_SPEED = 1e-3


class LinkCost:
    """Seconds to get ``nbytes`` of slice to one worker: ``latency + nbytes / rate``."""

    __slots__ = ("latency", "rate")

    def __init__(self, latency: float, rate: float) -> None:
        self.latency = latency
        self.rate = rate

    def seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.rate

    def learn(self, nbytes: int, overhead: float) -> None:
        """A task sent to an idle worker came back ``overhead`` s later than its run time:
        with no slice bytes, that is the latency; with bytes, what is left of it is the transfer."""
        if overhead <= 0:
            return
        if nbytes < 64 << 10:
            self.latency += SHIP_WEIGHT * (overhead - self.latency)
        else:
            transfer = max(overhead - self.latency, overhead * 0.1)
            self.rate += SHIP_WEIGHT * (nbytes / transfer - self.rate)

    def __repr__(self) -> str:
        return f"LinkCost(latency={self.latency:.2g} s, rate={format_size(self.rate)}/s)"


class SpeedBook:
    """Each worker's speed and link cost, learnt call after call (``Cluster`` keeps one)."""

    def __init__(self) -> None:
        self.speeds: dict[str, float] = {}
        self.links: dict[str, LinkCost] = {}
        self.unit: float | None = None
        self.calls: dict[str, int] = {}  # worker -> calls it was measured in

    def speed(self, worker: str) -> float:
        got = self.speeds.get(worker)
        if got is not None:
            return got
        return statistics.median(self.speeds.values()) if self.speeds else 1.0

    def link(self, worker: str, guess: tuple[float, float] = (0.002, 50e6)) -> LinkCost:
        cost = self.links.get(worker)
        if cost is None:
            cost = self.links[worker] = LinkCost(*guess)
        return cost

    def learn(self, per_slice: Mapping[str, tuple[int, float]]) -> None:
        """A call's measurements: worker -> (slices, seconds per slice). A worker that finished
        nothing but held a slice for a while counts as (0, at least that long) and weighs half."""
        measured = {w: s for w, (n, s) in per_slice.items() if s > 0}
        if not measured:
            return
        fastest = min(s for w, s in measured.items() if per_slice[w][0] > 0) if any(
            per_slice[w][0] for w in measured) else min(measured.values())
        for w, seconds in measured.items():
            seen = self.calls[w] = self.calls.get(w, 0) + 1
            if seen == 1 and per_slice[w][0]:
                continue  # a new process's first call (imports, first touches of its memory): not its speed
            n = per_slice[w][0]
            new = max(fastest / seconds, MIN_SPEED)
            old = self.speeds.get(w, 1.0)
            evidence = n * seconds / fastest  # (in the fastest worker's slices: a slow slice is long to watch)
            weight = evidence / (evidence + BLEND) if n else 0.5
            self.speeds[w] = old + weight * (new - old)
        self.unit = fastest
        if not self.speeds:
            return
        top = max(self.speeds.values())
        for w in self.speeds:
            self.speeds[w] = max(self.speeds[w] / top, MIN_SPEED)

    def ship(self, worker: str, nbytes: int) -> float:
        """Seconds to get ``nbytes`` of slice to ``worker``."""
        return self.link(worker).seconds(nbytes)

    def forget(self, workers: Iterable[str]) -> None:
        """Workers that left the cluster for good."""
        for w in workers:
            self.speeds.pop(w, None)
            self.links.pop(w, None)
            self.calls.pop(w, None)
