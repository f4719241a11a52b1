"""Which workers of a call have gone silent: the liveness rule, apart from clocks and processes.

Rules of this module: it decides, it does nothing. The cluster feeds it, for
each worker with work in flight, the link's traffic counter (reads and writes
that moved bytes; reads alone for a worker that still owes answers to the last
call), whether a frame from the worker is half-read, and a way to
sample the worker's CPU; it answers with a verdict. Killing, losing and
reporting stay with the caller. The clock is injected, for tests.

The rule. A worker with work in flight is heard from all the time: its
results, a STARTED for each slice that runs 3 ms, and an ALIVE from its
watcher thread every ``beat`` seconds while a slice runs. One that has been
silent for ``MISSES`` beats is suspect, but a watcher cannot beat while a
builtin holds the GIL (``sorted`` of a big list), so its CPU time decides:
sampled from the first beat of silence on, a worker whose CPU time grows, or
that is runnable (state R: on a loaded host it may wait for a core), is
busy (its silence starts again), one whose CPU time stands still for the
rest of the bound is unresponsive (stopped, swapped out, stuck on a dead
mount, or deadlocked). Where CPU time cannot be read (no ``/proc`` on the
host), only twice the bound of silence condemns. A frame from the worker that
stops arriving mid-way for the bound ends the link whatever the CPU says: a
worker writes a frame whole, and the master is reading. Silence is what
the master did not hear while it listened: bytes that wait unread (the
master was busy in a long reduce) are not silence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

#: Beats a worker with work in flight may miss before its CPU time is what stands between it and a kill.
MISSES = 3


@dataclass
class _Silence:
    traffic: int  # the link's counter when it last moved
    since: float  # when it last moved (or the worker's CPU time last grew)
    ticks: int | None = None  # its CPU time at the last sample in this silence


class Liveness:
    """The silence of each worker of one call, and the verdicts on it."""

    def __init__(self, beat: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.beat = beat
        self.bound = MISSES * beat
        self.clock = clock
        self.next_check = 0.0
        self._silences: dict[str, _Silence] = {}

    def start(self, owing: Collection[str] = ()) -> None:
        """A call begins: silences are counted afresh, each from the first look at it, half a beat in: a
        call that ends sooner costs nothing more. Except for the workers in ``owing``, which ended the
        last call with work in flight (a copy that lost the race, on a worker that may be stopped): their
        silence goes on, so a worker that never answers is found out even if every call heals around it."""
        self._silences = {name: s for name, s in self._silences.items() if name in owing}
        # (One that owes answers is looked at once at once: calls too short for a look would hide it.)
        self.next_check = self.clock() + (0.0 if owing else self.beat / 2)

    def due(self) -> bool:
        """Time for another look (twice a beat)?"""
        now = self.clock()
        if now < self.next_check:
            return False
        self.next_check = now + self.beat / 2
        return True

    def verdict(self, name: str, traffic: int, partial: bool, cpu: Callable[[], Any],
                waiting: Callable[[], bool] = lambda: False) -> str | None:
        """None while worker ``name`` is heard from, or busy; else why it is to be killed.

        ``waiting()`` says whether bytes from it wait unread (the master itself was
        busy: a long reduce, say): that is not silence. ``cpu()`` gives an object
        with ``state`` and ``ticks`` (or None when it cannot be read). Both are
        called only once the worker has been silent for a beat.
        """
        now = self.clock()
        silence = self._silences.get(name)
        if silence is None or traffic != silence.traffic:
            self._silences[name] = _Silence(traffic, now)
            return None
        quiet = now - silence.since
        if quiet < self.beat:
            return None
        if waiting():
            silence.since, silence.ticks = now, None
            return None
        if partial and now - silence.since >= self.bound:
            return (f"a frame from it stopped arriving mid-way: nothing more for {quiet:.1f} s "
                    f"(the liveness bound is {self.bound:g} s)")
        sample = cpu()
        if sample is None:
            if quiet >= 2 * self.bound:
                return (f"silent for {quiet:.1f} s with work to do, and its CPU time could not be read "
                        f"(heartbeat every {self.beat:g} s)")
            return None
        if sample.state == "R" or (silence.ticks is not None and sample.ticks != silence.ticks):
            # Busy in something that holds the GIL, or runnable and waiting for a core on a loaded host.
            silence.since, silence.ticks = now, sample.ticks
            return None
        silence.ticks = sample.ticks
        if quiet >= self.bound:
            state = {"T": "stopped", "t": "stopped by a debugger", "D": "in uninterruptible sleep"}.get(
                sample.state, f"process state {sample.state}")
            return (f"unresponsive: silent for {quiet:.1f} s with work to do and using no CPU ({state}; "
                    f"heartbeat every {self.beat:g} s)")
        return None

    def forget(self, name: str) -> None:
        self._silences.pop(name, None)
