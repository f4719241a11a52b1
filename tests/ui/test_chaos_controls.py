"""The chaos buttons: each click arms or does what it says, and the status line tells what is armed."""

from __future__ import annotations

import pytest

from qjam_nb import Cluster, SliceDone, WorkerStateChanged
from qjam_nb.ui.chaos import chaos_controls
from qjam_nb.ui.widget import ClusterWidget


@pytest.fixture
def cluster():
    with Cluster(["local:3"], echo=False) as cluster:
        yield cluster


def slow_sum(params, xs):
    import time

    time.sleep(0.005)
    return sum(xs)


def test_kill_button_with_after_arms_the_next_call_and_the_status_says_so(cluster, record):
    box = chaos_controls(cluster)
    assert "qjam-chaos" in box._dom_classes
    ui = box.controls
    assert list(ui.worker.options) == cluster.worker_names
    assert ui.status.value == "no chaos armed"
    ui.worker.value = "local/2"
    ui.after.value = 6
    ui.kill_button.click()
    assert [str(a) for a in cluster.chaos.armed] == ["kill local/2 once 6 slices of the next call are done"]
    assert "armed: kill local/2 once 6 slices" in ui.status.value and "next call" in ui.status.value
    assert cluster.workers[2].state == "idle"  # nothing happened yet
    log = record(cluster)
    assert cluster.map(slow_sum, None, list(range(40)), slice_size=1) == sum(range(40))
    [death] = [e for e in log.of(WorkerStateChanged) if e.state == "dead"]
    assert death.worker == "local/2" and "killed by chaos" in death.reason
    assert {e.worker for e in log.of(SliceDone)} >= {"local/0", "local/1"}
    # The status line followed: nothing armed now, and what chaos last did.
    assert ui.status.value.startswith("no chaos armed<br>last: kill local/2, after 6 slices of call 1")


def test_buttons_with_zero_act_now_and_errors_show_in_the_status_line(cluster):
    ui = chaos_controls(cluster).controls
    ui.worker.value = "local/1"
    ui.drop_button.click()
    assert cluster.workers[1].state == "dead" and cluster.workers[1].reason == "connection dropped by chaos"
    ui.kill_button.click()  # it is dead already: said in red, nothing raised
    assert "cannot kill local/1: it is dead" in ui.status.value
    ui.worker.value = "local/0"
    ui.seconds.value = 0.25
    ui.slow_button.click()
    assert cluster.chaos.delays == {"local/0": 0.25}
    assert "local/0 sleeps 0.25 s before each slice" in ui.status.value
    ui.after.value = 3
    ui.drop_button.click()
    assert cluster.chaos.armed
    ui.clear_button.click()
    assert not cluster.chaos.armed and not cluster.chaos.delays
    assert ui.status.value.startswith("no chaos armed<br>last: cleared")


def test_the_cluster_widget_carries_the_controls(cluster):
    widget = ClusterWidget(cluster)
    assert widget.chaos.controls.cluster is cluster
    widget.chaos.controls.kill_button.click()
    assert cluster.workers[0].state == "dead"
    widget.close()
