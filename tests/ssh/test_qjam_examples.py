"""qjam's 2010 examples, run through the seed API over ssh with only their imports changed.

Each module below is written the way qjam's examples were (a module with a
``mapfunc``, run with ``Master([...]).run(module, params, DataSet(...))``),
saved to a file only the notebook's process can import, so the workers get
its code by value.
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest

from qjam_nb import DataSet, Master, NumpyMatrixDataSet, RemoteWorker
from tests.qjam2010.sources import imported_examples


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    with imported_examples(tmp_path_factory.mktemp("qjam_examples"), "") as modules:
        yield modules


@pytest.fixture(scope="module")
def master(ssh_world):
    m = Master([RemoteWorker("sshhost"), RemoteWorker("sshhost")], echo=False)
    yield m
    m.shutdown()


def test_two_remote_workers_share_one_host(master):
    assert master.cluster.worker_names == ["sshhost/0", "sshhost/1"]
    assert len(master.cluster._executor.pool.transports) == 1  # one ssh connection, two channels


def test_newton_sqrt(master, examples):
    n, x = 123456789.0, 10.0
    for _ in range(100):
        new = master.run(examples["newton_sqrt"], params=n, dataset=DataSet([x]))
        if abs(new - x) < 1e-9 * new:
            break
        x = new
    assert abs(new - math.sqrt(n)) < 1e-6


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_sum_dataset(master, examples):
    matrix = np.matrix("1 2 3 4; 5 6 7 8; 9 10 11 12")
    assert master.run(examples["sum_dataset"], None, NumpyMatrixDataSet(matrix, slice_size=1)) == 78


def test_char_count(master, examples):
    text = (string.ascii_letters + " The quick brown fox jumps over the lazy dog.\n") * 50
    lines = text.split("\n")
    counts = master.run(examples["char_count"], None, DataSet(lines, slice_size=7))
    expected = [text.lower().count(c) for c in string.ascii_lowercase]
    assert counts == expected


def test_multiply_sum(master, examples):
    xs = list(range(1, 101))
    assert master.run(examples["multiply_sum"], 3, DataSet(xs, slice_size=9)) == 3 * sum(xs)


def test_numpy_inner_prod(master, examples):
    module = examples["numpy_inner_prod"]
    result = master.run(module, module.theta, DataSet(module.x, slice_size=2))
    assert result == sum(int(module.theta @ xi) for xi in module.x) == 170
