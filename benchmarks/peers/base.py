"""What every system measured offers (``System``), the peers' names, and the workloads they run.

The workloads are module-level functions named as ``run.py``'s own (``__main__``): forked pools find them
there, and cloudpickle ships them by value to dask's and ipyparallel's processes, which cannot import
``benchmarks`` (see the end of this module).
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import numpy as np

QJAM = "qjam_nb"
MP, PPE, IPP, DASK, XN, XNSSH, JOBLIB = (
    "multiprocessing.Pool", "ProcessPoolExecutor", "ipyparallel", "dask.distributed", "execnet popen",
    "execnet ssh", "joblib (loky)",
)
PEER_MODULES = {MP: None, PPE: None, IPP: "ipyparallel", DASK: "distributed", XN: "execnet", XNSSH: "execnet",
                JOBLIB: "joblib"}


def inc_slice(xs: list) -> list:
    return [x + 1 for x in xs]


def plus_one(theta: np.ndarray) -> np.ndarray:
    return theta + 1.0


def total(xs: np.ndarray) -> float:
    return float(xs.sum())


def list_sum(xs: list) -> int:
    return sum(xs)


def one(_: Any = None) -> int:
    return 1


def theta_plus(xs: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The dask rows' params call on plain Dask: ``theta`` plus the (one-number) slice's sum."""
    return theta + float(xs.sum())


def hetero_slice(xs: np.ndarray, seconds: float, slow_worker: str, factor: float) -> tuple[float, str]:
    """The heal row's task on dask: ``seconds`` of sleep (``factor`` times that on the worker named
    ``slow_worker``), then the slice's sum, and the name of the worker that ran it."""
    from distributed import get_worker

    name = str(get_worker().name)
    time.sleep(seconds * factor if name == slow_worker else seconds)
    return float(xs.sum()), name


# qjam_nb's mapfuncs: lambdas travel by value even if this file is imported as a module.

class System:
    """One way to run the workloads on N workers; ``close()`` stops everything it started."""

    name = ""
    kind = "peer"
    tiny_note = ""
    second_note = "no cache: ships again"
    dataset_fraction = 1  # > 1: the dataset rows use 1/fraction of the data (too slow otherwise)

    def trivial(self) -> list:
        raise NotImplementedError

    def params(self, theta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def dataset(self, x: np.ndarray, h: int) -> float:
        raise NotImplementedError

    def tiny(self, items: list[int]) -> int:
        raise NotImplementedError

    def round_trip(self) -> Any:
        raise NotImplementedError

    # The heal rows (qjam_nb and dask only): slices loaded once, the last worker slowed, calls over them.
    def hetero_load(self, x: np.ndarray, rows: int) -> None:
        """Put the slices ``x[i * rows:(i + 1) * rows]`` on the workers (qjam_nb: by the next call)."""
        raise NotImplementedError

    def hetero_slow(self, factor: float, seconds: float) -> str:
        """Make the last worker ``factor`` times slower on slices of ``seconds`` of work (1: normal); its name."""
        raise NotImplementedError

    def hetero(self, seconds: float) -> tuple[float, dict[str, int], dict[str, int]]:
        """One call: every slice sleeps ``seconds`` (longer on the slowed worker) and is summed, the sums
        reduced in slice order. Returns the result, the slices each worker finished (the copy that
        counted), and the slices that moved, by how (qjam_nb's ``SliceTaken``; dask: none counted)."""
        raise NotImplementedError

    def hetero_unload(self) -> None:
        pass

    def close(self) -> None:
        pass

def _default_sigterm() -> None:
    """In a forked pool worker: SIGTERM kills as by default (delivered now if it came during the fork)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextlib.contextmanager
def forking() -> Any:
    """Fork pool workers without this process's SIGTERM handler.

    A Python-level handler inherited through fork can lose a SIGTERM that arrives before the child has
    re-initialised its signal state; ``Pool.terminate()`` then waits forever for that worker (seen here once
    in the cold-start row). So: SIGTERM blocked here (children inherit the mask and unblock it in
    ``_default_sigterm``, with the default action) and the default handler while forking.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})



# The workloads travel as the one-file script's did: named ``__main__.<name>``, where ``run.py`` imports them
# (so a forked pool finds them there by name), which cloudpickle ships by value to the processes that cannot
# import ``benchmarks`` (ipyparallel's engines, dask's and loky's workers). Registering this module with
# ``cloudpickle.register_pickle_by_value`` instead would turn off qjam_nb's reuse of its mapfunc pickles
# (``shipping._fingerprint`` steps aside while any module is registered): +~25 us a trivial call.
for _workload in (inc_slice, plus_one, total, list_sum, one, theta_plus, hetero_slice):
    _workload.__module__ = "__main__"
