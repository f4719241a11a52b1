"""Which slice runs where: pure bookkeeping, no I/O and no clock (``now`` is handed in), tested on its own.

Rules, in order:

1. **Placement.** A slice cached on live workers runs on one of them: the one
   furthest below its share of the call, shares being in proportion to the
   workers' measured speeds (``costs``, a ``speeds.SpeedBook``). A holder
   over its share (a restarted or added worker took none, or speeds changed)
   gives the slices beyond it to the workers furthest below theirs, each if
   shipping it costs ``MARGIN`` times less than running it on the holder;
   they are then cached there too ("rebalanced"). In a call with at least
   as many slices as workers, every worker's share is at least one slice: a
   slow worker stays measured.
2. Slices cached nowhere go to whichever worker has the fewest tasks in
   flight, lowest index first, so first calls spread by speed as they go.
3. A worker has at most ``window`` tasks in flight: enough to hide the round
   trip, few enough that late slices still go to whoever is free. The window
   follows the slices' run time (``observe``): about 20 ms of queued work per
   worker, between 2 and 64 tasks.
4. **Stealing.** A worker with room in its window and nothing left to do
   takes the last queued slice of the worker that would finish its queue
   last, if it would finish that slice ``MARGIN`` times sooner itself,
   shipping counted (nothing if it caches the slice too); it caches it from
   then on. A slice that must be shipped is taken only by a worker with
   nothing in flight, one at a time, and only from a straggler (as in rule
   5): between equal workers, placement
   evens the queues out at the next call, and nothing ships over noise.
5. **Speculation.** In a call's tail (nothing queued, at most ``TAIL``
   slices a worker unfinished), a worker with nothing in flight runs
   a copy of a slice in flight on a *straggler*: a worker ``SLOWER`` times
   slower than itself by the median of their slices (``_typical``) and
   ``MEASURABLE`` s a slice slower, or late (its running slice has run
   ``OVERDUE`` times its expected time and ``LATE`` s, while others
   finished slices), if the copy would finish sooner by ``MARGIN``. One copy
   per slice; the first result wins and the other copy is dropped
   (``dropped``): the fold still takes each slice once.
6. A lost worker's unfinished slices are placed again (rule 1 or 2), unless a
   copy of one still runs elsewhere.

A shipped steal or a copy must also save ``MIN_GAIN`` seconds: less is noise
on a shared machine, and not worth a slice's bytes.

Nothing is shipped on a guess: without measured costs (no ``costs``, or no
slice timed yet in this call or the last) rules 1, 4 and 5 move only slices
the taker already caches. Pinned calls (no dataset) have none of rules 1, 4, 5.
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Protocol

MIN_WINDOW, MAX_WINDOW = 2, 64
QUEUED_WORK = 0.02
#: A worker this many times slower than an idle one has its slices shipped away (rule 4) or copied (rule 5).
SLOWER = 2.0
#: A slice running this many times longer than its worker's expected time is late (rule 5).
OVERDUE = 2.0
#: Seconds a slice must have run, at least, to be late (rules 4, 5): a busy machine stalls a process that long.
LATE = 0.5
#: Copies are made only in a call's tail: nothing queued, at most this many slices a worker left in flight.
TAIL = 2
#: A stolen slice or a copy must finish this many times sooner than where it is (rules 4, 5): moving
#: it must pay clearly, so that a uniform cluster does not shuffle slices over noise.
MARGIN = 1.25
#: What a worker's expected slice time (from past calls) weighs, in slices, against its slices in this call.
PRIOR = 4
#: Seconds a shipped steal or a copy must save at least (rules 4, 5): less is the machine's noise.
MIN_GAIN = 0.02
#: Seconds a slice: below it, what workers take differs by the machine's noise, not by their speeds
#: (a straggler is slower by this much a slice at least; calls of shorter slices teach the speed book nothing).
MEASURABLE = 0.001
_NOTHING_RAN = (0, 0.0, ())
#: How a slice came to a worker other than by rules 1-2 (``moves``).
STOLEN, SPECULATIVE, REBALANCED = "stolen", "speculative", "rebalanced"


class Costs(Protocol):
    """What the scheduler is told of the workers (``speeds.SpeedBook``)."""

    unit: float | None  # seconds a slice took at speed 1.0 in the last call

    def speed(self, worker: str) -> float: ...

    def ship(self, worker: str, nbytes: int) -> float: ...


class Scheduler:
    def __init__(
        self,
        workers: Sequence[str],
        keys: Sequence[bytes | None],
        holders: Mapping[bytes, Collection[str]],
        window: int = 4,
        pinned: bool = False,
        costs: Costs | None = None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        """``holders`` maps a slice key to the workers that cache it; ``sizes`` are the slices' bytes.

        ``pinned`` is for calls without a dataset: task ``i`` belongs to
        worker ``i`` (every worker runs once), until that worker is lost.
        """
        self.order = {w: i for i, w in enumerate(workers)}
        self.alive = set(workers)
        self.keys = list(keys)
        self.holders = holders
        self.window = window
        self.costs = costs
        self.sizes = sizes
        self.healing = not pinned and len(workers) > 1
        self.average: float | None = None
        self.own: dict[str, deque] = {w: deque() for w in workers}
        self.pool: list[int] = []
        self.in_flight: dict[str, dict[int, float]] = {w: {} for w in workers}  # slice -> when handed out
        self.done_count = 0
        self.finished = bytearray(len(self.keys))
        self.copies: dict[int, list[str]] = {}  # slice -> the workers running it, when more than one
        self.moves: list[tuple[str, int, str, str]] = []  # (worker, slice, how, from whom): for the caller to drain
        self.dropped: list[tuple[str, int]] = []  # (worker, slice): copies that lost, for the caller to drain
        self.rebalanced: dict[int, str] = {}  # slice -> the holder it was moved from, until handed out
        self.ran: dict[str, list] = {}  # worker -> [slices finished there, their seconds, each one's seconds]
        self.medians: dict[str, tuple[int, float]] = {}  # worker -> (slices, their median seconds) when last taken
        self.longest = 0.0  # the longest a slice of this call took
        self.began: float | None = None  # when the first tasks were handed out
        self.last_done: dict[str, float] = {}  # worker -> when its last slice finished
        self.lagging: dict[str, float] = {}  # worker -> longest it ran a slice whose copy won elsewhere
        self.pace: dict[str, float] = {}  # worker -> seconds between its results, receiving included
        self.started_at: dict[str, tuple[int, float]] = {}  # worker -> (slice, when it said STARTED)
        self.probes: dict[str, tuple[int, int]] = {}  # worker -> (slice handed out while it was idle, bytes to ship)
        self.link_samples: list[tuple[str, int, float]] = []  # (worker, bytes shipped, seconds beyond run time)
        self._first_pass = True
        if pinned:
            for index in range(len(self.keys)):
                self.own[workers[index]].append(index)
        else:
            self._place_all(workers)

    # -- placement ---------------------------------------------------------------------------
    def _place_all(self, workers: Sequence[str]) -> None:
        """Rule 1 for a call's cached slices (shares by speed), rule 2's pool for the rest."""
        costs = self.costs
        n = len(self.keys)
        speeds = [costs.speed(w) for w in workers] if costs is not None else [1.0] * len(workers)
        total = sum(speeds)
        least = 1.0 if n >= len(workers) else 0.0
        share = {}
        for w, s in zip(workers, speeds, strict=True):
            s = n * s / total
            share[w] = s if s > least else least
        count = dict.fromkeys(workers, 0)
        order = self.order
        over: list[tuple[int, str]] = []
        for index, key in enumerate(self.keys):
            best = None
            if key is not None:
                for w in self.holders.get(key, ()):  # (a loop, not max(): once a slice)
                    if w in count and (best is None or (share[w] - count[w], -order[w])
                                       > (share[best] - count[best], -order[best])):
                        best = w
            if best is None:
                self.pool.append(index)  # (in index order: already a heap)
            elif count[best] + 1 <= share[best] + 0.5:
                self.own[best].append(index)
                count[best] += 1
            else:
                over.append((index, best))
        if not over:
            return
        for index, holder in over:
            taker = max(workers, key=lambda w: (share[w] - count[w], -order[w]))
            if taker != holder and count[taker] + 1 <= share[taker] + 0.5 and self._moving_pays(taker, holder, index):
                self.own[taker].append(index)
                self.rebalanced[index] = holder
                count[taker] += 1
            else:
                self.own[holder].append(index)
                count[holder] += 1
        for w, queue in self.own.items():
            self.own[w] = deque(sorted(queue))

    def _moving_pays(self, taker: str, holder: str, index: int) -> bool:
        """Shipping slice ``index`` to ``taker`` costs less than running it on ``holder``."""
        run = self._expected(holder, self._unit())
        return run is not None and self._ship(taker, index) * MARGIN < run

    def _place(self, index: int) -> None:
        """A slice to place again (its worker was lost, or its key was wrong): on the least busy live
        holder, or in the pool."""
        key = self.keys[index]
        best = None
        if key is not None:
            for w in self.holders.get(key, ()):
                if w in self.alive and (best is None or self._load(w) < self._load(best)):
                    best = w
        if best is not None:
            queue = self.own[best]
            queue.append(index)
            if len(queue) > 1 and queue[-2] > index:
                self.own[best] = deque(sorted(queue))
        else:
            heapq.heappush(self.pool, index)

    def _load(self, w: str) -> tuple[int, int]:
        return len(self.own[w]) + len(self.in_flight[w]), self.order[w]

    # -- handing out -------------------------------------------------------------------------
    def observe(self, seconds: float) -> None:
        """A slice took ``seconds`` to run: keep about ``QUEUED_WORK`` seconds in flight per worker."""
        average = self.average = seconds if self.average is None else 0.8 * self.average + 0.2 * seconds
        # (Comparisons, not max/min/round: this runs once a slice.)
        window = int(QUEUED_WORK / average + 0.5) if average > QUEUED_WORK / MAX_WINDOW else MAX_WINDOW
        self.window = window if window > MIN_WINDOW else MIN_WINDOW

    def assign(self, now: float = 0.0) -> list[tuple[str, int]]:
        """Hand out as many (worker, slice) pairs as the windows allow; steals and copies are also
        noted in ``moves``."""
        out: list[tuple[str, int]] = []
        own, pool, in_flight, order, window = self.own, self.pool, self.in_flight, self.order, self.window
        if self.began is None:
            self.began = now
        while True:
            # The ready worker with the fewest tasks in flight, first in order on a tie (a loop, not
            # min() over a list: this runs once a slice).
            best, best_rank = None, None
            for w in self.alive:
                n = len(in_flight[w])
                if n < window and (own[w] or pool):
                    rank = (n, order[w])
                    if best_rank is None or rank < best_rank:
                        best, best_rank = w, rank
            if best is None:
                if self.healing and not pool and self._something_to_gain(now) and self._take(now, out):
                    continue
                self._first_pass = False
                return out
            queue = own[best]
            index = queue.popleft() if queue else heapq.heappop(pool)
            flight = in_flight[best]
            if not flight and not self._first_pass:
                self._probe(best, index)
            flight[index] = now
            out.append((best, index))
            if self.rebalanced and index in self.rebalanced:
                self.moves.append((best, index, REBALANCED, self.rebalanced.pop(index)))

    def _something_to_gain(self, now: float) -> bool:
        """A steal or a copy might pay: a slice could be late by now, or what is left to run is long
        enough to save ``MIN_GAIN`` (a quick look, so that small calls pay nothing)."""
        return (now - self.began >= LATE
                or (len(self.keys) - self.done_count) * self.longest * SLOWER >= MIN_GAIN)

    def _probe(self, worker: str, index: int) -> None:
        """``worker`` was idle when handed ``index``: its result will time the link (``link_samples``).
        (Not in a call's first pass, whose tasks also wait for the CALL to be read.)"""
        if self.costs is not None:
            held = self._holds(worker, index) or self.keys[index] is None
            self.probes[worker] = (index, 0 if held or self.sizes is None else self.sizes[index])

    def _take(self, now: float, out: list) -> bool:
        """Rules 4 and 5: a steal for the least busy worker that can, else a copy for the fastest idle
        one. True if a slice was taken."""
        in_flight, own, window = self.in_flight, self.own, self.window
        takers = sorted((len(in_flight[w]), self.order[w], w) for w in self.alive
                        if not own[w] and len(in_flight[w]) < window)
        if not takers:
            return False
        unit = self._unit()
        got = None
        if any(own[v] for v in self.alive):
            for _, _, w in takers:
                got = self._steal(w, now, unit)
                if got is not None:
                    break
            if got is None:
                return False
        else:  # the call's tail: only slices in flight are left
            idle = [w for n, _, w in takers if not n]
            if not idle or len(self.keys) - self.done_count > TAIL * len(self.alive):
                return False
            w = min(idle, key=lambda v: (self._expected(v, unit) or 0.0, self.order[v]))
            got = self._speculate(w, now, unit)
            if got is None:
                return False
        index, how, victim = got
        if not in_flight[w]:
            self._probe(w, index)
        in_flight[w][index] = now
        out.append((w, index))
        self.moves.append((w, index, how, victim))
        return True

    def _steal(self, w: str, now: float, unit: float | None) -> tuple[int, str, str] | None:
        e_w = self._pace(w, unit)
        idle = not self.in_flight[w]
        best = None
        for v in self.alive:
            queue = self.own[v]
            if v == w or not queue:
                continue
            tail = queue[-1]
            held = self._holds(w, tail)
            if not (held or idle):
                continue  # a slice to ship goes to a worker that has run out of work, one at a time
            ahead = len(self.in_flight[v]) + len(queue)
            e_v = self._pace(v, unit)
            if e_v is None or e_w is None:  # nothing timed yet: only a slice w caches, by count of tasks
                if not held:
                    continue
                finish_v, finish_w = float(ahead), len(self.in_flight[w]) + 1.0
            else:
                late, head_left = self._lateness(v, now, e_v)
                if not held and not late and not self._slower(v, w, unit):
                    continue  # equal workers' queues even out by placement, next call: no shipping over noise
                finish_v = head_left + (ahead - 1) * e_v
                finish_w = ((len(self.in_flight[w]) + 1) * e_w + self._ship(w, tail)) * MARGIN
            if finish_w < finish_v and (held or finish_v - finish_w > MIN_GAIN) and (
                    best is None or finish_v > best[0]):
                best = (finish_v, v)
        if best is None:
            return None
        victim = best[1]
        return self.own[victim].pop(), STOLEN, victim

    def _speculate(self, w: str, now: float, unit: float | None) -> tuple[int, str, str] | None:
        e_w = self._pace(w, unit)
        if e_w is None:
            return None
        best = None
        for v in self.alive:
            flight = self.in_flight[v]
            if v == w or not flight:
                continue
            if v not in self.ran and (self.costs is None or self.costs.unit is None):
                continue  # a fresh worker's first slice (importing numpy, say) is late only against a past call
            e_v = self._pace(v, unit)
            if e_v is None:
                continue
            late, head_left = self._lateness(v, now, e_v)
            if not late and not self._slower(v, w, unit):
                continue
            for position, index in enumerate(flight):
                if index in self.copies:
                    continue
                finish_v = head_left + position * e_v
                copy = e_w + self._ship(w, index)
                if copy * MARGIN < finish_v and finish_v - copy > MIN_GAIN and (
                        best is None or finish_v - copy > best[0]):
                    best = (finish_v - copy, v, index)
        if best is None:
            return None
        _, victim, index = best
        self.copies[index] = [victim, w]
        return index, SPECULATIVE, victim

    def _lateness(self, v: str, now: float, e_v: float) -> tuple[bool, float]:
        """Is ``v``'s oldest task in flight late (``OVERDUE`` times its expected time, a round trip
        included, and ``LATE`` seconds at least, while others finished slices), and how long until it
        ends: as long again as it has run, if late."""
        flight = self.in_flight[v]
        if not flight:
            return False, 0.0
        start = self._head_start(v, flight)
        elapsed = now - start
        if elapsed > LATE and elapsed > OVERDUE * (e_v + self._ship(v, -1)):
            # Others finished slices since it began: not the whole machine (or this process) standing still.
            if any(t > start for o, t in self.last_done.items() if o != v and o in self.alive):
                return True, elapsed
        return False, max(e_v - elapsed, 0.0)

    def _head_start(self, v: str, flight: dict[int, float]) -> float:
        """When ``v``'s oldest task in flight started: it said so, or it began once the one before
        ended (or once it was handed out, if later)."""
        head = next(iter(flight))
        said = self.started_at.get(v)
        if said is not None and said[0] == head:
            return said[1]
        return max(flight[head], self.last_done.get(v, 0.0))

    def next_check(self, now: float) -> float | None:
        """When to look again for a slice to steal or copy (rules 4, 5), if no result comes first:
        while a worker is idle and another has slices in flight (they may turn late)."""
        if not self.healing or self.pool:
            return None
        if self.began is None:
            return None
        if not self._something_to_gain(now):  # until a slice could be late
            return self.began + LATE
        idle = [w for w in self.alive if not self.in_flight[w] and not self.own[w]]
        if not idle or len(idle) == len(self.alive):
            return None
        e = self._expected(idle[0], self._unit())
        return now + (0.005 if e is None else max(0.005, min(e, LATE) / 4))

    # -- what came back ----------------------------------------------------------------------
    def started(self, worker: str, index: int, now: float) -> None:
        """``worker`` said it began slice ``index``."""
        self.started_at[worker] = (index, now)

    def done(self, worker: str, index: int, now: float = 0.0, seconds: float = 0.0) -> bool:
        """Record a finished slice; False if it was not in flight there (a stale result, or a dropped copy)."""
        flight = self.in_flight.get(worker)
        if flight is None or index not in flight:
            return False
        handed = flight.pop(index)
        self.finished[index] = 1
        self.done_count += 1
        ran = self.ran.get(worker)
        if ran is None:
            self.ran[worker] = [1, seconds, [seconds]]
        else:
            ran[0] += 1
            ran[1] += seconds
            ran[2].append(seconds)
        if seconds > self.longest:
            self.longest = seconds
        last = self.last_done.get(worker)
        if last is not None and handed < last:  # it waited there: results back to back give the pace
            pace = self.pace.get(worker)
            self.pace[worker] = now - last if pace is None else 0.5 * (pace + now - last)
        self.last_done[worker] = now
        if self.copies:
            others = self.copies.pop(index, None)
            for other in others or ():
                running = self.in_flight.get(other)
                if other != worker and running is not None and index in running:
                    if index == next(iter(running)):  # it was running there all this time: a sign of its speed
                        held = now - self._head_start(other, running)
                        if held > self.lagging.get(other, 0.0):
                            self.lagging[other] = held
                    del running[index]
                    self.dropped.append((other, index))
        if self.probes:
            probe = self.probes.get(worker)
            if probe is not None and probe[0] == index:
                del self.probes[worker]
                self.link_samples.append((worker, probe[1], now - handed - seconds))
        return True

    def rekey(self, index: int, key: bytes | None, running: str | Iterable[str] | None = None) -> None:
        """Slice ``index`` is really ``key`` (a guessed key was wrong): place it again.

        Not yet handed out: it leaves the queue its old key put it in. In flight
        (on ``running``: a worker, or several with copies; their results will be
        of the old content): it is taken back, to be handed out again.
        """
        self.keys[index] = key
        running = [running] if isinstance(running, str) else list(running or ())
        if running:
            for w in running:
                self.in_flight[w].pop(index, None)
            self.copies.pop(index, None)
        else:
            for queue in self.own.values():
                if index in queue:
                    queue.remove(index)
                    break
            else:
                if index in self.pool:
                    self.pool.remove(index)
                    heapq.heapify(self.pool)
                else:
                    return  # already done, or not in this scheduler
        self.rebalanced.pop(index, None)
        self._place(index)

    def lost(self, worker: str) -> list[int]:
        """Forget a dead worker; its unfinished slices go back to be placed again (those with no copy
        running elsewhere)."""
        if worker not in self.alive:
            return []
        self.alive.discard(worker)
        self.probes.pop(worker, None)
        back = []
        for index in sorted(set(self.in_flight.pop(worker, {})) | set(self.own.pop(worker, ()))):
            others = self.copies.get(index)
            if others is not None:
                if worker in others:
                    others.remove(worker)
                if len(others) < 2:
                    del self.copies[index]
                if any(index in self.in_flight.get(o, ()) for o in others):
                    continue
            back.append(index)
            self._place(index)
        return back

    # -- estimates ---------------------------------------------------------------------------
    def _unit(self) -> float | None:
        """Seconds a slice takes at speed 1: this call's, once slices finished; else the last call's."""
        costs = self.costs
        units = [t / k * (costs.speed(v) if costs is not None else 1.0) for v, (k, t, _) in self.ran.items() if k]
        if units:
            return sum(units) / len(units)
        return costs.unit if costs is not None else None

    def _expected(self, w: str, unit: float | None) -> float | None:
        """Seconds a slice should take on ``w``: ``unit`` over its speed, moved towards its own slices
        in this call as they finish (``PRIOR``: one slow slice on a busy machine is not a straggler);
        None if nothing is timed."""
        n, total, _ = self.ran.get(w, _NOTHING_RAN)
        prior = None if unit is None else unit / self.costs.speed(w) if self.costs is not None else unit
        if not n:
            return prior
        if prior is None:
            return total / n
        return (total + PRIOR * prior) / (n + PRIOR)

    def _typical(self, w: str, unit: float | None) -> float | None:
        """Like ``_expected``, but by the median of ``w``'s slices in this call: a few slices stretched
        by the machine (a process descheduled mid-slice, a collection) move a mean of short slices
        several times over, and would make a straggler of an equal worker."""
        ran = self.ran.get(w)
        prior = None if unit is None else unit / self.costs.speed(w) if self.costs is not None else unit
        if ran is None:
            return prior
        n, samples = ran[0], ran[2]
        taken = self.medians.get(w)
        if taken is None or (taken[0] != n and (n < 64 or n > taken[0] * 1.25)):  # (a median of many, now and then)
            taken = self.medians[w] = (n, statistics.median(samples))
        if prior is None:
            return taken[1]
        return (taken[1] * n + PRIOR * prior) / (n + PRIOR)

    def _pace(self, w: str, unit: float | None) -> float | None:
        """Seconds between ``w``'s results while it has work: its slices' run time, or more where
        receiving them takes time too (a first call's slices, shipped as they go)."""
        n, total, _ = self.ran.get(w, _NOTHING_RAN)
        expected = total / n if n else self._expected(w, unit)  # (its own slices, unblended: how long it takes)
        pace = self.pace.get(w)
        return expected if pace is None or (expected is not None and expected > pace) else pace

    def _slower(self, v: str, w: str, unit: float | None) -> bool:
        """``v`` is ``SLOWER`` times slower than ``w``, by their typical times (``_typical``, where a
        few slow slices do not make a straggler), and ``MEASURABLE`` seconds a slice slower: between
        slices of microseconds, a ratio measures the machine (its caches, clock, scheduling), and
        only a stall (``_lateness``) tells a straggler."""
        e_v, e_w = self._typical(v, unit), self._typical(w, unit)
        return e_v is not None and e_w is not None and e_v >= SLOWER * e_w and e_v - e_w >= MEASURABLE

    def _holds(self, w: str, index: int) -> bool:
        key = self.keys[index]
        return key is not None and w in self.holders.get(key, ())

    def _ship(self, w: str, index: int) -> float:
        """Seconds to get slice ``index``'s task to ``w``, with the slice unless ``w`` caches it
        (``index`` -1: a task alone); unknown (infinite) if it must ship without costs known."""
        held = index < 0 or self._holds(w, index)
        if self.costs is None:
            return 0.0 if held else float("inf")
        if held or self.sizes is None:
            return self.costs.ship(w, 0) if held else float("inf")
        return self.costs.ship(w, self.sizes[index])

    def measured(self, now: float) -> dict[str, tuple[int, float]]:
        """What this call says of each worker's speed: (slices finished, seconds per slice: their
        median, which a hiccup of the machine does not move). A slice that has run longer than that
        counts too: still in flight at the end, or run until a copy elsewhere won."""
        out = {}
        for w in self.ran.keys() | self.in_flight.keys():
            samples = self.ran[w][2] if w in self.ran else ()
            n = len(samples)
            flight = self.in_flight.get(w)
            held = now - self._head_start(w, flight) if flight and w in self.alive else 0.0
            held = max(held, self.lagging.get(w, 0.0))
            typical = statistics.median(samples) if n else 0.0
            if n and held <= typical:
                out[w] = (n, typical)
            elif n:
                out[w] = (n, (typical * n + held) / (n + 1))
            elif held > 0:
                out[w] = (0, held)
        return out
