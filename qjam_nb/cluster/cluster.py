"""``Cluster``: start workers, run ``map`` calls over cached slices, shut down.

The cluster is the only place that changes worker state, and it does so on
one thread: the one that calls ``map`` (or creates the cluster). Links put
what they hear in one inbox; the cluster takes items from it, updates its
tables, tells the scheduler, and emits events. Nothing here touches a socket,
a pipe or IPython directly.
"""

from __future__ import annotations

import atexit
import pickle
import queue
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..dataset import DataSet
from ..errors import (
    ClusterClosedError,
    DataSetError,
    HostError,
    QjamError,
    RemoteError,
    ShippingError,
    VersionMismatchError,
    WorkerError,
)
from ..transport.link import Link, LinkClosed, StderrOutput
from ..transport.ssh import SshOptions
from ..worker import protocol
from ..worker.protocol import Frame, Kind, ProtocolError
from . import events as ev
from . import states
from .echo import StreamEcho
from .handshake import master_versions, mismatch
from .hosts import LOCAL, open_transports, parse_hosts
from .progress import TqdmProgress
from .reduce import OrderedFold
from .scheduler import Scheduler
from .shipping import check_signature, dumps_function, dumps_params
from .status import StatusModel
from .tracebacks import code_spans, restore

DEFAULT_HOSTS = ("local:2",)
START_TIMEOUT = 60.0
#: Tasks a worker may have in flight at once (see ``Scheduler``).
WINDOW = 4

_live_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()


class WorkerHandle:
    """The master's view of one worker: its link, state, and what it caches."""

    def __init__(self, name: str, host: str, link: Link) -> None:
        self.name = name
        self.host = host
        self.link = link
        self.state = states.STARTING
        self.reason = ""
        self.hello: dict = {}
        self.cache: dict[str, int] = {}  # slice key -> bytes

    def __repr__(self) -> str:
        return f"<worker {self.name} {self.state}>"


class Cluster:
    """Workers on one or more hosts, and ``map`` over them.

    ``Cluster(["local:2"])`` starts two worker processes on this machine;
    ``Cluster(["node1", "node2"], workers_per_host=4)`` four on each of two
    hosts reached over ssh (``user``, ``port``, ``identity``, ``python`` and
    ``accept_new_host`` apply to every ssh host; ``~/.ssh/config`` supplies the
    rest). Use it as a context manager, or call ``shutdown()``; workers also
    exit by themselves when this process ends.
    """

    def __init__(
        self,
        hosts: Sequence[str] | str | None = None,
        *,
        workers_per_host: int = 1,
        user: str | None = None,
        port: int | None = None,
        identity: str | None = None,
        python: str | None = None,
        accept_new_host: bool = False,
        echo: bool = True,
        progress: bool | None = None,
        observers: Sequence[ev.Observer] = (),
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        """``echo`` prints worker output here, tagged; ``progress`` shows a text bar
        for calls that take over half a second (default: when stderr is a terminal);
        ``observers`` are subscribed before anything starts, so they see every event."""
        self.events = ev.EventBus()
        self.status = StatusModel()
        self.events.subscribe(self.status)
        for observer in observers:
            self.events.subscribe(observer)
        if echo:
            self.events.subscribe(StreamEcho())
        if progress or (progress is None and sys.stderr is not None and sys.stderr.isatty()):
            self.events.subscribe(TqdmProgress())
        self.workers: list[WorkerHandle] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._by_link: dict[int, WorkerHandle] = {}
        self._call = 0
        self._closed = False
        self._transports: dict = {}
        self.hosts = parse_hosts(DEFAULT_HOSTS if hosts is None else hosts, workers_per_host)
        self.ssh_options = SshOptions(user, port, identity, python, accept_new_host, min(start_timeout, 30.0))
        self.versions = master_versions()
        _live_clusters.add(self)
        try:
            self._start(start_timeout)
        except BaseException:
            self.shutdown()
            raise

    # -- lifecycle -----------------------------------------------------------
    def _start(self, timeout: float) -> None:
        counters: dict[str, int] = {}
        plan = []
        for host, n in self.hosts:
            first = counters.get(host, 0)
            counters[host] = first + n
            names = [f"{host}/{i}" for i in range(first, first + n)]
            for name in names:  # before start, so observers see every worker from STARTING on
                self.events.emit(ev.WorkerStateChanged(name, states.STARTING, states.STARTING, "connecting"))
            plan.append((host, names))
        started = time.perf_counter()
        self._transports = open_transports([host for host, _ in plan], self.ssh_options)
        for host, transport in self._transports.items():
            self.events.emit(ev.HostReady(host, describe(transport), getattr(transport, "uploaded", 0),
                                          time.perf_counter() - started))
        for host, names in plan:
            for proc in self._transports[host].start(names):
                worker = WorkerHandle(proc.name, host, Link(proc, self._inbox))
                self.workers.append(worker)
                self._by_link[id(worker.link)] = worker
        deadline = time.monotonic() + timeout
        while any(w.state == states.STARTING for w in self.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                slow = [w for w in self.workers if w.state == states.STARTING]
                for w in slow:
                    self._set_state(w, states.DEAD, f"no hello within {timeout:.0f} s")
                break
            try:
                item = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            self._handle_between_calls(item)
        dead = [w for w in self.workers if w.state == states.DEAD]
        mismatched = [w for w in dead if w.reason.startswith("worker ")]
        if mismatched:
            raise VersionMismatchError("; ".join(w.reason for w in mismatched))
        if dead:
            raise WorkerError(
                "could not start " + ", ".join(f"{w.name} ({w.reason})" for w in dead)
                + ": " + "; ".join(self._last_words(w) for w in dead)
            )

    def shutdown(self) -> None:
        """Stop every worker. The cluster cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            w.link.send(Kind.BYE)
            w.link.close()
        deadline = time.monotonic() + 5
        for w in self.workers:
            proc = w.link.process
            if proc.wait(max(0.0, deadline - time.monotonic())) is None:
                proc.kill()
                proc.wait(1)
            if w.state != states.STOPPED:
                self._set_state(w, states.STOPPED, "shut down")
        for transport in self._transports.values():
            transport.close()
        _live_clusters.discard(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        alive = sum(w.state in (states.IDLE, states.BUSY) for w in self.workers)
        return f"<Cluster {alive}/{len(self.workers)} workers alive{' (shut down)' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def worker_names(self) -> list[str]:
        return [w.name for w in self.workers]

    def cache_info(self) -> dict[str, tuple[int, int]]:
        """Per worker: (cached slices, cached bytes)."""
        return {w.name: (len(w.cache), sum(w.cache.values())) for w in self.workers}

    # -- map -----------------------------------------------------------------
    def map(
        self,
        mapfunc: Callable[[Any, Any], Any],
        params: Any = None,
        dataset: Any = None,
        reduce: Callable[[Any, Any], Any] | None = None,
        *,
        slice_size: int | None = None,
    ) -> Any:
        """Run ``mapfunc(params, slice)`` on every slice and reduce the results in slice order.

        ``dataset`` is a DataSet, or a list, tuple, numpy array or ``.npy`` path
        (cut with ``slice_size`` or the default). Without one, every worker runs
        ``mapfunc(params, [])`` once. Slices stay cached on the workers, so a
        second call over the same data ships only the function and params.
        """
        if self._closed:
            raise ClusterClosedError("this cluster was shut down: start a new one (Cluster(...) or %qjam_hosts)")
        check_signature(mapfunc)
        if reduce is not None:
            check_signature(reduce, "reduce")
        data = _as_dataset(dataset, slice_size)
        func_blob = dumps_function(mapfunc)
        params_part = dumps_params(params)
        keyed = data.keys_and_sizes() if data else []
        for index, (_, size) in enumerate(keyed):
            if size > protocol.MAX_FRAME:
                raise DataSetError(
                    f"slice {index} is {size} bytes, more than one message may carry ({protocol.MAX_FRAME}): "
                    "use a smaller slice_size"
                )
        self._drain_inbox()
        alive = [w for w in self.workers if w.state in (states.IDLE, states.BUSY)]
        if not alive:
            raise WorkerError("no worker is alive: " + self._obituaries() + ". Start the cluster again.")
        if data is not None and data.kind in ("array", "npy"):
            lacking = sorted({w.host for w in alive if not w.hello.get("numpy")})
            if lacking:
                raise HostError(
                    lacking[0], "checking for numpy",
                    "the dataset is a numpy array, but the Python there has no numpy "
                    f"({', '.join(lacking)}): install numpy there, point --python at a Python with numpy, "
                    "or pass a list",
                )
        self._call += 1
        call = _Call(self._call, data, keyed, reduce, len(alive))
        call.spans = code_spans(mapfunc)
        return self._run(call, alive, func_blob, params_part)

    def _run(self, call: _Call, alive: list[WorkerHandle], func_blob: bytes, params_part: tuple) -> Any:
        holders: dict[str, set[str]] = {}
        for w in alive:
            for key in w.cache:
                holders.setdefault(key, set()).add(w.name)
        keys = [k for k, _ in call.keyed] if call.data else [None] * len(alive)
        sched = Scheduler([w.name for w in alive], keys, holders, WINDOW, pinned=call.data is None)
        self.events.emit(ev.CallStarted(call.id, len(keys), tuple(w.name for w in alive)))
        body = {"func": pickle.PickleBuffer(func_blob), "params": params_part}
        chunks = protocol.encode(Kind.CALL, body, call=call.id)
        for w in alive:
            call.bytes_sent += w.link.send_chunks(chunks, Kind.CALL, call.id)
            self._set_state(w, states.BUSY, f"call {call.id}")
        ok = False
        try:
            self._feed(call, sched)
            while not call.fold.complete:
                self._handle_in_call(self._inbox.get(), call, sched)
            ok = True
            return call.fold.value
        except BaseException:
            for w in alive:
                if w.state == states.BUSY:
                    w.link.send(Kind.CANCEL, call=call.id)
            raise
        finally:
            for w in alive:
                if w.state == states.BUSY:
                    self._set_state(w, states.IDLE, "")
            self.events.emit(ev.CallFinished(
                call.id, time.perf_counter() - call.started, call.bytes_sent,
                call.slice_bytes_sent, call.slice_bytes_cached, ok,
            ))

    def _feed(self, call: _Call, sched: Scheduler) -> None:
        for name, index in sched.assign():
            worker = self._worker(name)
            key = call.keyed[index][0] if call.data else None
            cached = key is None or key in worker.cache
            self.events.emit(ev.SliceAssigned(call.id, index, name, cached and key is not None))
            if key is not None:
                if cached:
                    call.slice_bytes_cached += call.keyed[index][1]
                else:
                    self._ship(worker, call, index)
            call.bytes_sent += worker.link.send(Kind.TASK, {"key": key}, call.id, index, dumps=pickle.dumps)

    def _ship(self, worker: WorkerHandle, call: _Call, index: int) -> None:
        key, size = call.keyed[index]
        nbytes = worker.link.send(Kind.DATA, {"key": key, "data": call.data.slice(index)}, call.id, index)
        call.bytes_sent += nbytes
        call.slice_bytes_sent += nbytes
        worker.cache[key] = size
        self.events.emit(ev.SliceSent(call.id, index, worker.name, key, nbytes))
        self._cache_changed(worker)

    # -- the inbox -------------------------------------------------------------
    def _handle_in_call(self, item: tuple, call: _Call, sched: Scheduler) -> None:
        link, msg = item
        worker = self._by_link[id(link)]
        if isinstance(msg, Frame) and msg.call == call.id:
            kind, index = msg.kind, msg.index
            if kind is Kind.RESULT:
                body = self._body(worker, msg, f"the result of slice {index}")
                if sched.done(worker.name, index):
                    self.events.emit(ev.SliceDone(call.id, index, worker.name, body["seconds"]))
                    call.fold.add(index, body["value"])
                    self._feed(call, sched)
                return
            if kind is Kind.STARTED:
                self.events.emit(ev.SliceStarted(call.id, index, worker.name))
                return
            if kind is Kind.ERROR:
                body = self._body(worker, msg, "an error report")
                err = RemoteError(worker.name, index if call.data else -1, body["type"], body["message"],
                                  restore(body["traceback"], call.spans), body["where"])
                self.events.emit(ev.ErrorEvent(worker.name, call.id, err.index, str(err.args[0])))
                raise err
            if kind is Kind.NEED:
                worker.cache.pop(self._body(worker, msg, "a NEED")["key"], None)
                self._ship(worker, call, index)
                key = call.keyed[index][0]
                call.bytes_sent += worker.link.send(Kind.TASK, {"key": key}, call.id, index, dumps=pickle.dumps)
                return
        if isinstance(msg, LinkClosed) and worker.state == states.BUSY:
            self._lost(worker, msg)
            if not sched.alive - {worker.name}:
                raise WorkerError("every worker died during the call: " + self._obituaries())
            sched.lost(worker.name)
            self._feed(call, sched)
            return
        self._handle_between_calls(item)

    def _handle_between_calls(self, item: tuple) -> None:
        link, msg = item
        worker = self._by_link[id(link)]
        if isinstance(msg, StderrOutput):
            self.events.emit(ev.StreamOutput(worker.name, "stderr", msg.text, self._call, -1))
        elif isinstance(msg, LinkClosed):
            if worker.state not in (states.DEAD, states.STOPPED):
                self._lost(worker, msg)
        elif msg.kind is Kind.STREAM:
            body = self._body(worker, msg, "worker output")
            self.events.emit(ev.StreamOutput(worker.name, body["stream"], body["text"], msg.call, msg.index))
        elif msg.kind is Kind.HELLO and worker.state == states.STARTING:
            worker.hello = self._body(worker, msg, "the hello")
            if getattr(worker.link.process, "pid", None) is None:
                worker.link.process.pid = worker.hello.get("pid")
            problem = mismatch(worker.name, worker.hello, self.versions)
            if problem:
                self._set_state(worker, states.DEAD, problem)
                worker.link.send(Kind.BYE)
                worker.link.close()
            else:
                self._set_state(worker, states.IDLE, "ready")
        # Anything else belongs to a finished or cancelled call: dropped.

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle_between_calls(item)

    def _body(self, worker: WorkerHandle, frame: Frame, what: str) -> Any:
        try:
            return frame.body()
        except ProtocolError as exc:
            raise ShippingError(
                f"{what} from worker {worker.name} could not be unpickled here: {exc.__cause__ or exc}. "
                "Return values built from modules the notebook can import too."
            ) from exc

    # -- worker bookkeeping ------------------------------------------------------
    def _lost(self, worker: WorkerHandle, closed: LinkClosed) -> None:
        status = worker.link.process.exit_status()
        reason = closed.error or (f"exited with status {status}" if status is not None else "its stream closed")
        self._set_state(worker, states.DEAD, reason)
        self.events.emit(ev.ErrorEvent(worker.name, self._call, -1, f"worker {worker.name} died: {reason}"))
        if worker.cache:
            worker.cache.clear()
            self._cache_changed(worker)

    def _set_state(self, worker: WorkerHandle, new: str, reason: str) -> None:
        old = worker.state
        if old == new:
            return
        worker.state = states.transition(old, new)
        worker.reason = reason
        self.events.emit(ev.WorkerStateChanged(worker.name, new, old, reason))

    def _cache_changed(self, worker: WorkerHandle) -> None:
        self.events.emit(ev.CacheChanged(worker.name, len(worker.cache), sum(worker.cache.values())))

    def _worker(self, name: str) -> WorkerHandle:
        return next(w for w in self.workers if w.name == name)

    def _last_words(self, worker: WorkerHandle) -> str:
        tail = list(worker.link.stderr_tail)[-5:]
        return f"{worker.name} said: " + " | ".join(tail) if tail else f"{worker.name} printed nothing"

    def _obituaries(self) -> str:
        dead = [w for w in self.workers if w.state == states.DEAD]
        return "; ".join(f"{w.name}: {w.reason} ({self._last_words(w)})" for w in dead) or "no worker was started"


def describe(transport) -> str:
    """One line on how a host was reached, for the HostReady event."""
    if getattr(transport, "host", LOCAL) == LOCAL:
        return "worker processes on this machine"
    t = transport.target
    upload = (f"uploaded {transport.uploaded / 1024:.0f} KiB to" if transport.uploaded else "found the worker in")
    return (f"{t.user}@{t.hostname}:{t.port} ({transport.cipher}); {upload} {transport.directory}; "
            f"Python {transport.python}")


class _Call:
    """One map call's own state: slices, the fold, and byte counts."""

    def __init__(self, call_id: int, data: DataSet | None, keyed: list, reduce: Any, n_workers: int) -> None:
        self.id = call_id
        self.data = data
        self.keyed = keyed
        self.fold = OrderedFold(len(keyed) if data else n_workers, reduce)
        self.started = time.perf_counter()
        self.bytes_sent = 0
        self.slice_bytes_sent = 0
        self.slice_bytes_cached = 0
        self.spans: list = []


def _as_dataset(dataset: Any, slice_size: int | None) -> DataSet | None:
    if dataset is None:
        return None
    if isinstance(dataset, DataSet) and slice_size is None:
        return dataset
    return DataSet(dataset, slice_size)


@atexit.register
def _shutdown_all() -> None:
    for cluster in list(_live_clusters):
        try:
            cluster.shutdown()
        except QjamError:
            pass
