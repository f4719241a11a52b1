"""The frames executor's workers: starting, reviving, losing and stopping them.

The pool owns every ``FramesWorker`` and every host's transport, and is the
only code that changes a worker's state (always along ``states``' table, and
always with an event). It runs on the cluster's thread, which also reads
the workers' streams, in ``inbox.get``.

A worker that died is started again before the next call (``revive``), on
the same transport if its host is still connected, else on a new
connection; a host that cannot be reached is retried with backoff (1, 2,
4 ... 60 s) and reported, never looped on. A worker refused by the
handshake stays dead: starting it again would only be refused again.
"""

from __future__ import annotations

import pickle
import queue
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import events as ev
from .. import states
from ..errors import HostError, ShippingError, VersionMismatchError, WorkerError
from ..transport.link import Inbox, Link, LinkClosed, StderrOutput
from ..transport.registry import SshOptions, Transport, open_hosts, reopen_host
from ..worker import messages as m
from ..worker import sharedmem, threads
from ..worker.protocol import Frame, ProtocolError
from .base import WorkerHandle, cache_changed, set_state
from .handshake import describe_threads, master_versions, mismatch

BACKOFF_MAX = 60.0
#: Guesses of what shipping a slice costs, (latency s, bytes/s), until the scheduler measures it
#: (``cluster.speeds``): a local worker through shared memory, and one over ssh on a modest network.
LOCAL_SHIP = (0.0005, 1e9)
REMOTE_SHIP = (0.002, 50e6)


class FramesWorker(WorkerHandle):
    """A worker of the frames executor: the generic handle, with its link and what its stream said."""

    def __init__(self, name: str, host: str) -> None:
        super().__init__(name, host)
        self.link: Link | None = None
        self.running: tuple[int, int] | None = None  # (call, slice) it reported STARTED (after 3 ms) and not finished
        self.cancelled = 0  # the last call it answered CANCELLED for
        self.refused = False  # refused by the handshake: not started again
        self.results = sharedmem.LentResults()  # its big results, in its arena (local workers)
        self.retire_arena = False  # something still uses its arena: its next TASK says to make a new one


class WorkerPool:
    def __init__(self, events: ev.EventBus, plan: Sequence[tuple[str, int]], ssh_options: SshOptions,
                 blas_threads: int | bool | None = None) -> None:
        """``blas_threads``: None, each worker's share of its host's cores; N, N each; False, left alone
        (``worker/threads.py`` applies it)."""
        self.events = events
        self.blas_threads = blas_threads
        self.ssh_options = ssh_options
        self.inbox = Inbox()
        self.transports: dict[str, Transport] = {}
        self.versions = master_versions()
        self.workers: list[FramesWorker] = []
        self.by_link: dict[int, FramesWorker] = {}
        self.retry: dict[str, tuple[int, float]] = {}  # host -> (failures, next attempt)
        counters: dict[str, int] = {}
        for host, n in plan:
            first = counters.get(host, 0)
            counters[host] = first + n
            self.workers += [FramesWorker(f"{host}/{i}", host) for i in range(first, first + n)]
        self.current_call = 0  # for events emitted between calls


    # -- starting ------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Open every host, start every worker; raise if any host or worker fails."""
        for w in self.workers:  # observers see every worker from STARTING on
            self.events.emit(ev.WorkerStateChanged(w.name, states.STARTING, states.STARTING, "connecting"))
        started = time.perf_counter()
        self.transports = open_hosts([w.host for w in self.workers], self.ssh_options)
        for host, transport in self.transports.items():
            self._ready(host, transport, started)
        self._spawn(self.workers)
        self.await_hellos(self.workers, timeout)
        dead = [w for w in self.workers if w.state == states.DEAD]
        refused = [w for w in dead if w.refused]
        if refused:
            raise VersionMismatchError("; ".join(w.reason for w in refused))
        if dead:
            raise WorkerError("could not start " + "; ".join(self.obituary(w) for w in dead))

    def revive(self, timeout: float) -> list[FramesWorker]:
        """Start dead workers again where their host allows it; returns those that came back."""
        dead = [w for w in self.workers if w.state == states.DEAD and not w.refused]
        now = time.monotonic()
        reborn: list[FramesWorker] = []
        for host in dict.fromkeys(w.host for w in dead):
            failures, next_try = self.retry.get(host, (0, 0.0))
            if now < next_try:
                continue
            transport = self.transports.get(host)
            if transport is None or not transport.alive:
                started = time.perf_counter()
                try:
                    if transport is not None:
                        transport.close()
                    transport = reopen_host(host, self.ssh_options)  # within seconds, not the full timeout
                except (HostError, WorkerError, OSError) as exc:
                    wait = min(BACKOFF_MAX, 2.0**failures)
                    self.retry[host] = (failures + 1, now + wait)
                    self.events.emit(ev.ErrorEvent(host, self.current_call, -1,
                                                   f"host {host} could not be reached again ({exc}); "
                                                   f"next try in {wait:.0f} s or later"))
                    continue
                self.transports[host] = transport
                self._ready(host, transport, started)
            self.retry.pop(host, None)
            batch = [w for w in dead if w.host == host]
            for w in batch:
                self.set_state(w, states.STARTING, "restarting")
            self._spawn(batch)
            reborn += batch
        if reborn:
            self.await_hellos(reborn, timeout)
        return [w for w in reborn if w.state == states.IDLE]

    def _ready(self, host: str, transport: Transport, started: float) -> None:
        self.events.emit(ev.HostReady(host, transport.describe(), transport.uploaded,
                                      time.perf_counter() - started))

    def _spawn(self, workers: list[FramesWorker]) -> None:
        for host in dict.fromkeys(w.host for w in workers):
            batch = [w for w in workers if w.host == host]
            try:
                procs = self.transports[host].start([w.name for w in batch], env=self.thread_request(host))
            except (HostError, OSError) as exc:
                for w in batch:
                    self.set_state(w, states.DEAD, f"could not start: {exc}")
                continue
            for w, proc in zip(batch, procs, strict=True):
                if w.link is not None:  # the dead worker's: let its pipes or channel go
                    self.by_link.pop(id(w.link), None)
                    w.link.detach()
                    w.link.free()
                w.link = Link(proc, self.inbox)
                w.hello, w.running = {}, None
                w.starts += 1
                self.by_link[id(w.link)] = w

    def thread_request(self, host: str) -> dict[str, str]:
        """What the workers of ``host`` are told of their BLAS threads (``worker.threads.REQUEST``):
        a share among this cluster's workers on that host (all of them, not only those starting)."""
        if self.blas_threads is False:
            return {}
        if self.blas_threads is None:
            return {threads.REQUEST: f"share:{sum(w.host == host for w in self.workers)}"}
        return {threads.REQUEST: str(self.blas_threads)}

    def await_hellos(self, workers: list[FramesWorker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(w.state == states.STARTING for w in workers):
            left = deadline - time.monotonic()
            if left <= 0:
                for w in workers:
                    if w.state == states.STARTING:
                        w.link.kill()
                        self.set_state(w, states.DEAD, f"no hello within {timeout:.0f} s (handshake timed out)")
                return
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            self.handle(item)

    # -- the inbox, between calls ----------------------------------------------------
    def worker_of(self, link: Link) -> FramesWorker | None:
        worker = self.by_link.get(id(link))
        return worker if worker is not None and worker.link is link else None

    def handle(self, item: tuple) -> None:
        """Anything that is not part of the current call: output, hellos, deaths."""
        link, msg = item
        worker = self.worker_of(link)
        if worker is None:
            return  # an old link of a restarted worker
        if isinstance(msg, StderrOutput):
            self.events.emit(ev.StreamOutput(worker.name, "stderr", msg.text, self.current_call, -1))
        elif isinstance(msg, LinkClosed):
            if worker.state not in (states.DEAD, states.STOPPED):
                self.lose(worker, msg)
        else:
            handler = HANDLERS.get(m.message_class(msg))
            if handler is not None:
                handler(self, worker, msg)
        # Anything else belongs to a finished or cancelled call (or is an ALIVE): dropped.

    # Between calls' handlers (``HANDLERS``, by message class).
    def _on_stream(self, worker: FramesWorker, frame: Frame) -> None:
        out = self.decode(worker, frame, "worker output")
        self.events.emit(ev.StreamOutput(worker.name, out.stream, out.text, frame.call, frame.index))

    def _on_hello(self, worker: FramesWorker, frame: Frame) -> None:
        if worker.state == states.STARTING:
            self._hello(worker, self.decode(worker, frame, "the hello").body())

    def _on_answer(self, worker: FramesWorker, frame: Frame) -> None:
        if worker.running == (frame.call, frame.index):
            worker.running = None  # a cancelled call's slice ended

    def _on_cancelled(self, worker: FramesWorker, frame: Frame) -> None:
        worker.cancelled = frame.call

    def _hello(self, worker: FramesWorker, hello: dict) -> None:
        worker.hello = hello
        worker.ship_guess = LOCAL_SHIP if worker.link.shares_memory else REMOTE_SHIP
        self.events.emit(ev.WorkerThreads(worker.name, describe_threads(hello.get("blas"))))
        worker.link.learn_pid(hello.get("pid"))
        problem = mismatch(worker.name, hello, self.versions)
        if problem:
            worker.refused = True
            self.set_state(worker, states.DEAD, problem)
            worker.link.send(m.Bye())
            worker.link.close()
        else:
            again = worker.starts > 1
            self.set_state(worker, states.IDLE, "restarted" if again else "ready")

    def drain(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.handle(item)

    def decode(self, worker: FramesWorker, frame: Frame, what: str) -> m.Message:
        """The message ``frame`` carries; a ``ShippingError`` naming the worker if it cannot be read here."""
        try:
            return m.decode(frame)
        except ProtocolError as exc:
            raise _unpickling_failed(worker, what, exc.__cause__ or exc) from exc

    def result(self, worker: FramesWorker, frame: Frame) -> tuple[Any, float]:
        """A RESULT's value and the seconds its slice took; a big local result is built on the
        worker's arena, where it lies (see ``sharedmem.LentResults``)."""
        try:
            body = frame.body()
        except ProtocolError as exc:
            raise _unpickling_failed(worker, f"the result of slice {frame.index}", exc.__cause__ or exc) from exc
        if "pickled" not in body:
            return body["value"], body["seconds"]
        try:
            buffers = worker.results.read(body["arena"])
        except OSError as exc:  # its file was removed under us: the worker makes a new one next time
            worker.retire_arena = True
            raise WorkerError(f"the result of slice {frame.index} from worker {worker.name} could not be read "
                              f"from its shared memory in {sharedmem.DIRECTORY}: {exc}. Call again; if it "
                              "happens again, see what removes files there") from exc
        try:
            return pickle.loads(body["pickled"], buffers=buffers), body["seconds"]
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}"
            raise _unpickling_failed(worker, f"the result of slice {frame.index}", cause) from exc

    # -- losing and stopping -------------------------------------------------------
    def lose(self, worker: FramesWorker, closed: LinkClosed | None = None, reason: str = "") -> None:
        """Mark a worker dead, with why (its exit status, or what broke), and forget its cache.

        Its process group is killed too: helpers that mapfunc forked do not outlive it.
        """
        if not reason:
            status = worker.link.wait(0.5)
            reason = (closed.error if closed and closed.error else None) or exit_reason(status)
        worker.link.kill()
        worker.running = None
        if worker.link.shares_memory and worker.hello.get("pid"):
            sharedmem.discard_results_of(worker.hello["pid"])
            worker.results.close()
        self.set_state(worker, states.DEAD, reason)
        self.events.emit(ev.ErrorEvent(worker.name, self.current_call, -1, f"worker {worker.name} died: {reason}"))
        if worker.cache:
            worker.forget()
            self.cache_changed(worker)

    def kill(self, worker: FramesWorker, reason: str) -> None:
        """Kill a worker (with its process group) and mark it dead, without waiting for it."""
        worker.link.close()
        self.lose(worker, reason=reason)

    def settle(self, call: int, workers: list[FramesWorker], grace: float) -> None:
        """Stop a cancelled call on ``workers``, escalating: CANCEL, then SIGINT, then kill.

        A worker answers CANCEL with CANCELLED once no slice of the call runs
        there (at once if none did). After ``grace`` seconds, a worker that has not
        answered is killed if it runs a slice of the call (it said STARTED) or if
        nothing came from it meanwhile (stopped, hung, or deaf in a slice too young
        to have been announced); one still talking or taking what it is sent (a
        big slice on a slow link) is left to the liveness check of the next call.
        """
        busy = [w for w in workers if w.state == states.BUSY]
        for w in busy:
            w.link.send(m.Cancel(), call=call)
        # Every busy worker: one may be in a slice too young to have said STARTED (it does at 3 ms).
        # A worker between slices ignores SIGINT.
        for w in busy:
            w.link.interrupt()
        traffic = {w.name: w.link.traffic for w in busy}
        self._wait(lambda: all(w.cancelled == call or w.state != states.BUSY for w in busy), grace)
        for w in busy:
            if w.state != states.BUSY or w.cancelled == call:
                continue
            if (w.running and w.running[0] == call) or w.link.traffic == traffic[w.name]:
                self.kill(w, f"did not stop within {grace:g} s of being interrupted; killed")

    def _wait(self, done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.handle(self.inbox.get(timeout=left))
            except queue.Empty:
                return

    def stop(self) -> None:
        for w in self.workers:
            if w.link is not None:
                w.link.send(m.Bye())
                w.link.close()
        deadline = time.monotonic() + 5
        for w in self.workers:
            if w.link is not None:
                link = w.link
                if link.wait(max(0.0, deadline - time.monotonic())) is None:
                    link.kill()
                    link.wait(1)
                link.join(2.0)
                link.detach()
                link.free()
            if w.state != states.STOPPED:
                self.set_state(w, states.STOPPED, "shut down")
        for transport in self.transports.values():
            transport.close()
        while True:  # what is left refers to the links: let them go now, not at the next gc
            try:
                self.inbox.get_nowait()
            except queue.Empty:
                break

    # -- bookkeeping ---------------------------------------------------------------
    def alive(self) -> list[FramesWorker]:
        return [w for w in self.workers if w.state in (states.IDLE, states.BUSY)]

    def set_state(self, worker: FramesWorker, new: str, reason: str) -> None:
        set_state(self.events, worker, new, reason)

    def cache_changed(self, worker: FramesWorker) -> None:
        cache_changed(self.events, worker)

    def last_words(self, worker: FramesWorker, lines: int = 5) -> str:
        tail = list(worker.link.stderr_tail)[-lines:] if worker.link is not None else []
        return "its last stderr lines: " + " | ".join(tail) if tail else "it printed nothing to stderr"

    def obituary(self, worker: FramesWorker) -> str:
        return f"{worker.name}: {worker.reason} ({self.last_words(worker)})"

    def obituaries(self) -> str:
        dead = [w for w in self.workers if w.state == states.DEAD]
        return "; ".join(self.obituary(w) for w in dead) or "no worker was started"


#: What the workers say between calls (and what the running call leaves to the pool), by message class.
HANDLERS = {m.Stream: WorkerPool._on_stream, m.Hello: WorkerPool._on_hello, m.Result: WorkerPool._on_answer,
            m.Error: WorkerPool._on_answer, m.Cancelled: WorkerPool._on_cancelled}
m.check_handlers(HANDLERS, m.W2M)  # only registered messages that come from workers


def exit_reason(status: int | None) -> str:
    """Words for a process's exit status (negative: killed by that signal)."""
    if status is None or status == -1:
        return "its stream closed (no exit status: killed, or its connection dropped)"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name} (exit status {status})"
    return f"exited with status {status}"


def _unpickling_failed(worker: FramesWorker, what: str, cause: object) -> ShippingError:
    return ShippingError(f"{what} from worker {worker.name} could not be unpickled here: {cause}. "
                         "Return values built from modules the notebook can import too.")
