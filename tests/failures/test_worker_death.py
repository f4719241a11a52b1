"""Workers that die mid-call: the answer stays exact, the death is shown, and the cluster comes back."""

from __future__ import annotations

import os
import signal
import time

import pytest
import sshd

from qjam_nb import CallStarted, HostReady, SliceDone, WorkerError, WorkerStateChanged
from qjam_nb.ui.widget import ClusterWidget

DATA = list(range(80))


def slow_sum(params, xs):
    import time

    time.sleep(0.02)
    return sum(xs)


slow_sum.__module__ = "__main__"  # ship it by value, as a notebook's function: ssh workers cannot import tests


def kill_after(n_done: int, pid_of, sig=signal.SIGKILL):
    """Observer: once ``n_done`` slices are done, kill the process ``pid_of()`` names (once)."""
    state = {"done": 0, "killed": None}

    def observe(event):
        if isinstance(event, SliceDone):
            state["done"] += 1
            if state["done"] == n_done and state["killed"] is None:
                state["killed"] = pid_of()
                os.kill(state["killed"], sig)

    return observe, state


def test_sigkill_of_one_of_three_workers_mid_call_keeps_the_exact_answer(make_cluster, record):
    cluster = make_cluster(["local:3"])
    log = record(cluster)
    widget = ClusterWidget(cluster)
    victim = cluster.workers[1]
    observe, state = kill_after(10, lambda: victim.hello["pid"])
    cluster.events.subscribe(observe)
    assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
    assert state["killed"] is not None
    deaths = [e for e in log.of(WorkerStateChanged) if e.state == "dead"]
    assert [e.worker for e in deaths] == [victim.name]
    assert "SIGKILL" in deaths[0].reason or "stream closed" in deaths[0].reason
    widget.redraw()
    assert ">dead<" in widget.rows[victim.name]["state"].value
    # After the call the others did the victim's share; the next call brings it back and uses all three.
    log.clear()
    assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
    revived = [e for e in log.of(WorkerStateChanged) if e.worker == victim.name]
    assert [e.state for e in revived] == ["starting", "idle", "busy", "idle"]
    assert revived[1].reason == "restarted"
    assert log.of(CallStarted)[0].workers == tuple(cluster.worker_names)
    assert {e.worker for e in log.of(SliceDone)} == set(cluster.worker_names)
    assert victim.hello["pid"] != state["killed"]


def sshd_session_processes(daemon_pid: int) -> list[int]:
    """The per-connection sshd processes under a listening sshd (not the commands they run)."""
    return sshd.processes_running(daemon_pid, lambda cmdline: cmdline.startswith(b"sshd"))


def test_killing_the_sshd_session_of_one_worker_keeps_the_answer_and_reconnects(ssh_world, record):
    from qjam_nb import Cluster

    with Cluster(["sshhost:2", "sshhost2:1"], echo=False) as cluster:
        log = record(cluster)
        daemon = ssh_world.hosts[1].process.pid  # the sshd of 127.0.0.2, carrying sshhost2/0's channel
        sessions = sshd_session_processes(daemon)
        assert sessions
        observe, state = kill_after(10, lambda: sessions[0])
        cluster.events.subscribe(observe)
        assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
        assert state["killed"] is not None
        deaths = [e for e in log.of(WorkerStateChanged) if e.state == "dead"]
        assert [e.worker for e in deaths] == ["sshhost2/0"]
        cluster.events.unsubscribe(observe)
        log.clear()
        assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
        assert [e.host for e in log.of(HostReady)] == ["sshhost2"]  # connected again
        assert {e.worker for e in log.of(SliceDone)} == {"sshhost/0", "sshhost/1", "sshhost2/0"}


def test_sys_exit_on_every_slice_fails_naming_the_slice_and_exit_status(make_cluster):
    cluster = make_cluster(["local:2"])

    def leave(params, xs):
        import sys

        sys.exit(-1)

    with pytest.raises(WorkerError) as info:
        cluster.map(leave, None, [1, 2, 3, 4], slice_size=1)
    message = str(info.value)
    assert "running slice" in message and "exited with status 255" in message
    assert "sys.exit(-1) in mapfunc, slice" in message  # the worker's last stderr line
    assert cluster.map(lambda p, xs: sum(xs), None, [1, 2, 3, 4], slice_size=1) == 10


def test_a_slice_that_kills_two_workers_in_turn_is_not_tried_again(make_cluster):
    cluster = make_cluster(["local:3"])

    def poison(params, xs):
        import os

        if xs[0] == 7:
            os.kill(os.getpid(), 9)
        return xs[0]

    with pytest.raises(WorkerError, match=r"slice 7 killed 2 workers in turn, so it is not tried again") as info:
        cluster.map(poison, None, list(range(20)), slice_size=1)
    assert info.value.args[0].count("died running slice 7: killed by SIGKILL") == 2
    assert len(cluster.map(lambda p, xs: [1], None, list(range(9)), slice_size=1)) == 1  # whole again
    assert all(w.state == "idle" for w in cluster.workers)


def test_a_worker_that_dies_just_after_its_result_is_replaced_before_the_next_call(make_cluster, record):
    cluster = make_cluster(["local:2"])
    log = record(cluster)

    def die_soon(params, xs):
        import os
        import threading

        threading.Timer(0.2, os.kill, (os.getpid(), 9)).start()
        return 1

    assert cluster.map(die_soon) == 2
    time.sleep(0.6)
    assert cluster.map(lambda p, xs: 21) == 42
    restarted = [e for e in log.of(WorkerStateChanged) if e.reason == "restarted"]
    assert sorted(e.worker for e in restarted) == cluster.worker_names


def test_restart_brings_dead_workers_back_by_hand(make_cluster):
    cluster = make_cluster(["local:2"])
    pid = cluster.workers[0].hello["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and cluster.workers[0].state != "dead":
        cluster._executor.drain()
        time.sleep(0.05)
    assert cluster.workers[0].state == "dead"
    assert cluster.restart() == [cluster.workers[0].name]
    assert cluster.workers[0].state == "idle" and cluster.workers[0].hello["pid"] != pid
