"""The Dask executor (``qjam_nb/executors/dask.py``) on real Dask clusters on 127.0.0.1.

The cluster-level modules (map, cache, replay, timeline) run on the ``dask``
backend too; here is what only Dask has: slices held by the scheduler's
workers under ``qjam-`` keys, the ``dask`` command pair with a scheduler file,
an unreachable scheduler, the host entries, and a script without a
``__main__`` guard.
"""

from __future__ import annotations

import operator
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EventLog, dask_cluster, stop_dask_clusters

from qjam_nb import Cluster
from qjam_nb import events as ev
from qjam_nb.cluster.hosts import dask_target
from qjam_nb.errors import HostError, WorkerError

distributed = pytest.importorskip("distributed", reason="the Dask executor needs distributed (pip install '.[dask]')")

MiB = 1 << 20


@pytest.fixture(scope="module")
def local_dask():
    """Two Dask worker processes on 127.0.0.1 (no dashboard), for this module."""
    yield dask_cluster(2)
    stop_dask_clusters()


@pytest.fixture
def client(local_dask):
    with distributed.Client(local_dask) as c:
        yield c


def qjam_keys(client) -> dict[str, set]:
    """Per worker address, the ``qjam-`` slice keys the scheduler says it holds."""
    return {a: {k for k in keys if str(k).startswith("qjam-") and "call" not in str(k)}
            for a, keys in client.has_what().items()}


def test_the_second_call_over_a_200_mib_array_sends_no_slice_bytes(client):
    X = np.arange(200 * MiB // 8, dtype=np.float64).reshape(-1, 1024)  # 25600 rows of 8 KiB
    X.flags.writeable = False  # its keys are hashed once
    log = EventLog()
    with Cluster(dask=client, echo=False, observers=[log]) as cluster:
        ex = cluster._executor
        assert sorted(cluster.worker_names) == ["dask/0", "dask/1"]
        first = cluster.map(lambda p, xs: xs.sum(axis=0), None, X, slice_size=1600)
        sent = log.of(ev.SliceSent)
        # every slice leaves the notebook (a slice the schedule healed onto a second worker is copied
        # there by Dask, from the worker that holds it; now and then one is scattered twice on a loaded
        # machine: not understood yet, see docs/performance.md)
        assert sorted({e.index for e in sent}) == list(range(16)) and ex.scattered_bytes >= X.nbytes, sent
        held = qjam_keys(client)
        assert set().union(*held.values()) == {f.key for f in ex.futures.values()} and len(ex.futures) == 16
        # the face's cache record is the scheduler's
        by_address = {w.address: w for w in cluster.workers}
        for address, keys in held.items():
            assert {ex.futures[k].key for k in by_address[address].cache} == keys
        assert all(k.startswith("qjam-") for keys in held.values() for k in keys)
        assert sum(n for _, n in cluster.cache_info().values()) == X.nbytes

        log.clear()
        scattered = ex.scattered_bytes
        second = cluster.map(lambda p, xs: xs.sum(axis=0) * p, 2.0, X, slice_size=1600)
        assert log.of(ev.SliceSent) == [], log.of(ev.SliceTaken)
        assert ex.scattered_bytes == scattered  # nothing left the notebook for the second call
        assert qjam_keys(client) == held
        done = log.of(ev.CallFinished)[-1]
        assert done.ok and done.slice_bytes_sent == 0 and done.slice_bytes_cached == X.nbytes
        np.testing.assert_array_equal(second, 2.0 * first)
        np.testing.assert_array_equal(first, X.sum(axis=0))
    # the cluster let go of its slices (the client is the caller's, and stays)
    deadline = time.monotonic() + 10
    while sum(len(keys) for keys in qjam_keys(client).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(len(keys) for keys in qjam_keys(client).values()) == 0


def test_a_mapfunc_error_names_the_dask_worker_and_slice_and_the_next_call_works(client):
    def fragile(p, xs):
        if 13 in xs:
            raise ValueError("thirteen")
        return sum(xs)

    with Cluster(dask=client, echo=False) as cluster:
        with pytest.raises(Exception) as caught:
            cluster.map(fragile, None, list(range(40)), slice_size=4)
        err = caught.value
        assert type(err).__name__ == "RemoteError"
        assert err.worker in cluster.worker_names and err.index == 3
        assert "ValueError: thirteen" in str(err) and "running mapfunc" in str(err)
        assert "raise ValueError" in err.remote_traceback
        assert cluster.map(lambda p, xs: sum(xs), None, list(range(40)), slice_size=4) == sum(range(40))


def test_a_cancelled_call_stops_the_other_workers_batches_between_slices(client):
    def slow_or_failing(p, xs):
        if xs[0] == 0:
            raise RuntimeError("first slice fails")
        time.sleep(0.05)
        return 1

    with Cluster(dask=client, echo=False) as cluster:
        started = time.monotonic()
        with pytest.raises(Exception, match="first slice fails"):
            cluster.map(slow_or_failing, None, list(range(200)), slice_size=1)
        assert time.monotonic() - started < 8  # not 200 slices of 50 ms: the rest were cancelled
        assert all(w.state == "idle" for w in cluster.workers)
        assert cluster.map(lambda p, xs: 1, None, list(range(6)), slice_size=1) == 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_a_clear_error_naming_its_address():
    port = free_port()  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(HostError) as caught:
        Cluster([f"dask://127.0.0.1:{port}"], start_timeout=2, echo=False)
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "dask scheduler" in message and "within 2 s" in message


def test_the_dask_command_pair_with_a_scheduler_file(tmp_path):
    """``dask scheduler`` and ``dask worker`` as a user starts them, found through their scheduler file."""
    file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    common = ["--scheduler-file", str(file), "--no-dashboard"]
    dask = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen([*dask, "scheduler", *common, "--host", "127.0.0.1", "--port", "0"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists():
            assert procs[0].poll() is None, procs[0].stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the scheduler wrote no file within 60 s"
            time.sleep(0.1)
        procs.append(subprocess.Popen(
            [*dask, "worker", *common, "--host", "127.0.0.1", "--nthreads", "1", "--name", "w0"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        with Cluster([f"dask:{file}"], echo=False, start_timeout=60) as cluster:
            assert cluster.worker_names == ["dask/w0"]
            assert cluster.workers[0].host == "127.0.0.1"
            assert cluster.map(lambda p, xs: sum(xs) * p, 3, list(range(10)), slice_size=3) == 135
            assert cluster.map(lambda p, xs: sum(xs) * p, 1, list(range(10)), slice_size=3) == 45
            assert cluster.last_call.slice_bytes_sent == 0
    finally:
        for proc in reversed(procs):  # each in a session of its own: its group is this test's (with the nanny's child)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def test_dask_host_entries():
    assert dask_target(["dask://127.0.0.1:8786"]) == ("address", "tcp://127.0.0.1:8786")
    assert dask_target("dask://node1:8786") == ("address", "tcp://node1:8786")
    assert dask_target(["dask:/tmp/scheduler.json"]) == ("file", "/tmp/scheduler.json")
    assert dask_target(["dask:local:3"]) == ("local", 3)
    assert dask_target(["dask:local"], workers_per_host=2) == ("local", 2)
    assert dask_target(["local:2", "node1"]) is None and dask_target(None) is None
    for bad, says in [
        (["dask://127.0.0.1"], "dask://HOST:PORT"),
        (["dask://127.0.0.1:99999"], "dask://HOST:PORT"),
        (["dask:local:0"], "dask:local:N"),
        (["dask:"], "dask:PATH"),
        (["dask:local:2", "local:2"], "alone"),
    ]:
        with pytest.raises(WorkerError, match=says):
            dask_target(bad)
    with pytest.raises(TypeError, match="either hosts or dask=client"):
        Cluster(["local:1"], dask=object())
    with pytest.raises(TypeError, match="distributed.Client"):
        Cluster(dask=object())


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path):
    """Dask starts LocalCluster workers by spawn, which imports the script again: a clear HostError."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from qjam_nb import Cluster
        with Cluster(["dask:local:1"], echo=False, start_timeout=30) as cluster:
            print("RESULT", cluster.map(lambda p, xs: 1))
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode != 0
    assert "HostError" in out.stderr and 'if __name__ == "__main__":' in out.stderr, out.stderr[-3000:]
    assert str(script) in out.stderr


def test_a_dask_worker_killed_mid_call_hands_its_slices_to_the_other_and_comes_back(client):
    """SIGKILL one Dask worker process (ours: the module's LocalCluster started it) as the first slice
    ends: its slices are lost and done by the other, its cache forgotten; its nanny restarts it, and
    it is back under its name for the next call."""
    with Cluster(dask=client, echo=False) as cluster:
        data = list(range(60))
        cluster.map(lambda p, xs: sum(xs), None, data, slice_size=2)  # slices cached on both
        victim = cluster.workers[0]
        held = {r.index for r in cluster.last_call.done_slices() if r.worker == victim.name}
        pid = client.run(os.getpid)[victim.address]  # the process Dask runs that worker in
        assert held and pid == victim.hello["pid"]
        log = EventLog()
        killed: list[int] = []

        def kill_on_first_done(event) -> None:
            log(event)
            if isinstance(event, ev.SliceDone) and not killed:
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)

        unsubscribe = cluster.events.subscribe(kill_on_first_done)

        def slow(p, xs):
            time.sleep(0.03)
            return sum(xs)

        try:
            assert cluster.map(slow, None, data, slice_size=2) == sum(data)
        finally:
            unsubscribe()
        lost = log.of(ev.SliceLost)
        assert lost and {e.worker for e in lost} == {victim.name}
        assert victim.state == "dead" and victim.cache == {}
        assert any(e.worker == victim.name and e.state == "dead" for e in log.of(ev.WorkerStateChanged))
        done = {e.index: e.worker for e in log.of(ev.SliceDone)}
        assert sorted(done) == list(range(30))
        # What it held and did not finish before it died went to the other worker, shipped (scattered again).
        moved = {i for i in held if done[i] != victim.name}
        assert moved and moved <= {e.index for e in log.of(ev.SliceSent) if e.worker != victim.name}
        # its nanny starts it again: the next call has it back, under its name, with a new process
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(client.scheduler_info()["workers"]) < 2:
            time.sleep(0.1)
        assert cluster.map(lambda p, xs: sum(xs), None, data, slice_size=2) == sum(data)
        assert killed == [pid] and victim.state == "idle" and victim.hello["pid"] != pid


def test_a_slice_still_running_past_the_cancel_grace_has_its_worker_restarted(client):
    """A timeout stops the call at once; the worker stuck in a 60 s slice is restarted (its nanny, in
    the background: seconds), and is back under its name, caching nothing."""
    from qjam_nb.cluster.cluster import CANCEL_GRACE
    from qjam_nb.errors import CallTimeoutError

    def stuck_on_zero(p, xs):
        if xs[0] == 0:
            time.sleep(60)
        return 1

    with Cluster(dask=client, echo=False) as cluster:
        cluster.map(lambda p, xs: 1, None, list(range(8)), slice_size=1)
        pids = {w.name: w.hello["pid"] for w in cluster.workers}
        started = time.monotonic()
        with pytest.raises(CallTimeoutError):
            cluster.map(stuck_on_zero, None, list(range(8)), slice_size=1, timeout=1)
        assert time.monotonic() - started < 1 + 2 * CANCEL_GRACE + 2  # not the nanny's restart
        while time.monotonic() - started < 30 and any(w.state != "idle" for w in cluster.workers):
            time.sleep(0.2)
            cluster.restart()
        restarted = [w for w in cluster.workers if w.hello["pid"] != pids[w.name]]
        assert len(restarted) == 1 and restarted[0].state == "idle" and restarted[0].cache == {}
        assert "cancelled" in cluster._executor.obituaries() or restarted[0].reason == "restarted"
        assert cluster.map(lambda p, xs: 1, None, list(range(8)), slice_size=1) == 8


def test_qjam_hosts_takes_a_dask_entry(ip, local_dask):
    """``%qjam_hosts dask://HOST:PORT`` parses as ``Cluster`` does, and ``%%qjam_map`` runs there."""
    address = local_dask.scheduler_address.replace("tcp://", "dask://")
    assert ip.run_cell(f"%qjam_hosts {address}").success
    ip.user_ns["numbers"] = list(range(30))
    result = ip.run_cell("%%qjam_map -d numbers --slice-size 4 -o total\n"
                         "def mapfunc(p, xs):\n    return sum(xs)\n")
    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == sum(range(30))
    assert ip.run_cell("%qjam_hosts dask://127.0.0.1").error_in_exec is not None  # no port: a clear error
    ip.run_cell("%qjam_shutdown")


def test_qjam_hosts_takes_a_client_of_the_notebook(ip, client):
    """``%qjam_hosts --dask EXPR``: a ``distributed.Client`` the notebook holds (a SLURMCluster's, say)."""
    ip.user_ns["my_client"] = client
    assert ip.run_cell("%qjam_hosts --dask my_client").success
    ip.user_ns["numbers"] = list(range(30))
    result = ip.run_cell("%%qjam_map -d numbers --slice-size 4 -o total\n"
                         "def mapfunc(p, xs):\n    return sum(xs)\n")
    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == sum(range(30))
    assert ip.run_cell("%qjam_hosts local:2 --dask my_client").error_in_exec is not None  # not both
    ip.run_cell("%qjam_shutdown")
    assert client.scheduler_info()["workers"]  # the notebook's client and its cluster are left running


def test_what_mapfunc_prints_comes_back_tagged_with_its_worker_and_slice(client):
    def chatty(p, xs):
        print(f"slice of {xs[0]}")
        if xs[0] == 6:
            print("six on stderr", file=sys.stderr)
        return len(xs)

    log = EventLog()
    with Cluster(dask=client, echo=False, observers=[log]) as cluster:
        assert cluster.map(chatty, None, list(range(12)), slice_size=3) == 12
        assigned = {e.index: e.worker for e in log.of(ev.SliceDone)}
        out = log.of(ev.StreamOutput)
        assert sorted((e.index, e.stream, e.text) for e in out) == sorted(
            [(i, "stdout", f"slice of {3 * i}\n") for i in range(4)] + [(2, "stderr", "six on stderr\n")])
        assert all(e.worker == assigned[e.index] and e.call == log.of(ev.CallStarted)[0].call for e in out)


def test_what_runs_on_the_dask_workers_travels_by_value_and_needs_no_qjam_nb_there():
    """Loaded in an interpreter that cannot import qjam_nb (the venv may have it installed: blocked)."""
    import cloudpickle

    from qjam_nb.executors.dask import TRAVEL

    blob = cloudpickle.dumps((TRAVEL.versions, TRAVEL.run_batch, TRAVEL.cancel))
    code = textwrap.dedent("""
        import pickle, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "qjam_nb":
                    raise ImportError("qjam_nb is not here: " + name)
        sys.meta_path.insert(0, Block())
        versions, run_batch, cancel = pickle.loads(sys.stdin.buffer.read())
        print(sorted(versions()), run_batch.__name__, cancel.__name__)
        print(sorted(m for m in sys.modules if m.startswith("qjam")))
    """)
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    hello = "['blas', 'cloudpickle', 'numpy', 'pid', 'python']"
    assert out.stdout.decode().splitlines() == [f"{hello} run_batch cancel", "[]"]
    from qjam_nb.executors import dask as executor

    assert "daskbatch" not in str(cloudpickle.list_registry_pickle_by_value()) and executor.TRAVEL is TRAVEL


def test_the_widget_links_the_dask_dashboard(client):
    """The scheduler's web server (its dashboard, with bokeh installed): the widget links it, and it answers."""
    import urllib.parse
    import urllib.request

    from qjam_nb.ui.widget import ClusterWidget

    with Cluster(dask=client, echo=False) as cluster:
        view = ClusterWidget(cluster)
        try:
            link = cluster.dashboard
            assert link and urllib.parse.urlsplit(link).hostname == "127.0.0.1", link
            assert f'href="{link}"' in view.box.children[0].value
        finally:
            view.close()
    health = urllib.parse.urljoin(link, "/health")
    with urllib.request.urlopen(health, timeout=10) as answer:
        assert answer.status == 200 and answer.read() == b"ok"


def test_float_sums_are_bit_identical_to_our_own_workers(client):
    """numpy sums an array off a 64-byte boundary in another order (other last bits); Dask hands a worker
    scattered arrays wherever they sit in its message. Each slice's sum on Dask equals, bit for bit, the
    same slice's sum on our local workers and here, first call and cached."""
    import numpy as np

    rows = np.random.default_rng(7).standard_normal((400, 1001))  # slices of 400 KB: out of band in Dask's messages
    sums_of = lambda p, xs: [float(np.sum(xs))]  # noqa: E731
    here = [float(np.sum(rows[i:i + 10])) for i in range(0, 400, 10)]
    with Cluster(["local:2"], echo=False) as ours:
        local = ours.map(sums_of, None, rows, operator.add, slice_size=10)  # (lists: the sums in slice order)
    with Cluster(dask=client, echo=False) as cluster:
        first = cluster.map(sums_of, None, rows, operator.add, slice_size=10)
        cached = cluster.map(sums_of, None, rows, operator.add, slice_size=10)
    assert local == here
    assert [i for i, (a, b) in enumerate(zip(first, here, strict=True)) if a != b] == []
    assert [i for i, (a, b) in enumerate(zip(cached, here, strict=True)) if a != b] == []
