"""Shared fixtures: real clusters, on local workers and over a private sshd, and an event recorder.

Tests that take ``cluster2`` or ``make_cluster`` run twice: once on local
workers and once on workers reached over ssh (``sshhost``, a ``~/.ssh/config``
alias for a private sshd on 127.0.0.1). They write hosts as ``local:N``;
``hosts_for`` turns that into ``sshhost:N`` on the ssh run.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest
import sshd

from qjam_nb import Cluster

BACKENDS = ("local", "ssh")
#: A test module that sets ``BACKENDS = ALL_BACKENDS`` runs on these: the in-memory one (workers on threads
#: of this process, no process at all) too, for what does not depend on processes (map, cache, reduce
#: order, errors, events, the timeline).
ALL_BACKENDS = ("local", "ssh", "memory")
#: ...and on a Dask cluster (the Dask executor): ``LocalCluster``s on 127.0.0.1 started once per module,
#: one per worker count its tests ask for (``hosts_for``).
WITH_DASK = (*ALL_BACKENDS, "dask")


@dataclass
class SshWorld:
    """The master's temporary HOME and the two private hosts it can reach."""

    home: Path
    hosts: list  # PrivateSshd for 127.0.0.1 ("sshhost") and 127.0.0.2 ("sshhost2")
    key: Path

    @property
    def known_hosts(self) -> Path:
        return self.home / ".ssh" / "known_hosts"


@pytest.fixture(scope="session")
def ssh_world(tmp_path_factory):
    """Two private sshds and a HOME whose ~/.ssh/config names them ``sshhost`` and ``sshhost2``."""
    if not sshd.available():
        if os.environ.get("CI"):
            pytest.fail("sshd is not installed: .ci/run installs Debian's openssh-server")
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    root = tmp_path_factory.mktemp("ssh")
    home = root / "master_home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    key = sshd.keygen(home / ".ssh" / "id_ed25519")
    hosts = []
    mp = pytest.MonkeyPatch()
    try:
        for i, address in enumerate(("127.0.0.1", "127.0.0.2"), 1):
            hosts.append(sshd.PrivateSshd(root / f"host{i}", address, key.with_suffix(".pub")).start())
        user = getpass.getuser()
        (home / ".ssh" / "config").write_text("".join(
            f"Host {alias}\n  HostName {h.address}\n  Port {h.port}\n  User {user}\n  IdentityFile {key}\n\n"
            for alias, h in zip(("sshhost", "sshhost2"), hosts, strict=True)
        ))
        (home / ".ssh" / "known_hosts").write_text("".join(h.known_hosts_line() for h in hosts))
        mp.setenv("HOME", str(home))
        for var in ("SSH_AUTH_SOCK", "QJAM_USER", "QJAM_REMOTE_PYTHON"):
            mp.delenv(var, raising=False)
        yield SshWorld(home, hosts, key)
    finally:
        mp.undo()
        for h in hosts:
            h.stop()


def pytest_generate_tests(metafunc):
    """``backend``: every backend the module names in its ``BACKENDS`` (default: local and ssh)."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", getattr(metafunc.module, "BACKENDS", BACKENDS), indirect=True,
                             scope="module")


@pytest.fixture(scope="module")
def backend(request) -> str:
    """``"local"``, ``"ssh"``, ``"memory"`` or ``"dask"``: where this module's clusters run."""
    if request.param == "ssh":
        request.getfixturevalue("ssh_world")
    if request.param == "dask":
        pytest.importorskip("distributed", reason="the dask backend needs distributed (pip install '.[dask]')")
        yield request.param
        stop_dask_clusters()
        return
    yield request.param


def skip_in_memory(backend: str, why: str) -> None:
    """Skip a test of what only a worker process has (its own fds, signals, modules) on the memory backend."""
    if backend == "memory":
        pytest.skip(f"memory backend: {why}")


def skip_on_dask(backend: str, why: str) -> None:
    """Skip a test of our own worker processes (their pids, streams, frames) on the dask backend."""
    if backend == "dask":
        pytest.skip(f"dask backend: {why}")


#: worker count -> the LocalCluster the dask backend's tests of this module share.
_dask_clusters: dict = {}


def dask_cluster(n: int):
    """A ``LocalCluster`` of ``n`` worker processes on 127.0.0.1 (no dashboard), started once per module."""
    cluster = _dask_clusters.get(n)
    if cluster is None:
        from distributed import LocalCluster

        cluster = _dask_clusters[n] = LocalCluster(processes=True, n_workers=n, threads_per_worker=1,
                                                   host="127.0.0.1", dashboard_address=None)
    return cluster


def stop_dask_clusters() -> None:
    for cluster in _dask_clusters.values():
        cluster.close()
    _dask_clusters.clear()


def hosts_for(backend: str, hosts) -> list[str]:
    """``local:N`` as written in a test, or its ssh twin ``sshhost:N``, or its in-memory twin ``memory:N``;
    on the dask backend, ``dask://`` the scheduler of a shared ``LocalCluster`` with as many workers."""
    if backend == "local":
        return list(hosts)
    if backend == "dask":
        n = sum(int(h.partition(":")[2] or 1) for h in hosts if h.startswith("local"))
        return [dask_cluster(n).scheduler_address.replace("tcp://", "dask://")]
    twin = "sshhost" if backend == "ssh" else backend
    return [(twin + h[len("local"):]) if h.startswith("local") else h for h in hosts]


class EventLog:
    """Observer that keeps every event, for assertions on what the cluster did."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def clear(self) -> None:
        self.events.clear()


@pytest.fixture(scope="module")
def cluster2(backend):
    """Two workers, shared by a test module (slices stay cached across its tests)."""
    with Cluster(hosts_for(backend, ["local:2"]), echo=False) as cluster:
        yield cluster


@pytest.fixture
def events(cluster2):
    """Events of ``cluster2`` emitted during one test."""
    log = EventLog()
    unsubscribe = cluster2.events.subscribe(log)
    yield log
    unsubscribe()


@pytest.fixture
def make_cluster(backend):
    """Factory for clusters that are shut down at the end of the test (hosts written as ``local:N``)."""
    made: list[Cluster] = []

    def make(hosts=("local:2",), **options) -> Cluster:
        options.setdefault("echo", False)
        cluster = Cluster(hosts_for(backend, hosts), **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.shutdown()


@pytest.fixture
def record():
    """``log = record(cluster)``: an ``EventLog`` of what ``cluster`` emits during this test."""
    unsubscribes = []

    def subscribe(cluster: Cluster) -> EventLog:
        log = EventLog()
        unsubscribes.append(cluster.events.subscribe(log))
        return log

    yield subscribe
    for unsubscribe in unsubscribes:
        unsubscribe()


@pytest.fixture
def hashes(monkeypatch):
    """Counts the slices hashed (``DataSet.key_and_size`` calls); forgets the keys of read-only data."""
    from qjam_nb import DataSet
    from qjam_nb.dataset import _FROZEN_KEYS

    count = [0]
    original = DataSet.key_and_size

    def counting(self, index):
        count[0] += 1
        return original(self, index)

    monkeypatch.setattr(DataSet, "key_and_size", counting)
    _FROZEN_KEYS.clear()
    return count


@pytest.fixture
def no_write_watch(monkeypatch):
    """Big writable arrays are hashed every call, as where the kernel cannot say which pages were written."""
    from qjam_nb import writewatch

    monkeypatch.setattr(writewatch, "enabled", False)


KERNEL = "qjam-test-python"


@pytest.fixture(scope="module")
def ip():
    """The in-process IPython shell with qjam_nb's magics loaded and no cluster (none left after)."""
    from IPython.testing import globalipapp

    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    if "QjamMagics" not in shell.magics_manager.registry:
        shell.run_cell("%load_ext qjam_nb")
    shell.run_cell("%qjam_shutdown")
    yield shell
    shell.run_cell("%qjam_shutdown")


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory) -> str:
    """A kernelspec that starts ``sys.executable`` (not whatever ``python`` is on PATH)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    yield KERNEL
    mp.undo()


#: A cloudpickle major version other than ours, for the version handshake tests.
OTHER_CLOUDPICKLE = "2.2.1" if cloudpickle.__version__.split(".")[0] != "2" else "3.1.1"


@pytest.fixture(scope="session")
def python_with_other_cloudpickle(tmp_path_factory):
    """A real venv whose cloudpickle is OTHER_CLOUDPICKLE (installed from the package index)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    python = root / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", f"cloudpickle=={OTHER_CLOUDPICKLE}"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        message = f"could not install cloudpickle {OTHER_CLOUDPICKLE} into a venv: {pip.stderr[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python
