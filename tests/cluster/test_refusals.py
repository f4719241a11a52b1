"""Mistakes found before or while shipping: clear errors, and the cluster still works."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from conftest import WITH_DASK, skip_in_memory, skip_on_dask

from qjam_nb import Cluster, DataSetError, RemoteError, WorkerError
from qjam_nb.worker import protocol

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)


def test_an_empty_host_list_is_refused_not_replaced_by_the_default():
    with pytest.raises(WorkerError, match="no hosts given"):
        Cluster([])


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_workers_per_host_must_be_a_positive_whole_number(n):
    with pytest.raises(WorkerError, match="workers_per_host"):
        Cluster(["local"], workers_per_host=n)


@pytest.mark.parametrize("spec", ["local:0", "local:x", "local:-2"])
def test_bad_worker_counts_name_the_entry(spec):
    with pytest.raises(WorkerError, match=f"bad host entry '{spec}'"):
        Cluster([spec])


def test_a_slice_too_big_for_one_message_is_refused_before_shipping(cluster2, events, monkeypatch, backend):
    skip_on_dask(backend, "Dask splits big messages: its bound is memory, not one frame")
    monkeypatch.setattr(protocol, "MAX_FRAME", 1000)
    with pytest.raises(DataSetError, match="slice 0 is 1600 bytes.*smaller slice_size"):
        cluster2.map(lambda p, xs: 0, None, np.zeros((400, 2)), slice_size=100)
    assert events.events == []
    monkeypatch.undo()
    assert cluster2.map(lambda p, xs: len(xs), None, np.zeros((400, 2)), slice_size=100) == 400


def test_a_slice_the_worker_cannot_unpickle_names_the_slice_and_the_cause(make_cluster, tmp_path, monkeypatch,
                                                                          backend):
    skip_in_memory(backend, "its workers import what this process imports: no module is the master's only")
    cluster = make_cluster(["local:2"])
    # A module only the master can import (its path is added after the workers started).
    (tmp_path / "qjam_master_only.py").write_text("class Point:\n    def __init__(self, x):\n        self.x = x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import qjam_master_only

    points = [qjam_master_only.Point(i) for i in range(6)]
    where = "unpickling the slice sent there" if backend == "dask" else "handling a DATA message"
    with pytest.raises(RemoteError, match=rf"ModuleNotFoundError.*slice \d, while {where}") as info:
        cluster.map(lambda p, xs: sum(pt.x for pt in xs), None, points, slice_size=2)
    assert "qjam_master_only" in info.value.remote_message
    assert cluster.map(lambda p, xs: sum(xs), None, [1, 2, 3], slice_size=1) == 6
    sys.modules.pop("qjam_master_only", None)


def test_a_mapfunc_that_closes_its_stdout_leaves_the_worker_usable(make_cluster, backend):
    skip_in_memory(backend, "its workers share this process's stdout")
    cluster = make_cluster(["local:1"])

    def close_stdout(p, xs):
        os.close(1)
        return 1

    assert cluster.map(close_stdout) == 1
    assert cluster.map(lambda p, xs: 2) == 2
    # The output pump stops watching the closed pipe instead of spinning on it.
    pid = cluster.workers[0].hello["pid"]
    before = cpu_seconds(pid)
    time.sleep(0.5)
    assert cpu_seconds(pid) - before < 0.2


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
