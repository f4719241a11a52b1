"""Ship 200 MiB of float64 to 2 workers, next to the raw limits of the same path.

One command, ``python benchmarks/ssh_transfer.py``: starts a private OpenSSH
sshd on 127.0.0.1 (``tests/sshd.py``, keys made on the spot, everything in a
temporary directory, a temporary HOME for this process with a
``~/.ssh/config`` alias and ``known_hosts``), then measures, each ``--repeat``
times:

* raw paramiko send throughput on that sshd: one Transport set up like
  qjam_nb's (window, packet size, cipher preference), ``cat > /dev/null`` on
  two channels with 100 MiB each sent concurrently, and on one channel;
* qjam_nb on ``Cluster(["bench:2"])`` (2 ssh workers): a fresh 200 MiB array
  in 2 slices, the first ``map`` (ships and sums) and the second (cached);
* the same on ``local:2``, next to ``os.pipe`` throughput into a child
  process that reads and discards 200 MiB (also: two pipes of 100 MiB at
  once, and one pipe with a 1 MiB buffer instead of Linux's 64 KiB);
* the pure compute time of the two sums in this process, and the time to
  hash both slices (qjam_nb names slices by an XXH3-128 hash of their content,
  computed on the master before a call sends anything, cached or not).

Within a repetition the raw reference and qjam_nb run back to back, so a
change in the machine's speed during the run hits both. The first call is
also timed from the cluster's ``CallStarted`` to its ``CallFinished`` event,
which leaves out the slice hashing.

It prints medians (min-max) and ratios, and writes the numbers to
``benchmarks/results/ssh_transfer.json``. MB is 10^6 bytes throughout.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import getpass
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paramiko

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import sshd  # noqa: E402  (tests/sshd.py)

import qjam_nb  # noqa: E402
from qjam_nb import Cluster  # noqa: E402
from qjam_nb.dataset import DataSet  # noqa: E402
from qjam_nb.transport.ssh import PACKET_SIZE, PREFERRED_CIPHERS, WINDOW_SIZE  # noqa: E402

MiB = 1 << 20
MB = 1e6
ALIAS = "bench"
TOTAL = 200 * MiB  # the dataset, and the raw transfers
COLS = 1024  # 200 MiB = 25600 rows of 1024 float64
RESULTS = HERE / "results" / "ssh_transfer.json"


# A lambda travels by value even when this file is imported as a module.
mapfunc = lambda p, xs: xs.sum()  # noqa: E731


def timed_threads(target, args) -> float:
    """Run ``target(a)`` for every ``a`` in ``args`` on threads of their own; seconds until all are done."""
    threads = [threading.Thread(target=target, args=(a,), daemon=True) for a in args]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - start


# -- statistics ---------------------------------------------------------------

def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


# -- the private host -----------------------------------------------------------
class World:
    """A private sshd on 127.0.0.1 and a temporary HOME whose ~/.ssh/config names it ``bench``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "master_home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        self.key = sshd.keygen(self.home / ".ssh" / "id_ed25519")
        self.user = getpass.getuser()
        self.sshd = sshd.PrivateSshd(root / "host", "127.0.0.1", self.key.with_suffix(".pub"))
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> World:
        self.sshd.start()
        h = self.sshd
        (self.home / ".ssh" / "config").write_text(
            f"Host {ALIAS}\n  HostName {h.address}\n  Port {h.port}\n  User {self.user}\n  IdentityFile {self.key}\n"
        )
        (self.home / ".ssh" / "known_hosts").write_text(h.known_hosts_line())
        for var, value in (("HOME", str(self.home)), ("SSH_AUTH_SOCK", None), ("QJAM_USER", None),
                           ("QJAM_REMOTE_PYTHON", None)):
            self._saved_env[var] = os.environ.get(var)
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        return self

    def __exit__(self, *exc) -> None:
        for var, value in self._saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        self.sshd.stop()  # by its pid (Popen.terminate, then kill)


# -- raw paramiko -----------------------------------------------------------------
def raw_transport(world: World) -> paramiko.Transport:
    """A Transport configured as qjam_nb.transport.ssh.connect does it."""
    h = world.sshd
    sock = socket.create_connection((h.address, h.port), timeout=30)
    t = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, default_max_packet_size=PACKET_SIZE)
    security = t.get_security_options()
    offered = set(security.ciphers)
    security.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
        c for c in security.ciphers if c not in PREFERRED_CIPHERS
    )
    t.start_client(timeout=30)
    expected = h.host_key.with_suffix(".pub").read_text().split()[1]
    if t.get_remote_server_key().get_base64() != expected:
        raise RuntimeError("the private sshd presented an unexpected host key")
    t.auth_publickey(world.user, paramiko.PKey.from_path(str(world.key)))
    if not t.is_authenticated():
        raise RuntimeError("could not log in to the private sshd")
    return t


def raw_send(t: paramiko.Transport, payload: memoryview, channels: int) -> float:
    """Seconds to push ``payload`` through each of ``channels`` ``cat > /dev/null`` at once, until cat exits."""
    chans = []
    for _ in range(channels):
        chan = t.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
        chan.exec_command("exec cat > /dev/null")
        chans.append(chan)
    errors: list[BaseException] = []

    def push(chan: paramiko.Channel) -> None:
        try:
            chan.sendall(payload)
            chan.shutdown_write()
            status = chan.recv_exit_status()
            if status != 0:
                raise RuntimeError(f"remote cat exited with status {status}")
        except BaseException as exc:  # re-raised on the main thread
            errors.append(exc)

    seconds = timed_threads(push, chans)
    for chan in chans:
        chan.close()
    if errors:
        raise errors[0]
    return seconds


# -- raw pipe -----------------------------------------------------------------------
PIPE_CHILD = r"""
import os, sys
fd, n = int(sys.argv[1]), int(sys.argv[2])
view = memoryview(bytearray(1 << 20))
os.write(1, b"r")
got = 0
while True:
    k = os.readv(fd, [view])
    if not k:
        break
    got += k
os.write(1, str(got).encode())
"""


def pipe_send(payload: memoryview, pipes: int = 1, pipe_size: int | None = None) -> float:
    """Seconds to write ``payload`` into each of ``pipes`` os.pipes at once, each read (and discarded) by a child.

    ``pipe_size`` sets the pipe's buffer (F_SETPIPE_SZ); Linux's default is 64 KiB, as on qjam_nb's local pipes.
    """
    ends, children = [], []
    try:
        for _ in range(pipes):
            r, w = os.pipe()
            ends.append(w)
            if pipe_size:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe_size)
            children.append(subprocess.Popen([sys.executable, "-c", PIPE_CHILD, str(r), str(len(payload))],
                                             pass_fds=(r,), stdout=subprocess.PIPE))
            os.close(r)
        for child in children:
            if child.stdout.read(1) != b"r":
                raise RuntimeError("a pipe reader did not start")
        got: list[int] = []

        def push(i: int) -> None:
            view = payload
            while view:
                view = view[os.write(ends[i], view):]
            os.close(ends[i])
            ends[i] = -1
            got.append(int(children[i].stdout.read() or 0))
            children[i].wait()

        seconds = timed_threads(push, range(pipes))
    finally:
        for w in ends:
            if w >= 0:
                os.close(w)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    if got != [len(payload)] * pipes:
        raise RuntimeError(f"the pipe readers got {got} bytes, not {len(payload)} each")
    return seconds


# -- qjam_nb --------------------------------------------------------------------------
def make_array(rep: int) -> np.ndarray:
    x = np.arange(TOTAL // 8, dtype=np.float64)
    x += rep + 0.5  # new content (and new slice keys) every repetition
    return x.reshape(-1, COLS)


class QjamBench:
    """One cluster; each ``rep()`` ships a fresh array (first call), calls again (cached) and times the parts."""

    def __init__(self, hosts: list[str], label: str) -> None:
        self.label = label
        self.first: list[float] = []
        self.in_call: list[float] = []
        self.second: list[float] = []
        self.compute: list[float] = []
        self.hashing: list[float] = []
        self.cluster = Cluster(hosts, echo=False, progress=False)
        self.detail = "; ".join(h.detail for h in self.cluster.status.hosts.values())
        self.marks: dict = {}
        # CallStarted comes after the slice keys are computed; CallFinished when the last result is in.
        self.cluster.events.subscribe(lambda e: self.marks.__setitem__(type(e).__name__, time.perf_counter()))
        # Warm up: numpy imported on the workers, a function shipped once; not timed.
        warm = np.arange(64.0).reshape(8, 8)
        if self.cluster.map(mapfunc, None, warm, slice_size=4) != warm.sum():
            raise RuntimeError(f"{label}: wrong warm-up sum")

    def __enter__(self) -> QjamBench:
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.shutdown()

    def rep(self, rep: int) -> str:
        cluster = self.cluster
        x = make_array(rep)
        h = len(x) // 2
        t0 = time.perf_counter()
        expect = x[:h].sum() + x[h:].sum()
        self.compute.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        data = DataSet(x, h)
        data.keys_and_sizes()
        self.hashing.append(time.perf_counter() - t0)
        del data
        t0 = time.perf_counter()
        got1 = cluster.map(mapfunc, None, x, slice_size=h)
        self.first.append(time.perf_counter() - t0)
        self.in_call.append(self.marks["CallFinished"] - self.marks["CallStarted"])
        t0 = time.perf_counter()
        got2 = cluster.map(mapfunc, None, x, slice_size=h)
        self.second.append(time.perf_counter() - t0)
        if not (got1 == got2 == expect):
            raise RuntimeError(f"{self.label}: wrong sums {got1!r} {got2!r}, expected {expect!r}")
        del x
        gc.collect()
        return f"{self.label} first {mbps(TOTAL, self.first[-1]):.0f} MB/s, second {self.second[-1] * 1e3:.1f} ms"

    def result(self) -> dict:
        return {
            "first_call_MBps": summary([mbps(TOTAL, s) for s in self.first]),
            "first_call_s": summary(self.first),
            "first_call_in_call_MBps": summary([mbps(TOTAL, s) for s in self.in_call]),
            "second_call_ms": summary([s * 1e3 for s in self.second]),
            "compute_ms": summary([s * 1e3 for s in self.compute]),
            "slice_keys_ms": summary([s * 1e3 for s in self.hashing]),
            "host_detail": self.detail,
        }


# -- the run ----------------------------------------------------------------------------
def run(repeat: int) -> dict:
    """ssh first, then local; within each, the raw reference and qjam_nb take turns, one repetition each."""
    payload_half = memoryview(bytearray(os.urandom(1 << 20)) * 100)  # 100 MiB
    results: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "repeat": repeat,
            "bytes": TOTAL,
            "MB": MB,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "paramiko": paramiko.__version__,
            "numpy": np.__version__,
            "qjam_nb": getattr(qjam_nb, "__version__", "?"),
            "window_size": WINDOW_SIZE,
            "packet_size": PACKET_SIZE,
        }
    }
    with tempfile.TemporaryDirectory(prefix="qjam-bench-") as tmp, World(Path(tmp)) as world:
        print(f"private sshd on {world.sshd.address}:{world.sshd.port} (pid {world.sshd.process.pid})", flush=True)
        t = raw_transport(world)
        try:
            aead = "gcm" in t.local_cipher or "chacha20" in t.local_cipher
            results["meta"]["cipher"] = {"client_to_server": t.local_cipher, "server_to_client": t.remote_cipher,
                                          "mac": "none (AEAD cipher)" if aead else t.local_mac}
            raw_send(t, payload_half[: 8 * MiB], 1)  # warm-up
            two, one = [], []
            with QjamBench([f"{ALIAS}:2"], "qjam ssh") as bench:
                for rep in range(repeat):
                    two.append(mbps(2 * len(payload_half), raw_send(t, payload_half, 2)))
                    one.append(mbps(len(payload_half), raw_send(t, payload_half, 1)))
                    line = bench.rep(rep)
                    print(f"  ssh rep {rep + 1}/{repeat}: paramiko 2 channels {two[-1]:.0f} MB/s, "
                          f"1 channel {one[-1]:.0f} MB/s; {line}", flush=True)
        finally:
            t.close()
        results["paramiko_2ch_MBps"] = summary(two)
        results["paramiko_1ch_MBps"] = summary(one)
        results["qjam_ssh"] = bench.result()
    whole = memoryview(bytearray(payload_half) * 2)  # 200 MiB
    pipe_send(whole[: 8 * MiB])  # warm-up
    pipe, pipe2, pipe_big = [], [], []
    with QjamBench(["local:2"], "qjam local") as bench:
        for rep in range(repeat):
            pipe.append(mbps(len(whole), pipe_send(whole)))
            pipe2.append(mbps(2 * len(payload_half), pipe_send(payload_half, pipes=2)))
            pipe_big.append(mbps(len(whole), pipe_send(whole, pipe_size=MiB)))
            line = bench.rep(rep)
            print(f"  local rep {rep + 1}/{repeat}: pipe {pipe[-1]:.0f} MB/s, 2 pipes {pipe2[-1]:.0f} MB/s, "
                  f"1 MiB pipe {pipe_big[-1]:.0f} MB/s; {line}", flush=True)
    del whole, payload_half
    results["pipe_MBps"] = summary(pipe)
    results["pipe_2x_MBps"] = summary(pipe2)
    results["pipe_1MiB_buffer_MBps"] = summary(pipe_big)
    results["qjam_local"] = bench.result()
    for what in ("compute_ms", "slice_keys_ms"):  # in this process: the same work on both sides, pooled
        results[what] = summary(results["qjam_ssh"][what]["samples"] + results["qjam_local"][what]["samples"])
    results["ratios"] = ratios(results)
    return results


def ratios(r: dict) -> dict:
    med = lambda d: d["median"]  # noqa: E731
    out = {
        "ssh_first_vs_paramiko_2ch": med(r["qjam_ssh"]["first_call_MBps"]) / med(r["paramiko_2ch_MBps"]),
        "ssh_first_vs_paramiko_1ch": med(r["qjam_ssh"]["first_call_MBps"]) / med(r["paramiko_1ch_MBps"]),
        "local_first_vs_pipe": med(r["qjam_local"]["first_call_MBps"]) / med(r["pipe_MBps"]),
        "local_first_vs_2_pipes": med(r["qjam_local"]["first_call_MBps"]) / med(r["pipe_2x_MBps"]),
        "ssh_in_call_vs_paramiko_2ch": med(r["qjam_ssh"]["first_call_in_call_MBps"]) / med(r["paramiko_2ch_MBps"]),
        "local_in_call_vs_pipe": med(r["qjam_local"]["first_call_in_call_MBps"]) / med(r["pipe_MBps"]),
    }
    for side in ("ssh", "local"):
        q = r[f"qjam_{side}"]
        out[f"{side}_second_vs_compute_plus_1ms"] = med(q["second_call_ms"]) / (med(q["compute_ms"]) + 1.0)
    return out


def fmt(d: dict, unit: str, digits: int = 0) -> str:
    return f"{d['median']:.{digits}f} {unit} ({d['min']:.{digits}f}-{d['max']:.{digits}f})"


def report(r: dict) -> str:
    ra, s, loc = r["ratios"], r["qjam_ssh"], r["qjam_local"]
    c = r["meta"]["cipher"]
    rows = [
        ("ssh", "raw paramiko, 2 channels x 100 MiB", fmt(r["paramiko_2ch_MBps"], "MB/s"), ""),
        ("ssh", "raw paramiko, 1 channel x 100 MiB", fmt(r["paramiko_1ch_MBps"], "MB/s"), ""),
        ("ssh", "qjam first call, 200 MiB in 2 slices", fmt(s["first_call_MBps"], "MB/s"),
         f"{ra['ssh_first_vs_paramiko_2ch']:.2f}x raw 2ch ({ra['ssh_first_vs_paramiko_1ch']:.2f}x 1ch)"),
        ("ssh", "  same, CallStarted to CallFinished", fmt(s["first_call_in_call_MBps"], "MB/s"),
         f"{ra['ssh_in_call_vs_paramiko_2ch']:.2f}x raw 2ch (slice hashing left out)"),
        ("ssh", "qjam second call (cached)", fmt(s["second_call_ms"], "ms", 1),
         f"{ra['ssh_second_vs_compute_plus_1ms']:.1f}x (compute + 1 ms)"),
        ("local", "raw os.pipe into a child, 200 MiB", fmt(r["pipe_MBps"], "MB/s"), ""),
        ("local", "raw os.pipe, 2 children x 100 MiB", fmt(r["pipe_2x_MBps"], "MB/s"), ""),
        ("local", "raw os.pipe, 1 MiB pipe buffer", fmt(r["pipe_1MiB_buffer_MBps"], "MB/s"),
         "F_SETPIPE_SZ, as qjam's local pipes"),
        ("local", "qjam first call, 200 MiB in 2 slices", fmt(loc["first_call_MBps"], "MB/s"),
         f"{ra['local_first_vs_pipe']:.2f}x raw pipe ({ra['local_first_vs_2_pipes']:.2f}x 2 pipes)"),
        ("local", "  same, CallStarted to CallFinished", fmt(loc["first_call_in_call_MBps"], "MB/s"),
         f"{ra['local_in_call_vs_pipe']:.2f}x raw pipe (slice hashing left out)"),
        ("local", "qjam second call (cached)", fmt(loc["second_call_ms"], "ms", 1),
         f"{ra['local_second_vs_compute_plus_1ms']:.1f}x (compute + 1 ms)"),
        ("here", "compute: X[:h].sum() + X[h:].sum()", fmt(r["compute_ms"], "ms", 1), "in this process"),
        ("here", "slice keys: XXH3 of both slices", fmt(r["slice_keys_ms"], "ms", 1),
         "in this process; every map call pays it"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"qjam_nb ssh_transfer: 200 MiB float64, 2 workers, median (min-max) of {r['meta']['repeat']}; MB = 10^6 B",
        f"cipher {c['client_to_server']} (mac {c['mac']}), window {WINDOW_SIZE >> 20} MiB, "
        f"packet {PACKET_SIZE >> 10} KiB; {r['meta']['cpus']} CPUs, Python {r['meta']['python']}, "
        f"paramiko {r['meta']['paramiko']}",
        f"qjam host: {s['host_detail']}",
        "",
    ]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of every measurement (default 5)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the numbers (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not sshd.available():
        print("sshd or ssh-keygen is missing: apt-get install openssh-server openssh-client", file=sys.stderr)
        return 2

    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C: the sshd is stopped by the finally blocks
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    started = time.perf_counter()
    try:
        results = run(args.repeat)
    except KeyboardInterrupt:
        print("interrupted; the private sshd was stopped", file=sys.stderr)
        return 130
    results["meta"]["total_seconds"] = time.perf_counter() - started
    print()
    print(report(results))
    print(f"\n{results['meta']['total_seconds']:.0f} s in all")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
