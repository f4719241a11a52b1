"""qjam_nb next to its references and peers, every workload of issue 6, in one run.

``python benchmarks/run.py`` (``--repeat N``, ``--quick``, ``--only ROWS``)
measures, on this machine and in this one run:

* qjam_nb on ``local:2`` (and on 2 ssh workers of a private sshd on
  127.0.0.1, started here by ``tests/sshd.py`` and stopped by its pid);
* the raw limits of the same paths: ``os.pipe`` between two processes,
  pickle protocol 5 ``dumps``/``loads``, paramiko send/receive on the same
  sshd (the transport set up as qjam_nb's, and every cipher both sides offer);
* the peers, each doing the same work with its own natural API:
  ``multiprocessing.Pool``, ``concurrent.futures.ProcessPoolExecutor``,
  ipyparallel, dask.distributed (``LocalCluster``, processes, 1 thread each),
  execnet (popen and ssh gateways) and joblib (loky, with its automatic
  memory-mapping of large arrays). A peer that is not installed says so in
  its cell (``pip install -e '.[bench]'`` installs them all).

It prints every measurement as median (min-max) over the repetitions, then
one summary line per row: the issue's target, the ratio against it, and the
ratio against the best peer. The numbers (every sample) go to
``benchmarks/results/run.json``, the ratios to a plot,
``benchmarks/results/run.png``. MB is 10^6 bytes; MiB is 2^20.

Rows (``--only`` takes these names, comma-separated): ``trivial``,
``params``, ``dataset`` (first and second call), ``cold``, ``scale``,
``paper`` (``benchmarks/sparse_autoencoder.py``'s ``measure``), ``qjam2010``
(qjam 2010's ``Master.run`` of its autoencoder, ``benchmarks/qjam2010_autoencoder.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import importlib
import importlib.util
import inspect
import json
import logging
import os
import pickle
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Heavy imports (qjam_nb, paramiko, the peers) happen inside functions: dask starts its workers with
# multiprocessing's "spawn", which runs this file's top level again in each of them.

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MiB = 1 << 20
MB = 1e6
COLS = 1024  # dataset rows of 1024 float64 (8 KiB)
RESULTS_DIR = HERE / "results"
ALIAS = "bench"
GROUPS = ("trivial", "params", "dataset", "cold", "scale", "paper", "qjam2010")
GROUP_ALIASES = {"first": "dataset", "second": "dataset"}

QJAM = "qjam_nb"
MP, PPE, IPP, DASK, XN, XNSSH, JOBLIB = (
    "multiprocessing.Pool", "ProcessPoolExecutor", "ipyparallel", "dask.distributed", "execnet popen",
    "execnet ssh", "joblib (loky)",
)
PEER_MODULES = {MP: None, PPE: None, IPP: "ipyparallel", DASK: "distributed", XN: "execnet", XNSSH: "execnet",
                JOBLIB: "joblib"}


class Config:
    """Sizes and repetitions; ``--quick`` makes everything small (a smoke test, not a measurement)."""

    def __init__(self, repeat: int, quick: bool) -> None:
        self.repeat = repeat
        self.quick = quick
        self.data_bytes = (20 if quick else 200) * MiB
        self.param_bytes = MiB
        self.tiny = 5_000 if quick else 100_000  # slices in the scale row
        self.tiny_least = 200 if quick else 1_000  # a slow peer's fewest slices in the scale row
        self.tiny_rep_seconds = 1.0 if quick else 4.0  # ...else as many as it sends in this time
        self.heavy_repeat = min(repeat, 2 if quick else 3)  # scale row, execnet over ssh with 200 MiB
        self.paper_sizes = (1000,) if quick else (1000, 10000, 100000)
        self.batch_seconds = 0.1 if quick else 0.3  # a batch of calls for the ms-scale rows


# -- samples and rows ---------------------------------------------------------------------------------------
def stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def batch(fn: Callable[[], Any], seconds: float, max_calls: int = 200, min_calls: int = 3) -> float:
    """The median seconds per call of ``fn`` over a batch lasting about ``seconds``."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or (len(times) < max_calls and time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# row id -> (group, title, unit, higher is better)
ROWS: dict[str, tuple[str, str, str, bool]] = {
    "trivial": ("trivial", "trivial: x+1 over 2 one-item slices, result back", "ms/call", False),
    "params_local": ("params", "params, local: 1 MiB float64 to each worker, 1 MiB back from each", "ms/iter", False),
    "params_ssh": ("params", "params, ssh: the same to 2 ssh workers", "ms/iter", False),
    "first_local": ("dataset", "dataset first call, local: 200 MiB float64 in 2 slices, shipped and summed", "MB/s",
                    True),
    "first_ssh": ("dataset", "dataset first call, ssh: the same to 2 ssh workers", "MB/s", True),
    "second_local": ("dataset", "dataset second call, local, read-only array (peers have no cache: they re-ship)",
                     "ms", False),
    "second_local_w": ("dataset", "dataset second call, local, writable array (keys hashed again)", "ms", False),
    "second_ssh": ("dataset", "dataset second call, ssh, read-only array", "ms", False),
    "second_ssh_w": ("dataset", "dataset second call, ssh, writable array", "ms", False),
    "cold_local": ("cold", "cold start, local: to 2 ready workers and one round trip", "s", False),
    "cold_ssh": ("cold", "cold start, ssh: the same, worker already uploaded", "s", False),
    "scale_slices": ("scale", "scale: 100,000 tiny slices on local:2, first call, overhead per slice", "us/slice",
                     False),
    "scale_slices_cached": ("scale", "scale: the same 100,000 slices again (cached)", "us/slice", False),
    "scale_16": ("scale", "scale: 16 workers (local:16), ready and answering a no-dataset call", "s", False),
    "paper_1000": ("paper", "qjam's paper: sparse autoencoder, 1k patches, per L-BFGS evaluation", "s/eval", False),
    "paper_10000": ("paper", "qjam's paper: 10k patches", "s/eval", False),
    "paper_100000": ("paper", "qjam's paper: 100k patches", "s/eval", False),
    "qjam2010_1000": ("qjam2010", "qjam 2010's Master.run: its autoencoder, a half per worker, 1k patches", "s/eval",
                      False),
    "qjam2010_10000": ("qjam2010", "qjam 2010's Master.run: 10k patches", "s/eval", False),
    "qjam2010_100000": ("qjam2010", "qjam 2010's Master.run: 100k patches", "s/eval", False),
}


class Results:
    """Every cell measured, by row: (system, kind, samples or a status, note)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rows: dict[str, list[dict]] = {row: [] for row in ROWS}
        self.meta: dict = {}
        self.extra: dict = {}

    def add(self, row: str, system: str, kind: str, samples: list[float] | None = None, note: str = "",
            status: str = "") -> None:
        """``kind``: "qjam" (the figure the target is about), "qjam+" (a further qjam_nb figure),
        "ref" (a raw limit), "peer", or "info"."""
        cell = {"system": system, "kind": kind, "note": note, "status": status}
        if samples:
            cell.update(stats(samples))
        for i, old in enumerate(self.rows[row]):
            if old["system"] == system:
                self.rows[row][i] = cell
                return
        self.rows[row].append(cell)

    def get(self, row: str, system: str) -> dict | None:
        for cell in self.rows[row]:
            if cell["system"] == system and "median" in cell:
                return cell
        return None

    def qjam(self, row: str) -> dict | None:
        for cell in self.rows[row]:
            if cell["kind"] == "qjam" and "median" in cell:
                return cell
        return None


def log(msg: str) -> None:
    print(msg, flush=True)


# -- workloads: module-level functions (forked pools find them; dask and ipyparallel ship them by value) --------
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


# qjam_nb's mapfuncs: lambdas travel by value even if this file is imported as a module.
Q_INC = lambda p, xs: [x + 1 for x in xs]  # noqa: E731
Q_CONCAT = lambda a, b: a + b  # noqa: E731  (list concatenation: the result is [2, 3], as the peers return)
Q_PLUS1 = lambda theta, xs: theta + 1.0  # noqa: E731
Q_SUM = lambda p, xs: float(xs.sum())  # noqa: E731
Q_FIRST = lambda p, xs: xs[0]  # noqa: E731
Q_ONE = lambda p, xs: 1  # noqa: E731


def make_theta(cfg: Config) -> np.ndarray:
    return np.random.default_rng(1).random(cfg.param_bytes // 8)


class Data:
    """A random base array, and per repetition a fresh one (new content, so new slice keys) next to it."""

    def __init__(self, cfg: Config) -> None:
        self.base = np.random.default_rng(0).random(cfg.data_bytes // 8).reshape(-1, COLS)
        self.h = len(self.base) // 2

    def fresh(self, rep: int, read_only: bool = True) -> np.ndarray:
        x = self.base + float(rep + 1)
        if read_only:
            x.setflags(write=False)
        return x


# -- raw references -----------------------------------------------------------------------------------------
ECHO_CHILD = r"""
import os, sys
n = int(sys.argv[1])
view = memoryview(bytearray(n))
os.write(1, b"r")
while True:
    got = 0
    while got < n:
        k = os.readv(0, [view[got:]])
        if not k:
            sys.exit(0)
        got += k
    out = view
    while out:
        out = out[os.write(1, out):]
"""


class PipeEcho:
    """Two child processes, each reading n bytes from a pipe and writing them back on another (1 MiB pipe
    buffers, as qjam_nb's local workers have): the raw time of the params row's bytes, locally."""

    def __init__(self, n: int, children: int = 2) -> None:
        self.n = n
        self.children: list[subprocess.Popen] = []
        for _ in range(children):
            child = subprocess.Popen([sys.executable, "-c", ECHO_CHILD, str(n)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
            for fd in (child.stdin.fileno(), child.stdout.fileno()):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, MiB)
            self.children.append(child)
        for child in self.children:
            if child.stdout.read(1) != b"r":
                raise RuntimeError("an echo child did not start")
        self.buf = memoryview(bytearray(n))

    def round_trip(self, payload: memoryview) -> None:
        for child in self.children:
            view, fd = payload, child.stdin.fileno()
            while view:
                view = view[os.write(fd, view):]
        for child in self.children:
            got, fd = 0, child.stdout.fileno()
            while got < self.n:
                k = os.readv(fd, [self.buf[got:]])
                if not k:
                    raise RuntimeError("an echo child closed its pipe")
                got += k

    def close(self) -> None:
        for child in self.children:
            child.stdin.close()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child.stdout.close()


class ParamikoEcho:
    """The same echo on two channels of one paramiko Transport to the private sshd."""

    def __init__(self, transport: Any, n: int, python: str) -> None:
        import shlex

        from qjam_nb.transport.ssh import PACKET_SIZE, WINDOW_SIZE

        self.n = n
        self.chans = []
        for _ in range(2):
            chan = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
            chan.exec_command(f"exec {shlex.quote(python)} -c {shlex.quote(ECHO_CHILD)} {n}")
            self.chans.append(chan)
        for chan in self.chans:
            if chan.recv(1) != b"r":
                raise RuntimeError("a remote echo did not start")
        self.buf = memoryview(bytearray(n))

    def round_trip(self, payload: memoryview) -> None:
        for chan in self.chans:
            chan.sendall(payload)
        for chan in self.chans:
            got = 0
            while got < self.n:
                chunk = chan.recv(self.n - got)  # paramiko has no recv_into
                if not chunk:
                    raise RuntimeError("a remote echo closed its channel")
                self.buf[got:got + len(chunk)] = chunk
                got += len(chunk)

    def close(self) -> None:
        for chan in self.chans:
            chan.shutdown_write()
            chan.close()


def pickle_throughput(x: np.ndarray, h: int) -> tuple[float, float]:
    """MB/s of pickle protocol 5 (in-band) dumps, then loads, of both slices."""
    parts = [x[:h], x[h:]]
    t0 = time.perf_counter()
    blobs = [pickle.dumps(p, protocol=5) for p in parts]
    t1 = time.perf_counter()
    for b in blobs:
        pickle.loads(b)
    t2 = time.perf_counter()
    del blobs
    return x.nbytes / (t1 - t0) / MB, x.nbytes / (t2 - t1) / MB


# -- qjam_nb and the peers, behind one small interface ------------------------------------------------------
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

    def close(self) -> None:
        pass


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


EXECNET_WORKER = """
import numpy as np
for kind, payload in channel:
    if kind == "inc":
        channel.send([x + 1 for x in payload])
    elif kind == "plus1":
        channel.send((np.frombuffer(payload) + 1.0).tobytes())
    elif kind == "sum":
        channel.send(float(np.frombuffer(payload).sum()))
    elif kind == "tiny":
        channel.send(sum(payload))
    elif kind == "one":
        channel.send(1)
"""


class Execnet(System):
    """N gateways, each running one loop that answers messages (execnet channels carry bytes, not arrays)."""

    tiny_note = "one message per slice, all sent before the answers are read"

    def __init__(self, spec: str, name: str, n: int = 2) -> None:
        import execnet

        self.name = name
        if spec.startswith("ssh="):  # execnet always runs ``ssh -C``: zlib on the bulk data, ~10 MB/s here
            self.dataset_fraction = 10
        self.group = execnet.Group()
        try:
            self.gws = [self.group.makegateway(spec) for _ in range(n)]
            self.chans = [gw.remote_exec(EXECNET_WORKER) for gw in self.gws]
        except BaseException:
            self.group.terminate(timeout=5)
            raise

    def _each(self, kind: str, payloads: list) -> list:
        for chan, p in zip(self.chans, payloads, strict=True):
            chan.send((kind, p))
        return [chan.receive() for chan in self.chans]

    def trivial(self) -> list:
        a, b = self._each("inc", [[1], [2]])
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        blob = theta.tobytes()
        a, b = self._each("plus1", [blob, blob])
        return np.frombuffer(a) + np.frombuffer(b)

    def dataset(self, x: np.ndarray, h: int) -> float:
        return sum(self._each("sum", [x[:h].tobytes(), x[h:].tobytes()]))

    def tiny(self, items: list[int]) -> int:
        n = len(self.chans)
        for i, item in enumerate(items):
            self.chans[i % n].send(("tiny", [item]))
        counts = [len(range(k, len(items), n)) for k in range(n)]
        return sum(chan.receive() for chan, c in zip(self.chans, counts, strict=True) for _ in range(c))

    def round_trip(self) -> Any:
        return self._each("one", [None] * len(self.chans))

    def close(self) -> None:
        for chan in self.chans:
            with contextlib.suppress(Exception):
                chan.close()
        self.group.terminate(timeout=5)


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


# -- the private sshd ---------------------------------------------------------------------------------------
class SshWorld:
    """``ssh_transfer.World`` (private sshd, temporary HOME with a ``bench`` alias), plus what the ``ssh``
    client needs (it takes ~/.ssh from the password database, not HOME): known_hosts named in the config,
    batch mode. execnet's ssh gateway runs ``ssh -F <that config> bench``."""

    def __init__(self, root: Path) -> None:
        import ssh_transfer

        self.world = ssh_transfer.World(root)

    def __enter__(self) -> SshWorld:
        w = self.world.__enter__()
        self.config = w.home / ".ssh" / "config"
        with open(self.config, "a") as f:
            f.write(f"  UserKnownHostsFile {w.home / '.ssh' / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                    "  IdentitiesOnly yes\n  BatchMode yes\n")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.world.__exit__(*exc)

    def execnet_spec(self) -> str:
        return f"ssh={ALIAS}//ssh_config={self.config}//python={sys.executable}"

    def transport(self, cipher: str | None = None) -> Any:
        """A paramiko Transport set up as qjam_nb's (window, packet size, cipher preference), or with one cipher."""
        import ssh_transfer

        if cipher is None:
            return ssh_transfer.raw_transport(self.world)
        import paramiko

        saved = paramiko.Transport._preferred_ciphers
        paramiko.Transport._preferred_ciphers = (cipher,)
        try:
            return ssh_transfer.raw_transport(self.world)
        finally:
            paramiko.Transport._preferred_ciphers = saved


# -- the measurements -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: Config, groups: set[str], res: Results, world: SshWorld | None) -> None:
        self.cfg = cfg
        self.groups = groups
        self.res = res
        self.world = world
        self.theta = make_theta(cfg)
        self.data: Data | None = None
        self.installed = {name: mod is None or importlib.util.find_spec(mod) is not None
                          for name, mod in PEER_MODULES.items()}

    def want(self, *groups: str) -> bool:
        return any(g in self.groups for g in groups)

    # -- one system, every workload ----------------------------------------------------------------------
    def run_system(self, make: Callable[[], System], name: str, where: str) -> None:
        """Start one system (2 workers), run the selected workloads on it, stop it."""
        rows = self.rows_of(where)
        if not self.installed.get(name, True):
            for row in rows:
                self.res.add(row, name, "peer", status="not installed")
            return
        log(f"-- {name}")
        system: System | None = None
        t0 = time.perf_counter()
        try:
            system = make()
            log(f"   started in {time.perf_counter() - t0:.1f} s")
            if self.want("trivial") and where == "local":
                self.trivial(system)
            if self.want("params"):
                self.params(system, where)
            if self.want("dataset"):
                self.dataset(system, where)
            if self.want("scale") and where == "local":
                self.scale(system)
        except Exception as exc:  # one peer failing leaves the others to run
            traceback.print_exc()
            for row in rows:
                if not any(c["system"] == name for c in self.res.rows[row]):
                    self.res.add(row, name, "qjam" if name == QJAM else "peer",
                                 status=f"failed: {type(exc).__name__}: {exc}"[:200])
        finally:
            if system is not None:
                t1 = time.perf_counter()
                system.close()
                log(f"   stopped in {time.perf_counter() - t1:.1f} s")
            gc.collect()

    def rows_of(self, where: str) -> list[str]:
        rows = []
        if self.want("trivial") and where == "local":
            rows.append("trivial")
        if self.want("params"):
            rows.append(f"params_{where}")
        if self.want("dataset"):
            rows += [f"first_{where}", f"second_{where}", f"second_{where}_w"]
        if self.want("scale") and where == "local":
            rows += ["scale_slices", "scale_slices_cached"]
        return rows

    def trivial(self, s: System) -> None:
        if s.trivial() != [2, 3]:
            raise RuntimeError(f"{s.name}: trivial gave {s.trivial()!r}")
        samples = [batch(s.trivial, self.cfg.batch_seconds) * 1e3 for _ in range(self.cfg.repeat)]
        self.res.add("trivial", s.name, s.kind, samples)
        log(f"   trivial {statistics.median(samples):.2f} ms/call")

    def params(self, s: System, where: str) -> None:
        row = f"params_{where}"
        theta = self.theta
        got = s.params(theta)
        if not np.array_equal(got, 2 * (theta + 1.0)):
            raise RuntimeError(f"{s.name}: params gave a wrong vector")
        echo: PipeEcho | ParamikoEcho | None = None
        ref, ref_name, samples, ref_samples = None, "", [], []
        transport = None
        try:
            if s.kind == "qjam":  # the raw reference takes turns with qjam_nb, one batch each
                if where == "local":
                    echo, ref_name = PipeEcho(theta.nbytes), "raw os.pipe echo, 2 children"
                else:
                    transport = self.world.transport()
                    echo, ref_name = ParamikoEcho(transport, theta.nbytes, sys.executable), \
                        "raw paramiko echo, 2 channels"
                ref = memoryview(theta).cast("B")
                echo.round_trip(ref)
            for _ in range(self.cfg.repeat):
                if echo is not None:
                    ref_samples.append(batch(lambda: echo.round_trip(ref), self.cfg.batch_seconds) * 1e3)
                samples.append(batch(lambda: s.params(theta), self.cfg.batch_seconds) * 1e3)
        finally:
            if echo is not None:
                echo.close()
            if transport is not None:
                transport.close()
        if ref_samples:
            self.res.add(row, ref_name, "ref", ref_samples,
                         "1 MiB to each child and back, store and forward" +
                         (", 1 MiB pipe buffers" if where == "local" else ", python echo on the sshd"))
        self.res.add(row, s.name, s.kind, samples)
        log(f"   params {statistics.median(samples):.2f} ms/iter"
            + (f" (raw {statistics.median(ref_samples):.2f})" if ref_samples else ""))

    def dataset(self, s: System, where: str) -> None:
        cfg = self.cfg
        if self.data is None:
            self.data = Data(cfg)
        data, h = self.data, self.data.h
        nbytes = data.base.nbytes
        f = s.dataset_fraction
        reps = cfg.heavy_repeat if f > 1 else cfg.repeat
        first, second, second_w, kept = [], [], [], []
        for rep in range(reps):
            x = data.fresh(rep + (100 if where == "ssh" else 0))
            if f > 1:  # the first 1/f of both halves' rows, as two slices
                h = data.h // f
                x = x[: 2 * h]
                nbytes = x.nbytes
            expect = x[:h].sum() + x[h:].sum()
            if s.kind == "qjam":
                self.references(x, h, where)
            t0 = time.perf_counter()
            got1 = s.dataset(x, h)
            first.append(nbytes / (time.perf_counter() - t0) / MB)
            if s.kind == "qjam":
                record = s.cluster.last_call  # the time inside map (no observer of our own: it would cost per event)
                if record is not None and record.ok:
                    self.res.extra.setdefault(f"first_{where}_in_call_s", []).append(record.seconds)
                calls = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    got2 = s.dataset(x, h)
                    calls.append(time.perf_counter() - t0)
                second.append(statistics.median(calls) * 1e3)
                x.setflags(write=True)
                calls = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    got3 = s.dataset(x, h)
                    calls.append(time.perf_counter() - t0)
                second_w.append(statistics.median(calls) * 1e3)
                if not (np.isclose(got2, expect, rtol=1e-12) and np.isclose(got3, expect, rtol=1e-12)):
                    raise RuntimeError(f"{s.name}: cached sums {got2!r} {got3!r}, expected {expect!r}")
            else:
                keep = isinstance(s, Dask)
                t0 = time.perf_counter()
                got2 = s.dataset(x, h, keep=True) if keep else s.dataset(x, h)
                second.append((time.perf_counter() - t0) * 1e3 * f)
                if keep:
                    t0 = time.perf_counter()
                    got3 = s.dataset_kept()
                    kept.append((time.perf_counter() - t0) * 1e3)
                    s.kept = []
                    if not np.isclose(got3, expect, rtol=1e-12):
                        raise RuntimeError(f"{s.name}: kept sum {got3!r}, expected {expect!r}")
            if not np.isclose(got1, expect, rtol=1e-12) or not np.isclose(got2, expect, rtol=1e-12):
                raise RuntimeError(f"{s.name}: sums {got1!r} {got2!r}, expected {expect!r}")
            del x
            gc.collect()
            log(f"   dataset rep {rep + 1}/{reps}: first {first[-1]:.0f} MB/s, second {second[-1]:.1f} ms"
                + (f", writable {second_w[-1]:.1f} ms" if second_w else "")
                + (f", dask on kept futures {kept[-1]:.1f} ms" if kept else ""))
        full = f"{data.base.nbytes / MiB:.0f} MiB"
        small = f"; measured on {nbytes / MiB:.0f} MiB (ssh -C compresses: too slow for {full})" if f > 1 else ""
        self.res.add(f"first_{where}", s.name, s.kind, first, small.lstrip("; "))
        self.res.add(f"second_{where}", s.name, s.kind, second,
                     s.second_note + (small + f", times {f} for {full}" if f > 1 else ""))
        if s.kind == "qjam":
            self.res.add(f"second_{where}_w", s.name, s.kind, second_w, "every slice hashed again")
        else:
            self.res.add(f"second_{where}_w", s.name, s.kind, second, "as the read-only row: " + s.second_note)
        if kept:
            for row in (f"second_{where}", f"second_{where}_w"):
                self.res.add(row, f"{DASK}, scattered futures kept", "info", kept,
                             "dask's own way to keep data on the workers (not the same API as a re-shipped call)")

    def references(self, x: np.ndarray, h: int, where: str) -> None:
        """The raw limits of a repetition of the dataset row, measured right before qjam_nb's call."""
        import ssh_transfer

        nbytes = x.nbytes
        for _ in range(3):  # the pure compute of the second call: the two sums here
            t0 = time.perf_counter()
            _ = x[:h].sum() + x[h:].sum()
            self.res.extra.setdefault(f"compute_{where}_ms", []).append((time.perf_counter() - t0) * 1e3)
        raw = memoryview(x).cast("B")
        if where == "local":
            for key, kw in (("pipe_1MiB", {"pipe_size": MiB}), ("pipe_64KiB", {}), ("pipe_2x", {"pipes": 2})):
                part = raw[: nbytes // 2] if key == "pipe_2x" else raw
                secs = ssh_transfer.pipe_send(part, **kw)
                self.res.extra.setdefault(key, []).append(nbytes / secs / MB)
            d, lo = pickle_throughput(x, h)
            self.res.extra.setdefault("pickle_dumps", []).append(d)
            self.res.extra.setdefault("pickle_loads", []).append(lo)
        else:
            t = self.raw_ssh.get(self.best_cipher)
            secs = ssh_transfer.raw_send(t, raw[: nbytes // 2], 2)
            self.res.extra.setdefault("paramiko_best", []).append(nbytes / secs / MB)
            t = self.raw_ssh.get("qjam")
            secs = ssh_transfer.raw_send(t, raw[: nbytes // 2], 2)
            self.res.extra.setdefault("paramiko_qjam", []).append(nbytes / secs / MB)

    def tiny_for(self, s: System) -> int:
        """How many tiny slices a peer gets in the scale row: all of them, unless a probe of a few
        hundred says that would take over ``tiny_rep_seconds`` a repetition (dask and ipyparallel
        take ~1-6 ms a task here, ProcessPoolExecutor ~0.1-0.3 ms)."""
        cfg = self.cfg
        probe = list(range(cfg.tiny_least // 5))
        t0 = time.perf_counter()
        if s.tiny(probe) != sum(probe):
            raise RuntimeError(f"{s.name}: the probe's tiny slices summed to the wrong value")
        per_slice = (time.perf_counter() - t0) / len(probe)
        return max(cfg.tiny_least, min(cfg.tiny, int(cfg.tiny_rep_seconds / per_slice)))

    def scale(self, s: System) -> None:
        cfg = self.cfg
        n = cfg.tiny if s.kind == "qjam" else self.tiny_for(s)
        first, cached, per_task = [], [], []
        for rep in range(cfg.heavy_repeat):
            items = list(range(rep * n, (rep + 1) * n))
            expect = sum(items)
            t0 = time.perf_counter()
            got = s.tiny(items)
            first.append((time.perf_counter() - t0) / n * 1e6)
            if got != expect:
                raise RuntimeError(f"{s.name}: {n} tiny slices summed to {got}, not {expect}")
            if s.kind == "qjam":
                t0 = time.perf_counter()
                got = s.tiny(items)
                cached.append((time.perf_counter() - t0) / n * 1e6)
                if got != expect:
                    raise RuntimeError(f"{s.name}: cached tiny slices summed to {got}, not {expect}")
            if isinstance(s, MPPool):  # the same pool one task per slice, as qjam_nb and the others send them
                t0 = time.perf_counter()
                got = sum(s.pool.map(list_sum, [[i] for i in items], chunksize=1))
                per_task.append((time.perf_counter() - t0) / n * 1e6)
                if got != expect:
                    raise RuntimeError(f"{s.name}: chunksize=1 gave {got}, not {expect}")
            log(f"   scale rep {rep + 1}: {n} slices, first {first[-1]:.1f} us/slice"
                + (f", cached {cached[-1]:.1f} us/slice" if cached else ""))
            del items
        note = s.tiny_note + ("" if n == cfg.tiny else f"; {n:,} slices (fewer: ~{first[0]:.0f} us a task, "
                              "and the run is kept short)")
        self.res.add("scale_slices", s.name, s.kind, first, note)
        if per_task:
            for row in ("scale_slices", "scale_slices_cached"):
                self.res.add(row, f"{MP}, chunksize=1", "info", per_task, "one task per slice, as qjam_nb sends them")
        if cached:
            self.res.add("scale_slices_cached", s.name, s.kind, cached, "every slice cached: only TASKs travel")
        else:
            self.res.add("scale_slices_cached", s.name, s.kind, first, "no cache: " + note)

    # -- blocks -------------------------------------------------------------------------------------------
    def local_block(self) -> None:
        self.run_system(lambda: self.warm(Qjam(["local:2"], f"{QJAM} local:2")), QJAM, "local")
        peers: list[tuple[str, Callable[[], System]]] = [
            (XN, lambda: Execnet(f"popen//python={sys.executable}", XN)),
            (MP, MPPool), (PPE, PPool), (JOBLIB, Joblib), (DASK, Dask), (IPP, IPyParallel),
        ]
        for name, make in peers:
            self.run_system(lambda make=make: self.warm(make()), name, "local")
        self.reference_rows("local")

    def warm(self, s: System) -> System:
        """Not timed: the workers import numpy, see each function once."""
        s.round_trip()
        s.trivial()
        s.params(self.theta)
        warm = np.arange(2.0 * COLS).reshape(2, COLS)
        if s.dataset(warm, 1) != warm.sum():
            raise RuntimeError(f"{s.name}: wrong warm-up sum")
        return s

    def ssh_block(self) -> None:
        if not self.want("params", "dataset"):
            return
        if self.world is None:
            for row in ("params_ssh", "first_ssh", "second_ssh", "second_ssh_w"):
                self.res.add(row, QJAM, "qjam", status="not available: no sshd (apt-get install openssh-server)")
            return
        self.raw_ssh: dict[str, Any] = {}
        try:
            if self.want("dataset"):
                self.cipher_sweep()
            self.run_system(lambda: self.warm(Qjam([f"{ALIAS}:2"], f"{QJAM} ssh {ALIAS}:2")), QJAM, "ssh")
        finally:
            for t in self.raw_ssh.values():
                t.close()
            self.raw_ssh = {}
        self.run_system(lambda: self.warm(Execnet(self.world.execnet_spec(), XNSSH)), XNSSH, "ssh")
        self.reference_rows("ssh")

    def cipher_sweep(self) -> None:
        """Raw paramiko throughput (2 channels x half the dataset) with each cipher both sides offer."""
        import ssh_transfer

        payload = memoryview(np.random.default_rng(2).random(self.cfg.data_bytes // 16)).cast("B")
        qjam_t = self.world.transport()
        self.raw_ssh["qjam"] = qjam_t
        sweep: dict[str, float] = {}
        import paramiko

        quiet = logging.getLogger("paramiko")
        level = quiet.level
        for cipher in paramiko.Transport._preferred_ciphers:
            quiet.setLevel(logging.CRITICAL)  # a refused cipher is logged with a traceback otherwise
            try:
                t = self.world.transport(cipher)
            except Exception as exc:  # the server does not offer it
                sweep[cipher] = float("nan")
                log(f"   cipher {cipher}: not offered ({type(exc).__name__})")
                continue
            finally:
                quiet.setLevel(level)
            try:
                ssh_transfer.raw_send(t, payload[: 8 * MiB], 2)
                secs = min(ssh_transfer.raw_send(t, payload, 2) for _ in range(2))
                sweep[cipher] = 2 * len(payload) / secs / MB
                log(f"   cipher {cipher}: {sweep[cipher]:.0f} MB/s (2 channels)")
                self.raw_ssh[cipher] = t
            except Exception:
                t.close()
                raise
        offered = {c: v for c, v in sweep.items() if v == v}
        self.best_cipher = max(offered, key=offered.get)
        for c in list(self.raw_ssh):
            if c not in ("qjam", self.best_cipher):
                self.raw_ssh.pop(c).close()
        ssh_transfer.raw_send(qjam_t, payload[: 8 * MiB], 2)
        self.res.extra["cipher_sweep_MBps"] = sweep
        self.res.extra["best_cipher"] = self.best_cipher
        self.res.extra["qjam_cipher"] = qjam_t.local_cipher
        log(f"   best cipher {self.best_cipher}; qjam_nb's choice {qjam_t.local_cipher}")

    def reference_rows(self, where: str) -> None:
        """Raw limits and compute, gathered during qjam_nb's repetitions, into their rows."""
        ex = self.res.extra
        if not self.want("dataset") or f"compute_{where}_ms" not in ex:
            return
        r = f"first_{where}"
        if where == "local":
            self.res.add(r, "raw os.pipe, 1 MiB buffer", "ref", ex["pipe_1MiB"],
                         "all 200 MiB into one pipe, a child reads and discards (F_SETPIPE_SZ as qjam's)")
            self.res.add(r, "raw os.pipe, 64 KiB buffer", "info", ex["pipe_64KiB"], "Linux's default pipe size")
            self.res.add(r, "raw os.pipe, 2 children at once", "info", ex["pipe_2x"], "100 MiB each")
            self.res.add(r, "pickle 5 dumps (in-band)", "ref", ex["pickle_dumps"], "both slices, in this process")
            self.res.add(r, "pickle 5 loads (in-band)", "ref", ex["pickle_loads"], "both slices, in this process")
        else:
            sweep = ex.get("cipher_sweep_MBps", {})
            self.res.add(r, f"raw paramiko, best cipher {ex['best_cipher']}", "ref", ex["paramiko_best"],
                         "2 channels x 100 MiB into cat; sweep: "
                         + ", ".join(f"{c} {v:.0f}" for c, v in sweep.items() if v == v))
            if ex["best_cipher"] != ex["qjam_cipher"]:
                self.res.add(r, f"raw paramiko, qjam_nb's cipher {ex['qjam_cipher']}", "info", ex["paramiko_qjam"],
                             "the same transfer with the cipher qjam_nb negotiates")
        in_call = ex.get(f"first_{where}_in_call_s")
        if in_call:
            nbytes = self.data.base.nbytes
            self.res.add(r, f"{QJAM}, CallStarted to CallFinished", "qjam+", [nbytes / s / MB for s in in_call],
                         "the same first calls without the slice hashing before CallStarted")
        for row in (f"second_{where}", f"second_{where}_w"):
            self.res.add(row, "pure compute: the two sums here", "ref", ex[f"compute_{where}_ms"],
                         "x[:h].sum() + x[h:].sum() in this process")

    def cold_block(self) -> None:
        """Start to 2 ready workers plus one round trip, then stop (not timed); systems take turns."""
        systems: list[tuple[str, str, str, Callable[[], System]]] = [
            ("cold_local", f"{QJAM} local:2", QJAM, lambda: Qjam(["local:2"], f"{QJAM} local:2")),
            ("cold_local", XN, XN, lambda: Execnet(f"popen//python={sys.executable}", XN)),
            ("cold_local", MP, MP, MPPool),
            ("cold_local", PPE, PPE, PPool),
            ("cold_local", JOBLIB, JOBLIB, Joblib),
            ("cold_local", DASK, DASK, Dask),
            ("cold_local", IPP, IPP, IPyParallel),
        ]
        if self.world is not None:
            systems += [
                ("cold_ssh", f"{QJAM} ssh {ALIAS}:2", QJAM, lambda: Qjam([f"{ALIAS}:2"], f"{QJAM} ssh")),
                ("cold_ssh", XNSSH, XNSSH, lambda: Execnet(self.world.execnet_spec(), XNSSH)),
            ]
            # The worker is uploaded (and the ssh client's known host seen) once, untimed.
            Qjam([f"{ALIAS}:2"], "upload").close()
        else:
            self.res.add("cold_ssh", QJAM, "qjam", status="not available: no sshd")
        log("-- cold start")
        times: dict[str, list[float]] = {}
        ready: dict[str, list[float]] = {}
        failed: dict[str, str] = {}
        for rep in range(self.cfg.repeat):
            for _row, label, name, make in systems:
                if not self.installed.get(name, True) or label in failed:
                    continue
                if name == JOBLIB:
                    stop_loky()
                s = None
                try:
                    t0 = time.perf_counter()
                    s = make()
                    t1 = time.perf_counter()
                    s.round_trip()
                    t2 = time.perf_counter()
                    times.setdefault(label, []).append(t2 - t0)
                    ready.setdefault(label, []).append(t1 - t0)
                except Exception as exc:
                    traceback.print_exc()
                    failed[label] = f"failed: {type(exc).__name__}: {exc}"[:200]
                finally:
                    if s is not None:
                        s.close()
                    gc.collect()
            log(f"   rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v))
        for row, label, name, _ in systems:
            kind = "qjam" if name == QJAM else "peer"
            if not self.installed.get(name, True):
                self.res.add(row, label, kind, status="not installed")
            elif label in failed:
                self.res.add(row, label, kind, status=failed[label])
            else:
                note = {JOBLIB: "loky starts its workers on the first call",
                        PPE: "workers start on the first submit, counted here",
                        MP: f"start method {__import__('multiprocessing').get_start_method()}"}.get(name, "")
                self.res.add(row, label, kind, times[label], note)
                if name == QJAM:
                    self.res.add(row, f"{label}, ready only", "qjam+", ready[label],
                                 "Cluster(...) returned: workers started and handshaken")

    def scale16_block(self) -> None:
        log("-- 16 workers")
        cfg = self.cfg
        entries: dict[str, dict[str, list[float]]] = {}
        makers: list[tuple[str, Callable[[], System]]] = [
            (f"{QJAM} local:16", lambda: Qjam(["local:16"], f"{QJAM} local:16")),
            (f"{MP}(16)", lambda: MPPool(16)),
            (f"{XN} x 16", lambda: Execnet(f"popen//python={sys.executable}", XN, 16)),
        ]
        for rep in range(cfg.repeat):
            for label, make in makers:
                if label.startswith(XN) and not self.installed[XN]:
                    continue
                s = None
                try:
                    t0 = time.perf_counter()
                    s = make()
                    t1 = time.perf_counter()
                    got = s.round_trip()
                    t2 = time.perf_counter()
                    s.round_trip()
                    t3 = time.perf_counter()
                    if (sum(got) if isinstance(got, list) else got) != 16:
                        raise RuntimeError(f"{label}: the round trip gave {got!r}")
                finally:
                    if s is not None:
                        s.close()
                    gc.collect()
                e = entries.setdefault(label, {"total": [], "ready": [], "call": [], "again": []})
                e["total"].append(t2 - t0)
                e["ready"].append(t1 - t0)
                e["call"].append(t2 - t1)
                e["again"].append(t3 - t2)
            log(f"   rep {rep + 1}: " + ", ".join(
                f"{k} ready {v['ready'][-1]:.2f} s + call {v['call'][-1] * 1e3:.0f} ms" for k, v in entries.items()))
        for label, e in entries.items():
            q = label.startswith(QJAM)
            self.res.add("scale_16", label, "qjam" if q else "peer", e["total"], "ready + first call")
            self.res.add("scale_16", f"{label}: ready", "qjam+" if q else "info", e["ready"])
            self.res.add("scale_16", f"{label}: first call", "qjam+" if q else "info", e["call"])
            self.res.add("scale_16", f"{label}: next call", "qjam+" if q else "info", e["again"])
        if not self.installed[XN]:
            self.res.add("scale_16", f"{XN} x 16", "peer", status="not installed")

    def paper_block(self) -> None:
        log("-- qjam's paper: sparse autoencoder (benchmarks/sparse_autoencoder.py)")
        rows = [f"paper_{n}" for n in (1000, 10000, 100000)]
        try:
            module = importlib.import_module("sparse_autoencoder")
            measure = module.measure
        except Exception as exc:
            for row in rows:
                self.res.add(row, QJAM, "qjam", status=f"not available: {type(exc).__name__}: {exc}"[:200])
            return
        kwargs: dict[str, Any] = {"sizes": self.cfg.paper_sizes}
        params = inspect.signature(measure).parameters
        if "evals" in params and self.cfg.quick:  # otherwise measure()'s own number of evaluations
            kwargs["evals"] = 3
        if "verbose" in params:
            kwargs["verbose"] = True
        try:
            out = measure(None, **kwargs)
        except Exception as exc:
            traceback.print_exc()
            for row in rows:
                self.res.add(row, QJAM, "qjam", status=f"not available: {type(exc).__name__}: {exc}"[:200])
            return
        self.res.extra["paper"] = {k: v for k, v in out.items() if k != "rows"}
        reported = out.get("qjam", {})
        for n, cells in out.get("rows", {}).items():
            row = f"paper_{int(n)}"
            if row not in self.res.rows:
                continue
            baseline = getattr(module, "ONE_PROCESS", "numpy")
            for name, st in cells.items():
                if name in (baseline, "numpy"):
                    kind, label, note = "ref", "one process, numpy (default threads)", "cost_and_grad in this process"
                elif name == getattr(module, "RAW_PIPES", None):
                    kind, label, note = "info", "raw pipes, 2 processes (the floor)", \
                        "slice_sums in 2 children fed bytes over pipes, no framework"
                elif name.endswith(("worker", "workers")):
                    kind = "qjam" if name == "2 workers" else "qjam+"
                    label, note = f"{QJAM} local, {name}", "one cluster.map per evaluation, BLAS 1 thread per worker"
                else:
                    kind, label, note = "info", name, "see benchmarks/sparse_autoencoder.py"
                self.res.add(row, label, kind, st["samples"], note)
            busy = (out.get("others_busy") or {}).get(n)
            slices = (out.get("slices") or {}).get(n)
            if busy is not None or slices:
                self.res.rows[row].append({
                    "system": "conditions", "kind": "info", "status": "",
                    "note": (f"{slices[0]} slices of {slices[1]} rows; " if slices else "")
                    + (f"CPU used by other programs meanwhile: {busy:.2f} cores" if busy is not None else "")})
            q = reported.get(n) or reported.get(str(n))
            if q:
                self.res.extra.setdefault("paper_qjam_2010", {})[row] = q
                self.res.rows[row].append({"system": "qjam (2010 report): 1 worker / 2 workers", "kind": "info",
                                           "note": f"{q[0]} s / {q[1]} s per evaluation", "status": ""})
        for row in rows:
            if not self.res.rows[row]:
                self.res.add(row, QJAM, "qjam", status="not measured (--quick)")

    def qjam2010_block(self) -> None:
        log("-- qjam 2010's Master.run: its autoencoder on local:2 (benchmarks/qjam2010_autoencoder.py)")
        rows = [f"qjam2010_{n}" for n in (1000, 10000, 100000)]
        try:
            module = importlib.import_module("qjam2010_autoencoder")
            out = module.measure(self.cfg.paper_sizes, 3 if self.cfg.quick else None, verbose=True)
        except Exception as exc:
            traceback.print_exc()
            for row in rows:
                self.res.add(row, QJAM, "qjam", status=f"not available: {type(exc).__name__}: {exc}"[:200])
            return
        self.res.extra["qjam2010_blas"] = out.get("blas", {})
        kinds = {module.ONE_PROCESS: ("ref", "cost_and_grad of all the patches in this process"),
                 module.SET: ("qjam", "one mapfunc call per worker on its half; BLAS threads: a core's share each"),
                 module.LEFT: ("qjam+", "the same, workers' BLAS threads left to numpy (as many as cores)")}
        for n, cells in out["rows"].items():
            row = f"qjam2010_{int(n)}"
            for name, st in cells.items():
                kind, note = kinds[name]
                self.res.add(row, name if kind != "qjam" else f"{QJAM} {name}", kind, st["samples"], note)
        for row in rows:
            if not self.res.rows[row]:
                self.res.add(row, QJAM, "qjam", status="not measured (--quick)")


# -- targets ------------------------------------------------------------------------------------------------
PEERS_ALL = [MP, PPE, IPP, DASK, XN, JOBLIB]
TARGETS: list[tuple[str, str, tuple]] = [
    # (row, text, (mode, references, factor)); modes: "ratio" qjam cost <= factor x the reference's cost
    # (reference = the cheapest of those listed), "abs" qjam <= factor in the row's unit,
    # "compute" qjam <= 1.2 x compute + 1 ms, "speedup" numpy time / qjam time >= factor.
    ("trivial", "<= 1.5x execnet popen", ("ratio", [XN], 1.5)),
    ("trivial", "faster than multiprocessing, ipyparallel, dask", ("ratio", [MP, IPP, DASK], 1.0)),
    ("params_local", "<= 2x raw pipe time", ("ratio", ["raw os.pipe echo, 2 children"], 2.0)),
    ("params_ssh", "<= 1.3x raw paramiko time", ("ratio", ["raw paramiko echo, 2 channels"], 1.3)),
    ("first_local", "faster than every peer (joblib included)", ("ratio", PEERS_ALL, 1.0)),
    ("first_ssh", ">= 0.8x raw paramiko, best cipher", ("ratio", ["raw paramiko, best cipher"], 1 / 0.8)),
    ("second_local", "<= 1.2x compute + 1 ms", ("compute",)),
    ("second_local_w", "<= 1.2x compute + 1 ms", ("compute",)),
    ("second_ssh", "<= 1.2x compute + 1 ms", ("compute",)),
    ("second_ssh_w", "<= 1.2x compute + 1 ms", ("compute",)),
    ("cold_local", "<= 2x execnet popen", ("ratio", [XN], 2.0)),
    ("cold_ssh", "no slower than execnet ssh", ("ratio", [XNSSH], 1.0)),
    ("scale_slices", "<= 50 us/slice", ("abs", [], 50.0)),
    ("scale_slices_cached", "<= 50 us/slice", ("abs", [], 50.0)),
    ("scale_16", "ready and answering <= 1 s", ("abs", [], 1.0)),
    ("paper_1000", ">= 1.0x one-process numpy (2 workers)", ("speedup", [], 1.0)),
    ("paper_10000", ">= 1.5x one-process numpy (2 workers)", ("speedup", [], 1.5)),
    ("paper_100000", ">= 1.7x one-process numpy (2 workers)", ("speedup", [], 1.7)),
    ("qjam2010_10000", "2 workers beat one process (>= 1.0x)", ("speedup", [], 1.0)),
    ("qjam2010_100000", "2 workers beat one process (>= 1.0x)", ("speedup", [], 1.0)),
]


def cost(value: float, higher_better: bool) -> float:
    """Time-like: lower is better (throughput turned into time per byte)."""
    return 1.0 / value if higher_better else value


def fmt_value(v: float, unit: str) -> str:
    if unit in ("MB/s",):
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_cell(cell: dict, unit: str) -> str:
    if "median" not in cell:
        return cell.get("status") or "-"
    return f"{fmt_value(cell['median'], unit)} ({fmt_value(cell['min'], unit)}-{fmt_value(cell['max'], unit)})"


def speed_words(time_ratio: float) -> str:
    """qjam's time / the other's time, in words."""
    if time_ratio <= 1:
        return f"{1 / time_ratio:.2f}x faster"
    return f"{time_ratio:.2f}x slower"


def find_ref(res: Results, row: str, names: list[str]) -> list[dict]:
    out = []
    for cell in res.rows[row]:
        if "median" in cell and any(cell["system"] == n or cell["system"].startswith(n) for n in names):
            if cell["kind"] in ("ref", "peer"):
                out.append(cell)
    return out


def evaluate(res: Results) -> list[dict]:
    """One summary line per target: qjam's figure, the ratio against the target and against the best peer."""
    lines = []
    for row, text, spec in TARGETS:
        if not res.rows[row]:
            continue
        _, title, unit, hb = ROWS[row]
        q = res.qjam(row)
        line: dict = {"row": row, "target": text, "unit": unit, "qjam": None, "measured": "", "vs_target": None,
                      "met": None, "best_peer": None, "vs_best_peer": None, "peer_ratio_text": ""}
        if q is None:
            status = next((c["status"] for c in res.rows[row] if c["kind"] == "qjam" and c["status"]), "no figure")
            line["measured"] = status
            lines.append(line)
            continue
        qv = q["median"]
        line["qjam"] = qv
        mode = spec[0]
        if mode == "ratio":
            refs = find_ref(res, row, spec[1])
            if refs:
                best = min(refs, key=lambda c: cost(c["median"], hb))
                r = cost(qv, hb) / cost(best["median"], hb)
                line["vs_target"] = r / spec[2]
                shown = qv / best["median"]
                if hb:
                    lim = 1 / spec[2]
                    line["measured"] = f"{shown:.2f}x {best['system']} (need >= {lim:.2f}x)"
                elif spec[2] == 1.0:
                    line["measured"] = f"{speed_words(r)} than {best['system']}"
                else:
                    line["measured"] = f"{shown:.2f}x {best['system']} (need <= {spec[2]:g}x)"
            else:
                line["measured"] = "reference not measured"
        elif mode == "abs":
            line["vs_target"] = qv / spec[2]
            line["measured"] = f"{fmt_value(qv, unit)} {unit} (need <= {spec[2]:g})"
        elif mode == "compute":
            comp = find_ref(res, row, ["pure compute"])
            if comp:
                allowed = 1.2 * comp[0]["median"] + 1.0
                line["vs_target"] = qv / allowed
                line["measured"] = f"{fmt_value(qv, 'ms')} ms vs allowed {allowed:.1f} ms " \
                                   f"(compute {comp[0]['median']:.1f} ms)"
        elif mode == "speedup":
            base = find_ref(res, row, ["one process"])
            if base:
                speedup = base[0]["median"] / qv
                line["vs_target"] = spec[2] / speedup
                line["measured"] = f"{speedup:.2f}x numpy (need >= {spec[2]:g}x)"
                one = next((c for c in res.rows[row] if c["system"] == "one process, 1 thread" and "median" in c),
                           None)
                if one is not None:  # a baseline that other programs on the machine slow down far less
                    line["measured"] += f"; {one['median'] / qv:.2f}x 1-thread numpy"
        if line["vs_target"] is not None:
            line["met"] = line["vs_target"] <= 1.0 if mode != "ratio" or spec[2] != 1.0 else line["vs_target"] < 1.0
        peers = [c for c in res.rows[row] if c["kind"] == "peer" and "median" in c]
        if peers:
            best = min(peers, key=lambda c: cost(c["median"], hb))
            line["best_peer"] = best["system"]
            line["vs_best_peer"] = cost(qv, hb) / cost(best["median"], hb)
            line["peer_ratio_text"] = f"{speed_words(line['vs_best_peer'])} than {best['system']} " \
                                      f"({fmt_value(best['median'], unit)} {unit})"
        lines.append(line)
    return lines


# -- output ------------------------------------------------------------------------------------------------
def detail_table(res: Results) -> str:
    out = []
    for row, cells in res.rows.items():
        if not cells:
            continue
        _, title, unit, hb = ROWS[row]
        out.append(f"{title} [{unit}, {'higher' if hb else 'lower'} is better]")
        q = res.qjam(row)
        width = max(len(c["system"]) for c in cells)
        order = {"qjam": 0, "qjam+": 1, "ref": 2, "peer": 3, "info": 4}
        for c in sorted(cells, key=lambda c: order[c["kind"]]):
            ratio = ""
            if q is not None and "median" in c and c is not q and c["kind"] in ("ref", "peer", "info") \
                    and c["median"] > 0:
                ratio = f"qjam {speed_words(cost(q['median'], hb) / cost(c['median'], hb))}"
            kind = {"qjam": "", "qjam+": "", "ref": "raw", "peer": "peer", "info": "info"}[c["kind"]]
            text = f"  {c['system']:<{width}}  {kind:<4}  {fmt_cell(c, unit):<28}  {ratio:<22}"
            if c.get("note"):
                text += f"  {c['note']}"
            out.append(text.rstrip())
        out.append("")
    return "\n".join(out)


def summary_table(lines: list[dict]) -> str:
    head = ("row", "qjam_nb", "target", "measured", "vs target", "vs best peer")
    body = []
    for ln in lines:
        q = "-" if ln["qjam"] is None else f"{fmt_value(ln['qjam'], ln['unit'])} {ln['unit']}"
        vt = "-" if ln["vs_target"] is None else \
            f"{'met' if ln['met'] else 'MISSED'} ({ln['vs_target']:.2f} of the limit)"
        body.append((ln["row"], q, ln["target"], ln["measured"], vt, ln["peer_ratio_text"] or "-"))
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *[fmt(r) for r in body]])


def plot(lines: list[dict], path: Path, meta: dict) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "not written: matplotlib is not installed (pip install -e '.[bench]')"
    shown = [ln for ln in lines if ln["vs_target"] is not None or ln["vs_best_peer"] is not None]
    if not shown:
        return "not written: nothing to plot"
    labels = [f"{ln['row']}: {ln['target']}" for ln in shown]
    y = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(shown) + 1.8))
    vt = [ln["vs_target"] or np.nan for ln in shown]
    vp = [ln["vs_best_peer"] or np.nan for ln in shown]
    colors = ["tab:green" if ln["met"] else "tab:red" for ln in shown]
    ax.barh(y - 0.2, vt, height=0.38, color=colors, label="qjam_nb / target's limit (green: met)")
    ax.barh(y + 0.2, vp, height=0.38, color="tab:blue", alpha=0.6, label="qjam_nb time / best peer's time")
    for ys, values in ((y - 0.2, vt), (y + 0.2, vp)):
        for yy, v in zip(ys, values, strict=True):
            if v == v:
                ax.text(v, yy, f" {v:.3g}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (time-like: < 1 is better for qjam_nb; throughput rows inverted)")
    ax.set_title(f"qjam_nb benchmark {meta['date']}, {meta['cpus']} CPUs, median of {meta['repeat']}"
                 + (" (QUICK)" if meta["quick"] else ""), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("qjam_nb", "paramiko", "ipyparallel", "distributed", "execnet", "joblib", "cloudpickle"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


# -- main ---------------------------------------------------------------------------------------------------
def parse_only(text: str | None) -> set[str]:
    if not text:
        return set(GROUPS)
    groups = set()
    for name in text.split(","):
        name = GROUP_ALIASES.get(name.strip(), name.strip())
        if name not in GROUPS:
            raise SystemExit(f"--only: unknown row {name!r}; rows are {', '.join(GROUPS)}")
        groups.add(name)
    return groups


def run(cfg: Config, groups: set[str], out_dir: Path) -> Results:
    import sshd  # tests/sshd.py

    res = Results(cfg)
    res.meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeat": cfg.repeat, "quick": cfg.quick,
                "rows": sorted(groups), "cpus": os.cpu_count(), "machine": platform.machine(),
                "versions": versions(), "dataset_bytes": cfg.data_bytes, "tiny_slices": cfg.tiny,
                "MB": MB, "load_average_at_start": os.getloadavg()}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qjam-bench-")))
        saved = {k: os.environ.get(k) for k in ("IPYTHONDIR", "MPLCONFIGDIR")}
        os.environ["IPYTHONDIR"] = str(tmp / "ipython")  # ipyparallel's profile and connection files
        os.environ["MPLCONFIGDIR"] = str(tmp / "mpl")

        @stack.callback
        def _restore() -> None:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        world = None
        if sshd.available() and groups & {"params", "dataset", "cold"}:
            world = stack.enter_context(SshWorld(tmp / "ssh"))
            log(f"private sshd on {world.world.sshd.address}:{world.world.sshd.port} "
                f"(pid {world.world.sshd.process.pid})")
        elif not sshd.available():
            log("no sshd here: the ssh rows say 'not available' (apt-get install openssh-server)")
        bench = Bench(cfg, groups, res, world)
        if groups & {"trivial", "params", "dataset", "scale"}:
            bench.local_block()
        if groups & {"params", "dataset"}:
            bench.ssh_block()
        bench.data = None
        gc.collect()
        if "cold" in groups:
            bench.cold_block()
        if "scale" in groups:
            bench.scale16_block()
        if "paper" in groups:
            bench.paper_block()
        if "qjam2010" in groups:
            bench.qjam2010_block()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=None, help="repetitions of every measurement (default 5, "
                        "2 with --quick; the scale row and execnet over ssh take at most 3)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repetitions: checks that everything runs (figures not comparable)")
    parser.add_argument("--only", metavar="ROWS", help=f"comma-separated rows to run: {', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"where run.json and run.png go "
                        f"(default {RESULTS_DIR})")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved run.json again "
                        "(measures nothing)")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        res = Results(Config(saved["meta"]["repeat"], saved["meta"]["quick"]))
        res.meta, res.extra = saved["meta"], saved.get("extra", {})
        res.rows.update(saved["rows"])
        print_tables(res, evaluate(res))
        return 0
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    groups = parse_only(args.only)
    cfg = Config(repeat, args.quick)

    main_pid = os.getpid()

    def terminate(signum: int, frame: Any) -> None:  # SIGTERM cleans up as Ctrl-C does
        if os.getpid() != main_pid:  # a forked pool worker inherited this handler: die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        res = run(cfg, groups, args.out)
    except KeyboardInterrupt:
        print("interrupted: every cluster, peer and the private sshd were stopped", file=sys.stderr)
        return 130
    res.meta["total_seconds"] = time.perf_counter() - started
    res.meta["load_average_at_end"] = os.getloadavg()
    lines = evaluate(res)
    print_tables(res, lines)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "run.json"
    json_path.write_text(json.dumps({"meta": res.meta, "rows": res.rows, "summary": lines, "extra": res.extra},
                                    indent=1, default=str) + "\n")
    print(f"wrote {json_path}")
    print(f"plot: {plot(lines, args.out / 'run.png', res.meta)}")
    return 0


def print_tables(res: Results, lines: list[dict]) -> None:
    cfg = res.cfg
    banner = (f"qjam_nb benchmark, {res.meta['date']}: {res.meta['cpus']} CPUs, Python {res.meta['versions']['python']}"
              f", median (min-max) of {cfg.repeat}{' -- QUICK: small sizes, not a measurement' if cfg.quick else ''}")
    start_load, end_load = res.meta["load_average_at_start"][0], res.meta["load_average_at_end"][0]
    banner += f"\nload average (1 min) {start_load:.2f} at the start, {end_load:.2f} at the end"
    if start_load > 0.5:
        banner += ": other processes were running, so expect noisy figures (BLAS-threaded numpy suffers most)"
    print("\n" + banner + "\n")
    print(detail_table(res))
    print(summary_table(lines))
    print(f"\n{res.meta['total_seconds']:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
