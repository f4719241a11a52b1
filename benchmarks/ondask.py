"""The dask rows (issue 24): qjam_nb on a Dask cluster, next to plain Dask on the same cluster and
qjam_nb's own workers, in one run.

Three systems, 2 workers each, do the same work:

* ``qjam_nb on Dask``: ``Cluster(dask=client)`` on one ``LocalCluster(processes=True, n_workers=2,
  threads_per_worker=1, host="127.0.0.1", dashboard_address=None)``;
* plain Dask on that same cluster and client, written as a Dask user would map over cached slices:
  the slices ``client.scatter``ed once (``hash=True``, Dask's default), each call
  ``client.map(f, slice_futures, theta=params_future, pure=False)`` then ``client.gather``, the
  params ``client.scatter``ed each call (``hash=False``: a new vector every call, as in an optimiser);
* qjam_nb's own workers, ``Cluster(["local:2"])``.

Rows: a trivial call (``x + 1`` over 2 cached one-item slices), 1 MiB params (to each of 2 cached
one-number slices, 1 MiB back from each), the first call over a fresh 200 MiB float64 array in
``DATA_SLICES`` slices (slices shipped, then summed) and the same call again (cached), and
``cfg.dask_tiny`` (10,000) one-item slices (the first call and again, cached). Plain Dask is the reference:
each row's ratios are against it (the ``qjam_nb local:2`` cell says its own in its note).

Rules: the three systems take turns within each repetition, the order rotating, so a drift in
the machine's speed hits all of them; every answer is checked against the slices' results folded
here in slice order, bit-identical for qjam_nb's own workers (a slice that reached a Dask worker may
sit unaligned in memory, and numpy then sums it in another order: such answers are held to 1e-12
and counted in the cell's note). Everything started here (the LocalCluster, its client, both
qjam_nb clusters) is closed at the end of the group, also on an error, and the group checks that
no child process of this one is left.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .peers.base import DASK, QJAM, inc_slice, list_sum, theta_plus, total
from .peers.qjam import Q_CONCAT, Q_FIRST, Q_INC, Q_SUM, Q_THETA_PLUS
from .rows import COLS, DASK_PLAIN, MB, Config
from .samples import Results, batch, log, make_theta

ON_DASK = f"{QJAM} on Dask"
PLAIN = DASK_PLAIN
OWN = f"{QJAM} local:2"
DATA_SLICES = 8  # the 200 MiB array's slices: 4 a worker, so qjam_nb batches them
ROWS = ("dask_trivial", "dask_params", "dask_first", "dask_second", "dask_tiny", "dask_tiny_cached")
ROW_WORDS = {"warm": "warm-up call", "dask_trivial": "trivial call", "dask_params": "params call",
             "dask_first": "first call over the array", "dask_second": "second call over the array",
             "dask_tiny": "first call over the tiny slices", "dask_tiny_cached": "second call over the tiny slices"}


def fold(values: list) -> Any:
    """Results reduced in slice order, as qjam_nb's default reduce does (``a + b``, left to right)."""
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def slice_rows(cfg: Config) -> int:
    return cfg.data_bytes // 8 // COLS // DATA_SLICES


class QjamSystem:
    """qjam_nb (on Dask or on its own workers): ``cluster.map`` for each workload, the data cached by it."""

    def __init__(self, name: str, make: Callable[[], Any]) -> None:
        self.name = name
        self.cluster = make()
        self.trivial_data = [1, 2]
        self.param_data = np.array([[1.0], [2.0]])
        self.x: np.ndarray | None = None
        self.items: list[int] = []

    def trivial(self) -> list:
        return self.cluster.map(Q_INC, None, self.trivial_data, Q_CONCAT, slice_size=1)

    def params(self, theta: np.ndarray) -> np.ndarray:
        return self.cluster.map(Q_THETA_PLUS, theta, self.param_data, slice_size=1)

    def first(self, x: np.ndarray, rows: int) -> float:
        self.x, self.rows = x, rows
        return self.cluster.map(Q_SUM, None, x, slice_size=rows)

    def second(self) -> float:
        return self.cluster.map(Q_SUM, None, self.x, slice_size=self.rows)

    def tiny_first(self, items: list[int]) -> int:
        self.items = items
        return self.cluster.map(Q_FIRST, None, items, slice_size=1)

    def tiny_cached(self) -> int:
        return self.cluster.map(Q_FIRST, None, self.items, slice_size=1)

    def sent(self) -> int:
        """Slice bytes the last call shipped."""
        record = self.cluster.last_call
        return -1 if record is None else record.slice_bytes_sent

    def drop(self) -> None:
        self.x, self.items = None, []

    def close(self) -> None:
        self.cluster.shutdown()


class PlainDask:
    """Plain Dask on the same client: slices scattered once, one ``pure=False`` task per slice a call."""

    def __init__(self, client: Any) -> None:
        self.name = PLAIN
        self.client = client
        self.trivial_futures = client.scatter([[1], [2]])
        self.param_futures = client.scatter([np.array([[1.0]]), np.array([[2.0]])])
        self.futures: list = []

    def trivial(self) -> list:
        a, b = self.client.gather(self.client.map(inc_slice, self.trivial_futures, pure=False))
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        tf = self.client.scatter(theta, hash=False)
        return fold(self.client.gather(self.client.map(theta_plus, self.param_futures, theta=tf, pure=False)))

    def first(self, x: np.ndarray, rows: int) -> float:
        self.futures = self.client.scatter([x[i:i + rows] for i in range(0, len(x), rows)])
        return self.second()

    def second(self) -> float:
        return fold(self.client.gather(self.client.map(total, self.futures, pure=False)))

    def tiny_first(self, items: list[int]) -> int:
        self.futures = self.client.scatter([[i] for i in items])
        return self.tiny_cached()

    def tiny_cached(self) -> int:
        return sum(self.client.gather(self.client.map(list_sum, self.futures, pure=False)))

    def sent(self) -> int:
        return -1

    def drop(self) -> None:
        self.futures = []

    def close(self) -> None:
        self.futures = self.trivial_futures = self.param_futures = []


class DaskRows:
    """The dask group: starts the LocalCluster and the three systems, measures the rows, stops them."""

    def __init__(self, cfg: Config, res: Results, installed: dict[str, bool]) -> None:
        self.cfg = cfg
        self.res = res
        self.installed = installed
        self.theta = make_theta(cfg)
        self.inexact: dict[tuple[str, str], list[int]] = {}  # (system, row) -> [within 1e-12 only, checked]
        self.tiny = cfg.dask_tiny

    def run(self) -> None:
        if not self.installed.get(DASK, True):
            for row in ROWS:
                for name, kind in ((ON_DASK, "qjam"), (PLAIN, "peer")):
                    self.res.add(row, name, kind, status="not installed (pip install -e '.[dask]')")
            return
        import psutil

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        log(f"-- dask: {ON_DASK}, {PLAIN}, {OWN}")
        try:
            with contextlib.ExitStack() as stack:
                systems = self.start(stack)
                self.measure(systems)
        except Exception as exc:  # the group failing leaves the other groups to run
            traceback.print_exc()
            for row in ROWS:
                for name, kind in ((ON_DASK, "qjam"), (PLAIN, "peer"), (OWN, "qjam+")):
                    if not any(c["system"] == name for c in self.res.rows[row]):
                        self.res.add(row, name, kind, status=f"failed: {type(exc).__name__}: {exc}"[:200])
        gc.collect()
        left = started_since(before)
        deadline = time.monotonic() + 10  # LocalCluster's nannies may take a moment to reap their workers
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = started_since(before)
        self.res.extra["dask_left_processes"] = left
        if left:
            log(f"   WARNING: {len(left)} child processes of the dask group are still running: "
                f"{self.res.extra['dask_left_processes']}")

    def start(self, stack: contextlib.ExitStack) -> list:
        from dask.distributed import Client, LocalCluster

        from qjam_nb import Cluster

        t0 = time.perf_counter()
        # Its scheduler's HTTP server (on 127.0.0.1) takes another port when another cluster holds 8787: not news.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="Port 8787 is already in use", category=UserWarning)
        cluster = stack.enter_context(LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
            silence_logs=logging.CRITICAL))  # (a worker's heartbeat cut by the shutdown is logged as an error)
        client = stack.enter_context(Client(cluster))
        client.wait_for_workers(2, timeout=120)
        log(f"   LocalCluster ready in {time.perf_counter() - t0:.1f} s")
        systems: list = []
        for make in (lambda: QjamSystem(ON_DASK, lambda: Cluster(dask=client, echo=False, progress=False)),
                     lambda: PlainDask(client),
                     lambda: QjamSystem(OWN, lambda: Cluster(["local:2"], echo=False, progress=False))):
            s = make()
            stack.callback(s.close)  # (closed before the client and the LocalCluster, in reverse)
            systems.append(s)
        for s in systems:  # not timed: the workers import numpy, see each function once
            self.check(s, "warm", s.trivial(), [2, 3])
            self.check(s, "warm", s.params(self.theta), self.params_expected())
            warm = np.arange(2.0 * COLS).reshape(2, COLS)
            warm.setflags(write=False)
            self.check(s, "warm", s.first(warm, 1), fold([float(warm[0].sum()), float(warm[1].sum())]))
            s.drop()
        log(f"   systems ready and warm in {time.perf_counter() - t0:.1f} s")
        return systems

    def params_expected(self) -> np.ndarray:
        return fold([self.theta + 1.0, self.theta + 2.0])

    def check(self, s: Any, row: str, got: Any, expect: Any) -> None:
        """qjam_nb's own workers: bit-identical; the Dask systems: bit-identical or within 1e-12 (counted)."""
        tally = self.inexact.setdefault((s.name, row), [0, 0])
        what = ROW_WORDS[row]
        tally[1] += 1
        same = np.array_equal(got, expect) if isinstance(expect, np.ndarray) else got == expect
        if same:
            return
        close = isinstance(expect, (float, np.ndarray)) and np.allclose(got, expect, rtol=1e-12, atol=0)
        if s.name == OWN or not close:
            raise RuntimeError(f"{s.name}, {what}: gave {got!r}, not {expect!r}"
                               + (" (must be bit-identical)" if s.name == OWN else ""))
        tally[0] += 1

    def measure(self, systems: list) -> None:
        cfg = self.cfg
        samples: dict[str, dict[str, list[float]]] = {row: {s.name: [] for s in systems} for row in ROWS}
        notes: dict[str, dict[str, str]] = {row: {} for row in ROWS}
        theta, p_expect = self.theta, self.params_expected()
        for rep in range(cfg.repeat):
            for s in rotate(systems, rep):
                self.check(s, "dask_trivial", s.trivial(), [2, 3])
                samples["dask_trivial"][s.name].append(batch(s.trivial, cfg.batch_seconds) * 1e3)
                self.check(s, "dask_params", s.params(theta), p_expect)
                samples["dask_params"][s.name].append(batch(lambda s=s: s.params(theta), cfg.batch_seconds) * 1e3)
            log(f"   trivial/params rep {rep + 1}/{cfg.repeat}: " + ", ".join(
                f"{s.name} {samples['dask_trivial'][s.name][-1]:.2f}/{samples['dask_params'][s.name][-1]:.2f} ms"
                for s in systems))
        rows = slice_rows(cfg)
        base = np.random.default_rng(24).random((rows * DATA_SLICES, COLS))
        nbytes = base.nbytes
        sent: dict[str, list[int]] = {s.name: [] for s in systems}
        for rep in range(cfg.repeat):
            x = base + float(rep + 1)  # new content, so new slice keys, every repetition
            x.setflags(write=False)
            expect = fold([float(x[i:i + rows].sum()) for i in range(0, len(x), rows)])
            for s in rotate(systems, rep):
                t0 = time.perf_counter()
                got = s.first(x, rows)
                samples["dask_first"][s.name].append(nbytes / (time.perf_counter() - t0) / MB)
                self.check(s, "dask_first", got, expect)
                calls = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    got = s.second()
                    calls.append(time.perf_counter() - t0)
                    self.check(s, "dask_second", got, expect)
                sent[s.name].append(s.sent())
                samples["dask_second"][s.name].append(statistics.median(calls) * 1e3)
                s.drop()
            del x
            gc.collect()
            log(f"   200 MiB rep {rep + 1}/{cfg.repeat}: " + ", ".join(
                f"{s.name} {samples['dask_first'][s.name][-1]:.0f} MB/s, {samples['dask_second'][s.name][-1]:.1f} ms"
                for s in systems))
        del base
        for rep in range(cfg.heavy_repeat):
            items = list(range(rep * self.tiny, (rep + 1) * self.tiny))
            expect = sum(items)
            for s in rotate(systems, rep):
                t0 = time.perf_counter()
                got = s.tiny_first(items)
                samples["dask_tiny"][s.name].append((time.perf_counter() - t0) / self.tiny * 1e6)
                self.check(s, "dask_tiny", got, expect)
                t0 = time.perf_counter()
                got = s.tiny_cached()
                samples["dask_tiny_cached"][s.name].append((time.perf_counter() - t0) / self.tiny * 1e6)
                self.check(s, "dask_tiny_cached", got, expect)
                s.drop()
            log(f"   {self.tiny:,} slices rep {rep + 1}/{cfg.heavy_repeat}: " + ", ".join(
                f"{s.name} {samples['dask_tiny'][s.name][-1]:.0f}/{samples['dask_tiny_cached'][s.name][-1]:.0f} us"
                for s in systems))
        on_dask_sent = sent[ON_DASK]
        notes["dask_second"][ON_DASK] = ("slices cached on the Dask workers: the second calls shipped "
                                         f"{max(on_dask_sent)} slice bytes" if min(on_dask_sent) >= 0 else "")
        notes["dask_second"][PLAIN] = "client.map over the futures scattered by the first call"
        notes["dask_first"][PLAIN] = f"client.scatter of the {DATA_SLICES} slices, then client.map"
        notes["dask_tiny"][PLAIN] = "client.scatter of the slices, then client.map: one task per slice"
        notes["dask_tiny_cached"][PLAIN] = "client.map over the futures scattered by the first call"
        notes["dask_params"][PLAIN] = "theta client.scatter'ed each call (hash=False), then client.map"
        self.record(samples, notes)

    def record(self, samples: dict[str, dict[str, list[float]]], notes: dict[str, dict[str, str]]) -> None:
        from .rows import ROWS as ALL_ROWS

        for row in ROWS:
            hb = ALL_ROWS[row][3]
            plain = statistics.median(samples[row][PLAIN])
            for name, kind in ((ON_DASK, "qjam"), (PLAIN, "peer"), (OWN, "qjam+")):
                note = notes[row].get(name, "")
                if name == OWN:  # the detail table gives the ratios of the "qjam" cell only
                    mine = statistics.median(samples[row][name])
                    r = (plain / mine) if hb else (mine / plain)
                    note = (f"{1 / r:.2f}x faster than plain Dask" if r <= 1 else f"{r:.2f}x slower than plain Dask") \
                        + (f"; {note}" if note else "")
                bad, n = self.inexact.get((name, row), (0, 0))
                if bad:  # (qjam_nb's own workers: always bit-identical, or the group stops)
                    note += ("; " if note else "") + f"{bad} of {n} answers not bit-identical (within 1e-12)"
                self.res.add(row, name, kind, samples[row][name], note)


def started_since(before: set[int]) -> list[tuple[int, str]]:
    """This process's children still running that were not there ``before``: (pid, command line).
    Not multiprocessing's resource tracker, which Dask's spawned workers start and which lives as long
    as this process."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in before:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "multiprocessing.resource_tracker" not in cmd:
            out.append((p.pid, cmd[:200]))
    return out


def rotate(systems: list, rep: int) -> list:
    """The systems in turn, starting one later each repetition."""
    k = rep % len(systems)
    return systems[k:] + systems[:k]
