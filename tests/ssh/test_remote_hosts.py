"""Remote hosts as they are: a ``--python`` wrapper, stray modules in the home directory, a full
disk, a chatty ``.bashrc``; Ctrl-C while connecting; a worker's channel closed under load.

These tests run on a private sshd of their own (``qhost``, on 127.0.0.1, its sessions' HOME a
directory of this module's), so what they plant in that HOME never reaches the other tests'
hosts, and its log (LogLevel INFO) shows the connections it dropped. ``silent`` is a listening
socket that never says a word: an ssh host whose handshake never comes.
"""

from __future__ import annotations

import getpass
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import sshd

from qjam_nb import Cluster, HostError


@dataclass
class OwnWorld:
    host: sshd.PrivateSshd  # "qhost"
    home: Path  # the master's HOME while this module runs
    silent: socket.socket  # "silent": accepts connections, answers nothing
    key: Path

    @property
    def remote_home(self) -> Path:
        return self.host.home

    def add_host(self, alias: str, host: sshd.PrivateSshd) -> None:
        """Name another private sshd ``alias`` in this module's ~/.ssh/config, its key known."""
        with open(self.home / ".ssh" / "config", "a") as config:
            config.write(entry(alias, host.address, host.port, self.key))
        with open(self.home / ".ssh" / "known_hosts", "a") as known:
            known.write(host.known_hosts_line())


def entry(alias: str, address: str, port: int, key: Path) -> str:
    return f"Host {alias}\n  HostName {address}\n  Port {port}\n  User {getpass.getuser()}\n  IdentityFile {key}\n\n"


def private_sshd(root: Path, key: Path, loglevel: str = "ERROR") -> sshd.PrivateSshd:
    host = sshd.PrivateSshd(root, "127.0.0.1", key.with_suffix(".pub"))
    host.config.write_text(host.config.read_text().replace("LogLevel ERROR", f"LogLevel {loglevel}"))
    return host.start()


@pytest.fixture(scope="module")
def own(ssh_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("remotehosts")
    host = private_sshd(root / "qhost", ssh_world.key, "INFO")  # INFO: a dropped connection is logged
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    home = root / "master_home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(
        entry("qhost", host.address, host.port, ssh_world.key)
        + entry("silent", "127.0.0.1", silent.getsockname()[1], ssh_world.key))
    (home / ".ssh" / "known_hosts").write_text(host.known_hosts_line())
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    try:
        yield OwnWorld(host, home, silent, ssh_world.key)
    finally:
        mp.undo()
        host.stop()
        silent.close()


def sessions_of(host: sshd.PrivateSshd) -> list[int]:
    """The processes sshd runs for connections (one per connection, and its sessions' children)."""
    return sshd.processes_under(host.process.pid)


def wait_for(condition, seconds: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# -- the --python command ------------------------------------------------------------------------

def test_a_python_wrapper_starts_the_workers_too(own):
    """HPC ``module load``, conda activation: a script that sets the environment up, then execs Python."""
    wrapper = own.remote_home / "bin" / "qjam-python"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nexport QJAM_TEST_MARK=set-by-the-wrapper\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    with Cluster(["qhost"], python=str(wrapper), echo=False) as cluster:
        assert cluster.map(lambda p, xs: os.environ.get("QJAM_TEST_MARK")) == "set-by-the-wrapper"
        assert str(wrapper) in cluster.status.hosts["qhost"].detail  # says how its Python is started


# -- the home directory is not on the worker's sys.path -------------------------------------------

STRAYS = ("random", "json", "socket", "tempfile", "contextlib")


def test_modules_in_the_remote_home_do_not_shadow_the_standard_library(own):
    for name in STRAYS:
        (own.remote_home / f"{name}.py").write_text(f"raise ImportError('~/{name}.py was imported')\n")
    try:
        with Cluster(["qhost"], echo=False) as cluster:
            def where(p, xs):
                import random
                import sys
                return random.__file__, random.random() < 1, sys.path[0], os.getcwd()

            path, works, first, cwd = cluster.map(where)
        assert works and not path.startswith(str(own.remote_home))
        assert cwd == str(own.remote_home)  # workers still start in the home directory...
        assert first not in ("", ".", cwd)  # ...but it is not where they import from
    finally:
        for name in STRAYS:
            (own.remote_home / f"{name}.py").unlink()


# -- a failed upload leaves nothing --------------------------------------------------------------

def test_an_upload_that_fails_mid_way_leaves_nothing_and_says_what_to_do(own, tmp_path):
    """A host whose processes may not write files over 16 KiB (RLIMIT_FSIZE, as ``ulimit -f`` sets):
    the upload's writes fail mid-unpack with EFBIG, as on a full disk or quota they fail with ENOSPC."""
    host = private_sshd(tmp_path / "fullhost", own.key)
    try:
        own.add_host("fullhost", host)
        resource.prlimit(host.process.pid, resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))
        cache = host.home / ".cache" / "qjam_nb"
        with pytest.raises(HostError) as failed:
            Cluster(["fullhost"], echo=False)
        message = str(failed.value)
        assert "host 'fullhost', uploading the worker" in message
        assert "File too large" in message and "ulimit -f" in message  # what failed, and the likely why
        assert "nothing was left" in message and "connect again" in message  # what to do
        assert cache.is_dir()
        assert [p.name for p in cache.iterdir()] == []  # no .upload-* directory, no half payload

        resource.prlimit(host.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        with Cluster(["fullhost"], echo=False) as cluster:  # space again: the same host works
            assert cluster.map(lambda p, xs: 5) == 5
    finally:
        host.stop()


# -- a shell start-up file that prints ----------------------------------------------------------

def test_a_bashrc_that_prints_is_named_with_the_fix(own):
    bashrc = own.remote_home / ".bashrc"
    bashrc.write_text("echo 'Welcome to qhost, have a nice day'\n")
    try:
        with pytest.raises(HostError) as refused:
            Cluster(["qhost"], echo=False)
        message = str(refused.value)
        assert "host 'qhost'" in message and "Welcome to qhost" in message
        for name in ("~/.bashrc", "/etc/bash.bashrc", "~/.profile", "~/.bash_profile"):
            assert name in message
        assert "[[ $- == *i* ]] || return" in message
        assert "case $- in *i*) ;; *) return;; esac" in message
        # The fix as the message gives it:
        bashrc.write_text("[[ $- == *i* ]] || return\necho 'Welcome to qhost, have a nice day'\n")
        with Cluster(["qhost"], echo=False) as cluster:
            assert cluster.map(lambda p, xs: 7) == 7
    finally:
        bashrc.unlink()


# -- Ctrl-C while connecting --------------------------------------------------------------------

INTERRUPTED = textwrap.dedent("""
    import json, sys, threading
    from qjam_nb import Cluster
    print("starting", flush=True)
    try:
        Cluster(["qhost", "silent"], echo=False, start_timeout=60)
        print(json.dumps("not interrupted"), flush=True)
    except KeyboardInterrupt:
        left = [t for t in threading.enumerate() if t is not threading.main_thread()]
        print(json.dumps([f"{type(t).__module__}.{type(t).__name__} {t.name}" for t in left]), flush=True)
    sys.stdin.read()  # the kernel lives on: until the test closes this pipe
""")


def test_ctrl_c_while_connecting_leaves_no_thread_and_no_session(own):
    assert wait_for(lambda: not sessions_of(own.host), 10), "sessions of earlier tests are still open"
    own.silent.settimeout(30)
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    stuck = None
    try:
        assert kernel.stdout.readline() == "starting\n"
        stuck, _ = own.silent.accept()  # "silent" is being connected to (and will never answer)
        assert wait_for(lambda: sessions_of(own.host), 10)  # and qhost is connected
        time.sleep(1.0)  # qhost bootstrapped meanwhile (or is at it: either way, it must be undone)
        kernel.send_signal(signal.SIGINT)
        left = json.loads(kernel.stdout.readline())
        assert left == [], f"threads left running after Ctrl-C: {left}"
        stuck.settimeout(10)
        assert stuck.recv(1000).startswith(b"SSH-2.0-") and stuck.recv(1000) == b""  # closed
        assert wait_for(lambda: not sessions_of(own.host), 10), f"sshd sessions left: {sessions_of(own.host)}"
        assert kernel.poll() is None  # all that while, the kernel lived on
        kernel.stdin.close()
        assert kernel.wait(10) == 0
        assert kernel.stderr.read() == ""  # no error logged by the connections it closed
    finally:
        if stuck is not None:
            stuck.close()
        if kernel.poll() is None:
            kernel.kill()
            kernel.wait()


# -- closing one worker's channel while its host's others work on -----------------------------------

def spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def test_one_workers_channel_closed_100_times_under_load_keeps_the_host(own):
    """sshd drops the whole connection when a packet names a channel it already freed: an EOF sent
    after the channel's CLOSE (``ieof packet referred to nonexistent channel``). With the CPU busy,
    a thread preempted between preparing a packet and sending it makes that order."""
    log_before = own.host.log.read_text()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,))  # this process's threads wait for the GIL too
    spinner.start()
    try:
        with Cluster(["qhost:2"], echo=False) as cluster:
            survivor = cluster.workers[0]
            pid = survivor.hello["pid"]
            for i in range(100):
                # A kill runs ``kill -KILL`` over an exec channel of its own, then closes the worker's.
                (cluster.chaos.drop if i % 10 == 9 else cluster.chaos.kill)("qhost/1")
                pids = cluster.map(lambda p, xs: [os.getpid()], reduce=lambda a, b: a + b)
                assert survivor.hello["pid"] == pid, f"round {i}: qhost/0 was restarted ({survivor.reason})"
                assert sorted(pids) == sorted([pid, cluster.workers[1].hello["pid"]]), f"round {i}"
    finally:
        stop.set()
        spinner.join()
        for p in busy:
            p.kill()
            p.wait()
    time.sleep(0.5)  # what sshd has to say about the shutdown too
    log = own.host.log.read_text()[len(log_before):]
    assert "nonexistent channel" not in log, log[-2000:]
