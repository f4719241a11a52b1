"""Slices stay cached on the workers: shown by the events, never by timing."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from arrays import page_aligned
from conftest import WITH_DASK

from qjam_nb import CacheChanged, CallFinished, DataSet, SliceAssigned, SliceSent

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)

ROWS, COLS = 3200, 8192  # float64: 200 MiB


def column_sums():
    """A mapfunc made inside a function, so cloudpickle ships it by value, as from a notebook cell.

    (A function at the top of this file would travel by reference, and the
    workers would import this test module to find it.)
    """

    def mapfunc(params, xs):
        return xs.sum(axis=0)

    return mapfunc


def expected_column_sums(X: np.ndarray, ds: DataSet) -> np.ndarray:
    """What the cluster must return, bit for bit: per-slice sums added in slice order."""
    total = None
    for i in range(len(ds)):
        start, stop = ds.bounds(i)
        part = X[start:stop].sum(axis=0)
        total = part if total is None else total + part
    return total


def last_cache_event(log) -> dict[str, tuple[int, int]]:
    out = {}
    for e in log.of(CacheChanged):
        out[e.worker] = (e.n_slices, e.nbytes)
    return out


def test_second_map_sends_no_slice_bytes_and_a_change_resends_only_its_slice(make_cluster, record):
    cluster = make_cluster(["local:2"])
    log = record(cluster)
    X = np.random.default_rng(0).random((ROWS, COLS))
    assert X.nbytes == 200 * 2**20
    ds = DataSet(X)
    n = len(ds)
    assert n > 2 * 4  # more slices than the two workers' windows: scheduling really happens
    keys = [ds.key(i) for i in range(n)]
    try:
        # 1. The first map ships every slice, once.
        got = cluster.map(column_sums(), None, ds)
        assert got.tobytes() == expected_column_sums(X, ds).tobytes()
        sent = log.of(SliceSent)
        assert sorted(e.index for e in sent) == list(range(n))
        assert all(e.key == keys[e.index] for e in sent)
        assert sum(e.nbytes for e in sent) >= X.nbytes
        (first,) = log.of(CallFinished)
        assert first.slice_bytes_sent == sum(e.nbytes for e in sent)
        assert first.slice_bytes_cached == 0
        holder = {e.index: e.worker for e in sent}
        assert set(holder.values()) == set(cluster.worker_names)  # both workers got slices

        # 2. The second map over the same array sends no slice bytes at all.
        log.clear()
        again = cluster.map(column_sums(), None, X)  # a plain array: same default slicing, same keys
        assert again.tobytes() == got.tobytes()
        assert log.of(SliceSent) == []
        (second,) = log.of(CallFinished)
        assert second.slice_bytes_sent == 0
        assert second.slice_bytes_cached == X.nbytes
        assert second.bytes_sent < 64 * 1024  # the function, params and task notes only
        assigned = log.of(SliceAssigned)
        assert len(assigned) == n and all(e.cached for e in assigned)
        assert {e.index: e.worker for e in assigned} == holder  # each slice ran where it was cached

        # 3. One changed element re-sends only the slice that contains it.
        row = 1234
        X[row, 5] += 1.0
        changed = row // ds.slice_size
        log.clear()
        after = cluster.map(column_sums(), None, X)
        (resent,) = log.of(SliceSent)
        assert resent.index == changed
        assert resent.key == ds.key(changed) != keys[changed]
        start, stop = ds.bounds(changed)
        assert X[start:stop].nbytes <= resent.nbytes < 2 * X[start:stop].nbytes
        (third,) = log.of(CallFinished)
        assert third.slice_bytes_sent == resent.nbytes
        assert third.slice_bytes_cached == X.nbytes - X[start:stop].nbytes
        assert after.tobytes() == expected_column_sums(X, ds).tobytes()
        assert after[5] != got[5] and np.array_equal(np.delete(after, 5), np.delete(got, 5))
    finally:
        cluster.shutdown()
        del X, ds
        gc.collect()


def test_equal_arrays_share_cache_entries(cluster2, events):
    a = np.random.default_rng(1).standard_normal((400, 1024))  # 3.1 MiB
    b = a.copy()
    assert not np.shares_memory(a, b)
    ds_a, ds_b = DataSet(a, 25), DataSet(b, 25)
    assert [ds_a.key(i) for i in range(len(ds_a))] == [ds_b.key(i) for i in range(len(ds_b))]

    first = cluster2.map(column_sums(), None, ds_a)
    assert len(events.of(SliceSent)) == len(ds_a) == 16
    events.clear()
    second = cluster2.map(column_sums(), None, ds_b)
    assert events.of(SliceSent) == []
    assert second.tobytes() == first.tobytes()

    # Equal values in another dtype are other data: every slice travels.
    events.clear()
    cluster2.map(column_sums(), None, DataSet(a.astype(np.float32), 25))
    assert len(events.of(SliceSent)) == 16


def test_other_slicing_of_the_same_array_is_other_slices(cluster2, events):
    a = np.arange(6000.0).reshape(600, 10)
    cluster2.map(column_sums(), None, a, slice_size=100)
    assert len(events.of(SliceSent)) == 6
    events.clear()
    cluster2.map(column_sums(), None, a, slice_size=200)
    assert len(events.of(SliceSent)) == 3
    events.clear()
    cluster2.map(column_sums(), None, a, slice_size=100)
    assert events.of(SliceSent) == []


def test_lists_are_cached_too(cluster2, events):
    data = [f"line {i}" for i in range(200)]
    assert cluster2.map(lambda p, xs: len(xs), None, data, slice_size=20) == 200
    assert len(events.of(SliceSent)) == 10
    events.clear()
    assert cluster2.map(lambda p, xs: sum(len(x) for x in xs), None, list(data), slice_size=20) == sum(map(len, data))
    assert events.of(SliceSent) == []
    assert events.of(CallFinished)[-1].slice_bytes_cached > 0


def test_tasks_and_small_plain_slices_travel_many_to_a_frame(cluster2, events):
    from qjam_nb.worker import protocol

    data = list(range(400))
    assert cluster2.map(lambda p, xs: xs[0], None, data, slice_size=1) == sum(data)
    sent = events.of(SliceSent)
    assert sorted(e.index for e in sent) == list(range(400))
    first = events.of(CallFinished)[-1]
    assert first.slice_bytes_sent == sum(e.nbytes for e in sent)
    one_data = protocol.frame_size(protocol.encode(
        protocol.Kind.DATA, {"key": sent[-1].key, "data": [399], "task": {"key": sent[-1].key}}, call=1, index=399))
    assert first.bytes_sent < 400 * one_data * 0.75  # small plain slices travel in TASKS frames with their tasks
    events.clear()
    assert cluster2.map(lambda p, xs: 2 * xs[0], None, data, slice_size=1) == 2 * sum(data)
    assert events.of(SliceSent) == [] and len(events.of(SliceAssigned)) == 400
    key = events.of(SliceAssigned)[0].key
    one_task = protocol.frame_size(protocol.encode(protocol.Kind.TASK, {"key": key}, call=2, index=399))
    # A frame each would take 400 of these (besides the CALL); the tasks went many to a TASKS frame.
    assert events.of(CallFinished)[-1].bytes_sent < 400 * one_task * 0.75


def test_cache_info_and_events_report_slice_counts_and_bytes(make_cluster, record):
    cluster = make_cluster(["local:3"])
    log = record(cluster)
    assert cluster.cache_info() == {name: (0, 0) for name in cluster.worker_names}

    X = np.arange(9000, dtype=np.float32).reshape(90, 100)  # 400 bytes a row, no two slices equal
    ds = DataSet(X, slice_size=10)  # 9 slices of 4000 bytes
    cluster.map(column_sums(), None, ds)
    info = cluster.cache_info()
    assert sum(count for count, _ in info.values()) == 9
    assert sum(nbytes for _, nbytes in info.values()) == X.nbytes
    per_worker: dict[str, list[int]] = {}
    for e in log.of(SliceSent):
        per_worker.setdefault(e.worker, []).append(e.index)
    assert info == {w: (len(per_worker.get(w, [])), 4000 * len(per_worker.get(w, []))) for w in cluster.worker_names}
    assert all(count == 3 for count, _ in info.values())  # 9 new slices spread evenly on 3 workers
    # The events tell observers the same, and so does the status model built from them.
    assert last_cache_event(log) == info
    assert {row.name: (row.cached_slices, row.cached_bytes) for row in cluster.status.rows.values()} == info
    # A worker's CacheChanged events count up (one per batch of slices sent it, not one a slice)
    # and end at what it holds.
    for worker in cluster.worker_names:
        counts = [e.n_slices for e in log.of(CacheChanged) if e.worker == worker]
        assert counts == sorted(set(counts)) and counts[-1] == len(per_worker[worker])

    # A list dataset adds its slices, sized by their pickles.
    log.clear()
    cluster.map(lambda p, xs: len(xs), None, list(range(30)), slice_size=10)
    grown = cluster.cache_info()
    assert sum(count for count, _ in grown.values()) == 12
    assert sum(nbytes for _, nbytes in grown.values()) > X.nbytes
    assert last_cache_event(log) == {w: grown[w] for w in last_cache_event(log)}

    # A map over cached data changes nothing.
    log.clear()
    cluster.map(column_sums(), None, ds)
    assert log.of(CacheChanged) == [] and cluster.cache_info() == grown


def test_a_writable_array_changed_in_place_is_caught_although_the_call_starts_on_its_old_keys(
    make_cluster, record, no_write_watch
):
    """Where the kernel cannot say which pages were written, a big writable array's call starts on last
    call's keys while its slices are hashed again: a slice that changed is redone, whether its task had
    gone out (its old answer is dropped) or not."""
    from qjam_nb import SliceLost
    from qjam_nb.dataset import GUESS_KEYS_FROM

    cluster = make_cluster(["local:2"])
    log = record(cluster)
    X = np.random.default_rng(2).random((512, 2048))  # 8 MiB in 64 slices of 8 rows
    assert X.nbytes >= GUESS_KEYS_FROM and X.flags.writeable
    ds = DataSet(X, 8)
    first = cluster.map(column_sums(), None, ds)
    log.clear()
    assert cluster.map(column_sums(), None, ds).tobytes() == first.tobytes()
    assert log.of(SliceSent) == [] and log.of(SliceLost) == []

    X[3, 7] += 1.0  # slice 0: among the first tasks each worker gets
    X[500, 9] -= 1.0  # slice 62: still waiting here when the keys are checked
    log.clear()
    after = cluster.map(column_sums(), None, ds)
    assert after.tobytes() == expected_column_sums(X, ds).tobytes()
    assert sorted(e.index for e in log.of(SliceSent)) == [0, 62]
    assert [e.index for e in log.of(SliceLost)] == [0]  # handed out under its old key, then again
    (finished,) = log.of(CallFinished)
    assert finished.slice_bytes_cached == X.nbytes - 2 * X[:8].nbytes
    record_ = cluster.last_call
    assert sorted(r.index for r in record_.done_slices()) == list(range(64))


def test_a_watched_array_changed_in_place_ships_only_the_slices_written(make_cluster, record, hashes):
    """Where the kernel says which pages were written, a call on a big writable array hashes only
    those slices, before any task goes out: no guess, nothing redone."""
    from qjam_nb import SliceLost
    from qjam_nb.writewatch import WriteWatch

    cluster = make_cluster(["local:2"])
    log = record(cluster)
    X = page_aligned(np.random.default_rng(3).random((512, 2048)))  # 8 MiB in 64 slices of 8 rows
    try:
        WriteWatch(X.ctypes.data, X.nbytes)
    except OSError as e:
        pytest.skip(f"this kernel cannot say which pages were written: {e}")
    ds = DataSet(X, 8)
    first = cluster.map(column_sums(), None, ds)
    hashes[0] = 0
    log.clear()
    assert cluster.map(column_sums(), None, ds).tobytes() == first.tobytes()
    assert hashes[0] == 0 and log.of(SliceSent) == []

    X[3, 7] += 1.0
    X[500, 9] -= 1.0
    log.clear()
    after = cluster.map(column_sums(), None, ds)
    assert after.tobytes() == expected_column_sums(X, ds).tobytes()
    assert sorted(e.index for e in log.of(SliceSent)) == [0, 62]
    assert log.of(SliceLost) == []
    assert 2 <= hashes[0] <= 4  # 0 and 62, and a neighbour each where a page straddles two slices


def test_slice_keys_are_16_bytes_end_to_end(cluster2, events):
    """One representation: the dataset's key is what the events, the worker's cache and the timeline hold."""
    ds = DataSet([[i, i * 2] for i in range(30)], 4)
    cluster2.map(lambda p, xs: len(xs), None, ds)
    keys = [ds.key(i) for i in range(len(ds))]
    assert all(type(k) is bytes and len(k) == 16 for k in keys)
    assert [e.key for e in sorted(events.of(SliceAssigned), key=lambda e: e.index)] == keys
    assert {e.key for e in events.of(SliceSent)} <= set(keys)
    assert set(keys) <= {k for w in cluster2.workers for k in w.cache}
    assert sorted((r.index, r.key) for r in cluster2.last_call.slices) == list(enumerate(keys))
