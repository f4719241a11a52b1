"""The default reduce (qjam's ``a + b``) and the fold that keeps slice order."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from qjam_nb import ReduceError, default_reduce
from qjam_nb.cluster.reduce import OrderedFold

# -- default_reduce ---------------------------------------------------------------


def test_numbers_and_arrays_add():
    assert default_reduce(2, 3) == 5
    assert default_reduce(0.5, 0.25) == 0.75
    np.testing.assert_array_equal(default_reduce(np.arange(3), np.ones(3)), [1.0, 2.0, 3.0])


def test_lists_and_tuples_add_element_wise_and_keep_their_type():
    assert default_reduce([1, 2, 3], [10, 20, 30]) == [11, 22, 33]
    out = default_reduce((1, 2.5), (3, 0.5))
    assert out == (4, 3.0) and type(out) is tuple
    nested = default_reduce([np.ones(2), (1, [2])], [np.ones(2), (1, [3])])
    np.testing.assert_array_equal(nested[0], [2.0, 2.0])
    assert nested[1] == (2, [5])


def test_namedtuples_add_element_wise():
    Stats = collections.namedtuple("Stats", "count total")
    out = default_reduce(Stats(1, 2.0), Stats(3, 4.0))
    assert out == Stats(4, 6.0) and type(out) is Stats


def test_dicts_add_by_key_and_keep_keys_seen_once():
    assert default_reduce({"a": 1, "b": [1, 1]}, {"b": [2, 3], "c": 5}) == {"a": 1, "b": [3, 4], "c": 5}


def test_none_with_none_is_none():
    assert default_reduce(None, None) is None


def test_lists_of_different_length_are_refused():
    with pytest.raises(ValueError, match="length 2 to one of length 3"):
        default_reduce([1, 2], [1, 2, 3])


def test_list_and_tuple_do_not_mix():
    with pytest.raises(TypeError):
        default_reduce([1], (1,))


# -- OrderedFold -------------------------------------------------------------------


def test_fold_keeps_slice_order_whatever_the_arrival_order():
    fold = OrderedFold(5, lambda a, b: a + b)
    for index in (3, 1, 4, 0, 2):
        assert not fold.complete
        fold.add(index, [index])
    assert fold.complete
    assert fold.value == [0, 1, 2, 3, 4]


def test_fold_combines_what_it_can_and_holds_the_rest():
    fold = OrderedFold(4, None)
    fold.add(2, 20)
    fold.add(3, 30)
    assert fold.next == 0 and fold.value is None and set(fold.pending) == {2, 3}
    fold.add(0, 1)
    assert fold.next == 1 and fold.value == 1
    fold.add(1, 10)
    assert fold.complete and not fold.pending and fold.value == 61
    assert (fold.first_index, fold.last_index) == (0, 3)


def test_fold_of_floats_is_the_left_fold_in_slice_order():
    values = [1e16, 1.0, -1e16, 1.0]
    fold = OrderedFold(4, None)
    for index in (2, 3, 0, 1):
        fold.add(index, values[index])
    assert fold.value == ((1e16 + 1.0) + -1e16) + 1.0
    assert fold.value != ((1e16 + -1e16) + 1.0) + 1.0  # the order matters for these values


def test_fold_of_one_result_is_that_result():
    fold = OrderedFold(1, lambda a, b: pytest.fail("nothing to combine"))
    fold.add(0, "only")
    assert fold.complete and fold.value == "only"


def test_default_reduce_error_names_both_slice_ranges_and_types():
    fold = OrderedFold(4, None)
    fold.add(0, 1)
    fold.add(1, 2)
    fold.add(3, 4)
    with pytest.raises(ReduceError) as info:
        fold.add(2, "three")
    message = str(info.value)
    assert "the default reduce (a + b)" in message
    assert "slices 0..1 (int)" in message
    assert "slice 2 (str)" in message
    assert "define reduce(a, b)" in message
    assert isinstance(info.value.__cause__, TypeError)


def test_custom_reduce_error_says_it_was_yours():
    def reduce(a, b):
        raise KeyError("nope")

    fold = OrderedFold(2, reduce)
    fold.add(1, {"x": 1})
    with pytest.raises(ReduceError, match=r"your reduce could not combine .*slices 0\.\.0 \(list\).*slice 1 \(dict\)"):
        fold.add(0, [1])
