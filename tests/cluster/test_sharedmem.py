"""Local workers get large array slices through shared memory; nothing is left in /dev/shm.

Only the files this test's own cluster made are looked at (their names, as ``export`` returned
them): other qjam_nb processes on the machine make and delete files there at the same time."""

from __future__ import annotations

import os

import numpy as np

from qjam_nb.executors import frames as frames_executor
from qjam_nb.worker import sharedmem


def test_large_slices_go_through_shared_memory_locally_and_the_pipe_over_ssh(make_cluster, backend, monkeypatch):
    exported = []
    paths = []  # the files this cluster made
    real_export = sharedmem.export

    def counting(array):
        handle = real_export(array)
        exported.append(handle is not None)
        if handle is not None:
            paths.append(handle["path"])
        return handle

    monkeypatch.setattr(frames_executor.sharedmem, "export", counting)
    cluster = make_cluster(["local:2"])
    X = np.random.default_rng(1).standard_normal((1600, 1024))  # 8 slices of 1.6 MiB
    got = cluster.map(lambda p, xs: (xs.sum(axis=0), xs.flags.writeable), None, X, slice_size=200)
    np.testing.assert_allclose(got[0], X.sum(axis=0))
    assert got[1] == 0  # the workers' slices are read-only views of the shared memory
    if backend == "local":
        assert exported == [True] * 8
    else:
        assert exported == []  # another machine: no shared memory
    assert len(paths) == len(set(paths)) == exported.count(True)
    assert [p for p in paths if os.path.lexists(p)] == []  # every file was taken and deleted
    # Cached second call: nothing exported again.
    cluster.map(lambda p, xs: 0, None, X, slice_size=200)
    assert len(exported) == (8 if backend == "local" else 0)


def test_small_or_strided_slices_take_the_pipe():
    assert sharedmem.export(np.zeros(10)) is None
    assert sharedmem.export(np.zeros((1024, 1024))[:, ::2]) is None  # not contiguous
    assert sharedmem.export(np.array([object()] * 200000, dtype=object)) is None
    assert sharedmem.export([0.0] * 200000) is None


def test_an_exported_slice_round_trips_and_a_discarded_one_leaves_nothing():
    X = np.arange(300000, dtype=np.float64)
    handle = sharedmem.export(X)
    assert os.path.exists(handle["path"])
    Y = sharedmem.attach(handle)
    assert not os.path.exists(handle["path"])  # the mapping keeps the memory, not the name
    assert np.array_equal(X, Y) and not Y.flags.writeable
    lost = sharedmem.export(X)
    sharedmem.discard(lost)
    sharedmem.discard(lost)  # twice is harmless
    assert not os.path.exists(lost["path"])
