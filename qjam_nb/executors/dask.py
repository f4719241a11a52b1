"""The Dask executor: calls carried out on the workers of a Dask cluster (``distributed``).

Its rules, beside the seam's (``executors.base``):

* Where slices live: on the Dask workers, scattered once under explicit keys
  ``qjam-<hex of the slice key>``, pinned to the worker the face assigned;
  ``futures`` (Dask key -> Future) is the record that keeps them there, and
  each ``WorkerHandle.cache`` says which worker holds which (resynchronised
  with ``Client.has_what`` between calls: Dask's memory manager may drop
  a replica). A slice the face assigns to a worker that lacks it is scattered
  from here if no worker holds it, else copied worker to worker by Dask (the
  batch depends on its future). Either way it is shipped (``SliceSent``);
  ``scattered_bytes`` counts what left this process.
* A call's mapfunc and params are scattered once per call, to one of its
  workers (the others copy them from there).
  The tasks a worker is assigned in one pass go as one batch task
  (``daskbatch.run_batch``), pinned there (``allow_other_workers=False``),
  at most ``BATCHES_IN_FLIGHT`` batches a worker: more wait here, and leave
  at the next ``flush`` (less what finished elsewhere meanwhile).
* Progress and what mapfunc prints come from the batches' worker-side events
  (``log_event`` on this executor's topic), deaths from the scheduler's (``remove-worker``, under
  each worker's address);
  both, and the batches' completions, reach the call's thread through one
  ``queue.Queue`` (``inbox``), the only thread that emits events and reports.
* Cancel: a flag set on the call's workers (``Client.run``, not waiting),
  checked by batches between slices; past the grace, a worker still in a
  batch is restarted (``Client.restart_workers``: its nanny starts it again).
* Workers are named ``dask/<the Dask worker's name>``; a restarted worker
  keeps its Dask name (a new address), and comes back under the same name.

Nothing of qjam_nb is installed on the Dask workers: ``daskbatch`` travels by value (``TRAVEL``).
"""

from __future__ import annotations

import pickle
import queue
import threading
import time
import traceback
import types
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distributed
import numpy

from .. import events as ev
from .. import states
from ..errors import HostError, ShippingError, VersionMismatchError, WorkerError
from . import daskbatch
from .base import CallReports, CallRunBase, CallSpec, WorkerHandle, cache_changed, set_state
from .handshake import describe_threads, master_versions, mismatch


def _travelling() -> types.ModuleType:
    """``daskbatch``'s code, run again in a module that is in no ``sys.modules``: cloudpickle ships its
    functions by value (as it does ``__main__``'s), so nothing of qjam_nb is needed on the Dask
    workers. (``cloudpickle.register_pickle_by_value(daskbatch)`` would too, but a module registered
    so makes ``cluster.shipping`` pickle every mapfunc afresh, for every cluster of this process.)"""
    module = types.ModuleType("qjam_nb_daskbatch")
    path = daskbatch.__file__
    exec(compile(Path(path).read_text(), path, "exec"), module.__dict__)
    return module


#: What runs on the Dask workers (``daskbatch``), as it travels.
TRAVEL = _travelling()

#: Batch tasks a worker may have submitted at once; more tasks wait here until one finishes.
BATCHES_IN_FLIGHT = 2
#: Guesses of what shipping a slice to a Dask worker costs (latency s, bytes/s), until measured: on
#: this machine (loopback TCP) and elsewhere.
LOCAL_SHIP = (0.003, 500e6)
REMOTE_SHIP = (0.005, 50e6)
#: Host names of this machine, for ``ship_guess``.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: A bigger slice than this is refused before the call (Dask splits messages: the bound is memory).
MAX_SLICE_BYTES = 1 << 40
#: What a worker's name is made of: ``dask/`` and its Dask name.
PREFIX = "dask/"


#: Slice key -> how many times this process let go of its Dask key. A key let go of is not scattered
#: again under the same name: the client's release of it may reach the scheduler after the new scatter,
#: which would then be forgotten.
_let_go: dict[bytes, int] = {}


def dask_key(key: bytes) -> str:
    """The Dask key a slice is scattered under: ``qjam-`` and its content hash in hex (then ``-N`` once
    this process let go of it N times)."""
    n = _let_go.get(key)
    return "qjam-" + key.hex() if not n else f"qjam-{key.hex()}-{n}"


#: A call's pickled mapfunc and params up to this size travel inside each batch task, not scattered.
INLINE_PAYLOAD = 64 << 10


class DaskWorker(WorkerHandle):
    """A worker of the Dask executor: the generic handle, with its Dask name and current address."""

    def __init__(self, name: str, host: str, dask_name: str, address: str) -> None:
        super().__init__(name, host)
        self.dask_name = dask_name
        self.address = address
        self.refused = False
        self.running: tuple[int, int] | None = None  # (call, slice) its batch said it began and has not ended
        self.restarting: str | None = None  # the address it had when a restart was asked for, until it is back


class WorkerLost(Exception):
    """A worker could not be reached while its tasks left (``DaskCall._submit``)."""


class SliceRefused(Exception):
    """A worker could not take a slice scattered to it: its index and the error, as a batch says one."""

    def __init__(self, index: int, error: dict) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


def refused(exc: BaseException, where: str) -> dict:
    """Dask's word that a worker failed (it re-raises the worker's exception, or wraps it) as our error dict."""
    inner = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], BaseException) else exc
    return {"type": type(inner).__name__, "message": str(inner),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "where": where}


@dataclass(eq=False)
class Batch:
    worker: DaskWorker
    future: Any  # distributed.Future
    indexes: list
    retried: bool = False
    answers: list | None = None  # fetched with other batches' (``DaskCall._fetch``)


class DaskExecutor:
    """``executors.base.Executor`` over a Dask cluster.

    ``target`` is ``("client", Client)``, ``("address", "tcp://host:port")``,
    ``("file", scheduler.json)`` or ``("local", N)`` (a ``LocalCluster`` of N
    processes on 127.0.0.1, closed with the executor)."""

    max_slice_bytes = MAX_SLICE_BYTES

    def __init__(self, events: ev.EventBus, target: tuple[str, Any], heartbeat: float = 1.0) -> None:
        self.events = events
        self.target = target
        self.heartbeat = heartbeat
        self.client: Any = None
        self.local_cluster: Any = None
        self.own_client = target[0] != "client"
        self.token = uuid.uuid4().hex[:12]
        self.topic = f"qjam-{self.token}"
        self.inbox: queue.Queue = queue.Queue()
        self.workers: list[DaskWorker] = []
        self.futures: dict[bytes, Any] = {}  # slice key -> the Future that keeps it on its Dask workers
        self.scattered_bytes = 0  # slice bytes scattered from this process, ever
        self.versions = master_versions()
        self.current_call = 0
        self.where = ""  # the scheduler, for messages
        self.watched: set[str] = set()  # worker addresses whose topic we listen to
        self.calling = False  # a call is under way (begun, not closed)
        self.dashboard: str | None = None  # the Dask dashboard's address, when the scheduler serves one

    # -- starting ------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        started = time.perf_counter()
        self.client = self._connect(timeout)
        self.where = f"Dask scheduler {self.client.scheduler.address}"
        self.dashboard = dashboard_of(self.client)
        self.client.subscribe_topic(self.topic, lambda event: self.inbox.put(("event", event[1])))
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError) as exc:
            raise HostError(self.where, "waiting for workers",
                            f"no Dask worker joined within {timeout:g} s ({exc}). Start workers "
                            "(dask worker ADDRESS) or give start_timeout= more time") from exc
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        for address, w in sorted(info.items(), key=lambda item: str(item[1].get("name"))):
            self.workers.append(self._handle(address, w))
        for w in self.workers:
            self.events.emit(ev.WorkerStateChanged(w.name, states.STARTING, states.STARTING, "connecting"))
        for host in dict.fromkeys(w.host for w in self.workers):
            self.events.emit(ev.HostReady(host, f"Dask workers of {self.where}", 0, time.perf_counter() - started))
        for w in self.workers:
            self._watch(w)
        self._handshake(self.workers, "ready")
        refused = [w for w in self.workers if w.refused]
        if refused:
            raise VersionMismatchError("; ".join(w.reason for w in refused))
        if not self.alive():
            raise WorkerError(f"no worker of the {self.where} could be started: {self.obituaries()}")

    def _connect(self, timeout: float) -> Any:
        kind, value = self.target
        if kind == "client":
            return value
        if kind == "local":
            try:
                self.local_cluster = distributed.LocalCluster(
                    processes=True, n_workers=value, threads_per_worker=1, host="127.0.0.1",
                    dashboard_address=None)
            except Exception as exc:
                raise HostError(f"dask:local:{value}", "starting a Dask LocalCluster", local_cluster_advice(exc)) \
                    from exc
            return distributed.Client(self.local_cluster, timeout=timeout)
        try:
            if kind == "file":
                return distributed.Client(scheduler_file=value, timeout=timeout)
            return distributed.Client(value, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            what = f"the scheduler file {value}" if kind == "file" else f"the Dask scheduler at {value}"
            raise HostError(f"dask:{value}" if kind == "file" else value, "connecting",
                            f"could not reach {what} within {timeout:g} s ({type(exc).__name__}: {exc}). "
                            "Check that the scheduler runs (dask scheduler) and that this address and port "
                            "are the ones it listens on") from exc

    def _handle(self, address: str, info: dict) -> DaskWorker:
        name = info.get("name", address)
        label = str(name) if str(name) != address else address.split("://")[-1]
        w = DaskWorker(PREFIX + label, info.get("host") or address.split("://")[-1].rsplit(":", 1)[0], name, address)
        w.ship_guess = LOCAL_SHIP if w.host in LOOPBACK else REMOTE_SHIP
        return w

    def _handshake(self, workers: list[DaskWorker], ready: str) -> None:
        """Versions, through ``Client.run``; a worker that cannot exchange pickles with us is refused."""
        if not workers:
            return
        try:
            hellos = self.client.run(TRAVEL.versions, workers=[w.address for w in workers], on_error="return")
        except Exception as exc:
            hellos = {w.address: exc for w in workers}
        for w in workers:
            hello = hellos.get(w.address)
            if not isinstance(hello, dict):
                self._set_state(w, states.DEAD, f"did not answer the version handshake: {hello!r}")
                continue
            w.hello = hello
            problem = mismatch(w.name, hello, self.versions)
            if problem:
                w.refused = True
                self._set_state(w, states.DEAD, problem.replace(
                    "Point --python (python=, or QJAM_REMOTE_PYTHON) at an interpreter on that host whose versions "
                    "match, or install matching versions there",
                    "Start the Dask workers with a Python whose versions match, or install matching versions there"))
            else:
                w.starts += 1  # (a first start, or its nanny started it again)
                self.events.emit(ev.WorkerThreads(w.name, describe_threads(hello.get("blas"))))
                self._set_state(w, states.IDLE, ready)

    def _watch(self, w: DaskWorker) -> None:
        """Hear of ``w``'s removal: the scheduler logs it under the worker's address (its "all" topic is
        not listened to: some of its events cannot travel to a client)."""
        address = w.address
        if address in self.watched:
            return
        self.watched.add(address)

        def heard(event: tuple) -> None:  # (on the client's event loop)
            msg = event[1]
            if isinstance(msg, dict) and msg.get("action") == "remove-worker":
                self.inbox.put(("scheduler", {**msg, "worker": address}))

        self.client.subscribe_topic(address, heard)

    # -- between calls -------------------------------------------------------------
    def revive(self, timeout: float, now: bool = False) -> list[DaskWorker]:
        """Dead workers whose Dask name is back (a nanny restarted it), and (when some are dead, or
        ``now``) workers that joined since."""
        self._take_inbox()
        if not any(w.state == states.DEAD and not w.refused for w in self.workers) and not now:
            return []
        info = self._workers_back(timeout)
        by_name = {str(w.get("name", a)): a for a, w in info.items()}
        known = {str(w.dask_name) for w in self.workers}
        back = []
        for w in self.workers:
            address = by_name.get(str(w.dask_name))
            if w.state == states.DEAD and not w.refused and address is not None and address != w.restarting:
                w.address, w.restarting = address, None
                self._watch(w)
                self._set_state(w, states.STARTING, "restarting")
                back.append(w)
        for address, winfo in info.items():
            if str(winfo.get("name", address)) not in known:
                w = self._handle(address, winfo)
                self.workers.append(w)
                self._watch(w)
                self.events.emit(ev.WorkerStateChanged(w.name, states.STARTING, states.STARTING, "joined"))
                back.append(w)
        self._handshake(back, "restarted")
        return [w for w in back if w.state == states.IDLE]

    def _workers_back(self, timeout: float) -> dict:
        """The scheduler's workers; between calls, once the workers restarting are back (a nanny takes
        seconds to start one), or ``timeout`` passed: the next call has the whole cluster, as with our
        own workers. (A call being stopped does not wait: control goes back to the user at once.)"""
        deadline = time.monotonic() + timeout
        while True:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            restarting = [w for w in self.workers if w.restarting is not None and not w.refused]
            if not restarting or self.calling or time.monotonic() > deadline:
                return info
            addresses = {str(v.get("name", a)): a for a, v in info.items()}
            if all(addresses.get(str(w.dask_name)) not in (None, w.restarting) for w in restarting):
                return info
            time.sleep(0.05)
            self._take_inbox()

    def drain(self) -> None:
        self._take_inbox()
        self._sync_caches()

    def _take_inbox(self) -> None:
        """Deaths heard between calls; what past calls' batches still said is dropped."""
        while True:
            try:
                kind, msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "scheduler" and msg["action"] == "remove-worker":
                w = self._by_address(msg.get("worker"))
                if w is not None and w.state in (states.IDLE, states.BUSY):
                    self.lose_worker(w, "its Dask worker left the scheduler")
            elif kind == "restart-failed":
                addresses, why = msg
                for w in self.workers:
                    if w.restarting in addresses:
                        w.restarting = None
                        w.reason = why

    def _sync_caches(self) -> None:
        """Each worker's cache record, as the scheduler says (its memory manager may drop replicas; with
        none, there is nothing to ask: a round trip saved each call)."""
        if not self.futures:
            return
        seen: set[bytes] = set()
        replicated = False
        for w in self.alive():
            if not seen.isdisjoint(w.cache):
                replicated = True
                break
            seen.update(w.cache)
        if not replicated:
            return
        try:
            has = self.client.has_what()
        except Exception:
            return
        futures = self.futures
        for w in self.alive():
            held = set(has.get(w.address, ()))
            gone = [k for k in w.cache if k not in futures or futures[k].key not in held]
            for k in gone:
                w.forget(k)
            if gone:
                self.cache_changed(w)
        self._release_unheld()

    def _release_unheld(self) -> None:
        """Let go of slices no live worker caches (Dask forgets them)."""
        held = {k for w in self.alive() for k in w.cache}
        for k in [k for k in self.futures if k not in held]:
            self.let_go(k)

    def let_go(self, key: bytes) -> None:
        """Release slice ``key``'s future (Dask forgets the slice once no client wants it)."""
        if self.futures.pop(key, None) is not None:
            _let_go[key] = _let_go.get(key, 0) + 1

    def alive(self) -> list[DaskWorker]:
        return [w for w in self.workers if w.state in (states.IDLE, states.BUSY)]

    def obituaries(self) -> str:
        dead = [w for w in self.workers if w.state == states.DEAD]
        return "; ".join(f"{w.name}: {w.reason}" for w in dead) or "no Dask worker joined"

    def set_call(self, call: int) -> None:
        self.current_call = call

    def begin(self, spec: CallSpec, workers: list[DaskWorker], reports: CallReports) -> DaskCall:
        self.calling = True
        return DaskCall(self, spec, workers, reports)

    def lose(self, worker: str, how: str, reason: str) -> None:
        self.kill(self._by_name(worker), how, reason)

    def kill(self, w: DaskWorker, how: str, reason: str) -> None:
        """Chaos: end a worker's process (its nanny starts it again); ``drop`` has no Dask meaning."""
        if how != "kill":
            raise WorkerError(f"cannot end Dask worker {w.name} by {how!r}: the Dask executor can only 'kill' "
                              "(restart its process)")
        self._restart([w])
        self.lose_worker(w, reason)

    def _restart(self, workers: list[DaskWorker]) -> None:
        """Ask the workers' nannies to start them again, without waiting: a nanny takes seconds to
        start a Dask worker, and the caller (an interrupt, chaos) must have control back at once. The
        worker is back when its Dask name shows at another address (``revive``)."""
        client, addresses = self.client, [w.address for w in workers]
        for w in workers:
            w.restarting = w.address

        def restart() -> None:  # (its own thread: it only waits for Dask's answer, and says it through the inbox)
            try:
                client.restart_workers(addresses, raise_for_error=False)
            except Exception as exc:  # no nanny, or the scheduler is gone: they stay dead
                self.inbox.put(("restart-failed", (addresses, f"could not be restarted ({type(exc).__name__}: {exc})")))

        threading.Thread(target=restart, name="qjam-dask-restart", daemon=True).start()

    def lose_worker(self, w: DaskWorker, reason: str) -> None:
        """Mark ``w`` dead and forget what it cached."""
        w.running = None
        self._set_state(w, states.DEAD, reason)
        self.events.emit(ev.ErrorEvent(w.name, self.current_call, -1, f"worker {w.name} died: {reason}"))
        if w.cache:
            w.forget()
            self.cache_changed(w)
        self._release_unheld()

    def stop(self) -> None:
        client = self.client
        if client is not None:
            for topic in (self.topic, *self.watched):
                try:
                    client.unsubscribe_topic(topic)
                except Exception:
                    pass
        for key in list(self.futures):
            self.let_go(key)
        if client is not None and self.own_client:
            client.close()
        if self.local_cluster is not None:
            self.local_cluster.close()
        for w in self.workers:
            if w.state != states.STOPPED:
                self._set_state(w, states.STOPPED, "shut down")

    # -- bookkeeping ---------------------------------------------------------------
    def _by_address(self, address: str | None) -> DaskWorker | None:
        return next((w for w in self.workers if w.address == address), None)

    def _by_name(self, name: str) -> DaskWorker:
        return next(w for w in self.workers if w.name == name)

    def _set_state(self, w: DaskWorker, new: str, reason: str) -> None:
        set_state(self.events, w, new, reason)

    def cache_changed(self, w: DaskWorker) -> None:
        cache_changed(self.events, w)


class DaskCall(CallRunBase):
    """One call on the Dask executor: ``executors.base.CallRun``."""

    def __init__(self, executor: DaskExecutor, spec: CallSpec, workers: list[DaskWorker],
                 reports: CallReports) -> None:
        super().__init__(spec, workers, reports)
        self.executor = executor
        self.client = executor.client
        self.key = f"qjam-call-{executor.token}-{spec.id}"
        self.pending: dict[str, list[int]] = {w.name: [] for w in workers}  # assigned, not yet submitted
        self.batches: dict[str, list[Batch]] = {w.name: [] for w in workers}  # submitted, not answered
        self.answered: set[tuple[str, int]] = set()  # (worker, slice) whose answer came
        self.finished: set[int] = set()  # slices with a result (from any worker)
        self.shipped: dict[int, list[tuple[DaskWorker, bytes]]] = {}  # slice -> where it went under which key
        self.cache_news: dict[str, DaskWorker] = {}
        self.cancelled = False
        self.submitted = 0
        func, params = spec.func, spec.params
        # The params' out-of-band buffers (numpy's memory) as byte arrays over the same memory, which Dask
        # ships without a copy (a PickleBuffer it would pickle in band).
        buffers = [numpy.frombuffer(b.raw(), numpy.uint8) for b in params.buffers]
        payload = (bytes(func), bytes(params.data.raw()), buffers)
        addresses = [w.address for w in workers]
        self.payload_bytes = len(payload[0]) + len(payload[1]) + sum(b.nbytes for b in payload[2])
        self.payload: Any = payload  # small: it travels inside each batch task (a scatter costs a round trip
        # and the other workers' copies from the first: ~10 ms a call on 2 cores)
        if self.payload_bytes > INLINE_PAYLOAD:
            # Big: to one worker, and the others' batches copy it from there (Dask's ``broadcast`` logs an
            # event that cannot travel to a client listening to its topic).
            try:
                self.payload = self.client.scatter({self.key: payload}, workers=addresses)[self.key]
            except OSError as exc:
                raise WorkerError(f"call {spec.id}'s mapfunc and params could not reach the workers of the "
                                  f"{executor.where} ({type(exc).__name__}: {exc}). Call again: workers that "
                                  "left are dropped first") from exc
            self.bytes_sent += self.payload_bytes
        for w in workers:
            executor._set_state(w, states.BUSY, f"call {spec.id}")

    # -- writing ---------------------------------------------------------------------------
    def assign(self, tasks: Sequence[tuple[str, int]]) -> None:
        spec = self.spec
        data = spec.data
        emit = self.executor.events.emit
        for name, index in tasks:
            worker = self.workers[name]
            key, size = spec.keyed[index] if data is not None else (None, 0)
            cached = key is None or key in worker.cache
            emit(ev.SliceAssigned(self.id, index, name, cached and key is not None, key, size))
            if cached:
                self.slice_bytes_cached += size
            self.pending[name].append(index)

    def flush(self) -> None:
        # Until nothing more can leave: a worker lost while its batch left hands its tasks to others.
        while not self.cancelled:
            ready = [name for name, indexes in self.pending.items()
                     if indexes and len(self.batches[name]) < BATCHES_IN_FLIGHT]
            if not ready:
                break
            for name in ready:
                todo = [i for i in self.pending[name] if i not in self.finished]
                self.pending[name] = []
                if todo and self.workers[name].state == states.BUSY:
                    self._submit(self.workers[name], todo)
        if self.cache_news:
            for w in self.cache_news.values():
                self.executor.cache_changed(w)
            self.cache_news.clear()

    def _items(self, worker: DaskWorker, indexes: list[int]) -> list[tuple[int, Any]]:
        """(index, the slice's future, or None without a dataset), shipping what ``worker`` lacks."""
        spec = self.spec
        if spec.data is None:
            return [(i, None, None) for i in indexes]
        ex = self.executor
        futures = ex.futures
        scatter: dict[str, Any] = {}
        for index in indexes:
            key, size = spec.keyed[index]
            fut = futures.get(key)
            if fut is not None and fut.status != "finished":  # its only holder died: scatter it again
                ex.let_go(key)
                fut = None
            if key in worker.cache and fut is not None:
                continue
            if fut is None and key not in scatter:
                scatter[key] = spec.data.slice(index)
                ex.scattered_bytes += size
                self.bytes_sent += size
            # else: Dask copies it from the worker that holds it
            self.slice_bytes_sent += size
            worker.remember(key, size)
            self.shipped.setdefault(index, []).append((worker, key))
            ex.events.emit(ev.SliceSent(self.id, index, worker.name, key, size))
            self.cache_news[worker.name] = worker
        if scatter:
            names = {dask_key(key): key for key in scatter}
            try:
                scattered = self.client.scatter({name: scatter[key] for name, key in names.items()},
                                                workers=[worker.address])
            except OSError as exc:  # it died (the scheduler's word of it may still be on its way)
                raise WorkerLost(f"its Dask worker could not be reached ({type(exc).__name__}: {exc})") from exc
            except Exception as exc:  # it could not unpickle a slice (a class only the notebook can import)
                if not self._present(worker):  # or it left (Dask names the address it no longer knows)
                    raise WorkerLost(f"its Dask worker left ({type(exc).__name__}: {exc})") from exc
                first = next(i for i in indexes if spec.keyed[i][0] in scatter)
                for key in scatter:
                    worker.forget(key)
                raise SliceRefused(first, refused(exc, "unpickling the slice sent there")) from exc
            futures.update((names[name], fut) for name, fut in scattered.items())
        return [(i, futures[spec.keyed[i][0]], futures[spec.keyed[i][0]].key) for i in indexes]

    def _present(self, worker: DaskWorker) -> bool:
        """Does the scheduler still know ``worker``'s address?"""
        try:
            return worker.address in self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:
            return False

    def _submit(self, worker: DaskWorker, indexes: list[int], retried: bool = False) -> None:
        try:
            items = self._items(worker, indexes)
        except WorkerLost as lost:
            self.pending[worker.name] = indexes  # in flight for the face: lost with the rest
            self._lost(worker, str(lost))
            return
        except SliceRefused as refusal:
            self.reports.failed(worker.name, refusal.index, refusal.error)
            return
        self.submitted += 1
        if not isinstance(self.payload, distributed.Future):
            self.bytes_sent += self.payload_bytes
        delay = self.spec.delays.get(worker.name) if self.spec.delays else None
        future = self.client.submit(
            TRAVEL.run_batch, self.key, self.id, worker.name, self.payload, items, self.executor.topic, delay,
            key=f"{self.key}-batch-{self.submitted}", workers=[worker.address], allow_other_workers=False,
            pure=False)
        batch = Batch(worker, future, indexes, retried)
        self.batches[worker.name].append(batch)
        inbox = self.executor.inbox
        future.add_done_callback(lambda _: inbox.put(("done", batch)))

    def rekeyed(self, keyed: list) -> None:
        """The true keys: a slice shipped under a wrong guess holds its new content under its old key there."""
        for index, sent in self.shipped.items():
            if keyed[index][0] != self.spec.keyed[index][0]:
                for worker, key in sent:
                    worker.forget(key)
                    self.cache_news[worker.name] = worker
                self.executor.let_go(self.spec.keyed[index][0])
        self.spec.keyed = keyed

    # -- reading ---------------------------------------------------------------------------
    def wait(self, deadline: float | None) -> bool:
        inbox = self.executor.inbox
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            items = [inbox.get(timeout=timeout)]
        except queue.Empty:
            return False
        while True:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                break
        self._fetch([msg for kind, msg in items if kind == "done"])
        for item in items:
            self._handle(item)
        return True

    def _fetch(self, done: list[Batch]) -> None:
        """The answers of the batches that ended together, in one round trip (``Future.result`` makes one
        each)."""
        wanted = [b for b in done if b in self.batches.get(b.worker.name, ()) and b.future.status == "finished"]
        if len(wanted) < 2:
            return
        try:
            answers = self.client.gather([b.future for b in wanted])
        except Exception:
            return  # each asks on its own (``_on_done``), and says what went wrong
        for batch, got in zip(wanted, answers, strict=True):
            batch.answers = got

    def _handle(self, item: tuple) -> None:
        kind, msg = item
        if kind == "done":
            self._on_done(msg)
        elif kind == "event":
            self._on_event(msg)
        elif kind == "scheduler" and msg["action"] == "remove-worker":
            w = self.executor._by_address(msg.get("worker"))
            if w is not None and w.state in (states.IDLE, states.BUSY):
                self._lost(w, "its Dask worker left the scheduler (died, or was closed)")

    def _on_event(self, msg: Any) -> None:
        if not (isinstance(msg, tuple) and len(msg) >= 4 and msg[1] == self.id):
            return  # another call's
        worker = self.workers.get(msg[2])
        if worker is None or worker.state != states.BUSY:
            return
        if msg[0] == "slice":
            index = msg[3]
            if (worker.name, index) in self.answered:
                return  # its batch answered first
            worker.running = (self.id, index)
            self.reports.started(worker.name, index)
        elif msg[0] == "idle":
            worker.running = None
        elif msg[0] == "output":
            self.executor.events.emit(ev.StreamOutput(worker.name, msg[4], msg[5], self.id, msg[3]))

    def _on_done(self, batch: Batch) -> None:
        worker = batch.worker
        queued = self.batches.get(worker.name, [])
        if batch not in queued:
            return  # its worker was lost: its slices went elsewhere
        queued.remove(batch)
        if self.cancelled or worker.state != states.BUSY:
            return
        try:
            answers = batch.answers if batch.answers is not None else batch.future.result()
        except Exception as exc:
            self._batch_failed(batch, exc)
            return
        finally:
            batch.future.release()
        if worker.running and worker.running[1] in batch.indexes:
            worker.running = None
        for answer in answers:
            if worker.state != states.BUSY:
                break  # lost on the way (chaos fired at a result of this batch): the face placed the rest anew
            index = answer[1]
            self.answered.add((worker.name, index))
            if self.stale and self._stale(worker, index):
                continue
            if answer[0] == "ok":
                try:
                    value = pickle.loads(answer[2], buffers=answer[3])
                except Exception as exc:
                    raise ShippingError(
                        f"the result of slice {index} from worker {worker.name} could not be unpickled here: "
                        f"{type(exc).__name__}: {exc}. Return values built from modules the notebook can import "
                        "too.") from exc
                self.finished.add(index)
                self.reports.finished(worker.name, index, value, answer[4])
            elif answer[0] == "error":
                self.reports.failed(worker.name, index, answer[2])

    def _batch_failed(self, batch: Batch, exc: BaseException) -> None:
        """A batch that Dask could not run: its slices' data was lost (scattered again, once), or worse."""
        worker = batch.worker
        ex = self.executor
        lost = []
        if self.spec.data is not None:
            keys = {self.spec.keyed[i][0] for i in batch.indexes}
            futures = [ex.futures[k] for k in keys if k in ex.futures]
            try:
                holders = self.client.who_has(futures)
            except Exception:
                holders = {}
            lost = [k for k in keys if k not in ex.futures or not holders.get(ex.futures[k].key)]
        if lost and not batch.retried:
            for key in lost:  # gone from every worker: scattered again
                for w in self.workers.values():
                    if key in w.cache:
                        w.forget(key)
                        self.cache_news[w.name] = w
                ex.let_go(key)
            self._submit(worker, [i for i in batch.indexes if i not in self.finished], retried=True)
            return
        raise WorkerError(
            f"Dask could not run slices {batch.indexes} on worker {worker.name} ({type(exc).__name__}: {exc}); "
            f"the call was stopped. See the {ex.where}'s and that worker's logs")

    def _lost(self, worker: DaskWorker, why: str) -> None:
        running = worker.running
        batches = self.batches.pop(worker.name, [])
        self.batches[worker.name] = []
        self.pending[worker.name] = []
        for batch in batches:
            batch.future.release()
        self.executor.lose_worker(worker, why)
        self.reports.lost(worker.name, running[1] if running and running[0] == self.id else None, why)

    def lose(self, worker: str, how: str, reason: str) -> None:
        handle = self.workers[worker]
        handle.running = None  # chaos killed it, not the slice it was running: no blame on that slice
        if how != "kill":
            raise WorkerError(f"cannot end Dask worker {worker} by {how!r}: the Dask executor can only 'kill'")
        self.executor._restart([handle])
        self._lost(handle, reason)

    # -- ending ------------------------------------------------------------------------------
    def cancel(self, grace: float) -> None:
        """The flag first (batches stop between slices), then, past ``grace``, a restart of who still runs."""
        self.cancelled = True
        for name in self.pending:
            self.pending[name] = []
        busy = [w for w in self.workers.values() if self.batches.get(w.name) and w.state == states.BUSY]
        if not busy:
            return
        try:
            self.client.run(TRAVEL.cancel, self.key, workers=[w.address for w in busy], wait=False)
        except Exception:
            pass
        deadline = time.monotonic() + grace
        inbox = self.executor.inbox
        while any(self.batches.get(w.name) for w in busy):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                kind, msg = inbox.get(timeout=left)
            except queue.Empty:
                break
            if kind == "done":
                queued = self.batches.get(msg.worker.name, [])
                if msg in queued:
                    queued.remove(msg)
                    msg.future.release()
            elif kind == "scheduler":
                inbox.put((kind, msg))  # for ``drain``
                if msg["action"] == "remove-worker":
                    w = self.executor._by_address(msg.get("worker"))
                    if w is not None:
                        self.batches[w.name] = []
                break
        stuck = [w for w in busy if self.batches.get(w.name) and w.state == states.BUSY]
        if stuck:
            self.executor._restart(stuck)
            for w in stuck:
                for batch in self.batches.pop(w.name, []):
                    batch.future.release()
                self.executor.lose_worker(
                    w, f"did not stop within {grace:g} s of being cancelled; its Dask worker was restarted")

    def close(self) -> None:
        self.executor.calling = False
        for batches in self.batches.values():
            for batch in batches:
                batch.future.release()
        self.batches = {}
        if isinstance(self.payload, distributed.Future):
            self.payload.release()
        if self.cache_news:
            for w in self.cache_news.values():
                self.executor.cache_changed(w)
            self.cache_news.clear()
        for w in self.workers.values():
            w.running = None
            if w.state == states.BUSY:
                self.executor._set_state(w, states.IDLE, "")


def dashboard_of(client: Any) -> str | None:
    """The dashboard's link, if the scheduler serves one (``dashboard_address=None``: none)."""
    try:
        if "dashboard" not in client.scheduler_info().get("services", {}):
            return None
        return client.dashboard_link
    except Exception:
        return None


def local_cluster_advice(exc: BaseException) -> str:
    """Why a ``LocalCluster`` did not start, and what to do (a script without a ``__main__`` guard, mostly)."""
    import sys

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    said = f"{type(exc).__name__}: {exc}"
    if script:
        return (f"{said}. Dask starts its worker processes with the spawn start method, which imports "
                f"{script} again in each: put the code that makes the cluster under "
                "'if __name__ == \"__main__\":' (or use the notebook)")
    return f"{said}. See the messages above from its worker processes"
