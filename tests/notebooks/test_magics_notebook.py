"""The magics, end to end, in a real kernel: what a notebook user sees."""

from __future__ import annotations

import re

import pytest
from nbrun import error_of, new_notebook, run_notebook, text_of

CELLS = {
    "load": "%load_ext qjam_nb",
    "hosts": "%qjam_hosts local:2",
    "data": (
        "import numpy as np\n"
        "X = np.arange(101 * 101, dtype=float).reshape(101, 101)\n"
        "def scale(v):\n"
        "    return 2 * v\n"
        "from functools import reduce  # a notebook-level reduce must not be picked up"
    ),
    "map": (
        "%%qjam_map -p 3 -d X -o total --slice-size 7\n"
        "def mapfunc(p, xs):\n"
        "    print('rows in this slice:', len(xs))\n"
        "    return scale(xs.sum()) * p"
    ),
    "check": "assert total == 6 * X.sum(), total\nprint('total ok')",
    "reduce": (
        "%%qjam_map -d list(range(10)) --slice-size 3 -o maxima\n"
        "def mapfunc(p, xs):\n"
        "    return [max(xs)]\n"
        "def reduce(a, b):\n"
        "    return a + b"
    ),
    "boom": (
        "%%qjam_map -d [1, 2, 3, 4] --slice-size 1\n"
        "def mapfunc(p, xs):\n"
        "    return 1 / (xs[0] - 3)"
    ),
    "after": "%%qjam_map -d [1, 2, 3] --slice-size 1\ndef mapfunc(p, xs):\n    return sum(xs)",
    "nomap": "%%qjam_map\nx = 1",
    "many": (
        "import time\n"
        "%%qjam_map -d list(range(400)) --slice-size 1 -o many\n"
        "import time\n"
        "def mapfunc(p, xs):\n"
        "    time.sleep(0.002)\n"
        "    return xs[0]"
    ),
    "status": "%qjam_status",
    "shutdown": "%qjam_shutdown",
}
# A cell magic must be the first line of its cell.
CELLS["many"] = CELLS["many"].split("\n", 1)[1]


BACKENDS = ("local", "ssh", "dask")
HOSTS = {"local": "%qjam_hosts local:2", "ssh": "%qjam_hosts sshhost -n 2", "dask": "%qjam_hosts dask:local:2"}
WORKER = r"(local|sshhost|dask)/[01]"


@pytest.fixture(scope="module")
def executed(kernel_name, tmp_path_factory, backend):
    cells = dict(CELLS, hosts=HOSTS[backend])
    nb = new_notebook(*cells.values())
    client = run_notebook(nb, kernel_name, tmp_path_factory.mktemp("nb"))
    cells = dict(zip(CELLS, nb.cells, strict=True))
    return nb, cells, client


def test_map_cell_value_is_the_reduced_result_and_is_stored(executed):
    _, cells, _ = executed
    assert error_of(cells["map"]) is None, text_of(cells["map"])
    result = next(o for o in cells["map"].outputs if o["output_type"] == "execute_result")
    assert float(result["data"]["text/plain"].split("(")[-1].rstrip(")")) == 6 * sum(range(101 * 101))
    assert "total ok" in text_of(cells["check"])


def test_print_inside_mapfunc_reaches_the_cell_tagged_with_the_worker(executed):
    _, cells, _ = executed
    lines = [ln for ln in text_of(cells["map"]).splitlines() if "rows in this slice" in ln]
    assert len(lines) == 15  # one per slice: ceil(101 / 7)
    assert all(re.match(rf"\[{WORKER}\] rows in this slice: [0-9]+", ln) for ln in lines)


def test_reduce_defined_in_the_cell_replaces_the_default(executed):
    _, cells, _ = executed
    assert "[2, 5, 8, 9]" in text_of(cells["reduce"])  # concatenated, not added element-wise


def test_exception_in_mapfunc_shows_remote_traceback_with_worker_and_slice(executed):
    _, cells, _ = executed
    err = error_of(cells["boom"])
    assert err is not None and err["ename"] == "RemoteError"
    shown = "\n".join(err["traceback"])
    assert re.search(rf"ZeroDivisionError on worker {WORKER}, slice 2", shown)
    assert "return 1 / (xs[0] - 3)" in shown  # the cell's own source line
    assert "ZeroDivisionError: division by zero" in shown


def test_next_cell_works_after_a_remote_exception(executed):
    _, cells, _ = executed
    assert error_of(cells["after"]) is None
    assert "6" in text_of(cells["after"])


def test_cell_without_mapfunc_says_so(executed):
    _, cells, _ = executed
    # IPython shows a UsageError as a message on stderr, without a traceback.
    stderr = [o["text"] for o in cells["nomap"].outputs if o.get("name") == "stderr"]
    assert any("UsageError: this cell defines no mapfunc" in text for text in stderr), stderr


def test_widget_updates_live_during_a_call_of_many_slices(executed):
    _, cells, client = executed
    index = list(CELLS).index("many")
    assert error_of(cells["many"]) is None, text_of(cells["many"])
    # The hosts cell's widget and the call's own bar both redraw while the call runs.
    assert client.updates.get(index, 0) >= 5, client.updates


def _widget_states(nb) -> list[dict]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [m["state"] for m in state.values()]


def test_widget_model_shows_a_row_per_worker_with_state_progress_and_cache(executed):
    nb, _, _ = executed
    values = [s.get("value") for s in _widget_states(nb) if isinstance(s.get("value"), str)]
    names = {v for v in values if re.fullmatch(rf'<code title="BLAS threads: [^"<>]+">{WORKER}</code>', v)}
    assert len(names) == 2  # hovering a name shows its BLAS threads
    assert any(re.search(r">(idle|stopped)<", v) for v in values)
    # done/total of the 400-slice call, per worker: they add up to 400
    counts = [tuple(map(int, v.split("/"))) for v in values if re.fullmatch(r"\d+/\d+", v)]
    assert any(a + b == 400 for (a, _), (b, _) in zip(counts, counts[1:], strict=False))
    assert any(re.fullmatch(r"\d+ slices, (\d+ B|\d+\.\d [KMGT]iB)", v) and not v.startswith("0 ") for v in values)


def test_status_and_shutdown(executed):
    _, cells, _ = executed
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cells["status"].outputs)
    assert "stopped 2 workers" in text_of(cells["shutdown"])
