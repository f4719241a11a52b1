"""A worker that goes silent is found out and replaced; a worker that only computes long is left alone.

Silence is judged from what the master hears (results, STARTED, heartbeats
from the worker's watcher while a slice runs) and, before a silent worker is
condemned, from its CPU time: a worker burning CPU in a builtin that holds
the GIL is busy, not hung. Deaths are learnt from the process's exit status
too, not only from the end of its stream (a forked helper may hold that open).

Each test runs on local workers and over the private sshd. A call that would
hang for ever before the change is run in a thread with a watchdog, so the
test fails rather than hangs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from qjam_nb import CallTimeoutError, states
from qjam_nb import events as ev

#: Heartbeat interval for these tests (seconds): short, so that silence is judged fast.
BEAT = 0.2


def run_with_watchdog(call, seconds: float, on_hang=None):
    """``call()`` in a thread; its value (or exception), and how long it took. A call still running
    after ``seconds`` fails the test (``on_hang`` runs first, to let it end)."""
    box: dict = {}

    def target():
        started = time.monotonic()
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the test
            box["error"] = exc
        box["took"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if on_hang is not None:
            on_hang()
        thread.join(30)
        pytest.fail(f"the call did not end within {seconds} s")
    return box


def stop_on(cluster, worker_index: int, slice_count: int):
    """An observer that SIGSTOPs worker ``worker_index`` once it has finished ``slice_count`` slices
    of a call (from the call's own thread, so exactly then); returns the list of pids it stopped."""
    victim = cluster.workers[worker_index]
    stopped: list[int] = []
    done = [0]

    def observer(event):
        if isinstance(event, ev.SliceDone) and event.worker == victim.name and not stopped:
            done[0] += 1
            if done[0] == slice_count:
                pid = victim.hello["pid"]
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)

    cluster.events.subscribe(observer)
    return stopped


def resume(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def nap(params, xs):
    import time

    time.sleep(params)
    return sum(xs)


def test_every_slice_that_runs_long_enough_is_announced(make_cluster, record):
    """STARTED for each of several back-to-back slices, not only the first (the master blames and
    interrupts the slice it knows a worker runs)."""
    cluster = make_cluster(["local:1"])
    log = record(cluster)
    assert cluster.map(nap, 0.05, list(range(8)), slice_size=1) == 28
    assert sorted(e.index for e in log.of(ev.SliceStarted)) == list(range(8))


def test_a_stopped_worker_is_replaced_without_timeout(make_cluster, record):
    cluster = make_cluster(["local:2"], heartbeat=BEAT)
    log = record(cluster)
    assert cluster.map(nap, 0.0, list(range(40)), slice_size=2) == sum(range(40))  # warm: both cache slices
    stopped = stop_on(cluster, 0, 2)
    box = run_with_watchdog(lambda: cluster.map(nap, 0.05, list(range(40)), slice_size=2), 30,
                            on_hang=lambda: resume(stopped))
    resume(stopped)
    assert stopped, "the worker was never stopped"
    assert "error" not in box, box.get("error")
    assert box["value"] == sum(range(40))
    # Within 3 heartbeats (plus the CPU check, the kill and the survivor's share of the work: 20 slices of
    # 0.05 s) of going silent; generous for a loaded machine, far from "for ever".
    assert box["took"] < 20 * 0.05 + 6 * BEAT + 5
    changes = [(e.worker, e.state) for e in log.of(ev.WorkerStateChanged)]
    victim = cluster.workers[0].name
    assert (victim, states.UNRESPONSIVE) in changes
    assert (victim, states.DEAD) in changes
    assert any(isinstance(e, ev.SliceLost) and e.worker == victim for e in log.events)
    # Started again before the next call, which is right.
    assert cluster.map(nap, 0.0, list(range(40)), slice_size=2) == sum(range(40))
    assert cluster.workers[0].starts == 2 and cluster.workers[0].state == states.IDLE


def test_a_stopped_worker_with_timeout_does_not_spoil_the_next_call(make_cluster):
    # A heartbeat far longer than the timeout: the call's timeout ends it, and the stopped worker
    # must not be set back to idle as it was.
    cluster = make_cluster(["local:2"], heartbeat=30.0)
    stopped = stop_on(cluster, 0, 2)
    box = run_with_watchdog(lambda: cluster.map(nap, 0.1, list(range(40)), slice_size=2, timeout=1.5), 30,
                            on_hang=lambda: resume(stopped))
    assert stopped
    assert isinstance(box.get("error"), CallTimeoutError), box
    box = run_with_watchdog(lambda: cluster.map(nap, 0.0, list(range(40)), slice_size=2, timeout=10), 30,
                            on_hang=lambda: resume(stopped))
    resume(stopped)
    assert "error" not in box, box.get("error")
    assert box["value"] == sum(range(40))


def deaf_after_a_long_slice(params, xs):
    import signal
    import time

    if xs[0] == 0:
        time.sleep(0.5)  # a long slice first: announced
        return 0
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # then deaf, as in a long C call
    time.sleep(30)
    return xs[0]


def test_a_sigint_deaf_slice_after_a_long_one_is_killed_within_the_grace(make_cluster):
    cluster = make_cluster(["local:1"])
    box = run_with_watchdog(lambda: cluster.map(deaf_after_a_long_slice, None, [0, 1], slice_size=1, timeout=1.5),
                            30)
    assert isinstance(box.get("error"), CallTimeoutError), box
    assert box["took"] < 1.5 + 1.0 + 2.0  # the timeout, the grace, and margin for the kill
    box = run_with_watchdog(lambda: cluster.map(nap, 0.0, [1, 2, 3], slice_size=1, timeout=20), 30)
    assert box.get("value") == 6, box
    assert box["took"] < 5  # not waiting for the deaf slice's 30 s


def fork_a_helper(params, xs):
    import os
    import time

    pid = os.fork()
    if pid == 0:  # the helper: holds every fd of the worker, its stream to the master included
        time.sleep(60)
        os._exit(0)
    return {os.getpid(): pid}  # (dicts reduce by key: one entry per worker)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_of(parent: int, pids) -> int | None:
    for pid in pids:
        if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
            return pid
    return None


def wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_a_worker_killed_while_its_helper_holds_the_stream_is_seen_dead(make_cluster, record):
    cluster = make_cluster(["local:2"], heartbeat=BEAT)
    log = record(cluster)
    helpers = list(cluster.map(fork_a_helper, None, None).values())  # one helper per worker
    try:
        assert len(helpers) == 2 and all(alive(p) for p in helpers)
        victim = cluster.workers[0]
        helpers.sort(key=lambda pid: pid != child_of(victim.hello["pid"], helpers))  # the victim's first
        os.kill(victim.hello["pid"], signal.SIGKILL)
        box = run_with_watchdog(lambda: cluster.map(nap, 0.1, list(range(20)), slice_size=1, timeout=15), 30)
        assert box.get("value") == sum(range(20)), box
        assert (victim.name, states.DEAD) in [(e.worker, e.state) for e in log.of(ev.WorkerStateChanged)]
        # The dead worker's helper went with it (workers are killed as a group), and the other's at shutdown.
        assert wait_gone(helpers[:1], 5) == []
        cluster.shutdown()
        assert wait_gone(helpers, 5) == []
    finally:
        for pid in helpers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def stall_mid_frame(params, xs):
    import os
    import signal
    import time

    from qjam_worker import protocol

    worker = signal.getsignal(signal.SIGINT).__self__  # the worker's own handler: it knows its channel
    if worker.name.endswith("/0") and xs[0] in (2, 3):  # its second slice, whichever it is
        header = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, int(protocol.Kind.RESULT),
                                      worker.call, xs[0], 1, 1 << 30)
        with worker.channel.lock:
            os.write(worker.channel.fd, header + (1 << 30).to_bytes(8, "big") + b"x" * 100)
            time.sleep(60)  # and nothing more: a frame that stops arriving
    return xs[0]


def test_a_frame_that_stops_arriving_ends_the_link(make_cluster, record):
    cluster = make_cluster(["local:2"], heartbeat=BEAT)
    log = record(cluster)
    box = run_with_watchdog(lambda: cluster.map(stall_mid_frame, None, list(range(8)), slice_size=1, timeout=15), 30)
    assert box.get("value") == sum(range(8)), box
    assert box["took"] < 10
    # The schedule may heal around the stuck worker (copies of its slices) before liveness ends it: then
    # the next call finds it out, as it still owes the last call its answers.
    for _ in range(12):  # (its silence adds up over calls that heal in ~LATE s each: bound 3 * BEAT)
        deaths = [e.message for e in log.of(ev.ErrorEvent) if e.worker == cluster.workers[0].name]
        if deaths:
            break
        assert cluster.map(nap, 0.0, list(range(8)), slice_size=1) == sum(range(8))
    assert deaths and "frame" in deaths[0], deaths
    assert cluster.map(nap, 0.0, list(range(8)), slice_size=1) == sum(range(8))


def numpy_for(params, xs):
    import time

    import numpy as np

    a = np.random.default_rng(0).standard_normal((600, 600))
    started = time.perf_counter()
    while time.perf_counter() - started < params:  # in C, the GIL released
        a = np.tanh(a @ a / 600)
    return [time.perf_counter() - started]


def builtin_for(params, xs):
    import random
    import time

    items = [random.random() for _ in range(params)]
    started = time.perf_counter()
    sorted(items)  # one builtin call, holding the GIL throughout: the watcher cannot beat
    return [time.perf_counter() - started]


def odd_naps(params, xs):
    import time

    if xs[0] % 2:
        time.sleep(params)
    return sum(xs)


def slow_add(a, b):
    import time

    time.sleep(0.3)  # the master's own work: the workers' answers wait in their pipes meanwhile
    return a + b


def test_a_slow_reduce_here_is_not_the_workers_silence(make_cluster, record):
    cluster = make_cluster(["local:2"], heartbeat=BEAT / 2)
    log = record(cluster)
    # Odd slices take a while: their answers come while the master is in the reduce of others.
    assert cluster.map(odd_naps, 0.1, list(range(12)), reduce=slow_add, slice_size=1) == sum(range(12))
    assert not [e for e in log.of(ev.WorkerStateChanged) if e.state in (states.UNRESPONSIVE, states.DEAD)]


for f in (nap, odd_naps, slow_add, deaf_after_a_long_slice, fork_a_helper, stall_mid_frame, numpy_for, builtin_for):
    f.__module__ = "__main__"  # ship them by value, as a notebook's functions: ssh workers cannot import tests


def test_long_slices_on_a_healthy_worker_are_left_alone(make_cluster, record):
    cluster = make_cluster(["local:1"], heartbeat=BEAT)
    log = record(cluster)
    assert cluster.map(numpy_for, 5 * BEAT + 0.1, None)[0] >= 5 * BEAT
    n = 300_000
    while (took := cluster.map(builtin_for, n, None)[0]) < 5 * BEAT:  # a sort long enough on this machine
        n = int(n * min(8.0, 1.5 * 5 * BEAT / max(took, 1e-3)))
        assert n < 200_000_000
    assert took >= 5 * BEAT
    assert not [e for e in log.of(ev.WorkerStateChanged) if e.state in (states.UNRESPONSIVE, states.DEAD)]
    assert cluster.workers[0].starts == 1


@pytest.mark.parametrize("beat", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_a_heartbeat_that_is_not_a_positive_number_of_seconds_is_refused_before_anything_starts(beat):
    from qjam_nb import Cluster

    with pytest.raises(ValueError, match="heartbeat must be a positive number of seconds"):
        Cluster(["local:1"], heartbeat=beat)
