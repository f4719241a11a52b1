"""qjam 2010's examples (its ``examples/`` and ``bin/qjam-run.py`` runs), written in our own words to their
shape, run as a qjam program would run them with only its imports changed: ``from qjam_nb.qjam2010 import
...``, a module with a ``mapfunc``, ``Master([...]).run(module, params, DataSet(...))``. Each result is
checked against the module run in one process; local workers and, on the ssh run, a private sshd."""

from __future__ import annotations

import math
import string
import sys

import numpy as np
import pytest

from qjam_nb.qjam2010 import DataSet, Master, NumpyMatrixDataSet, RemoteWorker, default_reduce
from tests.qjam2010.sources import imported_examples


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    with imported_examples(tmp_path_factory.mktemp("qjam2010_examples"), "qjam2010_ex_") as modules:
        yield modules


@pytest.fixture(scope="module")
def master(backend):
    host = "local" if backend == "local" else "sshhost"
    m = Master([RemoteWorker(host), RemoteWorker(host)], echo=False, progress=False)
    yield m
    m.shutdown()


def test_newton_sqrt(master, examples):
    module, n, xs = examples["newton_sqrt"], 12345.0, [10.0]
    while True:
        x = master.run(module, params=n, dataset=DataSet([xs[-1]]))
        assert x == module.mapfunc(n, [xs[-1]])  # one item: one slice, one worker
        if abs(x - xs[-1]) < 0.0001:
            break
        xs.append(x)
    assert abs(x - math.sqrt(n)) < 1e-6


def test_sum_dataset_sum_matrix_example(master, examples):
    X = np.random.default_rng(0).permutation(np.arange(1, 101)).reshape(10, 10)
    assert master.run(examples["sum_dataset"], None, NumpyMatrixDataSet(X)) == 5050 == X.sum()


def test_char_count(master, examples):
    module = examples["char_count"]
    text = (string.ascii_letters + " Quick zephyrs blow, vexing daft Jim.\n") * 40
    lines = text.split("\n")
    counts = master.run(module, None, DataSet(lines))
    assert counts == module.charcount(None, lines) == [text.lower().count(c) for c in string.ascii_lowercase]


def test_multiply_sum_over_sequences_as_qjam_run(master, examples):
    seq = examples["sequences"]
    got = master.run(examples["multiply_sum"], params=seq.three, dataset=DataSet(list(seq.onetoten)))
    assert got == examples["multiply_sum"].mapfunc(seq.three, seq.onetoten) == 165


def test_numpy_inner_prod_as_qjam_run(master, examples):
    module = examples["numpy_inner_prod"]
    assert master.run(module, params=module.theta, dataset=DataSet(list(module.x))) == 170
    assert master.run(module, module.theta, DataSet(module.x)) == module.mapfunc(module.theta, module.x) == 170


def test_autoencoder_cost_as_qjam_computed_it(master):
    import tempfile
    from pathlib import Path

    from tests.qjam2010.sources import SAECOST, load  # the 2010 cost function, in our words

    with tempfile.TemporaryDirectory() as tmp:
        module = load(Path(tmp), "qjam2010_ex_saecost", SAECOST)
        try:
            rng = np.random.default_rng(1)
            X = rng.uniform(-0.9, 0.9, (301, 64))
            WB = rng.normal(0, 0.1, 2 * 30 * 64 + 30 + 64)
            cost, grad = master.run(module, WB, NumpyMatrixDataSet(X))
            want = default_reduce(module.mapfunc(WB, X[:151]), module.mapfunc(WB, X[151:]))
            assert abs(cost - want[0]) <= 1e-12 * abs(want[0])
            assert np.linalg.norm(grad - want[1]) <= 1e-12 * np.linalg.norm(want[1])
        finally:
            sys.modules.pop("qjam2010_ex_saecost", None)
