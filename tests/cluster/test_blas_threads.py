"""Each worker's BLAS threads: its share of the host's usable cores, or what the user set.

The thread pools are read in the worker with threadpoolctl (as numpy loaded them), and the
environment besides (all a worker without numpy would have). The expected share is computed
here from loky's ``cpu_count`` (affinity and cgroup quota, read by another implementation).
The usable-core computation is also tested on its own: affinity in a child process, cgroup
quotas from fake ``/proc`` and ``/sys`` trees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from joblib.externals.loky import cpu_count

from qjam_nb.worker import threads

VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS")


def pools(params, xs):
    """What this worker's libraries run with: its pid, the environment, threadpoolctl's pools (or None)."""
    import os
    import time

    time.sleep(0.2)  # long enough for every worker to take a slice
    env = {v: os.environ.get(v) for v in VARIABLES}
    try:
        import numpy  # noqa: F401  (loads its BLAS, as a mapfunc would)
        from threadpoolctl import threadpool_info
    except ImportError:
        return [(os.getpid(), env, None)]
    return [(os.getpid(), env, sorted((p["internal_api"], p["num_threads"]) for p in threadpool_info()))]


def concatenate(a: list, b: list) -> list:
    return a + b


pools.__module__ = concatenate.__module__ = "__main__"  # ship them by value: ssh workers cannot import tests


@pytest.fixture(autouse=True)
def unset(monkeypatch):
    """The test process sets none of the variables (a CI runner might): each test sets what it means."""
    for v in VARIABLES:
        monkeypatch.delenv(v, raising=False)


def seen(cluster, n_workers: int) -> dict[int, tuple]:
    """pid -> (environment, pools) of every worker of ``cluster``."""
    deadline = time.monotonic() + 30
    found: dict[int, tuple] = {}
    while len(found) < n_workers and time.monotonic() < deadline:
        for pid, env, info in cluster.map(pools, None, list(range(4 * n_workers)), reduce=concatenate,
                                          slice_size=1):
            found[pid] = (env, info)
    assert sorted(found) == sorted(w.hello["pid"] for w in cluster.workers)
    return found


def check(found: dict[int, tuple], expected: int) -> None:
    for pid, (env, info) in found.items():
        assert env == dict.fromkeys(VARIABLES, str(expected)), pid
        if info is not None:
            assert info, f"worker {pid}: numpy loaded no thread pool threadpoolctl knows"
            # OpenBLAS caps its threads at the cores it may use (as expected is, here)
            assert {n for _, n in info} == {expected}, (pid, info)


def share(n_workers: int) -> int:
    return max(1, cpu_count() // n_workers)


def test_each_worker_gets_its_share_of_the_usable_cores(make_cluster):
    cluster = make_cluster(["local:2"])
    check(seen(cluster, 2), share(2))
    for w in cluster.workers:
        blas = w.hello["blas"]
        assert (blas["threads"], blas["source"], blas["cores"], blas["workers"]) == (share(2), "share", cpu_count(), 2)
    table = cluster.status.text()
    assert table.splitlines()[0].split()[-1] == "BLAS"
    assert all(line.endswith(f"  {share(2)} ({cpu_count()} cores // 2 workers)")
               for line in table.splitlines()[1:3]), table


def test_workers_on_one_host_count_together_whatever_entries_name_it(make_cluster):
    cluster = make_cluster(["local:1", "local:2"])  # three workers on one host
    check(seen(cluster, 3), share(3))


def test_the_cluster_option_sets_every_workers_threads(make_cluster, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the option wins over the environment
    cluster = make_cluster(["local:2"], blas_threads=1)
    check(seen(cluster, 2), 1)
    assert {w.hello["blas"]["source"] for w in cluster.workers} == {"option"}


def test_a_value_in_the_workers_environment_is_kept(backend, make_cluster, monkeypatch, tmp_path):
    """Local workers inherit the notebook's environment; ssh workers keep their host's (here set by a
    ``--python`` wrapper), and the notebook's is not forwarded to them (the host's cores are not ours)."""
    if backend == "local":
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
        cluster = make_cluster(["local:1"])  # its share would be every usable core
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")  # the notebook's: stays here
        wrapper = tmp_path / "qjam-python"
        wrapper.write_text(f"#!/bin/sh\nexport OMP_NUM_THREADS=1\nexec {sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        cluster = make_cluster(["local:1"], python=str(wrapper))
    check(seen(cluster, 1), 1)  # the unset ones follow the user's value
    [w] = cluster.workers
    assert w.hello["blas"]["source"] == "environment"


def test_false_leaves_the_environment_alone(backend, make_cluster, monkeypatch):
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # inherited by local workers, not forwarded over ssh
    cluster = make_cluster(["local:2"], blas_threads=False)
    kept = "3" if backend == "local" else None
    for env, _ in seen(cluster, 2).values():
        assert env == {v: (kept if v == "MKL_NUM_THREADS" else None) for v in VARIABLES}
    assert {w.hello["blas"]["source"] for w in cluster.workers} == {"off"}


@pytest.mark.parametrize("bad", [0, -1, 2.5, "2", True])
def test_a_bad_option_says_what_to_give(bad):
    from qjam_nb import Cluster

    with pytest.raises(ValueError, match="blas_threads"):
        Cluster(["local:1"], blas_threads=bad)


# -- usable cores ------------------------------------------------------------------------------

def test_usable_cores_follow_the_affinity():
    one = sorted(os.sched_getaffinity(0))[:1]
    code = (f"import os;os.sched_setaffinity(0,{set(one)!r});"
            "from qjam_nb.worker.threads import usable_cores;print(usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1"]
    assert threads.usable_cores() == cpu_count()


def fake_tree(root, cgroup: str, mountinfo: str, files: dict[str, str]):
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return str(root)


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_a_cgroup_v2_quota_caps_the_cores_tightest_ancestor_first(tmp_path):
    root = fake_tree(tmp_path, "0::/user.slice/job\n", V2_MOUNT, {
        "sys/fs/cgroup/cpu.max": "max 100000\n",
        "sys/fs/cgroup/user.slice/cpu.max": "150000 100000\n",  # 1.5 cores: 2 threads
        "sys/fs/cgroup/user.slice/job/cpu.max": "max 100000\n",
    })
    assert threads.cgroup_cores(root) == 2
    assert threads.usable_cores(root) == min(2, len(os.sched_getaffinity(0)))


def test_a_cgroup_v2_quota_below_a_core_still_gives_one_thread(tmp_path):
    root = fake_tree(tmp_path, "0::/\n", V2_MOUNT, {"sys/fs/cgroup/cpu.max": "20000 100000\n"})
    assert threads.cgroup_cores(root) == 1
    assert threads.usable_cores(root) == 1


def test_no_quota_leaves_the_affinity(tmp_path):
    root = fake_tree(tmp_path, "0::/a\n", V2_MOUNT, {"sys/fs/cgroup/a/cpu.max": "max 100000\n"})
    assert threads.cgroup_cores(root) is None
    assert threads.usable_cores(root) == len(os.sched_getaffinity(0))
    assert threads.cgroup_cores(str(tmp_path / "nowhere")) is None


def test_a_cgroup_v1_quota_in_a_container_whose_mount_root_is_its_own_cgroup(tmp_path):
    mountinfo = ("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
                 "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
                 "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    root = fake_tree(tmp_path, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n", mountinfo, {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "300000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/memory/cpu.cfs_quota_us": "100000\n",  # not the cpu controller's: ignored
        "sys/fs/cgroup/memory/cpu.cfs_period_us": "100000\n",
    })
    assert threads.cgroup_cores(root) == 3


def test_a_cgroup_v1_quota_of_minus_one_is_none(tmp_path):
    mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    root = fake_tree(tmp_path, "1:cpu:/x\n", mountinfo, {
        "sys/fs/cgroup/cpu/x/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/x/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
    })
    assert threads.cgroup_cores(root) is None


def test_apply_keeps_the_users_value_and_fills_the_others_with_it(tmp_path):
    env = {"OMP_NUM_THREADS": "3", threads.REQUEST: "share:2"}
    report = threads.apply(env, str(tmp_path))
    assert [env[v] for v in VARIABLES] == ["3"] * 5
    assert (report["threads"], report["source"], report["workers"]) == (3, "environment", 2)
    env = {threads.REQUEST: "share:2"}
    threads.apply(env, str(tmp_path))
    assert [env[v] for v in VARIABLES] == [str(max(1, len(os.sched_getaffinity(0)) // 2))] * 5
    env = {"MKL_NUM_THREADS": "5"}
    assert threads.apply(env, str(tmp_path))["source"] == "off"
    assert env == {"MKL_NUM_THREADS": "5"}
