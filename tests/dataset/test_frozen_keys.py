"""Keys of data that cannot change are computed once; everything else is hashed on every call."""

from __future__ import annotations

import os
import time

import numpy as np

from qjam_nb import DataSet
from qjam_nb.dataset import _FROZEN_KEYS


def test_a_read_only_array_is_hashed_once(hashes):
    X = np.arange(1000.0).reshape(100, 10)
    X.setflags(write=False)
    first = DataSet(X, 10).keys_and_sizes()
    assert hashes[0] == 10
    assert DataSet(X, 10).keys_and_sizes() == first
    assert hashes[0] == 10  # no second pass over the data
    DataSet(X, 20).keys_and_sizes()  # another slicing is another set of keys
    assert hashes[0] == 15


def test_a_writable_array_is_hashed_every_call_so_changes_are_seen(hashes):
    X = np.arange(1000.0).reshape(100, 10)
    first = DataSet(X, 10).keys_and_sizes()
    X[55, 3] = -1.0
    second = DataSet(X, 10).keys_and_sizes()
    assert hashes[0] == 20
    assert [i for i in range(10) if first[i] != second[i]] == [5]


def test_a_read_only_view_of_a_writable_array_is_not_trusted(hashes):
    X = np.arange(1000.0).reshape(100, 10)
    view = X[:]
    view.setflags(write=False)
    before = DataSet(view, 10).keys_and_sizes()
    X[0, 0] = 99.0  # written through the base: the view sees it
    after = DataSet(view, 10).keys_and_sizes()
    assert hashes[0] == 20 and before[0] != after[0]


def test_an_npy_file_is_hashed_again_only_when_it_changes(hashes, tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.arange(600.0).reshape(60, 10))
    first = DataSet(str(path), 10).keys_and_sizes()
    assert DataSet(str(path), 10).keys_and_sizes() == first and hashes[0] == 6
    changed = np.arange(600.0).reshape(60, 10)
    changed[59, 9] = 0.5
    time.sleep(0.01)
    np.save(path, changed)
    os.utime(path)  # a new modification time even on coarse clocks
    second = DataSet(str(path), 10).keys_and_sizes()
    assert hashes[0] == 12 and [i for i in range(6) if first[i] != second[i]] == [5]


def test_the_key_cache_lets_go_of_dead_arrays():
    _FROZEN_KEYS.clear()
    X = np.zeros((10, 10))
    X.setflags(write=False)
    DataSet(X, 5).keys_and_sizes()
    assert len(_FROZEN_KEYS) == 1
    del X
    assert len(_FROZEN_KEYS) == 0
