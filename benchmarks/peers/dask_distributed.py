"""dask.distributed: a ``LocalCluster`` of processes, 1 thread each; arrays scattered to one worker each."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

import numpy as np

from .base import DASK, System, hetero_slice, inc_slice, list_sum, one, plus_one, total


class Dask(System):
    name = DASK
    tiny_note = "client.map, one task per slice"

    def __init__(self, n: int = 2, steal_every: str | None = None) -> None:
        """``steal_every``: the scheduler's work-stealing interval instead of dask's default (1 s in 2026.11)."""
        import dask
        from dask.distributed import Client, LocalCluster

        config = {} if steal_every is None else {"distributed.scheduler.work-stealing-interval": steal_every}
        if steal_every is not None:
            self.name = f"{DASK}, work stealing every {steal_every}"
        with dask.config.set(config):  # read as the scheduler starts, here
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
        self.hetero_futures: list = []
        self.slowed = ("", 1.0)  # (worker name, factor) for hetero_slice

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

    def hetero_load(self, x: np.ndarray, rows: int) -> None:
        """Scattered once, a future per slice, spread over the workers by ``scatter``."""
        self.hetero_futures = self.client.scatter([x[i:i + rows] for i in range(0, len(x), rows)])

    def hetero_slow(self, factor: float, seconds: float) -> str:
        name = max((str(w["name"]) for w in self.client.scheduler_info()["workers"].values()), key=int)
        self.slowed = (name, float(factor))
        return name

    def hetero(self, seconds: float) -> tuple[float, dict[str, int], dict[str, int]]:
        """One task per slice (``pure=False``: new keys, no result reused), dask's own stealing."""
        name, factor = self.slowed
        done = self.client.gather(self.client.map(hetero_slice, self.hetero_futures, seconds=seconds,
                                                  slow_worker=name, factor=factor, pure=False))
        return sum(v for v, _ in done), dict(Counter(w for _, w in done)), {}

    def hetero_unload(self) -> None:
        self.hetero_futures = []

    def close(self) -> None:
        self.kept = []
        self.hetero_futures = []
        with contextlib.suppress(Exception):
            self.client.close()
        self.cluster.close()
