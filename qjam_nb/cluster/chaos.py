"""Chaos for teaching: kill a worker, make it a straggler, or drop its connection, and watch a call cope.

``cluster.chaos`` is one of these. Its rules:

* Everything acts on the cluster's thread (the one calling ``map``), like the
  rest of the cluster; a widget button runs there too (the kernel's thread).
  Called while a call runs (from an observer, or another thread), an action
  is armed for that call's next slice; in a forked child, it raises.
* Now, between calls: ``kill`` sends the worker SIGKILL (locally, or with
  ``kill -KILL`` over ssh), ``drop`` closes its connection (its stdin pipe
  here, its ssh channel over ssh: the worker sees EOF and exits). Either way
  the worker is marked dead with a reason that says chaos did it, and it is
  started again before the next call, as any dead worker is.
* Armed (``after_slices=n``): a running cell blocks the kernel, so a button
  cannot act mid-call. An armed action fires from the map loop (``progress``,
  called by ``Cluster`` when a call starts and after every finished slice)
  once ``n`` slices of a call have finished; it stays armed until then, or
  until ``clear()``. The worker is then lost exactly as a dying worker is: its
  unfinished slices go to the others, and the answer stays right.
* A straggler's delay travels in each TASK (``"delay"``): the worker sleeps
  that long before running the slice, inside the slice's measured time, until
  ``slow(worker, 0)`` or ``clear()``.
* Chaos never takes the last live worker of a call: that could only fail
  the call, which teaches nothing about moving slices.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from .. import states

KILL, DROP = "kill", "drop"  # the executor's words for them (``Executor.lose``)
#: How a worker's death reads in its state's reason (and so in the widget).
REASONS = {KILL: "killed by chaos (SIGKILL)", DROP: "connection dropped by chaos"}


@dataclass(frozen=True)
class Armed:
    """A kill or drop waiting for ``after_slices`` slices of a call to finish."""

    action: str
    worker: str
    after_slices: int

    def __str__(self) -> str:
        when = ("as the next call starts" if self.after_slices == 0
                else f"once {self.after_slices} slices of the next call are done")
        return f"{self.action} {self.worker} {when}"


class Chaos:
    """Kill, slow down or disconnect a cluster's workers, now or after ``n`` slices of the next call.

    ``worker`` is a worker's name (``"local/1"``) or its index in
    ``cluster.workers``.
    """

    def __init__(self, cluster: Any) -> None:
        self._cluster_ref = weakref.ref(cluster)  # no cycle: a dropped cluster goes at once, as before
        self.armed: list[Armed] = []
        self.delays: dict[str, float] = {}  # worker name -> seconds slept before each slice
        self.log: deque[str] = deque(maxlen=20)  # what chaos did, newest last

    def __repr__(self) -> str:
        return f"<Chaos: {self.describe()}>"

    @property
    def _cluster(self) -> Any:
        cluster = self._cluster_ref()
        if cluster is None:
            raise RuntimeError("this chaos belonged to a cluster that no longer exists")
        return cluster

    # -- what the user calls ---------------------------------------------------------
    def kill(self, worker: str | int, after_slices: int | None = None) -> str:
        """SIGKILL the worker now, or once ``after_slices`` slices of the next call are done; its name."""
        return self._act(KILL, worker, after_slices)

    def drop(self, worker: str | int, after_slices: int | None = None) -> str:
        """Close the worker's connection (as if the network failed) now, or after ``after_slices`` slices."""
        return self._act(DROP, worker, after_slices)

    def slow(self, worker: str | int, seconds: float) -> str:
        """Make the worker sleep ``seconds`` before every slice (a straggler); 0 makes it normal again."""
        self._owned()
        name = self._name(worker)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"slow({name!r}, seconds): seconds must be a number >= 0 (0 ends it), not {seconds!r}")
        if seconds:
            self.delays[name] = float(seconds)
            self.log.append(f"{name} sleeps {seconds:g} s before each slice")
        elif self.delays.pop(name, None) is not None:
            self.log.append(f"{name} runs at full speed again")
        return name

    def clear(self) -> None:
        """Disarm every armed kill and drop, and end every slowdown."""
        self._owned()
        self.armed.clear()
        self.delays.clear()
        self.log.append("cleared")

    def describe(self) -> str:
        """One line on what is armed and who is slowed down."""
        parts = [f"armed: {a}" for a in self.armed]
        parts += [f"{name} sleeps {s:g} s before each slice" for name, s in self.delays.items()]
        return "; ".join(parts) or "no chaos armed"

    # -- hooks for Cluster's map loop ---------------------------------------------------
    def progress(self, call: Any) -> None:
        """Fire the armed actions whose slice count this call has reached (at its start, then per slice).

        ``call`` is the running call's ``cluster.call.CallDriver``; the delays travel in its ``CallSpec``."""
        done = call.sched.done_count
        for armed in [a for a in self.armed if done >= a.after_slices]:
            self.armed.remove(armed)
            self._fire(armed, call, done)

    # -- doing it ----------------------------------------------------------------------
    def _act(self, action: str, worker: str | int, after_slices: int | None) -> str:
        cluster = self._cluster
        cluster._check_open()
        name = self._name(worker)
        if after_slices is not None:
            if isinstance(after_slices, bool) or not isinstance(after_slices, int) or after_slices < 0:
                raise ValueError(f"{action}({name!r}, after_slices=...): give a whole number >= 0 of slices "
                                 f"(or None for now), not {after_slices!r}")
            self.armed.append(Armed(action, name, after_slices))
            return name
        handle = cluster._worker(name)
        with cluster._ownership.turn_if_free() as between_calls:
            if not between_calls or handle.state == states.BUSY:
                # Called during a call (an observer, another thread): the map loop does it at the next slice.
                self.armed.append(Armed(action, name, 0))
                return name
            if handle.state != states.IDLE:
                raise ValueError(f"cannot {action} {name}: it is {handle.state} "
                                 f"({handle.reason or 'no reason given'}); dead workers are started again "
                                 "before the next call (or cluster.restart())")
            cluster._executor.lose(name, action, REASONS[action])
        self.log.append(f"{action} {name}, between calls")
        return name

    def _fire(self, armed: Armed, call: Any, done: int) -> None:
        sched = call.sched
        handle = next((w for w in self._cluster.workers if w.name == armed.worker), None)
        if handle is None or handle.state != states.BUSY or armed.worker not in sched.alive:
            self.log.append(f"call {call.id}: did not {armed.action} {armed.worker}, which is not working in it")
            return
        if not sched.alive - {armed.worker}:
            self.log.append(f"call {call.id}: did not {armed.action} {armed.worker}, the last worker left in it")
            return
        when = f"as call {call.id} started" if done == 0 else f"after {done} slices of call {call.id}"
        reason = f"{REASONS[armed.action]}, {when}"
        self.log.append(f"{armed.action} {armed.worker}, {when}")
        # Dead now, as if its link had closed: its slices go to the others.
        call.run.lose(armed.worker, armed.action, reason)

    def _owned(self) -> None:
        """In a forked child chaos, as every use of its cluster, raises ForkedClusterError."""
        cluster = self._cluster_ref()
        if cluster is not None:
            cluster._ownership.check()

    def _name(self, worker: str | int) -> str:
        names = self._cluster.worker_names
        if isinstance(worker, int) and not isinstance(worker, bool):
            if 0 <= worker < len(names):
                return names[worker]
            raise ValueError(f"no worker {worker}: this cluster has {len(names)} (0..{len(names) - 1}: "
                             f"{', '.join(names)})")
        name = getattr(worker, "name", worker)
        if name not in names:
            raise ValueError(f"no worker named {worker!r}: the workers are {', '.join(names)} "
                             "(give a name or an index)")
        return name

