"""Zero-install bootstrap: the worker is uploaded once per host, privately; Python is probed first."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import numpy as np
import pytest

from qjam_nb import Cluster, HostError, HostReady
from qjam_nb.transport.payload import payload

SYSTEM_PYTHON = "/usr/bin/python3"


def ready_event(events: list, host: str) -> HostReady:
    return next(e for e in events if isinstance(e, HostReady) and e.host == host)


def test_first_cluster_uploads_the_worker_and_a_second_uploads_nothing(ssh_world):
    host = ssh_world.hosts[1]  # sshhost2
    shutil.rmtree(host.home / ".cache" / "qjam_nb", ignore_errors=True)
    first: list = []
    with Cluster(["sshhost2:2"], echo=False, observers=[first.append]) as cluster:
        assert cluster.map(lambda p, xs: 1) == 2
    uploaded = ready_event(first, "sshhost2")
    version, data = payload()
    assert uploaded.uploaded_bytes == len(data) > 0
    assert f"uploaded {len(data) / 1024:.0f} KiB to" in uploaded.detail

    second: list = []
    with Cluster(["sshhost2:2"], echo=False, observers=[second.append]) as cluster:
        assert cluster.map(lambda p, xs: 1) == 2
    again = ready_event(second, "sshhost2")
    assert again.uploaded_bytes == 0
    assert "found the worker in" in again.detail and version in again.detail


def test_remote_cache_directory_is_private(ssh_world):
    with Cluster(["sshhost"], echo=False):
        pass
    root = ssh_world.hosts[0].home / ".cache" / "qjam_nb"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    version, _ = payload()
    tree = root / version
    assert (tree / ".complete").exists()
    assert (tree / "qjam_worker" / "main.py").exists() and (tree / "deps" / "cloudpickle").is_dir()
    for path in [tree, *tree.rglob("*")]:  # (Python's __pycache__ follows the umask, still not writable)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o022 == 0, f"{path} is mode {oct(mode)}: writable by others"
    assert stat.S_IMODE((tree / "qjam_worker" / "main.py").stat().st_mode) == 0o600
    assert stat.S_IMODE((tree / ".complete").stat().st_mode) == 0o600
    assert not [p for p in root.iterdir() if p.name.startswith(".upload-")]  # no half-done uploads left


@pytest.fixture(scope="module")
def system_python():
    """Debian's own python3: same minor version as the notebook here, but no numpy and no cloudpickle."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is not installed")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                           text=True)
    import sys

    if probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is another Python minor version")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} has numpy")
    return SYSTEM_PYTHON


def test_a_python_without_numpy_or_cloudpickle_works_for_plain_data(ssh_world, system_python):
    with Cluster(["sshhost"], python=system_python, echo=False) as cluster:
        hello = cluster.workers[0].hello
        assert hello["numpy"] is None
        import cloudpickle

        assert hello["cloudpickle"] == cloudpickle.__version__  # the uploaded copy
        assert cluster.map(lambda p, xs: sum(x * p for x in xs), 2, list(range(10)), slice_size=3) == 90
        with pytest.raises(HostError, match=r"host 'sshhost', checking for numpy: .*install numpy there"):
            cluster.map(lambda p, xs: xs.sum(), None, np.arange(10.0))
        assert cluster.map(lambda p, xs: len(xs), None, [1, 2, 3]) == 3  # still usable


def test_python_from_qjam_remote_python(ssh_world, system_python, monkeypatch):
    monkeypatch.setenv("QJAM_REMOTE_PYTHON", system_python)
    with Cluster(["sshhost"], echo=False) as cluster:
        assert cluster.workers[0].hello["numpy"] is None
        assert system_python in cluster.status.hosts["sshhost"].detail


def test_default_remote_python_is_this_interpreter_when_the_host_has_it(ssh_world):
    import sys

    with Cluster(["sshhost"], echo=False) as cluster:
        assert f"Python {sys.executable}" in cluster.status.hosts["sshhost"].detail
        assert cluster.workers[0].hello["numpy"] == np.__version__


@pytest.mark.parametrize("how", ["symlink", "other owner"])
def test_a_cache_directory_that_is_a_symlink_or_not_ours_is_refused(ssh_world, tmp_path, how):
    root = ssh_world.hosts[1].home / ".cache" / "qjam_nb"
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    if how == "symlink":
        elsewhere = tmp_path / "planted"
        elsewhere.mkdir()
        root.symlink_to(elsewhere)
        expected = "is a symbolic link"
    else:
        if os.geteuid() != 0:
            pytest.skip("making a directory that belongs to another user needs root")
        root.mkdir(mode=0o700)
        os.chown(root, 65534, 65534)
        expected = "belongs to another user"
    try:
        with pytest.raises(HostError, match=rf"host 'sshhost2', checking its cache directory: .*qjam_nb {expected}"):
            Cluster(["sshhost2"], echo=False)
        if how == "symlink":
            assert list((tmp_path / "planted").iterdir()) == []  # nothing was written through the link
    finally:
        if root.is_symlink():
            root.unlink()
        else:
            shutil.rmtree(root, ignore_errors=True)
    with Cluster(["sshhost2"], echo=False) as cluster:  # removed, as the message says: works again
        assert cluster.map(lambda p, xs: 3) == 3


def test_no_key_material_reaches_events_logs_or_the_remote_cache(ssh_world, caplog):
    seen: list = []
    with caplog.at_level("DEBUG"), Cluster(["sshhost"], echo=False, observers=[seen.append]) as cluster:
        cluster.map(lambda p, xs: 1)
        text = "\n".join(repr(e) for e in seen) + cluster.status.text() + caplog.text
    secret = "".join(ssh_world.key.read_text().splitlines()[1:-1])  # the private key's base64 body
    for piece in (secret[:40], secret[-40:]):
        assert piece not in text
    cache = ssh_world.hosts[0].home / ".cache" / "qjam_nb"
    for path in cache.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
