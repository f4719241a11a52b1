"""qjam 2010's DataSet API and default_reduce, method by method, against 2010's documented behaviour
(its ``qjam/dataset.py``, ``qjam/common/reducing.py`` and their tests)."""

from __future__ import annotations

import numpy as np
import pytest

from qjam_nb import DataSet as ModernDataSet
from qjam_nb import DataSetError, ReduceError
from qjam_nb import default_reduce as modern_reduce
from qjam_nb.qjam2010 import (
    DataSet,
    ListDataSet,
    NumpyMatrixDataSet,
    NumpyMatrixFileDataSet,
    default_reduce,
)


def matrix(repeats: int) -> np.ndarray:
    return np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]] * repeats)


# -- lengths and defaults -------------------------------------------------------------


def test_list_length_is_the_number_of_slices_30_items_by_default():
    assert isinstance(DataSet(list(range(120))), ListDataSet)
    assert len(DataSet(list(range(120)))) == 4
    assert len(DataSet(list(range(121)))) == 5
    assert len(DataSet(list(range(120)), slice_size=1)) == 120
    assert len(DataSet(list(range(120)), slice_size=5)) == 24
    assert DataSet(list(range(120))).slice_size() == 30
    assert DataSet(tuple(range(10))).chunks() == 10


def test_matrix_length_5_rows_by_default():
    assert isinstance(DataSet(matrix(10)), NumpyMatrixDataSet)
    assert len(DataSet(matrix(10))) == 10
    assert len(DataSet(matrix(10), slice_size=1)) == 50
    assert len(DataSet(matrix(10), slice_size=3)) == 17
    assert NumpyMatrixDataSet(matrix(10)).slice_size() == 5
    assert NumpyMatrixDataSet(matrix(10)).chunks() == 50


def test_column_major_matrix_is_cut_by_columns():
    m = np.arange(60.0).reshape(6, 10)
    ds = NumpyMatrixDataSet(m, 3, row_major=False)
    assert ds.chunks() == 10 and len(ds) == 4
    np.testing.assert_array_equal(ds[1].raw_data(), m.T[3:6])


def test_a_2010_dataset_passes_through_and_other_types_are_refused():
    ds = ListDataSet([1, 2, 3])
    assert DataSet(ds) is ds
    with pytest.raises(DataSetError, match="list, tuple or numpy array"):
        DataSet({1: 2})


def test_a_modern_dataset_keeps_its_data_and_slicing():
    ds = DataSet(ModernDataSet(list(range(10)), slice_size=4))
    assert isinstance(ds, ListDataSet) and ds.slice_size() == 4 and len(ds) == 3


# -- slices ---------------------------------------------------------------------------


def test_getitem_and_slice_give_sub_datasets_with_raw_data():
    ds = DataSet(list(range(120)))
    for i in range(4):
        assert ds[i].raw_data() == list(range(30 * i, 30 * i + 30))
        assert ds.slice(i).raw_data() == ds.slice_data(i) == ds[i].raw_data()
        assert isinstance(ds[i], ListDataSet) and len(ds[i]) == 1 and ds[i].slice_size() == 30
    assert [s.raw_data() for s in ds[1:3]] == [list(range(30, 60)), list(range(60, 90))]
    ones = DataSet(list(range(120)), slice_size=1)
    assert ones[119].raw_data() == [119]
    assert [s.raw_data() for s in ones[10:13]] == [[10], [11], [12]]
    assert [s.raw_data() for s in ones[117:]] == [[117], [118], [119]]  # 2010 failed on an open end


def test_matrix_slices():
    ds = DataSet(matrix(10))
    np.testing.assert_array_equal(ds[2].raw_data(), matrix(1))
    np.testing.assert_array_equal(DataSet(matrix(10), slice_size=10).slice(0).raw_data(), matrix(2))
    np.testing.assert_array_equal(DataSet(matrix(10), slice_size=100).slice(0).raw_data(), matrix(10))
    assert isinstance(ds[0], NumpyMatrixDataSet)


def test_out_of_range_is_a_key_error_as_in_2010_and_ends_a_for_loop():
    ds = DataSet(list(range(120)))
    for bad in (4, -1, 100):
        with pytest.raises(KeyError, match="out of bounds"):
            ds[bad]
        with pytest.raises(KeyError):
            ds.slice(bad)
        with pytest.raises(KeyError):
            ds.slice_data(bad)
        with pytest.raises(KeyError):
            ds.hash(bad)
    assert [s.raw_data()[0] for s in ds] == [0, 30, 60, 90]
    with pytest.raises(TypeError):
        ds["0"]


def test_slice_size_is_recuts():
    ds = DataSet(list(range(100)))
    before = ds.hash_list()
    ds.slice_size_is(50)
    assert ds.slice_size() == 50 and len(ds) == 2
    assert ds[1].raw_data() == list(range(50, 100))
    assert ds.hash_list() != before and len(ds.hash_list()) == 2
    with pytest.raises(DataSetError, match="at least 1"):
        ds.slice_size_is(0)


# -- hashes ---------------------------------------------------------------------------


def test_hashes_are_stable_for_equal_data_and_change_with_the_data():
    ds1, ds2 = DataSet(list(range(120))), DataSet(list(range(120)))
    assert ds1.hash_list() == ds2.hash_list() and len(set(ds1.hash_list())) == 4
    assert ds1.hash() == ds2.hash()
    assert [ds1.hash(i) for i in range(4)] == ds1.hash_list()
    changed = list(range(120))
    changed[95] = -1
    ds3 = DataSet(changed)
    assert ds3.hash_list()[:3] == ds1.hash_list()[:3] and ds3.hash(3) != ds1.hash(3)
    assert ds3.hash() != ds1.hash()


def test_hash_0_is_slice_0_not_the_whole_dataset():
    # 2010's ``if index:`` made hash(0) the whole dataset's hash; here it is slice 0's, as hash_list() says.
    ds = DataSet(list(range(120)))
    assert ds.hash(0) == ds.hash_list()[0] != ds.hash()


def test_hash_is_the_content_key_the_workers_cache_under():
    data = np.arange(100.0).reshape(50, 2)
    ds = NumpyMatrixDataSet(data)
    modern = ModernDataSet(data, slice_size=5)
    assert ds.hash_list() == [modern.key(i).hex() for i in range(len(modern))]
    assert ds[3].hash(0) == ds.hash(3)  # a slice's own key is the key it has in its dataset


def test_matrix_in_place_change_changes_the_hash():
    data = np.arange(100.0).reshape(50, 2)
    ds = NumpyMatrixDataSet(data)
    before = ds.hash_list()
    data[7, 1] = -1.0
    after = ds.hash_list()
    assert after[1] != before[1] and after[:1] == before[:1] and after[2:] == before[2:]


@pytest.mark.parametrize("slice_size", [30, 1, 3])
def test_slice_from_hash_round_trip(slice_size):
    ds1, ds2 = DataSet(matrix(10), slice_size=slice_size), DataSet(matrix(10), slice_size=slice_size)
    for i in range(len(ds1)):
        np.testing.assert_array_equal(ds1.slice_from_hash(ds2.hash(i)).raw_data(), ds2[i].raw_data())
        np.testing.assert_array_equal(ds1.slice_data_from_hash(ds1.hash(i)), ds1.slice_data(i))
    with pytest.raises(KeyError):
        ds1.slice_from_hash("no such hash")


# -- the matrix file ------------------------------------------------------------------


@pytest.fixture
def matrix_file(tmp_path):
    rng = np.random.default_rng(5)
    m = rng.normal(size=(103, 7))
    path = tmp_path / "olsh.dat"
    path.write_text("".join(" ".join(f"{v: .7e}" for v in row) + "\n" for row in m))  # one row a line
    return str(path), np.loadtxt(path)


def test_matrix_file_dataset(matrix_file):
    path, m = matrix_file
    ds = NumpyMatrixFileDataSet(path)
    assert ds.slice_size() == 20 and ds.chunks() == ds.line_count() == 103 and len(ds) == 6
    assert ds.raw_data() == path  # 2010: the file name
    assert len(NumpyMatrixFileDataSet(path, slice_size=50)) == 3
    assert len(NumpyMatrixFileDataSet(path, slice_size=1)) == 103
    assert len(NumpyMatrixFileDataSet(path, slice_size=102)) == 2
    np.testing.assert_array_equal(ds[5].raw_data(), m[100:])
    np.testing.assert_array_equal(NumpyMatrixFileDataSet(path, slice_size=50)[1].raw_data(), m[50:100])
    assert isinstance(ds[0], NumpyMatrixDataSet)
    other = NumpyMatrixFileDataSet(path)
    assert other.hash_list() == ds.hash_list() == NumpyMatrixDataSet(m, 20).hash_list()
    np.testing.assert_array_equal(other.slice_from_hash(ds.hash(2)).raw_data(), m[40:60])
    columns = NumpyMatrixFileDataSet(path, slice_size=3, row_major=False)
    assert columns.chunks() == 7 and len(columns) == 3
    np.testing.assert_array_equal(columns[1].raw_data(), m.T[3:6])


def test_matrix_file_errors_name_the_file(tmp_path):
    with pytest.raises(DataSetError, match="no-such.dat"):
        NumpyMatrixFileDataSet(str(tmp_path / "no-such.dat"))
    ragged = tmp_path / "ragged.dat"
    ragged.write_text("1 2 3\n4 5\n")
    with pytest.raises(DataSetError, match="ragged.dat"):
        len(NumpyMatrixFileDataSet(str(ragged)))


# -- default_reduce -------------------------------------------------------------------


def test_default_reduce_as_2010():
    assert default_reduce((1, 2, 3), [4, 6, 7]) == [5, 8, 10]
    assert default_reduce([1, 2, 3], [5, 6, 7]) == [6, 8, 10]
    assert default_reduce((1, 2), (3, 4)) == [4, 6]  # a list, even for two tuples
    assert default_reduce(3, 4) == 7 and default_reduce("a", "b") == "ab"
    with pytest.raises(TypeError, match="same length"):
        default_reduce([1, 2, 3], [4, 6])
    with pytest.raises(TypeError):
        default_reduce(None, None)
    a, b = [np.ones(3)], [np.ones(3)]
    np.testing.assert_array_equal(default_reduce(a, b)[0], 2 * np.ones(3))
    np.testing.assert_array_equal(a[0], np.ones(3))  # inputs left as they were


def test_the_modern_default_reduce_is_unchanged():
    assert modern_reduce((1, 2), (3, 4)) == (4, 6)
    assert modern_reduce(None, None) is None
    with pytest.raises(ValueError):
        modern_reduce([1, 2, 3], [4, 6])


def test_reduce_error_is_a_type_error():
    assert issubclass(ReduceError, TypeError)
