"""Shared memory that no one else can touch: recovery deletes only what qjam_nb made, a file
another user planted stops nothing, and what a SIGKILLed master left is swept by the next one.

The master must run unprivileged for a planted file to be able to stop it (as root, the unlink
of another user's file just succeeds): those tests run it as uid 65534 with ``setpriv`` and an
interpreter that uid can run (a throw-away venv in a 0755 temporary directory). Every file a
test plants, it names itself and deletes itself; every process it signals, it started.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from qjam_nb import Cluster, SliceDone, WorkerStateChanged
from qjam_nb.worker import sharedmem

NOBODY = 65534
CHECKOUT = Path(__file__).resolve().parents[2]
SHM = sharedmem.DIRECTORY
DATA = list(range(40))

pytestmark = pytest.mark.skipif(not sharedmem.ARENAS, reason="shared memory is for Linux with /dev/shm")


def slow_sum(params, xs):
    import time

    time.sleep(0.02)
    return sum(xs)


slow_sum.__module__ = "__main__"


def starttime(pid: int) -> str:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()[19]


def master_dir_name(pid: int, start: str) -> str:
    """A name as a master's private directory in /dev/shm is named (see sharedmem)."""
    return f"qjam-{pid}-{start}-{secrets.token_hex(8)}"


def snapshot(path: str) -> tuple:
    st = os.lstat(path)
    return st.st_ino, st.st_uid, st.st_mode


# -- an interpreter uid 65534 can run --------------------------------------------------------------


def as_nobody(argv: list) -> list:
    # Through sh: setpriv may exec its program with the capabilities it keeps until then;
    # sh's exec of the interpreter is the unprivileged uid's own, as the master's of its workers.
    return [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "/bin/sh", "-c", 'exec "$@"', "sh", *argv]


PROBE = ("import sys, numpy, cloudpickle, qjam_nb; "
         "assert qjam_nb.__file__.startswith(sys.argv[1]), qjam_nb.__file__; print(sys.version_info[:2])")


def probe(python: str, env: dict, cwd: str, checkout: str) -> str:
    """'' if uid 65534 can run ``python`` and import the master's packages, else why not."""
    try:
        done = subprocess.run(as_nobody([python, "-c", PROBE, checkout]), env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip().splitlines()[-1:][0] if (done.stderr or done.stdout) else "failed"
    if done.stdout.strip() != str(tuple(sys.version_info[:2])):
        return f"it is Python {done.stdout.strip()}, not {sys.version_info[:2]}"
    return ""


def interpreters() -> list:
    """Interpreters of this Python version, this one first."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", None),
             shutil.which(f"python{version}"), f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    found += [os.path.realpath(p) for p in found if p]
    return list(dict.fromkeys(p for p in found if p and os.path.isfile(p)))


def site_modules() -> dict:
    """Where the master's third-party packages (its imports, numpy, cloudpickle) lie: top name -> path."""
    code = ("import json, sys, qjam_nb, numpy, cloudpickle\n"
            "out = {}\n"
            "for name, mod in list(sys.modules.items()):\n"
            "    f = getattr(mod, '__file__', None) or ''\n"
            "    if '.' not in name and ('site-packages' in f or 'dist-packages' in f) and name != 'qjam_nb':\n"
            "        out[name] = f\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def venv(root: Path, python: str, paths: list) -> str:
    """A venv in ``root`` running ``python``, with ``paths`` on its sys.path (a .pth file)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (root / "bin").mkdir(parents=True)
    site = root / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True)
    (root / "pyvenv.cfg").write_text(f"home = {os.path.dirname(python)}\ninclude-system-site-packages = false\n"
                                     f"version = {sys.version.split()[0]}\n")
    os.symlink(python, root / "bin" / "python")
    (site / "qjam_test_paths.pth").write_text("".join(f"{p}\n" for p in paths))
    return str(root / "bin" / "python")


def copy_readable(source: str, target: Path) -> None:
    if os.path.isdir(source):
        shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(source, target)


def runs_as_nobody(python: str, cwd: str) -> bool:
    done = subprocess.run(as_nobody([python, "-I", "-c", "import sys; print(sys.version_info[:2])"]),
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and done.stdout.strip() == str(tuple(sys.version_info[:2]))


def readable_copies(root: Path, modules: dict, site_dirs: list) -> Path:
    """qjam_nb and the packages the master imports (with their bundled libraries and metadata), copied
    where any uid can read them."""
    copies = root / "copies"
    (copies / "site").mkdir(parents=True)
    copy_readable(str(CHECKOUT / "qjam_nb"), copies / "qjam_nb")
    for f in modules.values():
        source = os.path.dirname(f) if f.endswith("__init__.py") else f
        copy_readable(source, copies / "site" / os.path.basename(source))
    for site in site_dirs:
        for extra in [*Path(site).glob("*.libs"), *Path(site).glob("*.dist-info")]:
            if not (copies / "site" / extra.name).exists():
                copy_readable(str(extra), copies / "site" / extra.name)
    subprocess.run(["chmod", "-R", "a+rX", str(copies)], check=True)
    return copies


@pytest.fixture(scope="module")
def nobody():
    """(python, env, cwd) for running a master as uid 65534: this checkout and the venv's packages
    where they are if that uid can read them, else copies in a 0755 temporary directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root: files are planted as root and the master runs as uid 65534 (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: it runs the master as an unprivileged uid")
    root = Path(tempfile.mkdtemp(prefix="qjam-test-nobody-"))
    try:
        root.chmod(0o755)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        modules = site_modules()
        site_dirs = sorted({str(Path(f).parent.parent if f.endswith("__init__.py") else Path(f).parent)
                            for f in modules.values()})
        problems, copies = [], None
        for n, python in enumerate(interpreters()):
            if not runs_as_nobody(python, str(root)):
                problems.append(f"{python}: uid {NOBODY} cannot run it")
                continue
            candidate = venv(root / f"venv{n}", python, [str(CHECKOUT), *site_dirs])
            problem = probe(candidate, env, str(root), str(CHECKOUT))
            if not problem:
                yield candidate, env, str(root)
                return
            if copies is None:
                copies = readable_copies(root, modules, site_dirs)
            candidate = venv(root / f"venv{n}-copies", python, [str(copies), str(copies / "site")])
            again = probe(candidate, env, str(root), str(copies))
            if not again:
                yield candidate, env, str(root)
                return
            problems.append(f"{python}: {problem}; from copies: {again}")
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that uid {NOBODY} can run and import "
                    "numpy, cloudpickle and qjam_nb with, even from copies in a 0755 directory: "
                    + "; ".join(problems))
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Master:
    """A master process running ``script``, talking JSON lines on its stdin and stdout."""

    def __init__(self, argv: list, script: str, *args: str, env: dict | None = None, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen([*argv, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise AssertionError(f"the master ended ({self.proc.returncode}): {self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def say(self, line: str = "go") -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


RECOVERY = r"""
import json, os, signal, sys
from qjam_nb import Cluster, SliceDone, WorkerStateChanged
from qjam_nb.worker import sharedmem

def slow_sum(params, xs):
    import time
    time.sleep(0.02)
    return sum(xs)

states = []
kill = {"done": 0, "victim": None}

def observe(event):
    if isinstance(event, WorkerStateChanged):
        states.append([event.worker, event.state, event.reason])
    elif isinstance(event, SliceDone) and kill["victim"] is not None:
        kill["done"] += 1
        if kill["done"] == 5:
            os.kill(kill["victim"], signal.SIGKILL)

with Cluster(["local:2"], echo=False, observers=[observe]) as cluster:
    pids = [w.hello["pid"] for w in cluster.workers]
    print(json.dumps({"pids": pids, "names": [w.name for w in cluster.workers],
                      "dir": sharedmem.own_directory(), "uid": os.geteuid()}), flush=True)
    sys.stdin.readline()  # the test plants its files
    out = {}
    kill["victim"] = pids[0]
    for what, timeout in (("first", None), ("second", 20)):
        try:
            out[what] = cluster.map(slow_sum, None, list(range(40)), slice_size=1, timeout=timeout)
        except Exception as exc:
            out[what + "_error"] = f"{type(exc).__name__}: {exc}"
    out["states"] = states
    out["pids_after"] = [w.hello.get("pid") for w in cluster.workers]
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the test has looked at its files
"""


def plant(path: str, uid: int = 0) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    os.write(fd, b"planted by a test")
    os.close(fd)
    os.chown(path, uid, uid)
    return path


def remove(paths) -> None:
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass


def test_a_file_another_user_planted_stops_no_recovery_of_an_unprivileged_master(nobody):
    python, env, cwd = nobody
    master = Master(as_nobody([python]), RECOVERY, env=env, cwd=cwd)
    planted = []
    try:
        hello = master.read()
        assert hello["uid"] == NOBODY
        tag = secrets.token_hex(4)
        for pid in hello["pids"]:
            # What the old recovery globbed (qjam-result-<worker pid>-*), and a file in the master's
            # own directory under the name a worker's result arena takes there: root's, not the master's.
            planted.append(plant(os.path.join(SHM, f"qjam-result-{pid}-planted{tag}")))
            planted.append(plant(os.path.join(hello["dir"], f"{sharedmem.RESULT_PREFIX}{pid}-planted{tag}")))
        before = {p: snapshot(p) for p in planted}
        master.say()
        out = master.read()
        assert "first_error" not in out, out["first_error"]
        assert out["first"] == sum(DATA)
        victim = hello["names"][0]
        mine = [s for s in out["states"] if s[0] == victim]
        assert ["dead"] == [s for _, s, _ in mine if s == "dead"], mine  # marked dead once ...
        assert [s for _, s, _ in mine][-4:] == ["starting", "idle", "busy", "idle"], mine  # ... and back
        assert "second_error" not in out, out["second_error"]
        assert out["second"] == sum(DATA)
        assert out["pids_after"][0] not in hello["pids"]
        assert {p: snapshot(p) for p in planted if os.path.lexists(p)} == before  # untouched, every one
        remove(planted)
        master.say()
        assert master.proc.wait(30) == 0
        assert not os.path.lexists(hello["dir"])  # the master's exit left nothing
    finally:
        master.stop()
        remove(planted)


def test_recovery_as_root_never_deletes_another_users_files():
    if os.geteuid() != 0:
        pytest.skip("needs root, to plant files of another uid (65534)")
    tag = secrets.token_hex(4)
    planted = []
    target = Path(tempfile.mkdtemp(prefix="qjam-test-target-"))
    deaths = []
    state = {"done": 0, "victim": None}

    def observe(event):
        if isinstance(event, WorkerStateChanged) and event.state == "dead":
            deaths.append(event.worker)
        elif isinstance(event, SliceDone) and state["victim"] is not None:
            state["done"] += 1
            if state["done"] == 5:
                os.kill(state["victim"], signal.SIGKILL)

    try:
        with Cluster(["local:2"], echo=False, observers=[observe]) as cluster:
            own = sharedmem.own_directory()
            (target / "kept").write_text("not qjam_nb's")
            for w in cluster.workers:
                pid = w.hello["pid"]
                planted.append(plant(os.path.join(SHM, f"qjam-result-{pid}-planted{tag}"), NOBODY))
                planted.append(plant(os.path.join(own, f"{sharedmem.RESULT_PREFIX}{pid}-planted{tag}"), NOBODY))
                link = os.path.join(own, f"{sharedmem.RESULT_PREFIX}{pid}-link{tag}")
                os.symlink(target / "kept", link)
                planted.append(link)
            before = {p: snapshot(p) for p in planted}
            victim = cluster.workers[0]
            state["victim"] = victim.hello["pid"]
            assert cluster.map(slow_sum, None, DATA, slice_size=1) == sum(DATA)
            assert deaths == [victim.name]
            assert cluster.map(slow_sum, None, DATA, slice_size=1, timeout=20) == sum(DATA)
            assert victim.state == "idle" and victim.hello["pid"] != state["victim"]
            assert {p: snapshot(p) for p in planted if os.path.lexists(p)} == before
            assert (target / "kept").read_text() == "not qjam_nb's"
    finally:
        remove(planted)
        shutil.rmtree(target, ignore_errors=True)


# -- what a SIGKILLed master leaves is swept by the next one -----------------------------------------

RECORDING = r"""
import json, os, signal, sys, threading, time
import numpy as np
from qjam_nb import Cluster
from qjam_nb.worker import sharedmem

made = []  # every shared-memory file this master made
real_export, real_init = sharedmem.export, sharedmem.Arena.__init__

def export(array):
    handle = real_export(array)
    if handle is not None:
        made.append(handle["path"])
    return handle

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    made.append(self.path)

sharedmem.export, sharedmem.Arena.__init__ = export, init

def first(t, xs):
    return float(t[0])

def slow(params, xs):
    import time
    time.sleep(10)
    return 0.0

with Cluster(["local:2"], echo=False) as cluster:
    cluster.map(first, np.ones(2 << 17), [0])  # 2 MiB of params: the params arena
    if sys.argv[1] == "die":
        stopped = cluster.workers[1].hello["pid"]
        os.kill(stopped, signal.SIGSTOP)  # the slice shipped to it stays unread

        def die():
            time.sleep(1.5)  # worker 0 is in its first slice, worker 1 has not read its own
            print(json.dumps({"made": made}), flush=True)
            os.kill(stopped, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=die, daemon=True).start()
        cluster.map(slow, None, np.zeros((1600, 1024)), slice_size=200)  # 8 slices of 1.6 MiB
    print(json.dumps({"made": made}), flush=True)
    sys.stdin.readline()
"""


def test_a_sigkilled_masters_shared_memory_is_swept_at_the_next_start_and_nothing_else():
    dead = Master([sys.executable], RECORDING, "die", cwd=str(CHECKOUT))
    live = None
    planted = []
    target = Path(tempfile.mkdtemp(prefix="qjam-test-target-"))
    try:
        dead_pid, dead_start = dead.proc.pid, starttime(dead.proc.pid)
        left = dead.read()["made"]
        dead.proc.wait(30)
        assert dead.proc.returncode == -signal.SIGKILL
        left_over = [p for p in left if os.path.lexists(p)]
        kinds = {m[1] for p in left_over if (m := re.search(r"(params|slice)-", os.path.basename(p)))}
        assert {"params", "slice"} <= kinds, f"the killed master left no params arena or no unread slice: {left}"
        live = Master([sys.executable], RECORDING, "live", cwd=str(CHECKOUT))
        live_files = live.read()["made"]
        assert live_files and all(os.path.exists(p) for p in live_files)

        # Look-alikes the sweep must leave: another uid's directory named for the dead master,
        # a directory of ours named for a live process (this one), a symbolic link named for the
        # dead master pointing at a directory of ours, another uid's file in the old naming.
        if os.geteuid() == 0:
            theirs = os.path.join(SHM, master_dir_name(dead_pid, dead_start))
            os.mkdir(theirs, 0o700)
            planted.append(theirs)
            plant(os.path.join(theirs, "params-planted"), NOBODY)
            os.chown(theirs, NOBODY, NOBODY)
            planted.append(plant(os.path.join(SHM, f"qjam-params-{dead_pid}-planted"), NOBODY))
        alive = os.path.join(SHM, master_dir_name(os.getpid(), starttime(os.getpid())))
        os.mkdir(alive, 0o700)
        planted.append(alive)
        plant(os.path.join(alive, "params-planted"))
        (target / "kept").write_text("not qjam_nb's")
        link = os.path.join(SHM, master_dir_name(dead_pid, dead_start))
        os.symlink(target, link)
        planted.append(link)
        before = {p: snapshot(p) for p in planted}
        inside = {p: sorted(os.listdir(p)) for p in planted if os.path.isdir(p) and not os.path.islink(p)}

        with Cluster(["local:1"], echo=False):
            pass
        assert [p for p in left_over if os.path.lexists(p)] == []  # swept, every one
        dirs = {os.path.dirname(p) for p in left_over} - {SHM}
        assert [d for d in dirs if os.path.lexists(d)] == []  # and the directory they were in
        assert all(os.path.exists(p) for p in live_files)  # a live master's: untouched
        assert {p: snapshot(p) for p in planted if os.path.lexists(p)} == before
        assert {p: sorted(os.listdir(p)) for p in inside} == inside
        assert (target / "kept").read_text() == "not qjam_nb's"
        live.say()
        assert live.proc.wait(30) == 0
        assert not any(os.path.lexists(p) for p in live_files)
    finally:
        dead.stop()
        if live is not None:
            live.stop()
        remove(planted)
        shutil.rmtree(target, ignore_errors=True)


def test_a_sweep_is_quiet_and_leaves_names_it_does_not_know():
    odd = [os.path.join(SHM, f"qjam-{name}-{secrets.token_hex(4)}") for name in ("x", "1-y", "2-3-zz")]
    try:
        for path in odd:
            plant(path, os.geteuid())
        sharedmem.sweep()
        assert all(os.path.exists(p) for p in odd)
    finally:
        remove(odd)


def test_names_carry_the_masters_pid_and_start_and_are_not_guessable():
    own = sharedmem.own_directory()
    name = os.path.basename(own)
    match = re.fullmatch(r"qjam-(\d+)-(\d+)-([0-9a-f]{16})", name)
    assert match and int(match[1]) == os.getpid() and match[2] == starttime(os.getpid())
    st = os.lstat(own)
    assert st.st_uid == os.geteuid() and (st.st_mode & 0o777) == 0o700
    a = sharedmem.Arena(1 << 20, "params-")
    try:
        assert os.path.dirname(a.path) == own and re.fullmatch(r"params-[0-9a-f]{16}", os.path.basename(a.path))
        assert (os.lstat(a.path).st_mode & 0o777) == 0o600
    finally:
        a.close()


def test_a_forked_child_makes_its_own_directory_and_leaves_its_parents_alone():
    import fcntl

    parent = sharedmem.own_directory()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            child = sharedmem.own_directory()
            os.write(w, child.encode())
            sharedmem._remove_own_directory()  # what its exit runs (atexit)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read()
    os.waitpid(pid, 0)
    assert child and child != parent and not os.path.lexists(child)
    assert os.path.isdir(parent)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):  # still locked: this process lives
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert parent not in sharedmem.sweep()
