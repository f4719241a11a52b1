"""Samples and where they go: batches timed, medians, the ``Results`` of a run, and the run's data.

Rules: nothing here starts a process or prints a table; ``Results`` holds every cell measured (its samples
or why it has none), in the rows of ``rows.ROWS``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .rows import COLS, ROWS, Config


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
