"""qjam_nb itself, as one of the systems: ``Cluster(hosts).map`` for each workload."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from .base import System

# qjam_nb's mapfuncs: lambdas travel by value even if this file is imported as a module.
Q_INC = lambda p, xs: [x + 1 for x in xs]  # noqa: E731
Q_CONCAT = lambda a, b: a + b  # noqa: E731  (list concatenation: the result is [2, 3], as the peers return)
Q_PLUS1 = lambda theta, xs: theta + 1.0  # noqa: E731
Q_SUM = lambda p, xs: float(xs.sum())  # noqa: E731
Q_FIRST = lambda p, xs: xs[0]  # noqa: E731
Q_ONE = lambda p, xs: 1  # noqa: E731
Q_THETA_PLUS = lambda theta, xs: theta + float(xs.sum())  # noqa: E731  (the dask rows' params call)
Q_SLEEP_SUM = lambda seconds, xs: (time.sleep(seconds), float(xs.sum()))[1]  # noqa: E731  (the heal rows)


class Qjam(System):
    kind = "qjam"
    tiny_note = "1 slice per task, 2-64 tasks in flight per worker (by the slices' run time)"
    second_note = "slices cached on the workers: only the function travels"

    def __init__(self, hosts: list[str], name: str) -> None:
        from qjam_nb import Cluster

        self.name = name
        self.cluster = Cluster(hosts, echo=False, progress=False)
        self.hetero_data: tuple[Any, int] | None = None
        self.moves: Counter = Counter()

    def trivial(self) -> list:
        return self.cluster.map(Q_INC, None, [1, 2], Q_CONCAT, slice_size=1)

    def params(self, theta: np.ndarray) -> np.ndarray:
        return self.cluster.map(Q_PLUS1, theta)

    def dataset(self, x: np.ndarray, h: int) -> float:
        return self.cluster.map(Q_SUM, None, x, slice_size=h)

    def tiny(self, items: list[int]) -> int:
        return self.cluster.map(Q_FIRST, None, items, slice_size=1)

    def round_trip(self) -> Any:
        return self.cluster.map(Q_ONE, None)

    def hetero_load(self, x: np.ndarray, rows: int) -> None:
        self.hetero_data = (x, rows)  # shipped and cached by the next call

    def hetero_slow(self, factor: float, seconds: float) -> str:
        """``chaos.slow``: the last worker sleeps ``(factor - 1) * seconds`` before each slice, in its time."""
        return self.cluster.chaos.slow(self.cluster.worker_names[-1], (factor - 1) * seconds)

    def hetero(self, seconds: float) -> tuple[float, dict[str, int], dict[str, int]]:
        from qjam_nb import events

        x, rows = self.hetero_data
        self.moves.clear()

        def count(event: Any) -> None:
            if type(event) is events.SliceTaken:
                self.moves[event.how] += 1

        unsubscribe = self.cluster.events.subscribe(count)
        try:
            value = self.cluster.map(Q_SLEEP_SUM, seconds, x, slice_size=rows)
        finally:
            unsubscribe()
        done = Counter(r.worker for r in self.cluster.last_call.done_slices())
        return value, dict(done), dict(self.moves)

    def hetero_unload(self) -> None:
        self.hetero_data = None

    def close(self) -> None:
        self.cluster.shutdown()
