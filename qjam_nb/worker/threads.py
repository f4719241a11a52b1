"""How many threads this worker's BLAS and OpenMP start: its share of the host's usable cores.

Rules of this file: it travels with the worker (standard library only), and
``apply`` runs first thing in ``main.main``, before any slice or mapfunc is
unpickled, so before numpy (and its BLAS) is loaded here: those libraries
read these variables once, when they load. (The local fork server never
imports numpy, so a forked worker loads it fresh too.)

Why: each worker's numpy otherwise starts a BLAS thread per core of the
host, so ``local:2`` on 2 cores runs 4 BLAS threads that fight over 2 cores
(9x slower than one process on the sparse autoencoder). dask's nanny and loky
set their workers' thread counts for the same reason.

The master asks in ``QJAM_BLAS_THREADS`` (``REQUEST``):

* ``share:N`` -- this worker is one of its cluster's N workers on this host:
  each of ``VARIABLES`` becomes max(1, usable cores // N), unless the
  environment already sets one of them (the user's: kept, and the ones not
  set take that same value, so OpenBLAS, which reads OPENBLAS_NUM_THREADS
  before OMP_NUM_THREADS, follows a user's OMP_NUM_THREADS);
* ``K`` -- all of them K (the ``Cluster(blas_threads=K)`` option), whatever the
  environment says;
* absent -- the environment is left alone (``Cluster(blas_threads=False)``).

Usable cores are what this process may run on: its CPU affinity, capped by
its cgroup's CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, the tightest along the cgroup's ancestors), not
``os.cpu_count()``, which counts the machine's cores. A quota of 1.5 cores
counts as 2 (as loky counts it).
"""

from __future__ import annotations

import math
import os

#: The variables set, in the order a user's value is looked for.
VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS")
#: What the master asks for (see the module's docstring).
REQUEST = "QJAM_BLAS_THREADS"


def apply(environ: dict | None = None, root: str = "/") -> dict:
    """Set ``VARIABLES`` in ``environ`` (``os.environ``) as the master asked; what was done, for the HELLO:
    ``threads`` (the number set, or None), ``source`` (share / environment / option / off), ``cores``,
    ``workers`` and ``env`` (each variable's value now, None where unset)."""
    environ = os.environ if environ is None else environ
    request = environ.get(REQUEST, "").strip()
    cores = usable_cores(root)
    report = {"threads": None, "source": "off", "cores": cores, "workers": None}
    users = [environ[v].strip() for v in VARIABLES if environ.get(v, "").strip()]
    if request.startswith("share:"):
        try:
            workers = max(1, int(request[len("share:"):]))
        except ValueError:
            workers = 1
        report["workers"] = workers
        if users:
            value, report["source"] = users[0], "environment"
        else:
            value, report["source"] = str(max(1, cores // workers)), "share"
        for v in VARIABLES:
            if not environ.get(v, "").strip():
                environ[v] = value
        report["threads"] = _number(value)
    elif request.isdigit() and int(request) >= 1:
        for v in VARIABLES:
            environ[v] = request
        report["threads"], report["source"] = int(request), "option"
    elif users:
        report["threads"] = _number(users[0])
    report["env"] = {v: environ.get(v) for v in VARIABLES}
    return report


def _number(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def usable_cores(root: str = "/") -> int:
    """Cores this process may use: its affinity, capped by its cgroup's CPU quota (at least 1).
    ``root`` is where ``/proc`` and ``/sys`` are looked for (a test passes a fake tree)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cores(root)
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cores(root: str = "/") -> int | None:
    """Whole cores (rounded up) the CPU quota of this process's cgroup allows, or None without a quota."""
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mounts = _cgroup_mounts(root)
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ident, controllers, path = parts
        if ident == "0" and controllers == "":
            where = [(r, p) for kind, opts, r, p in mounts if kind == "cgroup2"] or [("/", "/sys/fs/cgroup")]
            read = _v2_quota
        elif "cpu" in controllers.split(","):
            where = ([(r, p) for kind, opts, r, p in mounts if kind == "cgroup" and "cpu" in opts]
                     or [("/", "/sys/fs/cgroup/" + controllers), ("/", "/sys/fs/cgroup/cpu")])
            read = _v1_quota
        else:
            continue
        for mount_root, mount_point in where:
            quota = _tightest(os.path.join(root, mount_point.lstrip("/")), _relative(path, mount_root), read)
            if quota is not None:
                found.append(quota)
                break
    return min(found) if found else None


def _cgroup_mounts(root: str) -> list[tuple[str, set, str, str]]:
    """(cgroup or cgroup2, super options, mount root, mount point) of each cgroup mount in mountinfo."""
    try:
        with open(os.path.join(root, "proc/self/mountinfo")) as f:
            text = f.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((tail[0], set(tail[2].split(",")), _unescape(fields[3]), _unescape(fields[4])))
    return out


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _relative(path: str, mount_root: str) -> str:
    """The cgroup's directory under its mount (a container's mount root is its own cgroup)."""
    mount_root = mount_root.rstrip("/")
    if mount_root and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root):]
    return path.strip("/")


def _tightest(mount: str, relative: str, read) -> int | None:
    """The smallest quota from the cgroup's directory up to its mount point (each level caps its children)."""
    if not os.path.isdir(mount):
        return None
    parts = [p for p in relative.split("/") if p and p not in (".", "..")]
    quotas = []
    for depth in range(len(parts), -1, -1):
        quota = read(os.path.join(mount, *parts[:depth]))
        if quota is not None:
            quotas.append(quota)
    return min(quotas) if quotas else None


def _v2_quota(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "cpu.max")) as f:
            quota, _, period = f.read().strip().partition(" ")
        return _cores(quota, period or "100000")
    except (OSError, ValueError):
        return None


def _v1_quota(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
            quota = f.read().strip()
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = f.read().strip()
        return _cores(quota, period)
    except (OSError, ValueError):
        return None


def _cores(quota: str, period: str) -> int | None:
    if quota in ("max", "-1") or int(quota) <= 0 or int(period) <= 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))
