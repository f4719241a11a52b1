"""Fork and thread safety (issue 20): a cluster belongs to the process that made it, and runs one call at a time.

In a forked child every use of an inherited cluster raises ``ForkedClusterError`` at once (before a byte is
sent or a lock taken), its ``atexit`` leaves the parent's workers alone, and the child holds none of the
parent's pipes or sockets to the workers (so a SIGKILLed master's workers still see their input end). Two
threads calling ``map`` take turns; a call from inside a call, on its own thread, raises instead of waiting
for ever. Every child here is a real ``os.fork`` with a watchdog alarm, so a child that hangs dies instead of
hanging the test, and ends with ``os._exit`` (nothing of pytest's runs there).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qjam_nb import ClusterClosedError, ReentrantCallError, SliceDone, SliceStarted, WorkerStateChanged
from qjam_nb.transport import local

ROOT = Path(__file__).resolve().parents[2]
EIGHT = list(range(8))  # sum: 28
#: A child that uses an inherited cluster must be refused within this (no lock, no wait).
REFUSED_WITHIN = 1.0


def slow_sum(params, xs):
    import time

    time.sleep(params)
    return sum(xs)


slow_sum.__module__ = "__main__"  # ship it by value, as a notebook's function: ssh workers cannot import tests


def in_child(body, watchdog: float = 5.0) -> dict:
    """Run ``body()`` in a forked child: ``{"returned": ...}`` or ``{"raised": type, "message": ...}``, with
    ``"seconds"`` it took; ``{"died": status}`` if it sent no report (it hung until its watchdog, or exited)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then _exit whatever happens
        try:
            os.close(read)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang ends in death by SIGALRM
            signal.setitimer(signal.ITIMER_REAL, watchdog)
            started = time.monotonic()
            try:
                report = {"returned": body()}
            except BaseException as exc:
                report = {"raised": type(exc).__name__, "message": str(exc)}
            report["seconds"] = time.monotonic() - started
            os.write(write, json.dumps(report, default=repr).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()  # until the child ends (by itself, or its watchdog)
    _, status = os.waitpid(pid, 0)
    return json.loads(data) if data else {"died": os.waitstatus_to_exitcode(status)}


def pids(cluster) -> list[int]:
    return [w.hello["pid"] for w in cluster.workers]


def refused(report: dict, parent: int) -> None:
    """The child's use raised ForkedClusterError at once, naming the parent and the fix."""
    assert report.get("raised") == "ForkedClusterError", report
    assert str(parent) in report["message"] and "Cluster(" in report["message"], report
    assert report["seconds"] < REFUSED_WITHIN, report


# -- fork ------------------------------------------------------------------------------------------------


def test_a_child_that_starts_a_call_and_exits_mid_way_leaves_the_parents_next_answer_right(make_cluster):
    cluster = make_cluster()
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28

    def child():
        # Exit mid-call, as a child that is killed or finishes its work does; its slices take 0.3 s each,
        # so results of a call it had sent would arrive during the parent's next call.
        signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        return cluster.map(slow_sum, 0.3, list(range(1000, 1008)), slice_size=1)

    report = in_child(child)
    before = pids(cluster)
    assert cluster.map(slow_sum, 0.01, EIGHT, slice_size=1, timeout=30) == 28
    assert pids(cluster) == before  # and no worker of the parent's was lost on the way
    refused(report, os.getpid())


@pytest.mark.parametrize("held", ["call", "writes"])
def test_a_child_is_refused_at_once_while_the_parents_threads_hold_locks(make_cluster, held):
    """The parent forks while a thread of its runs a call (``call``), or holds each link's write lock
    (``writes``): the child, which has neither thread, must not wait for them, even with ``timeout=``."""
    cluster = make_cluster()
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28
    answer: dict = {}
    caller = None
    if held == "call":
        started = threading.Event()

        def observer(event):
            if isinstance(event, SliceStarted):
                started.set()

        def call():
            answer["value"] = cluster.map(slow_sum, 0.1, EIGHT, slice_size=1, timeout=30)

        cluster.events.subscribe(observer)
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        assert started.wait(10)
        locks = []
    else:
        locks = [w.link._lock for w in cluster.workers]
    holding, done = threading.Event(), threading.Event()

    def hold():
        for lock in locks:
            lock.acquire()
        holding.set()
        done.wait(30)
        for lock in locks:
            lock.release()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        report = in_child(lambda: cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=1))
    finally:
        done.set()
        holder.join(10)
    if caller is not None:
        caller.join(30)
        assert not caller.is_alive()
        assert answer.get("value") == 28  # the parent's call went on undisturbed
    refused(report, os.getpid())
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=30) == 28


def test_every_use_in_a_child_raises_and_its_shutdown_leaves_the_parents_workers(make_cluster, record):
    cluster = make_cluster()
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28
    before = pids(cluster)
    log = record(cluster)

    def child():
        uses = {
            "map": lambda: cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=1),
            "restart": cluster.restart,
            "replay": lambda: cluster.replay(0),
            "chaos.kill": lambda: cluster.chaos.kill(0),
            "chaos.drop": lambda: cluster.chaos.drop(1),
            "chaos.slow": lambda: cluster.chaos.slow(0, 1),
            "chaos.clear": cluster.chaos.clear,
        }
        outcome = {}
        for name, use in uses.items():
            started = time.monotonic()
            try:
                outcome[name] = ["returned", repr(use())]
            except Exception as exc:
                outcome[name] = [type(exc).__name__, str(exc), time.monotonic() - started]
        cluster.shutdown()  # marks the child's copy closed, and nothing else
        outcome["closed"] = cluster.closed
        try:
            cluster.map(slow_sum, 0, EIGHT)
        except Exception as exc:
            outcome["map after shutdown"] = [type(exc).__name__, str(exc), 0.0]
        return outcome

    report = in_child(child)
    outcome = report.get("returned", report)
    for name in ("map", "restart", "replay", "chaos.kill", "chaos.drop", "chaos.slow", "chaos.clear",
                 "map after shutdown"):
        assert outcome[name][0] == "ForkedClusterError", (name, outcome)
        refused({"raised": outcome[name][0], "message": outcome[name][1], "seconds": outcome[name][2]}, os.getpid())
    assert outcome["closed"] is True
    assert not cluster.closed
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=30) == 28
    assert pids(cluster) == before
    assert not [e for e in log.of(WorkerStateChanged) if e.state in ("dead", "stopped")]


def test_a_childs_atexit_leaves_the_parents_workers_alive_and_answering(make_cluster, record):
    cluster = make_cluster()
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28
    before = pids(cluster)
    log = record(cluster)

    def child():  # a normal exit: the interpreter runs the atexit handlers
        shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
        if shell is not None:  # (an in-process IPython of other tests: its history database is the parent's)
            atexit.unregister(shell.atexit_operations)
        atexit._run_exitfuncs()
        return cluster.closed

    report = in_child(child, watchdog=15)
    assert report.get("returned") is True, report
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=30) == 28
    assert pids(cluster) == before
    assert not [e for e in log.of(WorkerStateChanged) if e.state in ("dead", "stopped")]


CHILD_EXITS = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from qjam_nb import Cluster

    def slow_sum(params, xs):
        time.sleep(params)
        return sum(xs)

    cluster = Cluster([sys.argv[1]], echo=False)
    answer = {}
    caller = threading.Thread(target=lambda: answer.update(value=cluster.map(slow_sum, 0.05, list(range(16)),
                                                                             slice_size=1, timeout=30)))
    caller.start()
    time.sleep(0.2)
    pids = [w.hello["pid"] for w in cluster.workers]
    child = os.fork()
    if child == 0:  # the normal way out: atexit, then the interpreter frees the cluster (ssh channels too)
        signal.alarm(10)
        sys.exit(0)
    _, status = os.waitpid(child, 0)
    caller.join()
    again = cluster.map(slow_sum, 0, list(range(8)), slice_size=1, timeout=30)
    print(json.dumps({"child": os.waitstatus_to_exitcode(status), "answer": answer.get("value"), "again": again,
                      "same workers": pids == [w.hello["pid"] for w in cluster.workers]}), flush=True)
    cluster.shutdown()
""")


def test_a_child_that_exits_the_normal_way_during_a_call_leaves_the_parents_call_and_workers(backend):
    host = "local:2" if backend == "local" else "sshhost:2"
    run = subprocess.run([sys.executable, "-c", CHILD_EXITS, host], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {"child": 0, "answer": 120, "again": 28, "same workers": True}


def gone(pid: int) -> bool:
    """The process ended (a zombie no one reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # (it may vanish between the open and the read)
        return True


MASTER = textwrap.dedent("""
    import json, os, sys, time
    from qjam_nb import Cluster

    def add(params, xs):
        return sum(xs)

    cluster = Cluster([sys.argv[1]], echo=False)
    assert cluster.map(add, None, list(range(8)), slice_size=1) == 28
    child = os.fork()
    if child == 0:  # a long-lived child that never touches the cluster
        time.sleep(60)
        os._exit(0)
    print(json.dumps({"child": child, "workers": [w.hello["pid"] for w in cluster.workers]}), flush=True)
    time.sleep(60)
""")


def test_a_sigkilled_masters_workers_end_though_its_forked_child_lives_on(backend):
    host = "local:2" if backend == "local" else "sshhost:2"
    master = subprocess.Popen([sys.executable, "-c", MASTER, host], cwd=ROOT, stdout=subprocess.PIPE)
    child, workers = None, []
    try:
        started = json.loads(master.stdout.readline())
        child, workers = started["child"], started["workers"]
        assert len(workers) == 2 and not any(gone(pid) for pid in workers)
        master.kill()
        master.wait()
        deadline = time.monotonic() + 15
        while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in workers), f"workers still alive 15 s after their master's SIGKILL: {workers}"
        assert not gone(child)  # the child itself lived on all along
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
        for pid in [p for p in [child, *workers] if p]:  # only what this test started
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def open_fds() -> dict[int, str]:
    """This process's pipes, sockets and pidfds: fd -> what it is (``socket:[inode]``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith(("pipe:", "socket:", "anon_inode:[pidfd]")):
            found[int(name)] = target
    return found


def cluster_fds(before: dict[int, str]) -> dict[int, str]:
    """What was opened since ``before``, by what it is: a number may be taken again once closed
    (pidfds all read the same: by number)."""
    old = set(before.values()) - {"anon_inode:[pidfd]"}
    return {fd: target for fd, target in open_fds().items()
            if target not in old and before.get(fd) != target}


def check_fds_in_a_child(opened: dict[int, str]) -> None:
    """Close-on-exec here, and /dev/null in a forked child."""
    assert opened
    inheritable = {fd: target for fd, target in opened.items() if os.get_inheritable(fd)}
    assert not inheritable, f"fds an exec'd child (subprocess) would inherit: {inheritable}"
    report = in_child(lambda: {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in opened})
    assert report.get("returned") == {str(fd): os.devnull for fd in opened}, (opened, report)


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "interpreters"])
def test_a_forked_child_holds_none_of_the_local_workers_pipes(fork_server, monkeypatch):
    from qjam_nb import Cluster

    monkeypatch.setattr(local, "USE_FORK_SERVER", fork_server and local.USE_FORK_SERVER)
    before = open_fds()
    with Cluster(["local:2"], echo=False) as cluster:
        assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28
        opened = cluster_fds(before)
        if fork_server and local.USE_FORK_SERVER:
            assert any(t.startswith("anon_inode:[pidfd]") for t in opened.values())
        check_fds_in_a_child(opened)
        assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28


def test_a_forked_child_holds_none_of_the_ssh_sockets_direct_or_through_a_jump_host(ssh_world, tmp_path,
                                                                                    monkeypatch):
    from qjam_nb import Cluster

    (h1, h2) = ssh_world.hosts
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shutil.copy(ssh_world.home / ".ssh" / "known_hosts", home / ".ssh" / "known_hosts")
    config = (ssh_world.home / ".ssh" / "config").read_text()
    (home / ".ssh" / "config").write_text(
        config + f"Host viajump\n  HostName {h2.address}\n  Port {h2.port}\n  IdentityFile {ssh_world.key}\n"
        "  ProxyJump sshhost\n\n")
    monkeypatch.setenv("HOME", str(home))
    before = open_fds()
    with Cluster(["sshhost:1", "viajump:1"], echo=False) as cluster:
        assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28
        # The TCP sockets (to sshhost, and to the jump host under viajump's connection); paramiko's
        # channel pipes lead to no worker (they only wake the poll here).
        sockets = {fd: t for fd, t in cluster_fds(before).items() if t.startswith("socket:")}
        assert len(sockets) == 2
        check_fds_in_a_child(sockets)
        assert cluster.map(slow_sum, 0, EIGHT, slice_size=1) == 28


# -- threads ---------------------------------------------------------------------------------------------


def test_two_threads_calling_map_at_once_both_get_right_answers(make_cluster):
    cluster = make_cluster()
    results: list = []
    errors: list = []
    start = threading.Barrier(2)

    def calls(offset: int) -> None:
        start.wait()
        try:
            for _ in range(4):
                data = [offset + x for x in EIGHT]
                results.append((offset, cluster.map(slow_sum, 0.01, data, slice_size=1, timeout=20)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=calls, args=(offset,), daemon=True) for offset in (0, 100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == [(0, 28)] * 4 + [(100, 828)] * 4


def test_a_call_from_inside_a_call_on_its_thread_raises_instead_of_waiting_for_ever(make_cluster):
    cluster = make_cluster()
    inner: dict = {}

    def observer(event):  # observers run on the calling thread, in the middle of the call
        if isinstance(event, SliceDone) and not inner:
            for name, use in (("map", lambda: cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=5)),
                              ("restart", cluster.restart), ("shutdown", cluster.shutdown)):
                try:
                    inner[name] = use()
                except Exception as exc:
                    inner[name] = exc

    cluster.events.subscribe(observer)
    assert cluster.map(slow_sum, 0.01, EIGHT, slice_size=1, timeout=30) == 28
    for name in ("map", "restart", "shutdown"):
        assert isinstance(inner[name], ReentrantCallError), (name, inner)
        assert "observer" in str(inner[name]) and "thread" in str(inner[name])
    assert not cluster.closed
    assert cluster.map(slow_sum, 0, EIGHT, slice_size=1, timeout=30) == 28


def test_shutdown_from_another_thread_waits_for_the_running_call(make_cluster):
    cluster = make_cluster()
    answer: dict = {}
    started = threading.Event()

    def observer(event):
        if isinstance(event, SliceStarted):
            started.set()

    cluster.events.subscribe(observer)

    def call():
        try:
            answer["value"] = cluster.map(slow_sum, 0.1, EIGHT, slice_size=1, timeout=30)
        except BaseException as exc:
            answer["value"] = exc

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert started.wait(10)
    cluster.shutdown()
    assert answer.get("value") == 28  # the call had finished before the workers were stopped
    assert cluster.closed
    caller.join(10)
    assert not caller.is_alive()
    with pytest.raises(ClusterClosedError):
        cluster.map(slow_sum, 0, EIGHT)
