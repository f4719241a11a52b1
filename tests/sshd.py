"""Private OpenSSH servers for the tests, on loopback addresses, with keys made at test time.

Each ``PrivateSshd`` runs Debian's ``/usr/sbin/sshd`` in the foreground from
its own config in a temporary directory: its own host key, its own
authorized_keys, a free port on its own 127.0.0.x address, and a HOME of its
own for the sessions it runs (``SetEnv``), so a "host" keeps its
``~/.cache/qjam_nb`` apart from the others and from the real one. The
system's ``/etc/ssh`` and ssh service are never touched; the daemon is
stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qjam-test", "-f", str(path)], check=True)
    return path


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def blas_environment() -> str:
    """This machine's OPENBLAS_* settings, for the sessions too: a "host" that is this machine
    computes as it does (a kernel chosen otherwise rounds matrix products otherwise, and replay,
    run here, is compared bit for bit with what a worker returned)."""
    return "".join(f" {k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith("OPENBLAS_") and " " not in v and '"' not in v)


class PrivateSshd:
    """One sshd on ``address``, accepting ``client_key`` for the current user."""

    def __init__(self, root: Path, address: str, client_pub: Path) -> None:
        self.root = root
        self.address = address
        self.port = free_port(address)
        self.home = root / "home"  # the HOME of sessions on this "host"
        self.home.mkdir(parents=True)
        self.host_key = keygen(root / "ssh_host_ed25519_key")
        authorized = root / "authorized_keys"
        authorized.write_text(client_pub.read_text())
        authorized.chmod(0o600)
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {address}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "AllowTcpForwarding yes\n"
            "MaxSessions 200\n"
            "MaxStartups 100\n"
            f"SetEnv HOME={self.home}{blas_environment()}\n"
            "LogLevel ERROR\n"
        )
        self.log = root / "sshd.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> PrivateSshd:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd on {self.address} exited: {self.log.read_text()}")
            try:
                socket.create_connection((self.address, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on {self.address}:{self.port} did not start: {self.log.read_text()}")

    def known_hosts_line(self) -> str:
        kind, b64 = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[{self.address}]:{self.port} {kind} {b64}\n"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def processes_under(pid: int) -> list[int]:
    """Every descendant of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def processes_running(pid: int, test) -> list[int]:
    """The descendants of ``pid`` whose command line (NUL-separated bytes) passes ``test``."""
    found = []
    for child in processes_under(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if test(cmdline):
            found.append(child)
    return found
