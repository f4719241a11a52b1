"""Ctrl-C in a script and the stop button in Jupyter: the call stops everywhere, promptly.

Done when: control returns within 2 s of SIGINT, every worker is idle (or
restarted) within 5 s, and the next call returns the right answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import hosts_for
from nbrun import error_of, new_notebook, text_of

BACKENDS = ("local", "ssh", "dask")  # on dask: the script's cluster is a client of a LocalCluster of the test's

SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    from qjam_nb import Cluster

    # As a terminal would have it: CI may run the suite as a background job, where SIGINT starts ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def nap(params, xs):
        import signal, time
        if params == "stubborn":  # a mapfunc deaf to SIGINT, like one stuck in a long C call
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(30)

    cluster = Cluster(sys.argv[1].split(), echo=False)
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        cluster.map(nap, sys.argv[2], list(range(6)), slice_size=1)
        print(json.dumps({"error": "not interrupted"}), flush=True)
    except KeyboardInterrupt:
        back = time.monotonic() - t0
        states = [w.state for w in cluster.workers]
        reasons = [w.reason for w in cluster.workers]  # what the report says when they are not idle
        t1 = time.monotonic()
        total = cluster.map(lambda p, xs: sum(xs), None, list(range(6)), slice_size=1)
        next_took = time.monotonic() - t1
        while time.monotonic() - t1 < 20 and any(w.state != "idle" for w in cluster.workers):
            time.sleep(0.2)  # (a Dask worker's nanny takes seconds to start it again)
            cluster.restart()
        print(json.dumps({"back_after": back, "states": states, "reasons": reasons, "next": total,
                          "next_took": next_took, "whole_after": time.monotonic() - t1,
                          "after": [w.state for w in cluster.workers],
                          "starts": [w.starts for w in cluster.workers]}), flush=True)
    cluster.shutdown()
""")


@pytest.mark.parametrize("mode", ["cooperative", "stubborn"])
def test_ctrl_c_in_a_script_stops_the_call_on_every_worker(backend, mode):
    if backend == "dask" and mode == "stubborn":
        pytest.skip("on Dask every mapfunc runs in a worker's thread, which no signal reaches: the cooperative "
                    "case is already the stubborn one (and signal.signal fails there)")
    hosts = " ".join(hosts_for(backend, ["local:2"]))
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, hosts, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert script.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # the call is running: both workers sleep in mapfunc
        sent = time.monotonic()
        script.send_signal(signal.SIGINT)
        report = json.loads(script.stdout.readline())
        assert time.monotonic() - sent < (30 if backend == "dask" else 5)
        assert report.get("error") is None
        assert report["back_after"] - 1.0 < 2.0, report  # control back within 2 s of the SIGINT
        if backend == "dask":
            # Restarted by their nannies, which takes seconds: the next call waits for one of them.
            assert report["next"] == 15 and report["next_took"] < 15, report
        else:
            assert report["states"] == ["idle", "idle"], report  # idle, or restarted and idle
            assert report["next"] == 15 and report["next_took"] < 5, report
        assert report["after"] == ["idle", "idle"], report
        if mode == "stubborn" or backend == "dask":
            # Deaf workers were killed and started again; on Dask every one is (a Dask worker runs mapfunc
            # in a thread, which nothing interrupts: past the grace its process is restarted).
            assert report["starts"] == [2, 2], report
        else:
            assert report["starts"] == [1, 1]  # interrupted mapfuncs: the same workers carry on
        assert script.wait(30) == 0
    finally:
        if script.poll() is None:
            script.kill()


def test_stop_button_in_jupyter_interrupts_the_cell_and_the_next_cell_works(kernel_name, tmp_path):
    from nbclient import NotebookClient

    nb = new_notebook(
        "import os\nprint(os.getpid())",
        "%load_ext qjam_nb\n%qjam_hosts local:2",
        "%%qjam_map -d list(range(6)) --slice-size 1\nimport time\ndef mapfunc(p, xs):\n    time.sleep(30)",
        "%%qjam_map -d list(range(6)) --slice-size 1\ndef mapfunc(p, xs):\n    return sum(xs)",
    )
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=60, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        kernel_pid = int(text_of(nb.cells[0]).strip())
        client.execute_cell(nb.cells[1], 1)
        timer = threading.Timer(1.5, os.kill, (kernel_pid, signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        client.execute_cell(nb.cells[2], 2)
        took = time.monotonic() - t0
        timer.join()
        client.execute_cell(nb.cells[3], 3)
    assert took < 1.5 + 2.0, took
    err = error_of(nb.cells[2])
    assert err is not None and err["ename"] == "KeyboardInterrupt"
    assert error_of(nb.cells[3]) is None and "15" in text_of(nb.cells[3])
