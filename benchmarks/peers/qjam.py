"""qjam_nb itself, as one of the systems: ``Cluster(hosts).map`` for each workload."""

from __future__ import annotations

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


class Qjam(System):
    kind = "qjam"
    tiny_note = "1 slice per task, 2-64 tasks in flight per worker (by the slices' run time)"
    second_note = "slices cached on the workers: only the function travels"

    def __init__(self, hosts: list[str], name: str) -> None:
        from qjam_nb import Cluster

        self.name = name
        self.cluster = Cluster(hosts, echo=False, progress=False)

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

    def close(self) -> None:
        self.cluster.shutdown()
