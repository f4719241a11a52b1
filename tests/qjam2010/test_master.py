"""``Master([RemoteWorker(...)] * 2).run`` computes what qjam 2010 computed: one mapfunc call per worker on
one contiguous slice, reduced in worker order with 2010's default_reduce; on local workers and over ssh."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

import qjam_nb
from qjam_nb import SliceDone, SliceSent
from qjam_nb.qjam2010 import DataSet, ListDataSet, Master, NumpyMatrixDataSet, RemoteWorker, default_reduce

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sparse_autoencoder as sae  # noqa: E402

from tests.qjam2010.sources import SAECOST, load  # noqa: E402

CONSTANT = """
def mapfunc(params, dataset):
    return 42
"""

ONE = """
def mapfunc(params, dataset):
    return 1
"""

SLICES = """
def mapfunc(params, xs):
    return [list(xs)]

def reduce(a, b):
    return a + b
"""

UNEQUAL = """
def mapfunc(params, xs):
    return [0] * len(xs)
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("qjam2010_modules")
    names = {"constant": CONSTANT, "one": ONE, "slices": SLICES, "unequal": UNEQUAL, "saecost": SAECOST}
    loaded = {name: load(root, f"qjam2010_test_{name}", source) for name, source in names.items()}
    yield loaded
    for module in loaded.values():
        sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def master(backend):
    host = "local" if backend == "local" else "sshhost"
    m = Master([RemoteWorker(host)] * 2, echo=False, progress=False)
    yield m
    m.shutdown()


def test_master_is_qjam_nbs_master():
    assert qjam_nb.Master is Master and qjam_nb.RemoteWorker is RemoteWorker


def test_constant_mapfunc_gives_twice_the_constant(master, modules):
    assert master.run(modules["constant"]) == 84  # no dataset: each worker once
    assert master.run(modules["constant"], None, DataSet(list(range(1000)))) == 84
    assert master.run(modules["constant"], None, DataSet(np.zeros((1000, 3)))) == 84


def test_a_mapfunc_returning_1_runs_once_per_worker(master, modules, record):
    log = record(master.cluster)
    for data in (list(range(1000)), np.zeros((1000, 3)), list(range(3))):
        log.clear()
        assert master.run(modules["one"], None, DataSet(data)) == 2
        assert len(log.of(SliceDone)) == 2  # one mapfunc call per worker, counted from the events


def test_each_worker_gets_one_contiguous_slice_in_worker_order(master, modules):
    ds = ListDataSet(list(range(7)), slice_size=3)
    assert master.run(modules["slices"], None, ds) == [[0, 1, 2, 3], [4, 5, 6]]
    assert ds.slice_size() == 4 and len(ds) == 2  # the 2010 quirk kept: run re-cuts the dataset itself
    rows = master.run(modules["slices"], None, NumpyMatrixDataSet(np.eye(5)))
    assert [len(r) for r in rows] == [3, 2]


def test_no_more_chunks_than_workers_keeps_the_slicing(master, modules):
    # 2 chunks on 2 workers: not re-cut, so one slice of 30 and one worker idle, as in 2010.
    assert master.run(modules["slices"], None, ListDataSet([5, 6])) == [[5, 6]]
    assert master.run(modules["slices"], None, ListDataSet([5, 6], slice_size=1)) == [[5], [6]]


def test_a_second_run_ships_nothing(master, modules, record):
    X = np.arange(3000.0).reshape(1000, 3)
    master.run(modules["one"], None, NumpyMatrixDataSet(X))
    log = record(master.cluster)
    assert master.run(modules["one"], None, NumpyMatrixDataSet(X)) == 2
    assert log.of(SliceSent) == []
    assert master.cluster.last_call.n_slices == 2 and master.cluster.last_call.slice_bytes_sent == 0


def test_unequal_lengths_raise_type_error_through_run(master, modules):
    with pytest.raises(TypeError, match="same length"):
        master.run(modules["unequal"], None, ListDataSet(list(range(5))))  # slices of 3 and 2


def test_elapsed_time_is_logged_on_the_master_logger(master, modules, caplog):
    with caplog.at_level(logging.INFO, logger="Master"):
        master.run(modules["one"], None, ListDataSet(list(range(10))))
    lines = [r.getMessage() for r in caplog.records if r.name == "Master"]
    assert any(line.startswith("elapsed time: ") and line.endswith("s") for line in lines), lines
    assert "2 workers in worker pool" in lines


@pytest.mark.parametrize("n", [1000, 10000])
def test_sparse_autoencoder_equals_qjam_2010_on_two_workers(master, modules, n):
    X = sae.make_patches(n, seed=7)
    WB = sae.init_theta(3) + np.random.default_rng(3).normal(0, 0.05, sae.N_PARAMS)
    half = -(-n // 2)
    # What qjam 2010 returned with 2 workers: each half on its own (own sparsity penalty), reduced as qjam did.
    cost, grad = default_reduce(modules["saecost"].mapfunc(WB, X[:half]), modules["saecost"].mapfunc(WB, X[half:]))
    got_cost, got_grad = master.run(modules["saecost"], WB, NumpyMatrixDataSet(X))
    assert abs(got_cost - cost) / abs(cost) < 1e-12
    assert np.linalg.norm(got_grad - grad) / np.linalg.norm(grad) < 1e-12
    whole_cost, _ = modules["saecost"].mapfunc(WB, X)
    assert got_cost != pytest.approx(whole_cost, rel=1e-6)  # the per-worker penalty: not one process's objective
