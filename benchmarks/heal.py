"""The heal rows (issue 23): one of 3 workers slowed 2x, 5x, 10x on cached data, qjam_nb against the
ideal and against dask.distributed (which steals work) on the same workload.

The workload: ``hetero_slices`` slices of ``hetero_rows`` x 1024 float64 each; a slice's work is
``time.sleep(hetero_work)`` then its sum (3 workers share 2 cores here, so the work is sleep, not
compute), the sums reduced in slice order. "Slowed f x": the last worker takes f times as long a slice
(qjam_nb: ``chaos.slow(worker, (f - 1) * work)``, a sleep before each slice inside its time; dask: the
task sleeps ``f * work`` on that worker). The ideal is the sum of the work over the sum of the speeds,
``n * work / (2 + 1/f)``: no overhead, perfect balance.

Rules: each repetition has fresh data (new slice keys, so no replica of an earlier repetition helps),
loaded on the uniform cluster (qjam_nb: an untimed call ships and caches it; dask: scattered), then
timed once uniform ("no worker slowed"); then the last worker is slowed: the first call is timed (it
must heal within the call), then ``hetero_steady`` calls whose median is the steady state (placed by
what the first call learnt). qjam_nb's answers must be bit-identical to the slices' sums folded here.
qjam_nb runs ``heavy_repeat`` repetitions, dask one with 2 steady calls (its calls are the slow ones:
the group stays near a minute).
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable

import numpy as np

from .peers.base import DASK, QJAM, System
from .peers.dask_distributed import Dask
from .peers.qjam import Qjam
from .rows import COLS, HETERO_FACTORS, IDEAL, Config
from .samples import Results, log

WORKERS = 3
STEAL_EVERY = "100ms"  # dask's work-stealing interval in the info cell (its default: 1 s)


def ideal(cfg: Config, factor: float) -> float:
    """Seconds a call needs with no overhead at all: the work over the speeds (two at 1, one at 1/f)."""
    return cfg.hetero_slices * cfg.hetero_work / (WORKERS - 1 + 1 / factor)


def fresh(cfg: Config, factor: int, rep: int) -> np.ndarray:
    x = np.random.default_rng(1000 * factor + rep).random((cfg.hetero_slices * cfg.hetero_rows, COLS))
    x.setflags(write=False)
    return x


def expected(x: np.ndarray, rows: int) -> float:
    """The slices' sums folded in slice order, as both systems reduce them."""
    out = 0.0
    for i in range(0, len(x), rows):
        out = out + float(x[i:i + rows].sum())
    return out


def spread(counts: dict[str, int], slowed: str) -> str:
    """Slices per worker, the slowed one last: "21/22/17"."""
    others = sorted(w for w in counts if w != slowed)
    return "/".join(str(counts.get(w, 0)) for w in [*others, slowed])


class Heal:
    """The heal rows for qjam_nb and dask (default, and stealing every 100 ms as info), the ideal beside."""

    def __init__(self, cfg: Config, res: Results, installed: dict[str, bool]) -> None:
        self.cfg = cfg
        self.res = res
        self.installed = installed
        self.inexact: dict[str, int] = {}  # peer -> calls of this factor whose sum differed in the last bits
        self.calls: dict[str, int] = {}  # ... and calls of this factor

    def rows(self) -> list[str]:
        return [f"hetero_{f}x{when}" for f in HETERO_FACTORS for when in ("", "_first")]

    def run(self) -> None:
        cfg = self.cfg
        for f in HETERO_FACTORS:
            note = (f"{cfg.hetero_slices} x {cfg.hetero_work * 1e3:.0f} ms / (2 + 1/{f}): two workers at speed 1, "
                    f"one at 1/{f}")
            for row in (f"hetero_{f}x", f"hetero_{f}x_first"):
                self.res.add(row, IDEAL, "ref", [ideal(cfg, f)], note)
        systems: list[tuple[str, str, str, Callable[[], System]]] = [
            (QJAM, f"{QJAM} local:{WORKERS}", "qjam", lambda: Qjam([f"local:{WORKERS}"], f"{QJAM} local:{WORKERS}")),
            (DASK, DASK, "peer", lambda: Dask(WORKERS)),
            # dask's stealing looks every second by default, once or twice a call here: tuned, as info
            (DASK, f"{DASK}, work stealing every {STEAL_EVERY}", "info",
             lambda: Dask(WORKERS, steal_every=STEAL_EVERY)),
        ]
        for name, label, kind, make in systems:
            if not self.installed.get(name, True):
                for row in self.rows():
                    self.res.add(row, label, kind, status="not installed")
                continue
            log(f"-- heal: {label}, {WORKERS} workers")
            s = None
            try:
                s = make()
                self.system(s, kind)
            except Exception as exc:  # one system failing leaves the others to run
                traceback.print_exc()
                for row in self.rows():
                    if not any(c["system"] == label for c in self.res.rows[row]):
                        self.res.add(row, label, kind, status=f"failed: {type(exc).__name__}: {exc}"[:200])
            finally:
                if s is not None:
                    s.hetero_unload()
                    s.close()
                gc.collect()

    def call(self, s: System, expect: float, what: str) -> tuple[float, dict[str, int], dict[str, int]]:
        """One timed call, its answer checked: qjam_nb's bit-identical to the sums folded here, a peer's
        to 1e-12 (a slice moved between dask's workers may arrive unaligned in memory, and numpy sums
        an unaligned array in another order: the last bit can differ; such calls are counted)."""
        t0 = time.perf_counter()
        value, counts, moves = s.hetero(self.cfg.hetero_work)
        seconds = time.perf_counter() - t0
        self.calls[s.name] = self.calls.get(s.name, 0) + 1
        if value != expect:
            if s.kind == "qjam" or not np.isclose(value, expect, rtol=1e-12, atol=0):
                raise RuntimeError(f"{s.name}, {what}: the sum was {value!r}, not {expect!r}"
                                   + (" (must be bit-identical)" if s.kind == "qjam" else ""))
            self.inexact[s.name] = self.inexact.get(s.name, 0) + 1
        return seconds, counts, moves

    def system(self, s: System, kind: str) -> None:
        cfg = self.cfg
        work, rows = cfg.hetero_work, cfg.hetero_rows
        detail = self.res.extra.setdefault("heal", {}).setdefault(s.name, {})
        for f in HETERO_FACTORS:
            first, steady, uniform = [], [], []
            first_spread, steady_spread, first_moves, steady_moves = [], [], [], []
            # dask's calls are the slow ones: one repetition, 2 steady calls (the group stays near a minute)
            reps, n_steady = (cfg.heavy_repeat, cfg.hetero_steady) if kind == "qjam" else (1, 2)
            self.inexact[s.name] = self.calls[s.name] = 0
            for rep in range(reps):
                x = fresh(cfg, f, rep)
                expect = expected(x, rows)
                s.hetero_load(x, rows)
                slowed = s.hetero_slow(1, work)  # no one slowed: the data goes out and is cached evenly
                if kind == "qjam":  # (dask's scatter has placed the slices already)
                    self.call(s, expect, "loading call")
                uniform.append(self.call(s, expect, "uniform call")[0])
                s.hetero_slow(f, work)
                secs, counts, moves = self.call(s, expect, f"first call slowed {f}x")
                first.append(secs)
                first_spread.append(spread(counts, slowed))
                first_moves.append(moves)
                calls = []
                for i in range(n_steady):
                    secs, counts, moves = self.call(s, expect, f"call {i + 2} slowed {f}x")
                    calls.append(secs)
                steady.append(statistics.median(calls))
                steady_spread.append(spread(counts, slowed))
                steady_moves.append(moves)
                s.hetero_slow(1, work)
                s.hetero_unload()
                del x
                log(f"   {f}x rep {rep + 1}/{reps}: uniform {uniform[-1]:.3f} s; first {first[-1]:.3f} s "
                    f"({first_spread[-1]}{fmt_moves(first_moves[-1])}); steady {steady[-1]:.3f} s "
                    f"({steady_spread[-1]}{fmt_moves(steady_moves[-1])}); ideal {ideal(cfg, f):.3f} s")
            detail[f"{f}x"] = {"uniform": uniform, "first": first, "steady": steady, "first_spread": first_spread,
                               "steady_spread": steady_spread, "first_moves": first_moves,
                               "steady_moves": steady_moves}
            who = "slices per worker (slowed one last), each repetition: "
            uni = "" if kind == "qjam" else f"; no worker slowed: {statistics.median(uniform):.3f} s" + (
                f"; {self.inexact[s.name]} of {self.calls[s.name]} calls not bit-identical (within 1e-12)"
                if self.inexact[s.name] else "; bit-identical")
            self.res.add(f"hetero_{f}x_first", s.name, kind, first,
                         who + "; ".join(a + fmt_moves(m) for a, m in zip(first_spread, first_moves, strict=True))
                         + uni)
            self.res.add(f"hetero_{f}x", s.name, kind, steady,
                         f"median of {n_steady} calls; "
                         + who.replace("each repetition", "the last call of each")
                         + "; ".join(a + fmt_moves(m) for a, m in zip(steady_spread, steady_moves, strict=True))
                         + uni)
            if kind == "qjam":
                note = f"the same call on the uniform cluster (its ideal: {ideal(cfg, 1):.3f} s)"
                for row in (f"hetero_{f}x", f"hetero_{f}x_first"):
                    self.res.add(row, f"{s.name}, no worker slowed", "qjam+", uniform, note)


def fmt_moves(moves: dict[str, int]) -> str:
    """" (stolen 5, speculative 1)" from qjam_nb's SliceTaken counts; "" when none moved or none counted."""
    shown = [f"{how} {n}" for how, n in sorted(moves.items()) if n]
    return f" ({', '.join(shown)})" if shown else ""
