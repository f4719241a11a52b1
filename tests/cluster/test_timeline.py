"""The call timeline's records say exactly what the events said: every slice once, on the worker that ran it."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import pytest
from conftest import WITH_DASK, skip_in_memory

from qjam_nb import (
    CallFinished,
    CallStarted,
    ErrorEvent,
    RemoteError,
    SliceAssigned,
    SliceDone,
    SliceLost,
    SliceSent,
    SliceStarted,
)
from qjam_nb.cluster.timeline import CallRecorder, cache_map, cache_map_text, format_ranges
from qjam_nb.events import EventBus, SliceDropped, SliceTaken

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)

DATA = list(range(120))


def slow_sum(params, xs):
    import time

    time.sleep(0.01)
    return sum(xs) * params


slow_sum.__module__ = "__main__"  # ship it by value, as a notebook's function: ssh workers cannot import tests


def check_against_events(record, log) -> None:
    """Every slice exactly once with outcome done, on the worker its SliceDone named, with its numbers."""
    done_events = {e.index: e for e in log.of(SliceDone)}
    finished = log.of(CallFinished)[-1]
    done = record.done_slices()
    assert [r.index for r in done] == list(range(record.n_slices)) == sorted(done_events)
    for r in done:
        assert r.worker == done_events[r.index].worker
        assert r.compute == done_events[r.index].seconds
        assert r.assigned <= r.started <= r.done <= record.seconds
        assert r.compute <= r.done  # it ran after the call began, and its result came after it ran
        assert r.sent is None or r.assigned <= r.sent <= r.started
    assert (record.bytes_sent, record.slice_bytes_sent, record.slice_bytes_cached, record.ok) == (
        finished.bytes_sent, finished.slice_bytes_sent, finished.slice_bytes_cached, finished.ok)
    assert sum(r.nbytes_sent for r in record.slices) == finished.slice_bytes_sent
    assert sum(r.nbytes for r in record.slices if r.cached) == finished.slice_bytes_cached
    assert record.reduce_seconds == finished.reduce_seconds
    assert len(record.slices) == len(log.of(SliceAssigned))
    assert all(r.outcome is not None for r in record.slices)


def test_records_match_the_events_shipped_on_the_first_call_cached_on_the_second(make_cluster, record):
    cluster = make_cluster(["local:2"])
    log = record(cluster)
    assert cluster.last_call is None and cluster.calls == []
    assert cluster.map(slow_sum, 1, DATA, slice_size=8) == sum(DATA)
    first = cluster.last_call
    assert first.call == log.of(CallStarted)[0].call and first.n_slices == 15
    assert first.workers == tuple(cluster.worker_names)
    check_against_events(first, log)
    assert not any(r.cached for r in first.slices)
    sent = {e.index: e for e in log.of(SliceSent)}
    assert {r.index: (r.key, r.nbytes_sent) for r in first.slices} == {i: (e.key, e.nbytes) for i, e in sent.items()}
    assert first.totals()["shipped"] == 15 and first.totals()["bytes_saved"] == 0

    log.clear()
    assert cluster.map(slow_sum, 2, DATA, slice_size=8) == 2 * sum(DATA)
    second = cluster.last_call
    check_against_events(second, log)
    # Every slice came from the cache, but those the schedule moved to a worker idle first (an odd slice
    # stolen from the longer queue, or a copy): those were shipped there, and are cached there too now.
    taken = [r for r in second.slices if r.how]
    assert all(r.cached and r.nbytes_sent == 0 and r.sent is None for r in second.slices if not r.how)
    for r in taken:  # (cached there already if the first call ran a copy of it there)
        assert r.source != r.worker and (r.cached or (r.replicated and r.nbytes_sent > 0)), r
    assert second.slice_bytes_sent == sum(r.nbytes_sent for r in taken)
    assert second.totals()["cached"] == 15 - sum(1 for r in taken if r.outcome == "done" and r.replicated)
    # The cache held each slice where the first call ran it, so each ran there again (unless taken).
    moved = {r.index for r in taken}
    assert [(r.index, r.worker, r.key) for r in second.done_slices() if r.index not in moved] == [
        (r.index, r.worker, r.key) for r in first.done_slices() if r.index not in moved]
    assert cluster.calls == [first, second]
    assert first.params_hash != second.params_hash and len(second.params_hash) == 32
    assert second.moved() == [] and sorted(second.by_worker()) == sorted(cluster.worker_names)

    held = cache_map(second, cluster.workers)
    for w in cluster.workers:
        assert held[w.name] == sorted({r.index for r in second.slices if r.key in w.cache})
        reached = {r.index for call in (first, second) for r in call.slices if r.worker == w.name}
        assert {r.index for r in second.done_slices() if r.worker == w.name} <= set(held[w.name]) <= reached
    assert sorted({i for indexes in held.values() for i in indexes}) == list(range(15))
    text = cache_map_text(second, cluster.workers)
    for name, indexes in held.items():
        assert f"{name:<16} {format_ranges(indexes)}" in text


class KillAfter:
    """Observer: SIGKILLs ``worker``'s process when the ``n``-th slice of the call is done."""

    def __init__(self, n: int, worker) -> None:
        self.n, self.worker, self.seen, self.killed = n, worker, 0, None

    def __call__(self, event) -> None:
        self.seen += isinstance(event, SliceDone)
        if self.seen == self.n and self.killed is None:
            self.killed = self.worker.hello["pid"]
            os.kill(self.killed, signal.SIGKILL)


def test_a_worker_killed_mid_call_has_lost_records_and_its_slices_done_elsewhere(make_cluster, record, backend):
    skip_in_memory(backend, "SIGKILLs a worker's process")
    cluster = make_cluster(["local:3"])
    log = record(cluster)
    victim = cluster.workers[1]
    killer = KillAfter(8, victim)
    cluster.events.subscribe(killer)
    assert cluster.map(slow_sum, 1, DATA, slice_size=2) == sum(DATA)
    assert killer.killed is not None
    call = cluster.last_call
    check_against_events(call, log)
    lost_events = log.of(SliceLost)
    assert lost_events and {e.worker for e in lost_events} == {victim.name}
    slices = call.slices  # a fresh list each time: take it once
    lost = [r for r in slices if r.outcome == "lost"]
    assert sorted((r.index, r.worker) for r in lost) == sorted((e.index, e.worker) for e in lost_events)
    assert call.moved() == sorted(e.index for e in lost_events)
    for r in lost:
        assert r.done is None and r.ended is not None
        later = [x for x in slices if x.index == r.index and x is not r]
        assert [x.outcome for x in later] == ["done"] and later[0].worker != victim.name
        assert slices.index(later[0]) > slices.index(r)  # assigned again after it was lost
    assert call.totals()["lost"] == len(lost) and call.totals()["moved"] == len(lost)
    assert all(r.outcome == "done" for r in slices if r.worker != victim.name)


def test_a_failing_call_records_the_error_and_cancels_the_rest(make_cluster):
    cluster = make_cluster(["local:2"])

    def fails_on_5(params, xs):
        if xs[0] == 5:
            raise ValueError("five")
        return xs[0]

    with pytest.raises(RemoteError):
        cluster.map(fails_on_5, None, list(range(40)), slice_size=1)
    call = cluster.last_call
    assert call.ok is False and call.finished
    assert [r.index for r in call.slices if r.outcome == "error"] == [5]
    assert {r.outcome for r in call.slices} <= {"done", "error", "cancelled", "dropped"}
    assert "failed" in call.summary().splitlines()[0]


# -- the recorder alone, fed by hand --------------------------------------------------------------


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeWorker:
    name: str
    cache: dict = field(default_factory=dict)


def test_recorder_follows_a_slice_that_was_cached_then_needed_then_lost_then_done_elsewhere():
    clock = FakeClock()
    rec = CallRecorder(keep=2, clock=clock)
    rec(CallStarted(7, 2, ("a", "b"), "p"))
    clock.now += 1
    rec(SliceAssigned(7, 0, "a", True, "k0", 10))
    rec(SliceAssigned(7, 1, "a", False, "k1", 20))
    clock.now += 1
    rec(SliceSent(7, 1, "a", "k1", 25))
    rec(SliceSent(7, 0, "a", "k0", 12))  # the worker said NEED: it was not cached after all
    rec(SliceStarted(7, 0, "a"))
    clock.now += 1
    rec(SliceLost(7, 0, "a"))
    rec(SliceLost(7, 1, "a"))
    rec(SliceAssigned(7, 0, "b", False, "k0", 10))
    rec(SliceAssigned(7, 1, "b", False, "k1", 20))
    rec(SliceSent(7, 0, "b", "k0", 12))
    rec(SliceStarted(7, 0, "b"))
    rec(SliceDone(7, 0, "b", 0.25))
    rec(SliceDone(7, 0, "a", 9.0))  # a late result from a lost worker changes nothing
    rec(ErrorEvent("b", 7, 1, "boom"))
    clock.now += 1
    rec(CallFinished(7, 3.0, 100, 49, 0, False, 0.5))
    call = rec.last
    assert [(r.index, r.worker, r.outcome) for r in call.slices] == [
        (0, "a", "lost"), (1, "a", "lost"), (0, "b", "done"), (1, "b", "error")]
    first = call.slices[0]
    assert (first.cached, first.nbytes_sent, first.assigned, first.sent, first.started, first.ended) == (
        False, 12, 1.0, 2.0, 2.0, 3.0)
    assert call.slices[2].compute == 0.25 and call.slices[2].done == 3.0
    assert call.moved() == [0, 1] and [r.worker for r in call.done_slices()] == ["b"]
    assert (call.ok, call.seconds, call.reduce_seconds, call.params_hash) == (False, 3.0, 0.5, "p")
    rec(CallStarted(8, 0, ("a",)))
    rec(CallStarted(9, 0, ("a",)))
    assert [c.call for c in rec.calls] == [8, 9]  # keeps the last two
    rec(SliceAssigned(7, 0, "a", False))  # an old call's event: ignored
    assert rec.last.slices == []


def test_events_the_bus_holds_are_stamped_when_emitted_not_when_let_go():
    """The cluster holds a call's first events until its first messages are out. If the master
    then waits for a core (the workers it woke took both), the hold lasted a slice's run time;
    stamped at release, that slice showed as done 0.5 ms after the call began, for 5 ms of compute."""
    clock, bus, seen = FakeClock(), EventBus(), []
    rec = CallRecorder(clock=clock)
    bus.subscribe(rec)
    bus.subscribe(seen.append)  # an ordinary view: still gets them at release, in order
    bus.hold()
    bus.emit(CallStarted(1, 1, ("a",)))
    bus.emit(SliceAssigned(1, 0, "a", True))
    clock.now += 0.005  # the worker computes meanwhile; the master is off its core
    bus.release()
    assert [type(e) for e in seen] == [CallStarted, SliceAssigned]
    clock.now += 0.0005
    bus.emit(SliceDone(1, 0, "a", 0.005))
    bus.emit(CallFinished(1, 0.0055, 0, 0, 0, True))
    (r,) = rec.last.slices
    assert (r.assigned, r.done, r.compute) == (0.0, pytest.approx(0.0055), 0.005)
    assert len(seen) == 4


def test_the_recorder_forgets_old_calls_to_keep_its_records_bounded():
    rec = CallRecorder(keep=20, clock=FakeClock(), keep_records=10)
    for call in (1, 2, 3):
        rec(CallStarted(call, 4, ("a",)))
        for i in range(4):
            rec(SliceAssigned(call, i, "a", False))
    assert [c.call for c in rec.calls] == [2, 3]
    rec(CallStarted(4, 12, ("a",)))  # bigger than the bound on its own: only it is kept
    assert [c.call for c in rec.calls] == [4]


def test_unfinished_slices_are_cancelled_when_the_call_ends():
    rec = CallRecorder(clock=FakeClock())
    rec(CallStarted(1, 2, ("a",)))
    rec(SliceAssigned(1, 0, "a", False))
    rec(SliceAssigned(1, 1, "a", False))
    rec(SliceDone(1, 0, "a", 0.1))
    assert not rec.last.finished and rec.last.slices[1].outcome is None
    rec(CallFinished(1, 1.0, 0, 0, 0, False))
    assert [r.outcome for r in rec.last.slices] == ["done", "cancelled"]


def test_cache_map_lists_the_indexes_each_worker_holds():
    rec = CallRecorder(clock=FakeClock())
    rec(CallStarted(1, 4, ("a", "b")))
    for i, w in enumerate("abab"):
        rec(SliceAssigned(1, i, w, False, f"k{i}", 1))
    workers = [FakeWorker("a", {"k0": 1, "k2": 1, "other": 5}), FakeWorker("b", {"k1": 1}), FakeWorker("c")]
    assert cache_map(rec.last, workers) == {"a": [0, 2], "b": [1], "c": []}
    assert cache_map(None, workers) == {"a": [], "b": [], "c": []}
    assert "a                0, 2" in cache_map_text(rec.last, workers)
    assert cache_map_text(None, workers) == "cache map: no dataset in the last call"


def test_format_ranges():
    assert format_ranges([0, 1, 2, 3, 5, 7, 8]) == "0-3, 5, 7-8"
    assert format_ranges([14, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) == "0-12, 14"
    assert format_ranges([3]) == "3"
    assert format_ranges([]) == "none"


def test_a_call_of_many_slices_is_kept_as_columns_not_as_an_object_per_slice():
    import gc

    rec = CallRecorder(clock=FakeClock())
    gc.collect()
    before = len(gc.get_objects())
    rec(CallStarted(1, 20_000, ("a", "b")))
    for i in range(20_000):
        worker = "ab"[i % 2]
        rec(SliceAssigned(1, i, worker, False, i.to_bytes(16, "big"), 8))
        rec(SliceSent(1, i, worker, i.to_bytes(16, "big"), 9))
        rec(SliceDone(1, i, worker, 0.5))
    rec(CallFinished(1, 1.0, 0, 180_000, 0, True))
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    call = rec.last
    assert call.n_records == 20_000 and len(call.slice_keys()) == 20_000
    last = call.slices[-1]
    assert (last.index, last.worker, last.key, last.nbytes_sent, last.compute, last.outcome) == (
        19_999, "b", (19_999).to_bytes(16, "big"), 9, 0.5, "done")
    # No SliceStarted came (slices under 3 ms send none): started is when it must have begun.
    assert last.started == max(last.sent, last.done - 0.5)


def _a_call_of_events(n: int) -> list:
    """A call's events as the cluster emits them: some slices shipped, one lost and done elsewhere, one stolen,
    one copied (the copy dropped), one cut off."""
    out = [CallStarted(1, n, ("a", "b"), "p")]
    for i in range(n):
        worker = "ab"[i % 2]
        if i == 2:  # stolen from b's queue
            out.append(SliceTaken(1, i, worker, "stolen", "b"))
        out.append(SliceAssigned(1, i, worker, i % 3 == 0, i.to_bytes(16, "big"), 8))
        if i == 0:  # a copy on b, which loses
            out += [SliceTaken(1, i, "b", "speculative", "a"), SliceAssigned(1, i, "b", False, b"0" * 16, 8),
                    SliceSent(1, i, "b", b"0" * 16, 9)]
        if i % 3:
            out.append(SliceSent(1, i, worker, i.to_bytes(16, "big"), 9))
        if i == 1:
            out += [SliceStarted(1, i, worker), SliceLost(1, i, worker),
                    SliceAssigned(1, i, "a", False, i.to_bytes(16, "big"), 8)]
            worker = "a"
        if i != n - 1:
            out.append(SliceDone(1, i, worker, 0.5))
        if i == 0:
            out.append(SliceDropped(1, i, "b", worker))
    return out + [CallFinished(1, 9.0, 0, 0, 0, False, 0.25)]


def _seen(record) -> tuple:
    return (record.n_records, record.seconds, record.ok, [vars_of(r) for r in record.slices])


def vars_of(r) -> tuple:
    return tuple(getattr(r, name) for name in r.__slots__)


@pytest.mark.parametrize("n", [3, 50, 3000])  # 3000 slices: more events than the recorder keeps unfolded
def test_reading_a_record_while_its_call_runs_changes_nothing_it_says_in_the_end(n):
    events = _a_call_of_events(n)
    read_at_the_end = CallRecorder(clock=FakeClock())
    read_all_along = CallRecorder(clock=FakeClock())
    during = []
    for step, event in enumerate(events):
        for rec in (read_at_the_end, read_all_along):
            rec.clock.now += 0.5
            rec(event)
        if step % max(7, n // 10) == 0:
            during.append(_seen(read_all_along.last))
    assert _seen(read_at_the_end.last) == _seen(read_all_along.last)
    assert [r.outcome for r in read_at_the_end.last.slices][-1] == "cancelled"
    assert read_at_the_end.last.n_records == len([e for e in events if isinstance(e, SliceAssigned)])
    totals = read_at_the_end.last.totals()
    assert (totals["stolen"], totals["speculative"], totals["dropped"], totals["done"]) == (1, 1, 1, n - 1)
    # While it ran, the record said how long it had run so far, and grew.
    assert [d[1] for d in during] == sorted(d[1] for d in during) and during[-1][1] > during[0][1]
    assert during[-1][0] > during[0][0]


def test_a_record_read_from_another_thread_while_events_come_misses_none():
    import threading

    events = _a_call_of_events(20_000)
    rec = CallRecorder(clock=FakeClock())
    rec(events[0])
    stop = threading.Event()

    def read():
        while not stop.is_set():
            rec.last.slices  # noqa: B018  (folds whatever came so far)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for event in events[1:]:
            rec.clock.now += 0.5
            rec(event)
    finally:
        stop.set()
        reader.join()
    alone = CallRecorder(clock=FakeClock())
    for event in events:
        alone.clock.now += 0.5
        alone(event)
    assert _seen(rec.last) == _seen(alone.last)


def test_the_timeline_names_are_importable_from_timeline_and_live_in_one_module_each():
    """``qjam_nb.cluster.timeline`` only re-exports: each name has one home, the module of its one job."""
    import importlib

    from qjam_nb.cluster import timeline

    homes = {
        "qjam_nb.cluster.slicerows": ("SliceRecord", "DONE", "LOST", "CANCELLED", "ERROR", "DROPPED", "OUTCOMES",
                                      "TIMES"),
        "qjam_nb.cluster.callrecord": ("CallRecord",),
        "qjam_nb.cluster.recorder": ("CallRecorder", "KEEP_CALLS", "KEEP_RECORDS", "FOLD_EVERY", "KEEP_PENDING"),
        "qjam_nb.cluster.cachemap": ("cache_map", "cache_map_text"),
        "qjam_nb.cluster.params": ("params_hash",),
        "qjam_nb.formats": ("format_size", "format_ranges"),
    }
    for module, names in homes.items():
        home = importlib.import_module(module)
        for name in names:
            assert getattr(timeline, name) is getattr(home, name), f"timeline.{name} is not {module}.{name}"
    assert sorted(timeline.__all__) == sorted(name for names in homes.values() for name in names)


# -- a schedule that heals: stolen, copied, dropped and replicated slices, fed by hand ---------------


def _started(rec, call: int, n: int, workers=("a", "b")) -> None:
    rec(CallStarted(call, n, workers, "p"))


def test_a_stolen_slice_is_recorded_with_its_source_and_is_a_replica_when_it_was_shipped():
    clock = FakeClock()
    rec = CallRecorder(clock=clock)
    _started(rec, 1, 3)
    rec(SliceAssigned(1, 0, "a", True, "k0", 10))  # a caches all three; its window holds two
    rec(SliceAssigned(1, 1, "a", True, "k1", 10))
    clock.now += 1
    rec(SliceTaken(1, 2, "b", "stolen", "a"))  # b ran out of work: a's last queued slice, shipped to b
    rec(SliceAssigned(1, 2, "b", False, "k2", 10))
    rec(SliceSent(1, 2, "b", "k2", 12))
    rec(SliceDone(1, 0, "a", 0.5))
    clock.now += 1
    rec(SliceDone(1, 2, "b", 0.5))
    rec(SliceDone(1, 1, "a", 0.5))
    rec(CallFinished(1, 2.0, 12, 12, 20, True))
    call = rec.last
    slices = call.slices
    assert [(r.index, r.worker, r.how, r.source, r.replicated) for r in slices] == [
        (0, "a", None, None, False), (1, "a", None, None, False), (2, "b", "stolen", "a", True)]
    assert [r.outcome for r in slices] == ["done", "done", "done"]
    assert call.moved() == []  # taken from a queue, not moved after a death
    t = call.totals()
    assert (t["stolen"], t["speculative"], t["rebalanced"], t["replicated"], t["dropped"]) == (1, 0, 0, 1, 0)
    assert "1 stolen from a" in call.summary() and "1 now cached on two workers" in call.summary()


def test_a_stolen_slice_its_taker_cached_already_is_no_new_replica():
    rec = CallRecorder(clock=FakeClock())
    _started(rec, 1, 2)
    rec(SliceAssigned(1, 0, "a", True, "k0", 10))
    rec(SliceTaken(1, 1, "b", "stolen", "a"))
    rec(SliceAssigned(1, 1, "b", True, "k1", 10))
    rec(SliceDone(1, 0, "a", 0.5))
    rec(SliceDone(1, 1, "b", 0.5))
    rec(CallFinished(1, 1.0, 0, 0, 20, True))
    r = rec.last.slices[1]
    assert (r.how, r.source, r.cached, r.replicated) == ("stolen", "a", True, False)
    assert rec.last.totals()["replicated"] == 0


@pytest.mark.parametrize(("winner", "loser_started"), [
    ("copy", "before the drop"), ("original", "before the drop"), ("original", "after the drop"),
    ("original", "never")])
def test_a_speculative_copy_races_the_original_and_the_loser_is_dropped_where_the_winner_finished(
        winner, loser_started):
    clock = FakeClock()
    rec = CallRecorder(clock=clock)
    _started(rec, 3, 2)
    rec(SliceAssigned(3, 0, "a", True, "k0", 10))
    rec(SliceAssigned(3, 1, "b", True, "k1", 10))
    rec(SliceStarted(3, 0, "a"))
    rec(SliceStarted(3, 1, "b"))
    clock.now += 1
    rec(SliceDone(3, 1, "b", 1.0))
    clock.now += 1
    rec(SliceTaken(3, 0, "b", "speculative", "a"))  # a is slow with slice 0: b runs a copy
    rec(SliceAssigned(3, 0, "b", False, "k0", 10))
    rec(SliceSent(3, 0, "b", "k0", 12))
    copy_started = loser_started == "before the drop" or winner == "copy"
    if copy_started:
        rec(SliceStarted(3, 0, "b"))
    clock.now += 1
    won, lost = ("b", "a") if winner == "copy" else ("a", "b")
    rec(SliceDone(3, 0, won, 0.5))
    rec(SliceDropped(3, 0, lost, won))
    dropped_at = clock.now - 100.0
    clock.now += 1
    if loser_started == "after the drop" and winner == "original":
        rec(SliceStarted(3, 0, "b"))  # the dropped copy began anyway: its record stays closed
    rec(SliceDone(3, 0, lost, 9.0))  # a loser's result, should it come, changes nothing
    rec(CallFinished(3, 4.0, 12, 12, 20, True))
    call = rec.last
    by = {(r.index, r.worker): r for r in call.slices}
    copy, original, loser = by[0, "b"], by[0, "a"], by[0, lost]
    assert (copy.how, copy.source, copy.replicated) == ("speculative", "a", True)
    assert (original.how, original.source) == (None, None)
    assert by[0, won].outcome == "done" and by[0, won].done == dropped_at
    assert loser.outcome == "dropped" and loser.ended == dropped_at and loser.done is None
    assert loser.compute == 0.0
    if winner == "original" and loser_started != "before the drop":
        assert loser.started is None
    assert [(r.index, r.worker) for r in call.done_slices()] == [(0, won), (1, "b")]  # one record per slice
    assert call.moved() == []
    t = call.totals()
    assert (t["stolen"], t["speculative"], t["replicated"], t["dropped"], t["done"]) == (0, 1, 1, 1, 2)
    words = call.summary()
    assert ("1 copy (1 won)" if winner == "copy" else "1 copy (0 won)") in words
    assert "1 dropped" in words


def test_a_rebalanced_slice_is_recorded_as_such_and_is_a_replica():
    rec = CallRecorder(clock=FakeClock())
    _started(rec, 1, 2)
    rec(SliceAssigned(1, 0, "a", True, "k0", 10))
    rec(SliceTaken(1, 1, "b", "rebalanced", "a"))  # a caches it, but b (restarted) gets its share
    rec(SliceAssigned(1, 1, "b", False, "k1", 10))
    rec(SliceSent(1, 1, "b", "k1", 12))
    rec(SliceDone(1, 1, "b", 0.5))
    rec(SliceDone(1, 0, "a", 0.5))
    rec(CallFinished(1, 1.0, 12, 12, 10, True))
    r = rec.last.slices[1]
    assert (r.how, r.source, r.replicated, r.outcome) == ("rebalanced", "a", True, "done")
    t = rec.last.totals()
    assert (t["rebalanced"], t["replicated"], t["stolen"]) == (1, 1, 0)
    assert "1 rebalanced from a" in rec.last.summary()


def test_a_call_without_healing_says_nothing_of_it():
    rec = CallRecorder(clock=FakeClock())
    _started(rec, 1, 1)
    rec(SliceAssigned(1, 0, "a", True, "k0", 10))
    rec(SliceDone(1, 0, "a", 0.5))
    rec(CallFinished(1, 1.0, 0, 0, 10, True))
    words = rec.last.summary()
    assert not any(w in words for w in ("stolen", "copy", "copies", "dropped", "rebalanced", "two workers"))


def test_taken_and_dropped_records_survive_being_kept_as_columns():
    from qjam_nb.cluster.timeline import CallRecord, SliceRecord

    made = [SliceRecord(1, 0, "a", True, b"k" * 16, 10, assigned=0.0, started=0.1, ended=0.4, outcome="dropped"),
            SliceRecord(1, 0, "b", False, b"k" * 16, 10, 12, 0.2, 0.2, 0.2, 0.4, 0.4, 0.2, "done",
                        how="speculative", source="a"),
            SliceRecord(1, 1, "c", False, None, how="stolen", source="a")]
    call = CallRecord(1, 2, ("a", "b", "c"), 0.0, slices=made)
    for r in made:
        r.call = 1
    assert call.slices == made
    assert [r.replicated for r in call.slices] == [False, True, True]
