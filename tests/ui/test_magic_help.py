"""Every magic explains itself (``%qjam_map?``), says what to type when there is no cluster, and %qjam_replay works."""

from __future__ import annotations

import pytest

from qjam_nb import ReplayError

MAGICS = ("qjam_hosts", "qjam_status", "qjam_timeline", "qjam_replay", "qjam_shutdown", "qjam_map")


def error_of(ip, cell: str) -> BaseException:
    error = ip.run_cell(cell).error_in_exec
    assert error is not None, cell
    return error


@pytest.mark.parametrize("name", MAGICS)
def test_every_magic_has_a_docstring_with_examples_of_itself(ip, name):
    kind = "cell" if name == "qjam_map" else "line"
    magic = ip.magics_manager.magics[kind][name]
    doc = magic.__doc__
    assert "Example" in doc
    prefix = "%%" if kind == "cell" else "%"
    examples = doc.split("Example", 1)[1]
    assert f"{prefix}{name}" in examples
    assert len(doc.split("Example", 1)[0].split()) > 20  # words on what it is for, before the examples
    # IPython's ? shows the same text (and, for magics with options, the options).
    ip.run_cell(f"{prefix}{name}?")


def test_without_a_cluster_each_magic_says_what_to_type(ip, capsys):
    for cell in ("%qjam_status", "%qjam_timeline", "%qjam_replay 0", "%qjam_hosts"):
        message = str(error_of(ip, cell))
        assert "no cluster is running: start one with %qjam_hosts local:2" in message, cell
    assert "then %qjam_replay 0 runs its slice 0 here" in str(error_of(ip, "%qjam_replay 0"))
    assert "%qjam_replay SLICE [--call N], e.g. %qjam_replay 0" in str(error_of(ip, "%qjam_replay"))
    capsys.readouterr()
    ip.run_cell("%qjam_shutdown")
    assert "no cluster is running (start one with %qjam_hosts local:2)" in capsys.readouterr().out


def test_qjam_replay_returns_the_slices_value_and_explains_a_bad_slice(ip):
    assert ip.run_cell("%qjam_hosts local:2").success
    ip.user_ns["numbers"] = [0.1 * i for i in range(30)]
    result = ip.run_cell("%%qjam_map -d numbers --slice-size 4 -o sums\n"
                         "def mapfunc(p, xs):\n    return [sum(x * x for x in xs)]\n"
                         "def reduce(a, b):\n    return a + b\n")
    assert result.success, result.error_in_exec
    sums = ip.user_ns["sums"]
    assert len(sums) == 8
    assert ip.run_cell("%qjam_replay 7").result == [sums[7]]
    assert ip.run_cell("value = %qjam_replay 2 --call 1").success and ip.user_ns["value"] == [sums[2]]
    error = error_of(ip, "%qjam_replay 8")
    assert isinstance(error, ReplayError)
    assert "call 1 has no slice 8: it had 8 slices, numbered 0..7" in str(error)


def test_qjam_hosts_blas_threads_option(ip, monkeypatch):
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    cluster = ip.run_cell("%qjam_hosts local:1 --blas-threads 1").result
    assert [w.hello["blas"]["threads"] for w in cluster.workers] == [1]
    assert [w.hello["blas"]["source"] for w in cluster.workers] == ["option"]
    cluster = ip.run_cell("%qjam_hosts local:1 --blas-threads off").result
    assert [w.hello["blas"]["source"] for w in cluster.workers] == ["off"]
    cluster = ip.run_cell("%qjam_hosts local:1 --blas-threads auto").result
    assert [w.hello["blas"]["source"] for w in cluster.workers] == ["share"]
    message = str(error_of(ip, "%qjam_hosts local:1 --blas-threads many"))
    assert "--blas-threads takes auto, off or a number of threads of at least 1, not 'many'" in message
    ip.run_cell("%qjam_shutdown")
