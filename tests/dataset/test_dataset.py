"""DataSet: how data is cut into slices, how slices are named, and what is refused.

No workers here: slicing and hashing are pure master-side code.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from qjam_nb import DataSet, DataSetError, ListDataSet, NumpyMatrixDataSet
from qjam_nb.dataset import MAX_DEFAULT_SLICE_BYTES, MAX_DEFAULT_SLICES, default_slice_size


def all_slices(ds: DataSet) -> list:
    return [ds.slice(i) for i in range(len(ds))]


def all_keys(ds: DataSet) -> list[str]:
    return [ds.key(i) for i in range(len(ds))]


# -- slicing ------------------------------------------------------------------


def test_list_is_cut_in_order_with_a_short_last_slice():
    ds = DataSet(list(range(10)), slice_size=4)
    assert len(ds) == 3
    assert all_slices(ds) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [ds.bounds(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]


def test_tuple_slices_are_tuples():
    ds = DataSet(tuple("abcdefg"), slice_size=3)
    assert all_slices(ds) == [("a", "b", "c"), ("d", "e", "f"), ("g",)]


def test_array_slices_are_row_ranges():
    a = np.arange(30.0).reshape(10, 3)
    ds = DataSet(a, slice_size=4)
    parts = all_slices(ds)
    assert [p.shape for p in parts] == [(4, 3), (4, 3), (2, 3)]
    np.testing.assert_array_equal(np.concatenate(parts), a)


def test_array_slices_are_views_not_copies():
    a = np.arange(60.0).reshape(20, 3)
    ds = DataSet(a, slice_size=7)
    for part in all_slices(ds):
        assert np.shares_memory(part, a)
    # A view sees later changes to the array; a copy would not.
    a[15, 0] = -1.0
    assert ds.slice(2)[1, 0] == -1.0


def test_slice_index_out_of_range_says_how_many_there_are():
    ds = DataSet([1, 2, 3], slice_size=2)
    with pytest.raises(IndexError, match="this dataset has 2 slices"):
        ds.slice(2)
    with pytest.raises(IndexError):
        ds.bounds(-1)


def test_npy_path_is_memory_mapped_and_sliced_like_the_array(tmp_path):
    a = np.arange(50, dtype=np.int32).reshape(25, 2)
    path = tmp_path / "data.npy"
    np.save(path, a)
    for source in (path, str(path)):
        ds = DataSet(source, slice_size=10)
        assert ds.kind == "npy"
        assert isinstance(ds.data, np.memmap)
        assert len(ds) == 3
        parts = all_slices(ds)
        # Slices travel as plain arrays (raw bytes), not as file mappings.
        assert all(type(p) is np.ndarray for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), a)


def test_npy_file_and_equal_array_share_keys(tmp_path):
    a = np.random.default_rng(1).standard_normal((30, 4))
    np.save(tmp_path / "a.npy", a)
    assert all_keys(DataSet(tmp_path / "a.npy", 8)) == all_keys(DataSet(a, 8))


def test_rewrapping_a_dataset_keeps_its_slicing(tmp_path):
    ds = DataSet(list(range(100)), slice_size=7)
    again = DataSet(ds)
    assert again.slice_size == 7
    assert all_keys(again) == all_keys(ds)
    assert DataSet(ds, slice_size=50).slice_size == 50
    np.save(tmp_path / "x.npy", np.ones((5, 2)))
    assert DataSet(DataSet(tmp_path / "x.npy", 2)).kind == "npy"


def test_qjam_names():
    ds = ListDataSet(list(range(100)))
    assert ds.slice_size == 30 and len(ds) == 4
    m = np.arange(24.0).reshape(4, 6)
    rows = NumpyMatrixDataSet(m)
    assert rows.slice_size == 5 and len(rows) == 1
    np.testing.assert_array_equal(rows.slice(0), m)
    cols = NumpyMatrixDataSet(m, slice_size=4, row_major=False)
    assert len(cols) == 2
    np.testing.assert_array_equal(cols.slice(1), m[:, 4:].T)


# -- the default slice size ------------------------------------------------------


@pytest.mark.parametrize(
    ("n_items", "item_nbytes", "expected"),
    [
        (1, None, 1),
        (64, None, 1),
        (65, None, 2),
        (6400, None, 100),
        (6400, 8, 100),
        (10_000, 1 << 20, 16),  # 1 MiB rows: 16 MiB per slice wins over ceil(n / 64)
        (10, 64 << 20, 1),  # a row bigger than 16 MiB still makes a slice of one
    ],
)
def test_default_slice_size_rule(n_items, item_nbytes, expected):
    assert default_slice_size(n_items, item_nbytes) == expected


def test_default_slicing_depends_on_the_data_only():
    for n in (1, 7, 64, 65, 1000, 12345):
        ds = DataSet(list(range(n)))
        assert len(ds) <= MAX_DEFAULT_SLICES
        assert ds.slice_size == max(1, math.ceil(n / MAX_DEFAULT_SLICES))
    wide = np.zeros((1000, 8192))  # 64 KiB rows
    ds = DataSet(wide)
    assert ds.slice_size * wide[0].nbytes <= MAX_DEFAULT_SLICE_BYTES
    assert ds.slice_size == min(math.ceil(1000 / 64), MAX_DEFAULT_SLICE_BYTES // wide[0].nbytes)
    # The same data gives the same slices every time: nothing else goes in.
    assert all_keys(DataSet(wide)) == all_keys(ds)


# -- keys: content hashes ----------------------------------------------------------


def test_equal_content_gives_equal_keys_and_different_content_different_keys():
    a = np.random.default_rng(2).standard_normal((40, 5))
    keys = all_keys(DataSet(a, 10))
    assert len(set(keys)) == 4
    assert all_keys(DataSet(a.copy(), 10)) == keys
    b = a.copy()
    b[23, 4] += 1e-12
    changed = all_keys(DataSet(b, 10))
    assert [k == k2 for k, k2 in zip(keys, changed, strict=True)] == [True, True, False, True]


def test_keys_see_dtype_shape_and_byte_order():
    a = np.arange(24, dtype=np.int64).reshape(6, 4)
    key = DataSet(a, 6).key(0)
    assert DataSet(a.astype(np.float64), 6).key(0) != key
    assert DataSet(a.view(np.float64), 6).key(0) != key  # same bytes, other dtype
    assert DataSet(a.reshape(6, 2, 2), 6).key(0) != key  # same bytes, other shape
    assert DataSet(a.astype(">i8"), 6).key(0) != key
    assert DataSet(a.copy(order="F"), 6).key(0) == key  # memory layout is not content


def test_record_arrays_with_other_fields_do_not_share_keys():
    # Both dtypes are "|V8" with equal (zero) bytes: only the field layout tells them apart.
    a = np.zeros(4, dtype=[("a", "<i4"), ("b", "<f4")])
    b = np.zeros(4, dtype=[("x", "<f4"), ("y", "<i4")])
    assert a.dtype.str == b.dtype.str
    assert DataSet(a, 2).key(0) != DataSet(b, 2).key(0)


def test_datetime_arrays_can_be_keyed():
    t = np.arange("2024-01-01", "2024-01-11", dtype="datetime64[D]")
    ds = DataSet(t, 5)
    assert ds.key(0) != ds.key(1)
    assert ds.key_and_size(0)[1] == 5 * 8


def test_list_keys_follow_content_and_kind():
    keys = all_keys(DataSet(list(range(20)), 5))
    assert len(set(keys)) == 4
    assert all_keys(DataSet(list(range(20)), 5)) == keys
    assert all_keys(DataSet(tuple(range(20)), 5)) != keys
    changed = list(range(20))
    changed[7] = "seven"
    assert [a == b for a, b in zip(keys, all_keys(DataSet(changed, 5)), strict=True)] == [True, False, True, True]


def test_key_and_size_reports_raw_bytes_for_arrays():
    a = np.ones((10, 3), dtype=np.float32)
    ds = DataSet(a, 4)
    assert [ds.key_and_size(i)[1] for i in range(len(ds))] == [48, 48, 24]
    assert ds.key_and_size(0)[0] == ds.key(0)


# -- refusals, each saying what to do ------------------------------------------------


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ((x for x in range(3)), r"generator: pass list\(\.\.\.\)"),
        ({"a": 1}, r"dict: pass list\(d\.items\(\)\)"),
        ({1, 2}, r"set: pass sorted\(s\)"),
        (range(4), r"range: pass list\(r\)"),
        (42, "int: give a list, tuple, numpy array or .npy path"),
        (np.float64(2.5), "float64: give a list, tuple, numpy array or .npy path"),
        (np.array(3.0), "0-dimensional array cannot be sliced: give an array with rows"),
        ([], r"empty \(a list of length 0\): give it at least one item, or call map without a dataset"),
        ((), r"empty \(a tuple of length 0\)"),
        (np.zeros((0, 3)), r"empty \(an array of length 0\)"),
        ("table.csv", "must be a .npy file, not 'table.csv': load other files yourself"),
    ],
)
def test_unsliceable_data_is_refused_with_a_fix(data, says):
    with pytest.raises(DataSetError, match=says):
        DataSet(data)


def test_missing_npy_file_is_refused_with_a_fix(tmp_path):
    missing = tmp_path / "nothing.npy"
    with pytest.raises(DataSetError, match="does not exist") as info:
        DataSet(missing)
    assert str(missing) in str(info.value)
    assert "check the name" in str(info.value)


def test_empty_and_0d_npy_files_are_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    with pytest.raises(DataSetError, match=r"empty.npy' holds an array of length 0\): give it at least one"):
        DataSet(tmp_path / "empty.npy")
    np.save(tmp_path / "scalar.npy", np.float64(1.0))
    with pytest.raises(DataSetError, match="0-dimensional array, which cannot be sliced: save an array with rows"):
        DataSet(tmp_path / "scalar.npy")


@pytest.mark.parametrize(
    ("slice_size", "says"),
    [
        (0, "slice_size must be at least 1, not 0"),
        (-1, "slice_size must be at least 1, not -1"),
        (np.int64(0), "slice_size must be at least 1, not 0"),
        (1.5, "slice_size must be a positive whole number, not 1.5"),
        (2.0, "slice_size must be a positive whole number, not 2.0"),
        (True, "slice_size must be a positive whole number, not True"),
        ("3", "slice_size must be a positive whole number, not '3'"),
    ],
)
def test_bad_slice_size_is_refused(slice_size, says):
    with pytest.raises(DataSetError, match=says):
        DataSet([1, 2, 3], slice_size=slice_size)


def test_numpy_integer_slice_size_is_accepted():
    ds = DataSet([1, 2, 3], slice_size=np.int32(2))
    assert ds.slice_size == 2 and type(ds.slice_size) is int


def test_plain_list_slices_are_keyed_as_cloudpickle_would_and_others_still_by_cloudpickle():
    import cloudpickle

    from qjam_nb.codec import is_plain

    plain = [1, 2.5, "a", None, True, b"x", 1j]
    assert is_plain(plain) and is_plain(tuple(plain))
    assert pickle.dumps(plain, protocol=5) == cloudpickle.dumps(plain, protocol=5)  # so keys did not change
    nested = [[1, 2], {"a": np.arange(3)}, (np.ones(2), "b")]
    assert is_plain(nested) and pickle.dumps(nested, protocol=5) == cloudpickle.dumps(nested, protocol=5)
    assert not is_plain([lambda: 1]) and not is_plain([[[[[[1]]]]]]) and not is_plain([[lambda: 1]] * 65)
    assert not is_plain(np.array([object()])) and not is_plain({"a": {"b": {"c": [lambda: 1]}}})
    assert DataSet([lambda: 1, lambda: 2], 1).key(0) != DataSet([lambda: 2, lambda: 2], 1).key(0)


@pytest.mark.parametrize("data, size", [
    ([1, 2.5, "a", None, True, b"x", 1j] * 30, 4),  # every plain type, a short last slice
    (list(range(1000)), 1),
    ([1, [2], 3, 4], 2),  # one item that is not plain: slice by slice, as before
    ([1, 2, lambda: 3], 1),
])
def test_a_list_keyed_in_one_loop_has_the_keys_slice_by_slice_keying_gives(data, size):
    ds = DataSet(data, size)
    assert ds.keys_and_sizes() == [ds.key_and_size(i) for i in range(len(ds))]
    data[0] = "changed"  # a list is hashed again every call
    assert ds.keys_and_sizes()[0] == ds.key_and_size(0) != DataSet([1], 1).key(0)
