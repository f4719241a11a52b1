"""``python -m qjam_nb demo``: qjam's two classic examples on local workers.

1. Newton's method for the square root of 123456789, one ``map`` per step
   (qjam's ``newton_sqrt.py``): the params travel, the one-item dataset is
   the current guess.
2. The sum of a 64 MB matrix in 16 slices, twice: the first call ships the
   slices, the second finds them cached and ships none.
"""

from __future__ import annotations

import math
import time

import numpy as np

from . import Cluster, DataSet, events
from .formats import format_size


def newton_step(n: float, xs: list) -> float:
    """One Newton step towards sqrt(n) from the guess in the slice."""
    x = xs[0]
    return x - (x * x - n) / (2 * x)


def column_sums(params: None, rows: np.ndarray) -> np.ndarray:
    return rows.sum(axis=0)


class ShippedBytes:
    """Observer: how many slice bytes the last call shipped."""

    def __init__(self) -> None:
        self.slice_bytes = 0

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.CallFinished):
            self.slice_bytes = event.slice_bytes_sent


def main(hosts: list[str] | None = None) -> int:
    hosts = hosts or ["local:2"]
    started = time.perf_counter()
    with Cluster(hosts) as cluster:
        print(f"started {len(cluster.workers)} workers ({', '.join(cluster.worker_names)}) "
              f"in {time.perf_counter() - started:.2f} s")

        n = 123456789.0
        print(f"\nNewton's method for sqrt({n:.0f}), one map call per step:")
        x, step = 10.0, 0
        while True:
            step += 1
            new = cluster.map(newton_step, n, [x])
            delta = abs(new - x)
            x = new
            print(f"{step:3d}. {x:.10f} (delta={delta:.3g})")
            if delta < 1e-9 * x:
                break
        error = abs(x - math.sqrt(n))
        print(f"sqrt({n:.0f}) = {x:.10f}; math.sqrt says {math.sqrt(n):.10f} (difference {error:.2g})")

        rng = np.random.default_rng(2010)
        matrix = rng.standard_normal((4000, 2000))
        data = DataSet(matrix, slice_size=250)
        shipped = ShippedBytes()
        cluster.events.subscribe(shipped)
        print(f"\nColumn sums of a {matrix.shape[0]}x{matrix.shape[1]} matrix "
              f"({format_size(matrix.nbytes)}) in {len(data)} slices:")
        for label in ("first call (ships the slices)", "second call (slices cached)"):
            t0 = time.perf_counter()
            sums = cluster.map(column_sums, None, data)
            seconds = time.perf_counter() - t0
            print(f"  {label}: {seconds * 1000:8.1f} ms, {format_size(shipped.slice_bytes):>9} of slices shipped")
        reference = matrix.sum(axis=0)
        print(f"  matrix sum = {sums.sum():.6f} (numpy: {reference.sum():.6f}); "
              f"column sums match numpy to {np.abs(sums - reference).max():.1e}")
        for name, (count, nbytes) in cluster.cache_info().items():
            print(f"  {name} caches {count} slices, {format_size(nbytes)}")
        ok = error < 1e-6 and np.allclose(sums, reference)
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
