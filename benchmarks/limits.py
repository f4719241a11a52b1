"""The raw limits of the paths qjam_nb uses, measured in the same run: echo children over pipes, the
same echo over paramiko channels, pickle protocol 5, and the private sshd they run against.

Rules: no framework between the bytes and the wire (that is the point of a limit); whatever starts a
process or a transport has a ``close()`` (or is a context manager) that stops it, also on an error.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .rows import ALIAS, MB, MiB

ECHO_CHILD = r"""
import os, sys
n = int(sys.argv[1])
view = memoryview(bytearray(n))
os.write(1, b"r")
while True:
    got = 0
    while got < n:
        k = os.readv(0, [view[got:]])
        if not k:
            sys.exit(0)
        got += k
    out = view
    while out:
        out = out[os.write(1, out):]
"""


class PipeEcho:
    """Two child processes, each reading n bytes from a pipe and writing them back on another (1 MiB pipe
    buffers, as qjam_nb's local workers have): the raw time of the params row's bytes, locally."""

    def __init__(self, n: int, children: int = 2) -> None:
        self.n = n
        self.children: list[subprocess.Popen] = []
        for _ in range(children):
            child = subprocess.Popen([sys.executable, "-c", ECHO_CHILD, str(n)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
            for fd in (child.stdin.fileno(), child.stdout.fileno()):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, MiB)
            self.children.append(child)
        for child in self.children:
            if child.stdout.read(1) != b"r":
                raise RuntimeError("an echo child did not start")
        self.buf = memoryview(bytearray(n))

    def round_trip(self, payload: memoryview) -> None:
        for child in self.children:
            view, fd = payload, child.stdin.fileno()
            while view:
                view = view[os.write(fd, view):]
        for child in self.children:
            got, fd = 0, child.stdout.fileno()
            while got < self.n:
                k = os.readv(fd, [self.buf[got:]])
                if not k:
                    raise RuntimeError("an echo child closed its pipe")
                got += k

    def close(self) -> None:
        for child in self.children:
            child.stdin.close()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child.stdout.close()


class ParamikoEcho:
    """The same echo on two channels of one paramiko Transport to the private sshd."""

    def __init__(self, transport: Any, n: int, python: str) -> None:
        import shlex

        from qjam_nb.transport.ssh import PACKET_SIZE, WINDOW_SIZE

        self.n = n
        self.chans = []
        for _ in range(2):
            chan = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
            chan.exec_command(f"exec {shlex.quote(python)} -c {shlex.quote(ECHO_CHILD)} {n}")
            self.chans.append(chan)
        for chan in self.chans:
            if chan.recv(1) != b"r":
                raise RuntimeError("a remote echo did not start")
        self.buf = memoryview(bytearray(n))

    def round_trip(self, payload: memoryview) -> None:
        for chan in self.chans:
            chan.sendall(payload)
        for chan in self.chans:
            got = 0
            while got < self.n:
                chunk = chan.recv(self.n - got)  # paramiko has no recv_into
                if not chunk:
                    raise RuntimeError("a remote echo closed its channel")
                self.buf[got:got + len(chunk)] = chunk
                got += len(chunk)

    def close(self) -> None:
        for chan in self.chans:
            chan.shutdown_write()
            chan.close()


def pickle_throughput(x: np.ndarray, h: int) -> tuple[float, float]:
    """MB/s of pickle protocol 5 (in-band) dumps, then loads, of both slices."""
    parts = [x[:h], x[h:]]
    t0 = time.perf_counter()
    blobs = [pickle.dumps(p, protocol=5) for p in parts]
    t1 = time.perf_counter()
    for b in blobs:
        pickle.loads(b)
    t2 = time.perf_counter()
    del blobs
    return x.nbytes / (t1 - t0) / MB, x.nbytes / (t2 - t1) / MB


class SshWorld:
    """``ssh_transfer.World`` (private sshd, temporary HOME with a ``bench`` alias), plus what the ``ssh``
    client needs (it takes ~/.ssh from the password database, not HOME): known_hosts named in the config,
    batch mode. execnet's ssh gateway runs ``ssh -F <that config> bench``."""

    def __init__(self, root: Path) -> None:
        import ssh_transfer

        self.world = ssh_transfer.World(root)

    def __enter__(self) -> SshWorld:
        w = self.world.__enter__()
        self.config = w.home / ".ssh" / "config"
        with open(self.config, "a") as f:
            f.write(f"  UserKnownHostsFile {w.home / '.ssh' / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                    "  IdentitiesOnly yes\n  BatchMode yes\n")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.world.__exit__(*exc)

    def execnet_spec(self) -> str:
        return f"ssh={ALIAS}//ssh_config={self.config}//python={sys.executable}"

    def transport(self, cipher: str | None = None) -> Any:
        """A paramiko Transport set up as qjam_nb's (window, packet size, cipher preference), or with one cipher."""
        import ssh_transfer

        if cipher is None:
            return ssh_transfer.raw_transport(self.world)
        import paramiko

        saved = paramiko.Transport._preferred_ciphers
        paramiko.Transport._preferred_ciphers = (cipher,)
        try:
            return ssh_transfer.raw_transport(self.world)
        finally:
            paramiko.Transport._preferred_ciphers = saved
