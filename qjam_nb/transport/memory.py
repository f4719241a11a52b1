"""Workers in memory: ``memory:N``, each a ``WorkerCore`` on a thread of this process, for tests.

No process is started: the frames go both ways over pipes within this
process, so the whole master (links, inbox, pool, scheduler, fold) runs as
it does with ``local``, and the worker's decisions are the very code a
worker process runs (``worker/core.py``); only the shell around the core is
this file's small one (the thread reads, steps, runs mapfunc, writes).

Ground rules of this file: it is a transport like the others, opened through
``registry.open_host`` and reached through its ``Link``. A thread is not a
process, and the verbs a thread cannot honour do the honest thing, not a
pretend one:

* ``shares_memory`` is False: slices and params travel through the pipe.
* ``interrupt()`` does nothing: a thread cannot be interrupted. A CANCEL
  still stops every queued slice; the running mapfunc runs to its end.
* ``kill()`` cuts the worker's output (the master sees it gone at once,
  ``exit_status`` -9 as for a killed process) and abandons the thread: it
  ends once the master closes its input and its mapfunc returns, whatever it
  says going to /dev/null. Nothing else of the process is touched.
* ``cpu_state()`` is None (no ``/proc`` entry of its own) and ``pid`` None,
  also after the hello: no signal can ever reach this process through it.
* What mapfunc prints goes to this process's own stdout and stderr (no fds of
  its own to capture): no STREAM messages.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..worker import messages
from ..worker.core import Configure, Exit, Run, Send, WorkerCore, error_message
from ..worker.io import WATCH_AFTER
from ..worker.main import versions
from ..worker.pipes import widen, write_all
from .base import CpuState, PipeStreams, forget

MEMORY = "memory"
#: exit_status of a worker whose thread was abandoned by ``kill`` (as a SIGKILLed process's).
KILLED = -9


class _Gone(Exception):
    """The master cut the worker's streams (``kill``): the thread ends."""


class MemoryProcess(PipeStreams):
    """One in-memory worker: the master's ends of its pipes (``PipeStreams``) and its thread."""

    shares_memory = False

    def __init__(self, name: str) -> None:
        to_worker, self._in = os.pipe()  # (read end for the worker, write end here)
        self._out, from_worker = os.pipe()
        self._err, err_w = os.pipe()
        for fd in (to_worker, self._in, self._out, from_worker, self._err, err_w):
            os.set_inheritable(fd, False)
        for fd in (self._in, from_worker):
            widen(fd)
        super().__init__(self._in, self._out, self._err)
        self.name = name
        self._status: int | None = None
        self._ended = threading.Event()
        self._fd_lock = threading.Lock()  # the link's writer and the pool may both close our ends
        self._worker = _MemoryWorker(self, to_worker, from_worker, err_w)
        self.thread = threading.Thread(target=self._worker.serve, name=f"qjam-memory-{name}", daemon=True)
        self.thread.start()

    @property
    def pid(self) -> int | None:
        return None

    @pid.setter
    def pid(self, value: int | None) -> None:  # the hello's pid (none): never a pid to signal
        pass

    def held_fds(self) -> list[int]:
        return [fd for fd in (self._in, self._out, self._err) if fd >= 0]

    def close(self) -> None:
        self._close_fd("_in")

    def kill(self) -> None:
        """Cut the worker's output (the master sees its end at once) and abandon its thread, which ends
        once the master closes its input (as after any death) and its mapfunc, if one runs, returns."""
        if self._status is None:
            self._status = KILLED
        self._ended.set()
        self._worker.cut()

    def interrupt(self) -> None:
        """Nothing: a thread cannot be interrupted (see the module's rules)."""

    def exit_status(self) -> int | None:
        return self._status

    def cpu_state(self) -> CpuState | None:
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        if self._status is None:
            self._ended.wait(timeout)
        return self._status

    def release(self) -> None:
        for attr in ("_in", "_out", "_err"):
            self._close_fd(attr)

    def drop(self) -> None:
        """Nothing beyond ``close``: the worker's input ends once what was queued is written."""

    def _close_fd(self, attr: str) -> None:
        with self._fd_lock:
            close_attr(self, attr)

    def _ended_with(self, status: int) -> None:
        if self._status is None:
            self._status = status
        self._ended.set()


class _MemoryWorker:
    """The shell around one ``WorkerCore``: a thread that reads, steps and runs; a watcher that sends
    STARTED and ALIVE while a slice runs (as ``worker/io.py``'s does, without the fine tuning)."""

    def __init__(self, process: MemoryProcess, fd_in: int, fd_out: int, fd_err: int) -> None:
        self.process = process
        self.core = WorkerCore(process.name)
        self.fd_in, self.fd_out, self.fd_err = fd_in, fd_out, fd_err
        self.lock = threading.Lock()
        self.fd_lock = threading.Lock()  # held while our fds are closed, or pointed elsewhere by ``cut``
        self.beat = 1.0
        self.slice_began = threading.Condition(self.lock)
        self.stopped = False

    def cut(self) -> None:
        """The master killed us: our output ends point at /dev/null from now on (the numbers stay
        taken, so a write racing this cannot land in another file), so the master sees the end of
        the stream at once; the thread ends at its next read (the master closed our input)."""
        with self.fd_lock:  # (not while the thread closes them: a number let go may be another file's)
            forget([self.fd_out, self.fd_err])

    def ask(self, method: Any, *args: Any) -> list:
        """The core under the lock, the frames its answer asks for written before letting go."""
        with self.lock:
            rest = []
            for action in method(*args):
                if type(action) is Send:
                    if self.fd_out < 0:
                        raise _Gone
                    write_all(self.fd_out, self.encode(action))
                else:
                    rest.append(action)
            return rest

    @staticmethod
    def encode(action: Send) -> list:
        """The frame of ``action``; a result that cannot be pickled is answered with that error, as a worker
        process does (``worker/io.py``)."""
        try:
            return messages.encode(action.message, action.call, action.index)
        except Exception as exc:
            if type(action.message) is not messages.Result:
                raise
            return messages.encode(error_message(exc, "pickling the result"), action.call, action.index)

    def serve(self) -> None:
        status = 0
        try:
            self.ask(lambda: [Send(messages.Hello(worker=self.core.name, pid=None, host=socket.gethostname(),
                                                  blas=None, **versions()))])
            threading.Thread(target=self.watch, name=f"qjam-memory-watch-{self.core.name}", daemon=True).start()
            status = self.loop()
        except (_Gone, OSError):
            status = KILLED
        finally:
            with self.lock, self.fd_lock:
                self.stopped = True
                self.slice_began.notify_all()
                for attr in ("fd_in", "fd_out", "fd_err"):
                    close_attr(self, attr)
            self.process._ended_with(status)  # (after a kill, its status stays KILLED)

    def loop(self) -> int:
        core = self.core
        while True:
            if not core.pending:
                buf = core.get_buffer()
                n = os.readv(self.fd_in, [buf])
                actions = self.ask(core.buffer_updated, n) if n else self.ask(core.eof)
            else:
                actions = self.ask(core.step)
            for action in actions:
                if type(action) is Run:
                    self.run(action)
                elif type(action) is Configure:
                    self.beat = action.beat
                elif type(action) is Exit:
                    if action.reason and self.fd_err >= 0:
                        os.write(self.fd_err, (action.reason + "\n").encode(errors="replace"))
                    return action.status
                # Retire: there is no result arena here

    def run(self, run: Run) -> None:
        with self.lock:
            self.slice_began.notify_all()
        start = time.perf_counter()
        try:
            if run.delay is not messages.ABSENT:
                time.sleep(run.delay)
            value = run.func(run.params, run.data)
        except BaseException as exc:  # sys.exit in mapfunc ends nothing but its slice here
            self.ask(self.core.failed, run.call, run.index, exc, 1)
            return
        self.ask(self.core.finished, run.call, run.index, value, time.perf_counter() - start)

    def watch(self) -> None:
        """STARTED once a slice has run ``WATCH_AFTER`` s, then ALIVE every beat while it runs."""
        core = self.core
        with self.lock:
            while not self.stopped and self.fd_out >= 0:
                if core.running is None:
                    self.slice_began.wait()
                    continue
                number = core.slices
                self.slice_began.wait(WATCH_AFTER)
                if core.slices != number or core.running is None or self.fd_out < 0:
                    continue
                for action in core.announce():
                    write_all(self.fd_out, messages.encode(action.message, action.call, action.index))
                while (not self.stopped and self.fd_out >= 0 and core.slices == number
                       and core.running is not None):
                    self.slice_began.wait(self.beat)
                    if self.fd_out >= 0 and core.slices == number:
                        for action in core.heartbeat(number):
                            write_all(self.fd_out, messages.encode(action.message, action.call, action.index))


def close_attr(owner: Any, attr: str) -> None:
    """Close the descriptor in ``owner.<attr>`` once: the attribute says -1 before it is closed (the caller
    holds the lock that guards it, so a number let go is never closed again as another file's)."""
    fd = getattr(owner, attr)
    if fd >= 0:
        setattr(owner, attr, -1)
        try:
            os.close(fd)
        except OSError:
            pass


class MemoryTransport:
    """Starts in-memory workers (threads of this process): the ``memory`` host entry."""

    host = MEMORY
    alive = True  # nothing to lose: no connection
    uploaded = 0  # nothing to upload

    def start(self, names: Sequence[str], env: dict[str, str] | None = None) -> list[MemoryProcess]:
        """One thread per name. ``env`` cannot apply to a thread of this process: it is ignored."""
        return [MemoryProcess(name) for name in names]

    def describe(self) -> str:
        return "in-memory workers: threads of this process (no processes, no shared memory, no signals)"

    def close(self, deadline: float | None = None) -> None:
        """Nothing to release: each worker's thread ends when its stream does."""
