"""Which slice runs where: pure bookkeeping, no I/O, tested on its own.

Rules, in order:

1. A slice cached on a live worker runs there (its first live holder), so a
   second call over the same data ships no slice bytes.
2. Slices cached nowhere go to whichever worker has the fewest tasks in
   flight, lowest index first, so first calls spread evenly.
3. A worker has at most ``window`` tasks in flight: enough to hide the round
   trip, few enough that late slices still go to whoever is free. The window
   follows the slices' run time (``observe``): about 20 ms of queued work per
   worker, between 2 and 64 tasks, so tiny slices stream and long ones are
   handed out one or two at a time.
4. A lost worker's unfinished slices go back to the pool (rule 1 or 2 again).

Cached slices are not stolen by idle workers: shipping a slice again usually
costs more than waiting for its holder.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection, Mapping, Sequence

MIN_WINDOW, MAX_WINDOW = 2, 64
QUEUED_WORK = 0.02


class Scheduler:
    def __init__(
        self,
        workers: Sequence[str],
        keys: Sequence[bytes | None],
        holders: Mapping[bytes, Collection[str]],
        window: int = 4,
        pinned: bool = False,
    ) -> None:
        """``holders`` maps a slice key to the workers that cache it.

        ``pinned`` is for calls without a dataset: task ``i`` belongs to
        worker ``i`` (every worker runs once), until that worker is lost.
        """
        self.order = {w: i for i, w in enumerate(workers)}
        self.alive = set(workers)
        self.keys = list(keys)
        self.holders = holders
        self.window = window
        self.average: float | None = None
        self.own: dict[str, deque] = {w: deque() for w in workers}
        self.pool: list[int] = []
        self.in_flight: dict[str, set[int]] = {w: set() for w in workers}
        self.done_count = 0
        for index in range(len(self.keys)):
            if pinned:
                self.own[workers[index]].append(index)
            else:
                self._place(index)

    def _place(self, index: int) -> None:
        key = self.keys[index]
        best = None
        if key is not None:
            for w in self.holders.get(key, ()):  # (a loop, not a list and min(): once a slice)
                if w in self.alive and (best is None or self.order[w] < self.order[best]):
                    best = w
        if best is not None:
            self.own[best].append(index)
        else:
            heapq.heappush(self.pool, index)

    def observe(self, seconds: float) -> None:
        """A slice took ``seconds`` to run: keep about ``QUEUED_WORK`` seconds in flight per worker."""
        average = self.average = seconds if self.average is None else 0.8 * self.average + 0.2 * seconds
        # (Comparisons, not max/min/round: this runs once a slice.)
        window = int(QUEUED_WORK / average + 0.5) if average > QUEUED_WORK / MAX_WINDOW else MAX_WINDOW
        self.window = window if window > MIN_WINDOW else MIN_WINDOW

    def assign(self) -> list[tuple[str, int]]:
        """Hand out as many (worker, slice) pairs as the windows allow."""
        out: list[tuple[str, int]] = []
        own, pool, in_flight, order, window = self.own, self.pool, self.in_flight, self.order, self.window
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
                return out
            queue = own[best]
            index = queue.popleft() if queue else heapq.heappop(pool)
            in_flight[best].add(index)
            out.append((best, index))

    def done(self, worker: str, index: int) -> bool:
        """Record a finished slice; False if it was not in flight there (a stale result)."""
        if index not in self.in_flight.get(worker, ()):
            return False
        self.in_flight[worker].discard(index)
        self.done_count += 1
        return True

    def rekey(self, index: int, key: str | None, worker_running_it: str | None = None) -> None:
        """Slice ``index`` is really ``key`` (a guessed key was wrong): place it again.

        Not yet handed out: it leaves the queue its old key put it in. In flight
        on ``worker_running_it`` (whose result will be of the old content): it
        is taken back, to be handed out again.
        """
        self.keys[index] = key
        if worker_running_it is not None:
            self.in_flight[worker_running_it].discard(index)
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
        self._place(index)

    def lost(self, worker: str) -> list[int]:
        """Forget a dead worker; its unfinished slices go back to be placed again."""
        if worker not in self.alive:
            return []
        self.alive.discard(worker)
        back = sorted(self.in_flight.pop(worker, set()) | set(self.own.pop(worker, ())))
        for index in back:
            self._place(index)
        return back
