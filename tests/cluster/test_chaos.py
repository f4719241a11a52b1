"""Chaos for teaching: a killed, dropped or slowed worker leaves the answer right, and its slices move."""

from __future__ import annotations

import pytest
from conftest import skip_on_dask

from qjam_nb import CallStarted, SliceDone, SliceLost, WorkerError, WorkerStateChanged

BACKENDS = ("local", "ssh", "dask")
DATA = list(range(60))


def slow_sum(params, xs):
    import time

    time.sleep(0.01)
    return sum(xs)


slow_sum.__module__ = "__main__"  # ship it by value, as a notebook's function: ssh workers cannot import tests


def deaths(log) -> list:
    return [e for e in log.of(WorkerStateChanged) if e.state == "dead"]


def test_kill_armed_for_ten_slices_moves_the_victims_slices_and_it_comes_back(make_cluster, record, backend):
    cluster = make_cluster(["local:3"])
    log = record(cluster)
    victim = cluster.worker_names[1]
    assert cluster.chaos.kill(1, after_slices=10) == victim
    assert "kill " + victim in cluster.chaos.describe()
    assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
    [death] = deaths(log)
    assert death.worker == victim
    assert death.reason == "killed by chaos (SIGKILL), after 10 slices of call 1"
    assert not cluster.chaos.armed and cluster.chaos.describe() == "no chaos armed"
    # The slices it had in flight were lost, then done by the others; nothing of it finished after its death.
    done = {e.index: e.worker for e in log.of(SliceDone)}
    assert sorted(done) == list(range(len(DATA)))
    moved = [e.index for e in log.of(SliceLost) if e.worker == victim]
    # (On Dask a worker's results come a batch at a time: chaos fires at one, and the victim may have
    # had nothing in flight then.)
    assert (moved or backend == "dask") and all(done[i] != victim for i in moved)
    after = log.events[log.events.index(death):]
    assert not [e for e in after if isinstance(e, SliceDone) and e.worker == victim]
    # The call's timeline shows the same: the moved slices, each finished once, on a survivor.
    timeline = cluster.last_call
    assert timeline.moved() == sorted(moved)
    assert {r.index: r.worker for r in timeline.done_slices()} == done
    # It is started again before the next call, which all three workers share.
    log.clear()
    assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
    assert [e.reason for e in log.of(WorkerStateChanged) if e.worker == victim][:2] == ["restarting", "restarted"]
    assert log.of(CallStarted)[0].workers == tuple(cluster.worker_names)
    assert victim in {e.worker for e in log.of(SliceDone)}


def test_drop_now_marks_the_worker_dead_and_the_next_call_restarts_it(make_cluster, record, backend):
    skip_on_dask(backend, "a Dask worker's connection is Dask's: chaos can only kill it (a test checks the refusal)")
    cluster = make_cluster(["local:2"])
    log = record(cluster)
    old = cluster.workers[0].link
    cluster.chaos.drop(cluster.worker_names[0])
    assert cluster.workers[0].state == "dead"
    assert deaths(log)[0].reason == "connection dropped by chaos"
    assert old.join(10.0)  # the worker saw its connection go and ended: its stream closed
    assert cluster.map(slow_sum, None, DATA, slice_size=5) == sum(DATA)
    assert {e.worker for e in log.of(SliceDone)} == set(cluster.worker_names)
    assert cluster.workers[0].link is not old


def test_drop_armed_for_the_start_of_a_call_gives_every_slice_to_the_other(make_cluster, record, backend):
    skip_on_dask(backend, "a Dask worker's connection is Dask's: chaos can only kill it (a test checks the refusal)")
    cluster = make_cluster(["local:2"])
    log = record(cluster)
    cluster.chaos.drop(1, after_slices=0)
    assert cluster.map(slow_sum, None, DATA, slice_size=2) == sum(DATA)
    [death] = deaths(log)
    assert death.worker == cluster.worker_names[1]
    assert death.reason == "connection dropped by chaos, as call 1 started"
    assert {e.worker for e in log.of(SliceDone)} == {cluster.worker_names[0]}
    assert {e.worker for e in log.of(SliceLost)} == {cluster.worker_names[1]}


def test_slow_makes_a_straggler_until_cleared(make_cluster, record):
    cluster = make_cluster(["local:2"])
    log = record(cluster)
    slow = cluster.worker_names[1]
    cluster.chaos.slow(slow, 0.2)
    assert cluster.chaos.delays == {slow: 0.2}  # each TASK to it carries the delay
    assert cluster.map(slow_sum, None, list(range(8)), slice_size=2) == sum(range(8))
    mine = [e.seconds for e in log.of(SliceDone) if e.worker == slow]
    assert mine and min(mine) >= 0.2  # the worker slept inside each slice's measured time
    assert "sleeps 0.2 s before each slice" in cluster.chaos.describe()
    cluster.chaos.clear()
    assert cluster.chaos.delays == {}
    assert cluster.chaos.describe() == "no chaos armed"


def test_chaos_never_takes_the_last_worker_of_a_call(make_cluster, record):
    cluster = make_cluster(["local:2"])
    log = record(cluster)
    cluster.chaos.kill(0, after_slices=2)
    cluster.chaos.kill(1, after_slices=4)
    assert cluster.map(slow_sum, None, DATA, slice_size=2) == sum(DATA)
    assert [e.worker for e in deaths(log)] == [cluster.worker_names[0]]
    assert cluster.chaos.log[-1] == f"call 1: did not kill {cluster.worker_names[1]}, the last worker left in it"


def test_kill_now_ends_the_process(make_cluster, backend):
    if backend != "local":
        pytest.skip("the exit status of a local process is what shows SIGKILL")
    cluster = make_cluster(["local:2"])
    process = cluster.workers[1].link.process
    cluster.chaos.kill("local/1")
    assert process.wait(10) == -9
    assert cluster.workers[1].reason == "killed by chaos (SIGKILL)"


def test_chaos_says_what_is_wrong_with_its_arguments(make_cluster, backend):
    if backend != "local":
        pytest.skip("argument checks do not depend on the transport")
    cluster = make_cluster(["local:2"])
    chaos = cluster.chaos
    with pytest.raises(ValueError, match=r"no worker named 'node9/0': the workers are local/0, local/1"):
        chaos.kill("node9/0")
    with pytest.raises(ValueError, match=r"no worker 2: this cluster has 2 \(0..1"):
        chaos.drop(2)
    with pytest.raises(ValueError, match=r"after_slices=.*whole number >= 0.*not -1"):
        chaos.kill(0, after_slices=-1)
    with pytest.raises(ValueError, match=r"seconds must be a number >= 0 \(0 ends it\), not -1"):
        chaos.slow(0, -1)
    chaos.kill(0)
    with pytest.raises(ValueError, match=r"cannot drop local/0: it is dead \(killed by chaos \(SIGKILL\)\); dead "):
        chaos.drop(0)
    assert cluster.map(lambda p, xs: sum(xs), None, [1, 2, 3], slice_size=1) == 6  # and it is back


def test_dask_refuses_to_drop_a_worker_and_says_what_it_can_do(make_cluster, backend):
    if backend != "dask":
        pytest.skip("our own workers can be dropped (the tests above)")
    cluster = make_cluster(["local:2"])
    with pytest.raises(WorkerError, match="can only 'kill'"):
        cluster.chaos.drop(cluster.worker_names[0])
    assert cluster.map(slow_sum, None, DATA, slice_size=4) == sum(DATA)
