"""benchmarks/ as a package: its modules import, its rows and targets agree, a saved run prints again,
and the peers' workloads travel by value (ipyparallel's and dask's processes cannot import ``benchmarks``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


def test_the_rows_and_targets_agree_and_every_peer_is_a_system():
    from benchmarks import rows
    from benchmarks.peers import base, dask_distributed, execnet_gateways, ipp, joblib_loky, pools, qjam

    assert {row for row, _, _ in rows.TARGETS} <= set(rows.ROWS)
    assert {group for group, *_ in rows.ROWS.values()} == set(rows.GROUPS)
    systems = [qjam.Qjam, pools.MPPool, pools.PPool, ipp.IPyParallel, dask_distributed.Dask,
               execnet_gateways.Execnet, joblib_loky.Joblib]
    assert all(issubclass(s, base.System) for s in systems)
    assert {s.name for s in systems if s.name} <= set(base.PEER_MODULES)


def test_the_workloads_travel_by_value(tmp_path):
    from benchmarks import measure  # noqa: F401  (every peer module, as run.py imports them)
    from benchmarks.peers import base

    # ...without registering a module by value, which would turn off qjam_nb's reuse of mapfunc pickles
    assert not cloudpickle.list_registry_pickle_by_value()
    blob = cloudpickle.dumps([base.inc_slice, base.list_sum])
    code = "import pickle, sys; inc, total = pickle.load(sys.stdin.buffer); print(inc([1, 2]), total([3, 4]))"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, cwd=tmp_path, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["[2,", "3]", "7"]


def test_a_saved_run_prints_its_tables_again_and_a_bad_row_is_named(tmp_path):
    from benchmarks.rows import ROWS, Config
    from benchmarks.samples import Results

    res = Results(Config(2, True))
    res.add("trivial", "qjam_nb local:2", "qjam", [0.2, 0.3])
    res.add("trivial", "execnet popen", "peer", [0.25, 0.26])
    res.add("params_ssh", "qjam_nb", "qjam", status="not available: no sshd")
    out = report_of(tmp_path, res, {"date": "2026-12-07 12:00:00", "repeat": 2, "quick": True})
    assert ROWS["trivial"][1] in out.stdout and "not available: no sshd" in out.stdout
    summary = re.sub(r" +", " ", out.stdout)
    assert "trivial | 0.25 ms/call | <= 1.5x execnet popen | 0.98x execnet popen (need <= 1.5x) | met" in summary
    bad = subprocess.run([sys.executable, str(RUN), "--only", "trivial,nope"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "--only: unknown row 'nope'; rows are trivial, params" in bad.stderr


def test_the_heal_rows_are_judged_against_the_ideal_both_steady_and_first_call(tmp_path):
    from benchmarks.heal import expected, ideal
    from benchmarks.rows import GROUPS, IDEAL, ROWS, TARGETS, Config
    from benchmarks.samples import Results

    assert "heal" in GROUPS
    for f in (2, 5, 10):
        assert ROWS[f"hetero_{f}x"][0] == ROWS[f"hetero_{f}x_first"][0] == "heal"
    judged = {row for row, text, _ in TARGETS if text == "<= 1.2x ideal"}
    assert judged == {"hetero_5x", "hetero_5x_first", "hetero_10x", "hetero_10x_first"}
    cfg = Config(2, False)
    assert abs(ideal(cfg, 10) - cfg.hetero_slices * cfg.hetero_work / 2.1) < 1e-12
    x = np.arange(12.0).reshape(6, 2)
    assert expected(x, 2) == 6.0 + 22.0 + 38.0  # the slices' sums, folded in slice order

    res = Results(cfg)
    for row, qjam in (("hetero_10x", [0.62, 0.60]), ("hetero_10x_first", [0.8, 0.9])):
        res.add(row, "qjam_nb local:3", "qjam", qjam)
        res.add(row, IDEAL, "ref", [ideal(cfg, 10)])
        res.add(row, "dask.distributed", "peer", [0.9, 1.0])
    out = report_of(tmp_path, res, {"date": "2026-12-08 01:00:00", "repeat": 2, "quick": False})
    summary = re.sub(r" +", " ", out.stdout)
    assert f"hetero_10x | 0.61 s/call | <= 1.2x ideal | 1.07x {IDEAL} (need <= 1.2x) | met" in summary
    assert f"hetero_10x_first | 0.85 s/call | <= 1.2x ideal | 1.49x {IDEAL} (need <= 1.2x) | MISSED" in summary


def report_of(tmp_path, res, meta: dict) -> subprocess.CompletedProcess:
    """``run.py --report`` of ``res`` saved as a run.json with ``meta`` (and the rest of a run's meta)."""
    meta = {"cpus": 2, "versions": {"python": "3"}, "load_average_at_start": [0.1], "load_average_at_end": [0.2],
            "total_seconds": 1.0, **meta}
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"meta": meta, "rows": res.rows, "extra": {}}))
    out = subprocess.run([sys.executable, str(RUN), "--report", str(saved)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_the_dask_rows_are_judged_against_plain_dask_on_the_same_cluster(tmp_path):
    from benchmarks import run
    from benchmarks.peers import base
    from benchmarks.rows import DASK_PLAIN, GROUPS, ROWS, TARGETS, Config
    from benchmarks.samples import Results

    assert "dask" in GROUPS and run.parse_only("dask") == {"dask"}
    rows = [row for row, spec in ROWS.items() if spec[0] == "dask"]
    assert rows == ["dask_trivial", "dask_params", "dask_first", "dask_second", "dask_tiny", "dask_tiny_cached"]
    judged = {row for row, _, spec in TARGETS if spec[0] == "ratio" and spec[1] == [DASK_PLAIN]}
    assert judged == {"dask_trivial", "dask_params", "dask_second", "dask_tiny_cached"}  # the cached-data rows
    # plain Dask's workloads travel by value to its workers, as the other peers' do
    blob = cloudpickle.dumps(base.theta_plus)
    code = ("import pickle, sys; import numpy as np; f = pickle.load(sys.stdin.buffer); "
            "print(f(np.array([3.0]), np.ones(2)))")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.decode().split() == ["[4.", "4.]"], out.stderr.decode()

    res = Results(Config(2, False))
    res.add("dask_second", "qjam_nb on Dask", "qjam", [4.0, 6.0])
    res.add("dask_second", DASK_PLAIN, "peer", [10.0, 10.0])
    res.add("dask_second", "qjam_nb local:2", "qjam+", [2.0, 2.0], "5.00x faster than plain Dask")
    res.add("dask_tiny_cached", "qjam_nb on Dask", "qjam", [300.0, 300.0])
    res.add("dask_tiny_cached", DASK_PLAIN, "peer", [200.0, 200.0])
    out = report_of(tmp_path, res, {"date": "2026-12-08 05:00:00", "repeat": 2, "quick": False})
    summary = re.sub(r" +", " ", out.stdout)
    assert f"dask_second | 5.00 ms | faster than plain Dask (same cluster) | 2.00x faster than {DASK_PLAIN} | met" \
        in summary
    assert f"dask_tiny_cached | 300 us/slice | faster than plain Dask (same cluster) | 1.50x slower than " \
           f"{DASK_PLAIN} | MISSED" in summary
    assert "5.00x faster than plain Dask" in out.stdout


def test_the_dask_group_runs_small_checks_every_answer_and_leaves_no_process(tmp_path):
    """The dask rows end to end at toy sizes (a LocalCluster of 2 on 127.0.0.1): every system's cell
    measured, answers checked, everything it started stopped (``ondask`` counts its children)."""
    pytest.importorskip("distributed", reason="the dask rows need distributed (pip install '.[dask]')")
    from benchmarks.ondask import OWN, PLAIN, ROWS, DaskRows
    from benchmarks.rows import Config
    from benchmarks.samples import Results

    cfg = Config(1, True)
    cfg.data_bytes, cfg.dask_tiny, cfg.batch_seconds, cfg.heavy_repeat = 1 << 20, 40, 0.01, 1
    res = Results(cfg)
    DaskRows(cfg, res, {}).run()
    for row in ROWS:
        cells = {c["system"]: c for c in res.rows[row]}
        assert set(cells) == {"qjam_nb on Dask", PLAIN, OWN}, res.rows[row]
        assert all("median" in c for c in cells.values()), res.rows[row]
        assert "than plain Dask" in cells[OWN]["note"]
    assert "shipped 0 slice bytes" in next(c for c in res.rows["dask_second"] if c["kind"] == "qjam")["note"]
    assert res.extra["dask_left_processes"] == []
