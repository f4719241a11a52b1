"""Remote workers never outlive their master, never listen on a port, and one that is killed never
takes the host's connection down with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import sshd

from qjam_nb import Cluster
from qjam_nb.transport.ssh import SshProcess, SshTransport, run

MASTER = textwrap.dedent("""
    import json, sys, time, threading
    from qjam_nb import Cluster
    cluster = Cluster(["sshhost:2", "sshhost2:1", "local:2"], echo=False)
    print(json.dumps([w.hello["pid"] for w in cluster.workers]), flush=True)
    cluster.map(lambda p, xs: time.sleep(120))  # busy when it gets killed
""")


def worker_processes_under(pid: int) -> list[int]:
    return sshd.processes_running(pid, lambda cmdline: b"qjam_worker" in cmdline)


def test_sigkill_of_the_master_leaves_no_worker_behind_local_or_remote(ssh_world):
    master = subprocess.Popen([sys.executable, "-c", MASTER], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(master.stdout.readline())
        daemons = [h.process.pid for h in ssh_world.hosts]
        assert len(pids) == 5
        # The ssh workers (and the shells that wait for them to report how they ended) run under the sshds.
        assert set(pids[:3]) <= {pid for d in daemons for pid in worker_processes_under(d)}
        time.sleep(0.5)  # the call is running: every worker sits in time.sleep
        master.send_signal(signal.SIGKILL)
        master.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(worker_processes_under(d) for d in daemons):
            time.sleep(0.1)
        assert [worker_processes_under(d) for d in daemons] == [[], []]
        # Exited; a zombie waiting for init to reap it is not running.
        assert not [(pid, state(pid)) for pid in pids if state(pid) not in ("gone",) and "state Z" not in state(pid)]
    finally:
        if master.poll() is None:
            master.kill()


def state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "gone"
    return f"state {stat[0]}, parent {stat[1]}"


def listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_no_worker_holds_a_listening_socket(ssh_world):
    with Cluster(["sshhost:2", "local:1"], echo=False) as cluster:
        assert cluster.map(lambda p, xs: 1) == 3
        listening = listening_inodes()
        assert listening  # the sshds themselves listen: the check can see listeners
        sshd_sockets = socket_inodes(ssh_world.hosts[0].process.pid)
        assert sshd_sockets & listening
        for worker in cluster.workers:
            pid = worker.hello["pid"]
            assert not socket_inodes(pid) & listening, f"{worker.name} (pid {pid}) listens on a TCP port"


def test_closing_a_worker_channel_while_it_prints_keeps_the_connection(ssh_world):
    """paramiko closes the fd behind ``fileno()``, which the inbox polls, while its transport thread
    may be signalling data on it (paramiko issues 1700, 2271): now and then the EBADF ended the
    connection of a host whose worker was killed while it printed, and its other workers with it."""
    host = SshTransport("sshhost")
    try:
        for i in range(200):
            channel = host.transport.open_session()
            channel.exec_command("yes qjam >&2 & yes qjam")
            process = SshProcess(f"printer{i}", channel, host)
            process.poll_fds()
            reader = threading.Thread(target=read_until_closed, args=(channel,))
            reader.start()  # keeps the window open: data arrives right up to the close
            time.sleep(0.002)
            process.release()
            reader.join(10)
            assert host.alive, f"the connection died when channel {i} was closed while data came in"
        assert run_on(host, "echo still here") == "still here\n"
    finally:
        host.close()


def read_until_closed(channel) -> None:
    try:
        while not channel.closed:
            if channel.recv_stderr_ready():
                channel.recv_stderr(1 << 16)
            if channel.recv_ready():
                channel.recv(1 << 16)
    except Exception:  # closed under us: done
        pass


def run_on(host: SshTransport, command: str) -> str:
    status, out, _ = run(host.transport, command)
    assert status == 0
    return out
