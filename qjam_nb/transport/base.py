"""What a transport is: something that starts workers and gives back byte streams.

A transport knows how to reach one host (a child process here, later an ssh
channel) and nothing about frames, slices or calls. Each started worker is a
``WorkerProcess``: a byte stream (stdin/stdout of the worker) read without
waiting once polled, its stderr, and process control. ``qjam_nb.transport.link`` adds framing on top.

Forked children. Whatever holds a worker's pipe, socket or pidfd registers
with ``forget_in_children``; in every child forked from this process, each
one's ``forget_in_child()`` points those descriptors at /dev/null (``forget``).
A child then keeps no worker alive once this process dies (a worker exits when
its input ends), and never writes into a stream this process is using. The
numbers stay taken, so the child's copies of the Python objects that own them
may close them later, closing only /dev/null. Nothing is sent from the child.
Every descriptor the master opens to a worker is close-on-exec too, so an
exec'd child (``subprocess``) gets none of them.
"""

from __future__ import annotations

import os
import signal
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from ..worker.pipes import write_all, write_some

#: The travelling worker package, as files on this machine.
WORKER_PACKAGE = Path(__file__).resolve().parent.parent / "worker"


def bootstrap_code(package_dir: str, name: str, fallback_path: str | None = None, safe_path: bool = False,
                   env: dict[str, str] | None = None) -> str:
    """The ``python -c`` program that starts a worker from ``package_dir``.

    It loads the worker package by file location under the name
    ``qjam_worker``, so it needs no install and never imports qjam_nb itself
    (which would drag the master's dependencies in). ``fallback_path`` is
    appended to ``sys.path``: it holds the cloudpickle we uploaded, used only
    where the host's Python has none of its own. ``safe_path`` (ssh hosts)
    takes the current directory off ``sys.path`` before anything is imported:
    ``python -c`` puts it first, and there it is the home directory, where a
    stray ``random.py`` would shadow the standard library. (Local workers keep
    it: it is the notebook's directory, whose modules the notebook imports too.) ``env`` is added
    to the worker's environment first (in the program, not the command: any login shell runs it).
    """
    extend = f"sys.path.append({fallback_path!r});" if fallback_path else ""
    if env:
        extend += f"import os;os.environ.update({dict(env)!r});"
    return _load_worker_package(package_dir, extend, safe_path) + f"import qjam_worker.main as w;w.main({name!r})"


def forkserver_code(package_dir: str, fd: int) -> str:
    """The ``python -c`` program of a local fork server (``worker/forkserver.py``) on socket ``fd``."""
    return _load_worker_package(package_dir) + f"import qjam_worker.forkserver as f;f.serve({fd})"


def _load_worker_package(package_dir: str, extend: str = "", safe_path: bool = False) -> str:
    first = "import sys;sys.path[:]=[p for p in sys.path if p];" if safe_path else "import sys;"
    return (
        f"{first}import importlib.util as u;{extend}"
        f"p={package_dir!r};"
        "s=u.spec_from_file_location('qjam_worker',p+'/__init__.py',submodule_search_locations=[p]);"
        "m=u.module_from_spec(s);sys.modules['qjam_worker']=m;s.loader.exec_module(m);"
    )


class CpuState(NamedTuple):
    """What ``/proc/PID/stat`` says of a worker: its state letter (R, S, D, T, Z...) and the CPU
    time it has used, in clock ticks (only compared with itself: the unit does not matter)."""

    state: str
    ticks: int


def parse_stat(text: str) -> CpuState | None:
    """``/proc/PID/stat``'s line, read: (state, utime + stime); None if it is not such a line."""
    try:
        fields = text.rsplit(")", 1)[1].split()
        return CpuState(fields[0], int(fields[11]) + int(fields[12]))
    except (IndexError, ValueError):
        return None


def local_cpu_state(pid: int | None) -> CpuState | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except OSError:
        return None


def kill_group(pgid: int | None) -> None:
    """SIGKILL to every process of the worker's process group (it made one of its own: its pid),
    helpers that mapfunc forked included. Called while the worker is alive (so the group is
    surely its own) and once more after it died, for helpers that outlived it: a group id is not
    reused while any process of the group lives."""
    if pgid is None or pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # no such group (left already), or not ours
        pass
#: What holds descriptors to workers (weakly: an owner that goes needs no forgetting).
_owners: weakref.WeakSet = weakref.WeakSet()


def forget_in_children(owner: object) -> None:
    """Have ``owner.forget_in_child()`` run in every child forked from now on, while ``owner`` lives."""
    _owners.add(owner)


def forget(fds: Iterable[int]) -> None:
    """In a forked child: point each of ``fds`` at /dev/null (close-on-exec), keeping the numbers taken."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            if fd >= 0 and fd != null:
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _after_fork_in_child() -> None:
    # Runs in the child, whose other threads are gone (and their locks with them): takes no lock.
    for owner in list(_owners):
        try:
            owner.forget_in_child()
        except Exception:  # one owner that cannot must not stop the others, nor the fork
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PipeStreams:
    """A local worker's byte streams: the ends of its stdin, stdout and stderr pipes, non-blocking here."""

    shares_memory = True  # same machine: large array slices go through /dev/shm (worker.sharedmem)

    def __init__(self, stdin: int, stdout: int, stderr: int) -> None:
        self._stdin = stdin
        self._fds = (stdout, stderr)
        for fd in (stdin, stdout, stderr):  # only this process uses these ends
            os.set_blocking(fd, False)
        forget_in_children(self)

    def held_fds(self) -> list[int]:
        """The descriptors this process still holds to the worker (those not closed yet)."""
        return [self._stdin, *self._fds]

    def forget_in_child(self) -> None:
        forget(self.held_fds())

    def poll_fds(self) -> tuple[int, ...]:
        return self._fds

    def read_ready(self, buffer: memoryview) -> int | None:
        try:
            return os.readv(self._fds[0], [buffer])
        except BlockingIOError:
            return None

    def read_stderr_ready(self) -> bytes | None:
        try:
            return os.read(self._fds[1], 65536)
        except BlockingIOError:
            return None

    def write(self, chunks: list) -> None:
        write_all(self._stdin, chunks)

    def write_ready(self, chunks: list, size: int) -> int:
        return write_some(self._stdin, chunks, size)


class WorkerProcess(Protocol):
    """One started worker, as a transport hands it over."""

    name: str
    shares_memory: bool  # on this machine: slices may be handed over in shared memory
    pid: int | None  # on its host; None until known (an ssh worker's comes with its hello: ``Link.learn_pid``)

    def poll_fds(self) -> tuple[int, ...]:
        """File descriptors that poll readable when stdout or stderr has something (or ended):
        stdout's first, and stderr's last when it has one of its own."""

    def read_ready(self, buffer: memoryview) -> int | None:
        """Read what worker stdout has into ``buffer``, without waiting: bytes read, 0 at the end, None if none yet."""

    def read_stderr_ready(self) -> bytes | None:
        """What the worker's real stderr has, without waiting: b"" once it closed, None if nothing yet."""

    def write(self, chunks: list) -> None:
        """Write all of one message's ``chunks`` to the worker's stdin, in order (blocking)."""

    def write_ready(self, chunks: list, size: int) -> int:
        """Write what goes without blocking of one message's ``chunks`` (``size`` bytes); returns the bytes written."""

    def close(self) -> None:
        """Close the worker's stdin: the worker exits when it sees that."""

    def kill(self) -> None:
        """End the worker and its process group (the helpers it forked) now, without waiting."""

    def interrupt(self) -> None:
        """Send the worker SIGINT: it stops the mapfunc it is running (and nothing else)."""

    def exit_status(self) -> int | None:
        """The exit status once the process has ended, else None."""

    def cpu_state(self) -> CpuState | None:
        """The worker's process state and CPU time used, from ``/proc`` (None where it cannot be read)."""

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds for the end; the exit status, or None if still running."""

    def release(self) -> None:
        """Free what is left (pipes, channel) once the worker ended and its stream was read."""

    def drop(self) -> None:
        """Cut the connection as a failing network would (chaos), after ``close``: nothing more goes
        either way. Where closing stdin is all there is (a pipe), nothing more to do."""


class Transport(Protocol):
    """Reaches one host and starts workers there. Opened through ``registry.open_host``."""

    host: str
    alive: bool  # False once the connection to the host dropped
    uploaded: int  # bytes of the worker payload sent there when it opened (0: none needed)

    def describe(self) -> str:
        """One line on how the host was reached, for the HostReady event."""

    def start(self, names: Sequence[str], env: dict[str, str] | None = None) -> list[WorkerProcess]:
        """Start one worker per name, all at once, and return them started."""

    def close(self, deadline: float | None = None) -> None:
        """Release the host (its connection); call after its workers ended. With a ``deadline``
        (``time.monotonic``), wait until then at most for what the connection runs to end."""
