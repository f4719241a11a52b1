"""What cannot travel is refused early: before any worker runs, naming the culprit."""

from __future__ import annotations

import importlib.util
import sys
import threading

import cloudpickle
import pytest
from conftest import WITH_DASK

from qjam_nb import CallStarted, MapFuncError, QjamError, ShippingError, SliceSent

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)

GLOBAL_LOCK = threading.Lock()


def refused(cluster, events, mapfunc, params=None, dataset=(1, 2, 3), **options) -> str:
    """Run a call that must fail with ShippingError before anything happens; returns the message."""
    with pytest.raises(ShippingError) as info:
        cluster.map(mapfunc, params, list(dataset) if dataset is not None else None, **options)
    assert events.of(CallStarted) == [] and events.of(SliceSent) == []
    assert events.events == []  # nothing at all: no worker changed state, nothing was sent
    assert isinstance(info.value, QjamError)
    return str(info.value)


@pytest.fixture
def still_works(cluster2):
    """After each test the cluster still runs calls."""
    yield
    assert cluster2.map(lambda p, xs: sum(xs), None, [1, 2, 3]) == 6


# -- the closure -----------------------------------------------------------------------


def test_closure_over_a_file_open_for_writing_is_refused_and_named(cluster2, events, still_works, tmp_path):
    with open(tmp_path / "log.txt", "w") as log_file:

        def mapfunc(params, xs):
            log_file.write(str(xs))
            return len(xs)

        message = refused(cluster2, events, mapfunc)
    assert "mapfunc cannot be shipped to the workers" in message
    assert "the variable 'log_file'" in message
    assert "_io.TextIOWrapper" in message
    assert "Create it inside mapfunc" in message


def test_closure_over_a_binary_file_is_refused_and_named(cluster2, events, still_works, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 10)
    with open(tmp_path / "blob.bin", "rb") as blob:
        message = refused(cluster2, events, lambda p, xs: blob.read(1))
    assert "the variable 'blob'" in message
    assert "BufferedReader" in message


def test_closure_over_a_lock_is_refused_and_named(cluster2, events, still_works):
    counter_lock = threading.Lock()

    def mapfunc(params, xs):
        with counter_lock:
            return sum(xs)

    message = refused(cluster2, events, mapfunc)
    assert "the variable 'counter_lock'" in message
    assert "_thread.lock" in message
    assert "cannot pickle '_thread.lock' object" in message


def test_global_lock_is_named(cluster2, events, still_works):
    def mapfunc(params, xs):
        with GLOBAL_LOCK:
            return sum(xs)

    assert "the global 'GLOBAL_LOCK'" in refused(cluster2, events, mapfunc)


def test_lock_inside_a_helper_function_is_traced_to_it(cluster2, events, still_works):
    guard = threading.RLock()

    def helper(xs):
        with guard:
            return sum(xs)

    message = refused(cluster2, events, lambda p, xs: helper(xs))
    assert "the variable 'guard', used by the variable 'helper'" in message


def test_lock_held_by_the_object_of_a_bound_method_is_named(cluster2, events, still_works):
    class Model:
        def __init__(self):
            self.weights = [1.0, 2.0]
            self.update_lock = threading.Lock()

        def mapfunc(self, params, xs):
            return sum(xs) * self.weights[0]

    message = refused(cluster2, events, Model().mapfunc)
    assert "the attribute 'update_lock'" in message and "self" in message


def test_closure_over_plain_data_travels(cluster2, events):
    table = {"scale": 3, "names": ["a", "b"]}
    assert cluster2.map(lambda p, xs: sum(xs) * table["scale"], None, [1, 2, 3], slice_size=1) == 18
    assert len(events.of(CallStarted)) == 1


def test_reduce_is_not_shipped_so_it_may_close_over_a_lock(cluster2):
    lock = threading.Lock()

    def reduce(a, b):
        with lock:
            return a + b

    assert cluster2.map(lambda p, xs: sum(xs), None, list(range(10)), slice_size=3, reduce=reduce) == 45


# -- params ---------------------------------------------------------------------------


def test_unpicklable_params_are_refused_and_located(cluster2, events, still_works):
    lock = threading.Lock()
    message = refused(cluster2, events, lambda p, xs: 1, params={"rate": 0.1, "guard": lock})
    assert "params cannot be pickled" in message
    assert "(at params['guard'])" in message
    message = refused(cluster2, events, lambda p, xs: 1, params=[1, (2, lock)])
    assert "(at params[1][1])" in message
    message = refused(cluster2, events, lambda p, xs: 1, params=lock, dataset=None)
    assert "params cannot be pickled" in message and "_thread.lock" in message


# -- mapfunc and reduce that cannot be called --------------------------------------------


@pytest.mark.parametrize(
    "mapfunc",
    [
        lambda params: 1,
        lambda: 1,
        lambda params, xs, extra: 1,
        lambda params, xs, *, flag: 1,
    ],
    ids=["one argument", "no argument", "three arguments", "required keyword"],
)
def test_mapfunc_with_wrong_arity_is_refused(cluster2, events, mapfunc):
    with pytest.raises(MapFuncError, match=r"mapfunc must take two arguments, \(params, slice\); <lambda>\("):
        cluster2.map(mapfunc, None, [1, 2])
    assert events.events == []


@pytest.mark.parametrize("mapfunc", [5, "mapfunc", None, [len]], ids=["int", "str", "None", "list"])
def test_non_callable_mapfunc_is_refused(cluster2, events, mapfunc):
    says = rf"mapfunc must be a function of \(params, slice\), not a {type(mapfunc).__name__}"
    with pytest.raises(MapFuncError, match=says):
        cluster2.map(mapfunc, None, [1, 2])
    assert events.events == []


def test_reduce_that_cannot_take_two_results_is_refused(cluster2, events):
    with pytest.raises(MapFuncError, match=r"reduce must take two arguments, \(a, b\)"):
        cluster2.map(lambda p, xs: 1, None, [1, 2], reduce=lambda a: a)
    with pytest.raises(MapFuncError, match=r"reduce must be a function of \(a, b\), not a str"):
        cluster2.map(lambda p, xs: 1, None, [1, 2], reduce="max")
    assert events.events == []


def test_callables_that_take_two_arguments_are_accepted(cluster2):
    class Scaled:
        def __init__(self, k):
            self.k = k

        def __call__(self, params, xs):
            return self.k * sum(xs)

    def with_default(params, xs, extra=10):
        return sum(xs) + extra

    def with_varargs(*args):
        return len(args)

    data = [1, 2, 3, 4]
    assert cluster2.map(Scaled(2), None, data, slice_size=2) == 20
    assert cluster2.map(with_default, None, data, slice_size=2) == 30
    assert cluster2.map(with_varargs, None, data, slice_size=2) == 4


# -- a function's pickle, reused while nothing it reaches can have changed ---------------

CELL_SOURCE = """
SCALE = 3
TABLE = [1, 2, 3]

def scaled(params, xs):
    return [x * SCALE for x in xs]

def looked_up(params, xs):
    return [TABLE[x] for x in xs]
"""


@pytest.fixture
def cell():
    """Functions as a notebook cell makes them: in a module no worker can import, so shipped by value."""
    namespace = {"__name__": "qjam_test_cell_shipping"}
    exec(compile(CELL_SOURCE, "<cell>", "exec"), namespace)
    return namespace


def test_an_unchanged_function_reuses_its_pickle_until_a_global_it_uses_is_rebound(cell):
    from qjam_nb.cluster.shipping import dumps_function

    first = dumps_function(cell["scaled"])
    assert dumps_function(cell["scaled"]) is first
    cell["SCALE"] = 4
    again = dumps_function(cell["scaled"])
    assert again is not first and cloudpickle.loads(again)(None, [1]) == [4]


def test_a_function_reaching_a_mutable_object_is_pickled_again_every_call(cell):
    from qjam_nb.cluster.shipping import dumps_function

    first = dumps_function(cell["looked_up"])
    assert dumps_function(cell["looked_up"]) is not first


def test_a_function_of_an_imported_module_reuses_its_pickle_whatever_its_globals_hold(tmp_path, monkeypatch):
    """cloudpickle ships it by module and name, so a mutable module constant does not force a new pickle;
    once the module no longer holds it under that name, it is pickled by value, and afresh."""
    from qjam_nb.cluster.shipping import dumps_function

    path = tmp_path / "qjam_test_imported_mapfunc.py"
    path.write_text("TABLE = [1, 2, 3]\n\ndef looked_up(params, xs):\n    return [TABLE[x] for x in xs]\n")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)  # imported, as far as cloudpickle can tell
    spec.loader.exec_module(module)
    first = dumps_function(module.looked_up)
    assert dumps_function(module.looked_up) is first and len(first) < 200  # a reference, not code
    func, module.looked_up = module.looked_up, lambda params, xs: xs
    by_value = dumps_function(func)
    assert by_value != first and cloudpickle.loads(by_value)(None, [0, 2]) == [1, 3]
    assert dumps_function(func) is not by_value  # by value it reaches a list: pickled every call


def test_globals_changed_between_calls_reach_the_workers(cluster2, cell):
    def run(name, data):
        return cluster2.map(cell[name], None, data, lambda a, b: a + b)  # concatenated in slice order

    assert run("looked_up", [0, 1, 2]) == [1, 2, 3]
    cell["TABLE"][0] = 10  # in place
    assert run("looked_up", [0, 1, 2]) == [10, 2, 3]
    assert run("scaled", [1, 2]) == [3, 6]
    cell["SCALE"] = 5  # rebound
    assert run("scaled", [1, 2]) == [5, 10]


def test_params_are_pickled_once_with_their_digest(cluster2, events):
    """One ``Pickled`` a call: the digest the timeline shows is the one made with the pickle, not a second hash."""
    import numpy as np

    from qjam_nb.cluster.params import params_hash
    from qjam_nb.cluster.shipping import dumps_params
    from qjam_nb.codec import Pickled

    params = {"w": np.arange(1000.0), "step": 0.5}
    pickled = dumps_params(params)
    assert isinstance(pickled, Pickled) and pickled.digest == params_hash(pickled.wire())
    assert len(pickled.buffers) == 1  # the array travels beside the pickle, not in it
    assert dumps_params({"w": np.arange(1000.0), "step": 0.25}).digest != pickled.digest
    cluster2.map(lambda p, xs: p["step"], params)
    [started] = [e for e in events.events if type(e).__name__ == "CallStarted"]
    assert started.params_hash == pickled.digest == cluster2.last_call.params_hash
