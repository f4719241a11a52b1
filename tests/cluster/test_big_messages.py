"""Big params and results (1 MiB and up) go through shared-memory arenas with local workers
and through the pipe over ssh: right call after call, a result the user keeps never changes,
and nothing is left in /dev/shm."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qjam_nb import Cluster
from qjam_nb.errors import WorkerError
from qjam_nb.executors import frames as frames_executor
from qjam_nb.worker import sharedmem

FLOATS_PER_MIB = (1 << 20) // 8


def arena_files() -> set[str]:
    """The arenas in this process's own shared-memory directory (no other process makes files there)."""
    directory = sharedmem.sharing_directory()
    if directory is None:
        return set()
    return {f for f in os.listdir(directory) if f.startswith((sharedmem.PARAMS_PREFIX, sharedmem.RESULT_PREFIX))}


def test_big_params_and_results_are_right_call_after_call(make_cluster, backend):
    cluster = make_cluster(["local:2"])
    rng = np.random.default_rng(0)
    arenas = []
    for floats in (FLOATS_PER_MIB, FLOATS_PER_MIB, 3 * FLOATS_PER_MIB, FLOATS_PER_MIB):  # grows, then fits
        theta = rng.standard_normal(floats)
        got = cluster.map(lambda t, xs: t * 2.0, theta)
        np.testing.assert_array_equal(got, 4.0 * theta)  # each of the 2 workers once
        arenas.append(cluster._executor.params_arena.path if cluster._executor.params_arena else None)
    if backend == "local":
        assert arenas[0] == arenas[1] != arenas[2] == arenas[3]  # reused; replaced once, when outgrown
        assert all(w.results.path for w in cluster.workers)  # the results came through the arenas
    else:
        assert arenas == [None] * 4  # another machine: the pipe
        assert not any(w.results.path for w in cluster.workers)


def test_a_result_the_user_keeps_never_changes_in_later_calls(make_cluster, backend):
    cluster = make_cluster(["local:2"])

    def full(value, xs):
        return np.full(FLOATS_PER_MIB, value)

    kept = [cluster.map(full, float(i), [0], slice_size=1) for i in range(4)]  # one slice: its result is returned
    for i, result in enumerate(kept):
        assert not result.flags.writeable
        np.testing.assert_array_equal(result, float(i))
    if backend == "local":
        (worker,) = [w for w in cluster.workers if w.results.path]
        kept_paths = []
        for i in range(3):
            kept.append(cluster.map(full, float(i), [0], slice_size=1))
            kept_paths.append(worker.results.path)
        assert len(set(kept_paths)) == 3  # each kept result made the worker move to a new arena
        del kept[:]
        dropped_paths = []
        for i in range(3):
            cluster.map(full, float(i), [0], slice_size=1)  # dropped at once
            dropped_paths.append(worker.results.path)
        assert set(dropped_paths) == {kept_paths[-1]}  # nothing kept: the same arena, written again


def test_results_a_reduce_holds_on_to_stay_right(make_cluster):
    cluster = make_cluster(["local:2"])
    X = list(range(4))

    def pair(a, b):  # keeps both results, as they came
        return (a if isinstance(a, list) else [a]) + [b]

    first = cluster.map(lambda v, xs: np.full(FLOATS_PER_MIB, v + xs[0]), 10.0, X, reduce=pair, slice_size=1)
    second = cluster.map(lambda v, xs: np.full(FLOATS_PER_MIB, v + xs[0]), 20.0, X, reduce=pair, slice_size=1)
    assert [float(a[0]) for a in first] == [10.0, 11.0, 12.0, 13.0]
    assert [float(a[-1]) for a in second] == [20.0, 21.0, 22.0, 23.0]
    assert all(np.all(a == a[0]) for a in first + second)


def test_nothing_is_left_in_shared_memory_after_shutdown(backend):
    before = arena_files()
    with Cluster(["local:2"], echo=False) as cluster:
        theta = np.ones(2 * FLOATS_PER_MIB)
        kept = cluster.map(lambda t, xs: t + 1.0, theta)
        if sharedmem.DIRECTORY is not None:
            assert any(f.startswith(sharedmem.PARAMS_PREFIX) for f in arena_files())
    assert arena_files() == before
    np.testing.assert_array_equal(kept, 4.0)  # still readable: the mapping outlives the file


def test_params_take_the_pipe_when_shared_memory_is_full(make_cluster, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(frames_executor.sharedmem, "arena_for", full)
    cluster = make_cluster(["local:2"])
    theta = np.arange(2 * FLOATS_PER_MIB, dtype=np.float64)
    np.testing.assert_array_equal(cluster.map(lambda t, xs: t, theta), 2 * theta)
    assert cluster._executor.params_arena is None


def test_big_params_reach_local_and_ssh_workers_of_one_cluster(ssh_world):
    with Cluster(["local:1", "sshhost:1"], echo=False) as cluster:
        theta = np.random.default_rng(2).standard_normal(2 * FLOATS_PER_MIB)
        for scale in (1.0, 3.0):
            got = cluster.map(lambda t, xs: [t.sum(), t[::1000].copy()], theta * scale)
            assert got[0] == pytest.approx(2 * (theta * scale).sum())
            np.testing.assert_array_equal(got[1], 2 * (theta * scale)[::1000])


def test_an_arena_that_cannot_grow_leaves_the_old_one_usable(monkeypatch):
    if sharedmem.DIRECTORY is None:
        pytest.skip("no /dev/shm here")
    arena = sharedmem.arena_for(None, 1 << 20, "qjam-params-test-")
    try:
        assert sharedmem.arena_for(arena, 1000, "qjam-params-test-") is arena  # fits: the same
        monkeypatch.setattr(sharedmem, "Arena", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(OSError):
            sharedmem.arena_for(arena, 8 << 20, "qjam-params-test-")
        handle = arena.write([memoryview(b"still here")])
        assert [bytes(b) for b in sharedmem.ArenaReader().read(handle)] == [b"still here"]
    finally:
        arena.close()
    assert not os.path.exists(arena.path)


def test_a_dead_workers_result_arena_is_deleted():
    if sharedmem.DIRECTORY is None:
        pytest.skip("no /dev/shm here")
    own = sharedmem.own_directory()  # where this master's local workers make their result arenas
    left = os.path.join(own, f"{sharedmem.RESULT_PREFIX}999999999-abc")
    other = os.path.join(own, f"{sharedmem.RESULT_PREFIX}9999999990-abc")
    for path in (left, other):
        open(path, "wb").close()
    try:
        sharedmem.discard_results_of(999999999)
        assert not os.path.exists(left) and os.path.exists(other)  # that worker's only
    finally:
        for path in (left, other):
            if os.path.exists(path):
                os.unlink(path)


def test_only_results_that_may_hold_a_mebibyte_are_pickled_to_see():
    big, small = np.zeros(FLOATS_PER_MIB), np.zeros(10)
    assert sharedmem.may_be_big(big) and sharedmem.may_be_big([small, big]) and sharedmem.may_be_big({"g": big})
    assert sharedmem.may_be_big((np.zeros(FLOATS_PER_MIB // 2), np.zeros(FLOATS_PER_MIB // 2)))
    assert not any(sharedmem.may_be_big(v) for v in (small, [small] * 3, 3.0, "x" * (2 << 20), None, {"a": 1}))


def test_a_result_arena_removed_under_the_cluster_is_a_clear_error_and_the_next_call_works():
    if not sharedmem.ARENAS:
        pytest.skip("result arenas are for local workers on Linux")
    with Cluster(["local:1"], echo=False) as cluster:
        (worker,) = cluster.workers
        f = lambda t, xs: t * 3.0  # noqa: E731
        theta = np.ones(FLOATS_PER_MIB)
        np.testing.assert_array_equal(cluster.map(f, theta), 3.0)
        pid = worker.hello["pid"]
        real_read = worker.results.read

        def removed(handle):  # as if something cleaned /dev/shm between the worker's write and our read
            os.unlink(handle["path"])
            return real_read(handle)

        worker.results.path = None  # map it again by name
        worker.results.read = removed
        with pytest.raises(WorkerError, match=r"slice 0 from worker local/0 .* shared memory .* Call again"):
            cluster.map(f, theta)
        worker.results.read = real_read
        np.testing.assert_array_equal(cluster.map(f, theta * 2), 6.0)  # a new arena
        assert worker.hello["pid"] == pid  # the same worker: nothing was lost
