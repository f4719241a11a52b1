"""Replay runs one slice of a recent call here, bit-identical to what its worker returned, or says why not."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
from conftest import WITH_DASK

from qjam_nb import RemoteError, ReplayError
from qjam_nb.cluster import replay as replay_module
from qjam_nb.cluster.replay import ReplayLog

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)


def tanh_sums(theta, xs):
    import numpy as np

    return [np.sum(np.tanh(xs @ theta))]  # a one-item list: the reduce below collects them


def weighted(theta, xs):
    import numpy as np

    return [xs.T @ np.exp(np.sin(xs @ theta))]


def collect(a, b):
    return a + b


def fail_on_seven(params, xs):
    if 7 in xs:
        raise ValueError(f"seven in {list(xs)}")
    return [sum(xs)]


for f in (tanh_sums, weighted, collect, fail_on_seven):
    f.__module__ = "__main__"  # ship them by value, as a notebook's functions: ssh workers cannot import tests


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((900, 6)), rng.standard_normal(6)


def test_replay_is_bit_identical_to_each_workers_float_result(cluster2, data):
    X, theta = data
    results = cluster2.map(tanh_sums, theta, X, reduce=collect, slice_size=40)
    assert len(results) == 23
    for i, value in enumerate(results):
        [again] = cluster2.replay(i)
        assert type(again) is type(value) is np.float64
        assert again.tobytes() == value.tobytes(), i


def test_replay_of_array_results_and_of_an_older_call_after_params_changed_in_place(cluster2, data):
    X, theta = data
    first = cluster2.map(weighted, theta, X, reduce=collect, slice_size=100)
    call = cluster2.last_call.call
    theta *= 3  # in place: the call's params were copied for replay
    second = cluster2.map(weighted, theta, X, reduce=collect, slice_size=100)
    for i in range(len(first)):
        assert cluster2.replay(i)[0].tobytes() == second[i].tobytes()
        assert cluster2.replay(i, call=call)[0].tobytes() == first[i].tobytes()
    assert not np.array_equal(first[0], second[0])


def test_replay_errors_name_the_slice_the_call_and_what_to_do(cluster2, data):
    X, theta = data
    X = X.copy()
    cluster2.map(tanh_sums, theta, X, reduce=collect, slice_size=100)
    last = cluster2.last_call.call
    with pytest.raises(ReplayError, match=rf"call {last} has no slice 9: it had 9 slices, numbered 0..8"):
        cluster2.replay(9)
    X[450, 2] += 1.0  # slice 4
    assert cluster2.replay(3) is not None
    with pytest.raises(ReplayError, match=rf"slice 4 of call {last} changed since the call .*Run the call again"):
        cluster2.replay(4)
    for _ in range(3):
        cluster2.map(lambda p, xs: 1)
    with pytest.raises(ReplayError, match=rf"call {last} is not remembered: replay keeps the last 3 calls "
                                          rf"\({last + 1}, {last + 2}, {last + 3}\)"):
        cluster2.replay(0, call=last)
    assert cluster2.replay(1) == 1  # a call without a dataset: one task per worker
    with pytest.raises(ReplayError, match=r"has no slice 2: it had 2 tasks \(one per worker"):
        cluster2.replay(2)
    with pytest.raises(ReplayError, match=r"no call to replay yet: run cluster.map\(...\)"):
        ReplayLog().replay(0)


def test_a_slice_that_failed_on_a_worker_raises_here_for_the_debugger(cluster2):
    with pytest.raises(RemoteError) as info:
        cluster2.map(fail_on_seven, None, list(range(12)), reduce=collect, slice_size=4)
    assert info.value.index == 1
    with pytest.raises(ValueError, match=r"seven in \[4, 5, 6, 7\]") as replayed:
        cluster2.replay(1)
    # The failing frame is this file's fail_on_seven, with its source line, as a debugger will show it.
    frame = traceback.extract_tb(replayed.value.__traceback__)[-1]
    assert (frame.filename, frame.name) == (__file__, "fail_on_seven") and "raise ValueError" in frame.line
    assert cluster2.replay(2) == [8 + 9 + 10 + 11]


def test_a_replayed_function_shipped_by_value_shows_its_source_lines(cluster2):
    def fail_on_three(params, xs):  # local: cloudpickle ships it by value, as a notebook cell's
        if 3 in xs:
            raise ValueError("three")
        return [sum(xs)]

    with pytest.raises(RemoteError):
        cluster2.map(fail_on_three, None, list(range(6)), reduce=collect, slice_size=2)
    with pytest.raises(ValueError, match="three") as replayed:
        cluster2.replay(1)
    frame = traceback.extract_tb(replayed.value.__traceback__)[-1]
    assert (frame.filename, frame.name) == (__file__, "fail_on_three")
    assert frame.line == 'raise ValueError("three")'


def test_replay_gives_mapfunc_a_copy_of_a_list_slice_and_a_read_only_array(cluster2):
    items = [[1], [2], [3], [4]]

    def grab(params, xs):
        xs[0].append(99)
        return [len(xs[0])]

    assert cluster2.map(grab, None, items, reduce=collect, slice_size=2) == [2, 2]
    assert cluster2.replay(1) == [2]
    assert items == [[1], [2], [3], [4]]  # the notebook's data is untouched, as by the workers

    def write(params, xs):
        xs[0, 0] = 1.0
        return 0

    with pytest.raises(RemoteError, match="read-only"):
        cluster2.map(write, None, np.zeros((4, 2)), slice_size=2)
    with pytest.raises(ValueError, match="read-only"):
        cluster2.replay(0)


def test_big_params_are_checked_instead_of_copied(cluster2, data, monkeypatch):
    X, theta = data
    monkeypatch.setattr(replay_module, "COPY_PARAMS_BYTES", 0)
    theta = theta.copy()
    values = cluster2.map(tanh_sums, theta, X, reduce=collect, slice_size=300)
    assert cluster2.replay(2)[0] == values[2]
    theta[0] = 0.0
    with pytest.raises(ReplayError, match=r"the params of call \d+ changed in place since the call"):
        cluster2.replay(2)
