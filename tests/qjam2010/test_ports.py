"""``RemoteWorker(host, port=N)`` reaches the sshd on port N, for that worker's host alone, whatever
``~/.ssh/config`` says; and ``Cluster``'s ``ssh://host:port[:N]`` host entries that carry it."""

from __future__ import annotations

import socket

import pytest

from qjam_nb import Cluster, HostError, WorkerError
from qjam_nb.cluster.hosts import parse_hosts
from qjam_nb.qjam2010 import Master, RemoteWorker

ALIAS = "sshhost-elsewhere"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


@pytest.fixture(scope="module")
def elsewhere(ssh_world):
    """An alias for sshhost's address whose ~/.ssh/config Port is a closed port (restored after)."""
    config = ssh_world.home / ".ssh" / "config"
    before = config.read_text()
    sshhost = before.split("Host sshhost\n", 1)[1].split("\n\n", 1)[0]
    entry = "\n".join(line for line in sshhost.splitlines() if not line.strip().startswith("Port "))
    config.write_text(before + f"Host {ALIAS}\n{entry}\n  Port {closed_port()}\n\n")
    yield ssh_world.hosts[0].port
    config.write_text(before)


def test_the_port_given_is_used_not_the_configs(elsewhere):
    m = Master([RemoteWorker(ALIAS, port=elsewhere), RemoteWorker("local")], echo=False, progress=False)
    try:
        assert m.hosts == [f"ssh://{ALIAS}:{elsewhere}:1", "local:1"]
        assert m.run(type("M", (), {"mapfunc": staticmethod(lambda p, xs: 1)})) == 2
        assert sorted(m.cluster.worker_names) == sorted([f"ssh://{ALIAS}:{elsewhere}/0", "local/0"])
    finally:
        m.shutdown()


def test_without_a_port_the_configs_port_is_used(elsewhere):
    m = Master([RemoteWorker(ALIAS)], echo=False, progress=False, start_timeout=10)
    with pytest.raises(HostError):
        m.cluster  # noqa: B018 -- starting the cluster connects
    m.shutdown()


def test_two_ports_of_one_host_are_two_hosts(ssh_world, elsewhere):
    workers = [RemoteWorker("sshhost"), RemoteWorker(ALIAS, port=elsewhere), RemoteWorker("sshhost")]
    m = Master(workers, echo=False, progress=False)
    try:
        assert m.hosts == ["sshhost:2", f"ssh://{ALIAS}:{elsewhere}:1"]
        assert len(m.cluster.workers) == 3 and len(m.cluster._executor.pool.transports) == 2
    finally:
        m.shutdown()


def test_cluster_takes_ssh_uri_entries(ssh_world):
    port = ssh_world.hosts[0].port
    with Cluster([f"ssh://sshhost:{port}:2"], echo=False) as cluster:
        assert cluster.worker_names == [f"ssh://sshhost:{port}/0", f"ssh://sshhost:{port}/1"]
        assert cluster.map(lambda p, xs: 1) == 2


def test_host_entries_parse():
    assert parse_hosts(["ssh://bob@node:2222:4", "ssh://node:2200", "ssh://node", "node:3"]) == [
        ("ssh://bob@node:2222", 4), ("ssh://node:2200", 1), ("node", 1), ("node", 3)]
    for bad in ("ssh://node:0", "ssh://node:70000", "ssh://node:22:0", "ssh://no de", "ssh://"):
        with pytest.raises(WorkerError, match="ssh://"):
            parse_hosts([bad])


def test_remote_worker_checks_its_port():
    assert RemoteWorker("h").port == 22 and str(RemoteWorker("h", port=2222)) == "h:2222"
    for bad in (0, 70000, "22", True):
        with pytest.raises(ValueError):
            RemoteWorker("h", port=bad)
    with pytest.raises(TypeError):
        Master(RemoteWorker("local"))
    with pytest.raises(ValueError):
        Master([])
    with pytest.raises(TypeError):
        Master(["local"])
