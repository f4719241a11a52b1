"""The standard library's process pools: ``multiprocessing.Pool`` and ``ProcessPoolExecutor``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import MP, PPE, System, _default_sigterm, forking, inc_slice, list_sum, one, plus_one, total


class MPPool(System):
    name = MP
    tiny_note = "Pool.map, default chunksize"

    def __init__(self, n: int = 2) -> None:
        import multiprocessing

        with forking():  # Pool() forks all n workers before it returns
            self.pool = multiprocessing.get_context().Pool(n, initializer=_default_sigterm)

    def trivial(self) -> list:
        a, b = self.pool.map(inc_slice, [[1], [2]], chunksize=1)
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        a, b = self.pool.map(plus_one, [theta, theta], chunksize=1)
        return a + b

    def dataset(self, x: np.ndarray, h: int) -> float:
        return sum(self.pool.map(total, [x[:h], x[h:]], chunksize=1))

    def tiny(self, items: list[int]) -> int:
        return sum(self.pool.map(list_sum, [[i] for i in items]))

    def round_trip(self) -> Any:
        return self.pool.map(one, range(self.pool._processes), chunksize=1)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class PPool(System):
    name = PPE
    tiny_note = "Executor.map, default chunksize (1)"

    def __init__(self, n: int = 2) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.n = n
        self.ex = ProcessPoolExecutor(n, initializer=_default_sigterm)
        with forking():  # with fork, the first submit starts all n workers
            self.ex.submit(one).result()

    def trivial(self) -> list:
        a, b = self.ex.map(inc_slice, [[1], [2]])
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        a, b = self.ex.map(plus_one, [theta, theta])
        return a + b

    def dataset(self, x: np.ndarray, h: int) -> float:
        return sum(self.ex.map(total, [x[:h], x[h:]]))

    def tiny(self, items: list[int]) -> int:
        return sum(self.ex.map(list_sum, [[i] for i in items]))

    def round_trip(self) -> Any:
        return list(self.ex.map(one, range(self.n)))

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)
