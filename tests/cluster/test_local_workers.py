"""``local:N`` workers: forked from one fork server, as if each were a fresh interpreter of this one."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from qjam_nb import Cluster
from qjam_nb.transport import local


def whoami():
    """A mapfunc made here, so it travels by value: what the worker sees of its process."""

    def mapfunc(params, xs):
        import random

        return [(os.getpid(), os.getppid(), os.getcwd(), os.environ.get("QJAM_TEST_SEEN"), os.getsid(0),
                 random.random())]

    return mapfunc


def concatenate(a: list, b: list) -> list:
    return a + b  # the default reduce adds lists element-wise


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The master in another directory, with a variable set after qjam_nb was imported."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QJAM_TEST_SEEN", "set late")
    return str(tmp_path)


def test_workers_are_forked_from_one_server_and_see_this_directory_and_environment(elsewhere):
    with Cluster(["local:3"], echo=False) as cluster:
        seen = cluster.map(whoami(), None, reduce=concatenate)
        assert len(seen) == 3 and len({pid for pid, *_ in seen}) == 3
        parents = {ppid for _, ppid, *_ in seen}
        assert len(parents) == 1 and parents != {os.getpid()}
        assert "forkserver" in cmdline(parents.pop())
        for pid, _, cwd, value, session, _ in seen:
            assert cwd == elsewhere and value == "set late"
            assert session == pid != os.getsid(0)  # a session of its own: Ctrl-C reaches the master only
        assert len({r for *_, r in seen}) == 3  # random is seeded anew in each, not copied from the server
        assert {w.hello["numpy"] for w in cluster.workers} == {np.__version__}  # read without importing it


def test_without_the_fork_server_each_worker_is_a_new_interpreter(elsewhere, monkeypatch):
    monkeypatch.setattr(local, "USE_FORK_SERVER", False)
    with Cluster(["local:2"], echo=False) as cluster:
        seen = cluster.map(whoami(), None, reduce=concatenate)
        assert {ppid for _, ppid, *_ in seen} == {os.getpid()}
        assert all(cwd == elsewhere and value == "set late" for _, _, cwd, value, *_ in seen)


def test_a_killed_worker_reports_its_signal_through_the_server():
    with Cluster(["local:2"], echo=False) as cluster:
        (pid, *_), _ = cluster.map(whoami(), None, reduce=concatenate)
        proc = next(w.link.process for w in cluster._executor.workers if w.link.process.pid == pid)
        assert isinstance(proc, local.ForkedProcess)
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(5) == -signal.SIGKILL


def test_the_cluster_outlives_its_fork_server():
    """A server that died: the workers it forked go on; one that dies is started the slow way."""
    with Cluster(["local:2"], echo=False) as cluster:
        seen = cluster.map(whoami(), None, reduce=concatenate)
        server = seen[0][1]
        os.kill(server, signal.SIGKILL)
        assert len(cluster.map(whoami(), None, reduce=concatenate)) == 2  # the same workers, on their own now
        os.kill(seen[0][0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # a call soon starts a worker in its place, as a new interpreter
            again = cluster.map(whoami(), None, reduce=concatenate)
            pids = {pid: ppid for pid, ppid, *_ in again}
            if (len(pids) == 2 and seen[0][0] not in pids) or time.monotonic() > deadline:
                break
        assert len(pids) == 2 and seen[0][0] not in pids and os.getpid() in pids.values()
