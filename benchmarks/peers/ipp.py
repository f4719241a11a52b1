"""ipyparallel: a ``Cluster(n=2)`` of engines, one ``apply_async`` per engine (a load-balanced map for tiny slices)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .base import IPP, System, inc_slice, list_sum, one, plus_one, total


class IPyParallel(System):
    name = IPP
    tiny_note = "load-balanced view map, chunksize 1"

    def __init__(self, n: int = 2) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=n, controller_ip="127.0.0.1", log_level=logging.ERROR)
        self.rc = None
        try:
            self.rc = self.cluster.start_and_connect_sync()
            self.rc.wait_for_engines(n, timeout=120)
            self.dview = self.rc[:]
            self.dview.use_cloudpickle()
            self.engines = [self.rc[i] for i in self.rc.ids[:n]]
            self.lview = self.rc.load_balanced_view()
        except BaseException:
            self.close()
            raise

    def _each(self, fn: Callable, args: list) -> list:
        pending = [e.apply_async(fn, a) for e, a in zip(self.engines, args, strict=True)]
        return [p.get() for p in pending]

    def trivial(self) -> list:
        a, b = self._each(inc_slice, [[1], [2]])
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        a, b = self._each(plus_one, [theta, theta])
        return a + b

    def dataset(self, x: np.ndarray, h: int) -> float:
        return sum(self._each(total, [x[:h], x[h:]]))

    def tiny(self, items: list[int]) -> int:
        return sum(self.lview.map_sync(list_sum, [[i] for i in items]))

    def round_trip(self) -> Any:
        return self.dview.apply_sync(one)

    def close(self) -> None:
        if self.rc is not None:
            with contextlib.suppress(Exception):
                self.rc.close()
        self.cluster.stop_cluster_sync()
