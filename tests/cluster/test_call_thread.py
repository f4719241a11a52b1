"""A call runs on one thread, and its observers are called there (design §2, "One thread per call").

The future a notebook will keep (a call on a background thread) depends on it: every event of the call,
and every report the executor makes to the face, comes on the thread that runs the call, never on a
reader or writer thread of the executor's, so observers need no locks.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import WITH_DASK

from qjam_nb import SliceDone

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)


def adding_one():
    """The mapfunc, made inside a test so that it travels by value to ssh hosts (this module is not there)."""
    def add_one(params, xs):
        return sum(x + 1 for x in xs)
    return add_one


def test_a_call_on_a_background_thread_emits_every_event_on_that_thread(cluster2):
    seen: list[tuple[str, int]] = []
    unsubscribe = cluster2.events.subscribe(lambda e: seen.append((type(e).__name__, threading.get_ident())))
    caller: dict[str, int] = {}

    def call():
        caller["thread"] = threading.get_ident()
        return cluster2.map(adding_one(), None, list(range(40)), slice_size=3)

    try:
        with ThreadPoolExecutor(1) as pool:
            value = pool.submit(call).result(timeout=120)
    finally:
        unsubscribe()
    assert value == sum(range(1, 41))
    kinds = {kind for kind, _ in seen}
    assert {"CallStarted", "SliceAssigned", "SliceDone", "CallFinished"} <= kinds
    assert {thread for _, thread in seen} == {caller["thread"]} != {threading.get_ident()}


def test_the_notebook_thread_reads_status_while_a_call_runs_elsewhere(cluster2):
    """While a background call runs, the caller's thread may read what observers folded (not call map)."""
    done = threading.Event()
    gate = threading.Event()

    def held(event):
        if isinstance(event, SliceDone) and not gate.is_set():
            gate.set()
            done.wait(30)  # the call waits in its observer while this thread looks

    unsubscribe = cluster2.events.subscribe(held)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(cluster2.map, adding_one(), None, list(range(12)), slice_size=2)
            assert gate.wait(60)
            busy = [w for w in cluster2.workers if w.state == "busy"]
            assert busy and not future.done()
            done.set()
            assert future.result(timeout=60) == sum(range(1, 13))
    finally:
        done.set()
        unsubscribe()
    assert all(w.state == "idle" for w in cluster2.workers)
