"""dask.distributed: a ``LocalCluster`` of processes, 1 thread each; arrays scattered to one worker each."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np

from .base import DASK, System, inc_slice, list_sum, one, plus_one, total


class Dask(System):
    name = DASK
    tiny_note = "client.map, one task per slice"

    def __init__(self, n: int = 2) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None, silence_logs=logging.ERROR)
        try:
            self.client = Client(self.cluster)
            self.client.wait_for_workers(n, timeout=120)
            self.workers = list(self.client.scheduler_info()["workers"])
        except BaseException:
            self.cluster.close()
            raise
        self.kept: list = []

    def trivial(self) -> list:
        a, b = self.client.gather(self.client.map(inc_slice, [[1], [2]], pure=False))
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        futs = [self.client.submit(plus_one, theta, pure=False, workers=[w]) for w in self.workers[:2]]
        a, b = self.client.gather(futs)
        return a + b

    def dataset(self, x: np.ndarray, h: int, keep: bool = False) -> float:
        parts = [self.client.scatter(p, workers=[w]) for p, w in zip([x[:h], x[h:]], self.workers, strict=False)]
        out = sum(self.client.gather(self.client.map(total, parts, pure=False)))
        if keep:
            self.kept = parts
        return out

    def dataset_kept(self) -> float:
        """The second call as a dask user would write it: on the futures scattered before."""
        return sum(self.client.gather(self.client.map(total, self.kept, pure=False)))

    def tiny(self, items: list[int]) -> int:
        return sum(self.client.gather(self.client.map(list_sum, [[i] for i in items], pure=False)))

    def round_trip(self) -> Any:
        return self.client.gather(self.client.map(one, range(len(self.workers)), pure=False))

    def close(self) -> None:
        self.kept = []
        with contextlib.suppress(Exception):
            self.client.close()
        self.cluster.close()
