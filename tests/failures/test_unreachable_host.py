"""A host that goes away: its workers are dropped, it is retried with backoff, and comes back."""

from __future__ import annotations

import getpass
import shutil
import time

import pytest
import sshd

from qjam_nb import Cluster, ErrorEvent, HostReady, SliceDone


@pytest.fixture
def flaky(ssh_world, tmp_path, monkeypatch):
    """A third sshd (127.0.0.4), named ``flaky`` in a copy of the test HOME."""
    host = sshd.PrivateSshd(tmp_path / "flaky", "127.0.0.4", ssh_world.key.with_suffix(".pub")).start()
    home = tmp_path / "home"
    shutil.copytree(ssh_world.home / ".ssh", home / ".ssh")
    with open(home / ".ssh" / "config", "a") as config:
        config.write(f"Host flaky\n  HostName {host.address}\n  Port {host.port}\n  User {getpass.getuser()}\n")
    with open(home / ".ssh" / "known_hosts", "a") as known:
        known.write(host.known_hosts_line())
    monkeypatch.setenv("HOME", str(home))
    yield host
    host.stop()


def take_down(host: sshd.PrivateSshd) -> None:
    """The host vanishes: its sshd and every connection it carries."""
    sessions = sshd.processes_under(host.process.pid)
    host.stop()
    for pid in sessions:
        try:
            import os

            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_lost_host_is_retried_with_backoff_and_comes_back(flaky, record):
    with Cluster(["local:1", "flaky:1"], echo=False) as cluster:
        log = record(cluster)
        assert cluster.map(lambda p, xs: 1) == 2
        take_down(flaky)
        log.clear()
        t0 = time.monotonic()
        # This call finds flaky/0 gone (or loses it midway) and still answers, on the local worker.
        assert cluster.map(lambda p, xs: sum(xs), None, list(range(10)), slice_size=1) == 45
        assert cluster.workers[1].state == "dead"
        # By the end of the next call: one reconnect attempt, refused, reported with the wait before
        # the next try (made by this call, or by the one before if it saw the host gone at its start).
        assert cluster.map(lambda p, xs: 1) == 1
        errors = [e.message for e in log.of(ErrorEvent) if e.worker == "flaky"]
        assert len(errors) == 1 and "could not be reached again" in errors[0] and "next try in" in errors[0]
        assert "connection refused" in errors[0]
        # Straight after: within the backoff, no new attempt (and no new report): not looped on.
        log.clear()
        assert cluster.map(lambda p, xs: 1) == 1
        assert not [e for e in log.of(ErrorEvent) if e.worker == "flaky"]
        assert time.monotonic() - t0 < 5
        # The host is back (same address and port): after the backoff the next call reconnects.
        flaky.start()
        time.sleep(1.1)
        log.clear()
        fresh = list(range(100, 110))  # not cached anywhere yet, so both workers get some
        assert cluster.map(lambda p, xs: sum(xs), None, fresh, slice_size=1) == sum(fresh)
        assert [e.host for e in log.of(HostReady)] == ["flaky"]
        assert cluster.workers[1].state == "idle"
        assert "flaky/0" in {e.worker for e in log.of(SliceDone)}


def test_restart_retries_at_once_whatever_the_backoff(flaky):
    with Cluster(["local:1", "flaky:1"], echo=False) as cluster:
        take_down(flaky)
        cluster.map(lambda p, xs: 1)
        cluster.map(lambda p, xs: 1)  # the reconnect fails: backoff starts
        flaky.start()
        assert cluster.restart() == ["flaky/0"]
        assert cluster.map(lambda p, xs: 1) == 2
