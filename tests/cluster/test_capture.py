"""A mapfunc that captures big data gets a warning naming each big variable and what to do instead."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qjam_nb import CaptureWarning, Cluster
from qjam_nb.cluster import shipping
from qjam_nb.cluster.shipping import big_captures, dumps_function

BIG = np.ones(1_600_000)  # 12.2 MiB: over CAPTURE_WARN_BYTES
SMALL = np.ones(10)


@pytest.fixture(scope="module")
def cluster():
    with Cluster(["local:2"], echo=False) as cluster:
        yield cluster


def warned(run) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    found = [w for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(found) == 1, [str(w.message) for w in found]
    warned.filename = found[0].filename  # where the warning points: the code that called map
    return str(found[0].message)


def test_a_big_global_is_named_with_its_size_and_the_call_still_works(cluster):
    def mapfunc(p, xs):
        return float(BIG[: len(xs)].sum())

    result = []
    message = warned(lambda: result.append(cluster.map(mapfunc, None, list(range(6)), slice_size=3)))
    assert result == [6.0]
    assert warned.filename == __file__
    assert message.startswith("mapfunc pickles to 12.2 MiB, sent to every worker on every call, "
                              "because it uses the global 'BIG' (12.2 MiB).")
    assert "-d NAME in %%qjam_map, dataset= in map" in message and "params (-p NAME / params=)" in message


def test_closure_cells_defaults_helpers_and_comprehensions_are_searched():
    weights = np.zeros(1_400_000)

    def helper(i):
        return BIG[i]

    def closure(p, xs):
        return weights[0]

    def default(p, xs, table=np.zeros(1_500_000)):
        return table[0]

    def uses_helper(p, xs):
        return helper(0)

    def comprehension(p, xs):
        return [BIG[i] for i in xs]

    assert big_captures(closure) == [("the variable 'weights'", pytest.approx(11.2e6, rel=0.01))]
    assert [label for label, _ in big_captures(default)] == ["the default of argument 'table'"]
    assert [label for label, _ in big_captures(uses_helper)] == ["the global 'BIG' (used by the variable 'helper')"]
    assert [label for label, _ in big_captures(comprehension)] == ["the global 'BIG'"]
    message = warned(lambda: dumps_function(uses_helper))
    assert "because it uses the global 'BIG' (used by the variable 'helper') (12.2 MiB)" in message


def test_no_warning_for_a_small_closure_and_the_three_biggest_when_none_is_big_alone(cluster, monkeypatch):
    def small(p, xs):
        return float(SMALL.sum()) + len(xs)

    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)
        assert cluster.map(small, None, [1, 2, 3], slice_size=1) == 33.0
    a, b, c, d = (np.ones(n) for n in (1000, 2000, 3000, 4000))

    def many(p, xs):
        return a[0] + b[0] + c[0] + d[0]

    monkeypatch.setattr(shipping, "CAPTURE_WARN_BYTES", 20_000)
    message = warned(lambda: dumps_function(many))
    assert ("because it uses the variable 'd' (31.4 KiB), the variable 'c' (23.6 KiB), "
            "the variable 'b' (15.7 KiB)") in message
    assert "'a'" not in message


def test_a_notebook_cell_capturing_a_notebook_variable_is_warned_about(cluster):
    from IPython.testing import globalipapp

    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    if "QjamMagics" not in shell.magics_manager.registry:
        shell.run_line_magic("load_ext", "qjam_nb")
    magics = shell.magics_manager.registry["QjamMagics"]
    magics.cluster = cluster  # the module's cluster, as if %qjam_hosts had started it
    try:
        shell.user_ns["features"] = np.ones((2_000, 800))  # 12.2 MiB
        cell = "def mapfunc(p, xs):\n    return float(features[xs[0]].sum())\n"
        message = warned(lambda: shell.user_ns.__setitem__(
            "out", shell.run_cell_magic("qjam_map", "-d [1, 2] --slice-size 1", cell)))
        assert shell.user_ns["out"] == 1600.0
        assert "because it uses the global 'features' (12.2 MiB)" in message
        assert warned.filename == __file__  # the line that ran the cell, not qjam_nb's or IPython's own
    finally:
        magics.cluster = None
        shell.user_ns.pop("features", None)
