"""joblib: a ``Parallel(n_jobs=2)`` per call on its loky workers (large arrays memory-mapped)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .base import JOBLIB, System, inc_slice, list_sum, one, plus_one, total


class Joblib(System):
    name = JOBLIB
    tiny_note = "Parallel, batch_size auto"
    second_note = "no cache: dumps both slices to memmap files again"

    def __init__(self, n: int = 2) -> None:
        from joblib import Parallel, delayed

        self.delayed = delayed
        self.n = n
        # A new Parallel per call, as most joblib code does: the loky workers are reused all the same, and each
        # call's memmap files are removed when it ends (inside one ``with Parallel()`` they pile up until its end,
        # and past about 1 GiB of them its calls here fell to pickling speed).
        self.parallel = lambda tasks: Parallel(n_jobs=n)(tasks)

    def trivial(self) -> list:
        a, b = self.parallel(self.delayed(inc_slice)(s) for s in ([1], [2]))
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        a, b = self.parallel(self.delayed(plus_one)(theta) for _ in range(2))
        return a + b

    def dataset(self, x: np.ndarray, h: int) -> float:
        return sum(self.parallel(self.delayed(total)(p) for p in (x[:h], x[h:])))

    def tiny(self, items: list[int]) -> int:
        return sum(self.parallel(self.delayed(list_sum)([i]) for i in items))

    def round_trip(self) -> Any:
        return self.parallel(self.delayed(one)() for _ in range(self.n))

    def close(self) -> None:
        stop_loky()


def stop_loky() -> None:
    """joblib keeps its loky workers for reuse; stop them."""
    with contextlib.suppress(Exception):
        from joblib.externals.loky import reusable_executor

        executor = reusable_executor._executor
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)
