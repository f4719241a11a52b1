"""``Cluster``: start workers, run ``map`` calls over cached slices, shut down.

Everything happens on one thread at a time: the one that calls ``map`` (or
creates the cluster); a second thread waits for the running call, and a
forked child may not use the cluster at all (``ownership``). It takes what
the workers said from the pool's inbox (reading their streams itself,
``transport.link.Inbox``), tells the scheduler, folds results and emits events. Worker lifecycles
(start, revive, lose, cancel, stop) live in ``pool``. Nothing here touches a
socket, a pipe or IPython directly.

When a call goes wrong: a worker that dies hands its unfinished slices to the
others, and so does one that goes silent (``liveness``: it is killed); a
slice whose worker died twice is not tried a third time; a remote
exception, an interrupt or a timeout stops the other workers' slices
(CANCEL, then SIGINT, then kill) before the error reaches the caller; and
dead workers are started again before the next call.
"""

from __future__ import annotations

import atexit
import dataclasses
import pickle
import queue
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import cloudpickle

from ..dataset import DataSet, pickles_plainly
from ..errors import (
    CallTimeoutError,
    ClusterClosedError,
    DataSetError,
    HostError,
    QjamError,
    RemoteError,
    WorkerError,
)
from ..transport.link import LinkClosed
from ..transport.registry import SshOptions
from ..worker import protocol, sharedmem
from ..worker.protocol import Frame, Kind
from . import events as ev
from . import states
from .chaos import Chaos
from .echo import StreamEcho
from .hosts import parse_hosts
from .liveness import Liveness
from .ownership import Ownership, one_at_a_time
from .pool import WorkerHandle, WorkerPool
from .progress import TqdmProgress
from .reduce import OrderedFold
from .replay import ReplayLog
from .scheduler import Scheduler
from .shipping import check_signature, dumps_function, dumps_params
from .status import StatusModel
from .timeline import CallRecord, CallRecorder, params_hash
from .tracebacks import code_spans, restore

DEFAULT_HOSTS = ("local:2",)
START_TIMEOUT = 60.0
#: Bounds for bringing workers back before a call, so a lost host costs seconds, not minutes.
REVIVE_TIMEOUT = 15.0
#: Tasks a worker may have in flight when a call starts (``Scheduler.observe`` adapts it).
WINDOW = 4
#: Seconds a running slice gets to stop after CANCEL + SIGINT before its worker is killed.
CANCEL_GRACE = 1.0
#: Deaths a slice may cause before it is not tried again.
MAX_SLICE_DEATHS = 2
#: Seconds between a busy worker's heartbeats; silent for ``liveness.MISSES`` of them (and using no
#: CPU), it is judged unresponsive, killed and replaced.
HEARTBEAT = 1.0
#: Seconds the interpreter's exit waits for a call still running on another (daemon) thread; past
#: that its workers are left to end by themselves, as they do once this process ends (their input closes).
EXIT_WAIT = 5.0

_live_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()


#: A slice of plain items up to this size (pickled) may travel in a TASKS frame, with its task.
BATCH_SLICE_BYTES = 64 << 10


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
        ssh: SshOptions | None = None,
        user: str | None = None,
        port: int | None = None,
        identity: str | None = None,
        python: str | None = None,
        accept_new_host: bool = False,
        echo: bool = True,
        progress: bool | None = None,
        observers: Sequence[ev.Observer] = (),
        start_timeout: float = START_TIMEOUT,
        heartbeat: float = HEARTBEAT,
        blas_threads: int | bool | None = None,
    ) -> None:
        """``echo`` prints worker output here, tagged; ``progress`` shows a text bar
        for calls that take over half a second (default: when stderr is a terminal);
        ``observers`` are subscribed before anything starts, so they see every event;
        ``start_timeout`` bounds connecting, bootstrapping and the handshake;
        ``heartbeat`` is the seconds between a busy worker's signs of life: one silent
        for three of them, and not using CPU, is killed and its slices run elsewhere.

        ``ssh=SshOptions(user=, port=, identity=, python=, accept_new_host=)`` holds what is said of
        every ssh host; the same settings may be given as keyword arguments of their own instead (not
        both). Connecting takes ``start_timeout`` or ``SshOptions.timeout`` (30 s), the shorter, at most.

        ``blas_threads`` bounds each worker's BLAS/OpenMP threads (the ``OMP_NUM_THREADS``,
        ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``VECLIB_MAXIMUM_THREADS`` and
        ``NUMEXPR_NUM_THREADS`` it starts with), since numpy in every worker would otherwise start a
        thread per core and the workers of a host fight over its cores. None (the default): its share,
        max(1, usable cores of its host // this cluster's workers there), where usable is what its
        affinity and cgroup CPU quota allow, unless its environment sets one of them (a local
        worker's is this process's; an ssh worker's is its host's: this one's is not forwarded),
        which is then kept; N: N threads each; False: the environment is left alone. What each
        worker got is in ``%qjam_status`` and the widget."""
        if not (blas_threads is None or blas_threads is False
                or (type(blas_threads) is int and blas_threads >= 1)):
            raise ValueError(f"blas_threads must be None (each worker's share of its host's cores), a whole "
                             f"number of threads of at least 1, or False (leave them alone), not {blas_threads!r}")
        if isinstance(heartbeat, bool) or not (isinstance(heartbeat, (int, float)) and 0 < heartbeat < float("inf")):
            raise ValueError(f"heartbeat must be a positive number of seconds, not {heartbeat!r}")
        self._ownership = Ownership()  # this process's, one call at a time
        self.events = ev.EventBus()
        self.status = StatusModel()
        self.events.subscribe(self.status)
        self._recorder = CallRecorder()
        self.events.subscribe(self._recorder)
        if echo:
            self.events.subscribe(StreamEcho())
        if progress or (progress is None and sys.stderr is not None and sys.stderr.isatty()):
            self.events.subscribe(TqdmProgress())
        for observer in observers:
            self.events.subscribe(observer)
        self._call = 0
        self._liveness = Liveness(float(heartbeat))
        self.chaos = Chaos(self)  # kill, slow down or disconnect workers, for teaching
        self._replays = ReplayLog()
        self._params_arena: sharedmem.Arena | None = None  # big params for local workers (see _call_frames)
        self._closed = False
        self.hosts = parse_hosts(DEFAULT_HOSTS if hosts is None else hosts, workers_per_host)
        self.ssh_options = ssh_settings(ssh, start_timeout, user=user, port=port, identity=identity, python=python,
                                        accept_new_host=accept_new_host)
        self._pool = WorkerPool(self.events, self.hosts, self.ssh_options, blas_threads)
        _live_clusters.add(self)
        sharedmem.sweep()  # what masters that were killed left in /dev/shm (see sharedmem)
        try:
            self._pool.start(start_timeout)
        except BaseException:
            self.shutdown()
            raise

    # -- lifecycle -----------------------------------------------------------
    @one_at_a_time
    def restart(self) -> list[str]:
        """Start every dead worker again now (reconnecting hosts, ignoring backoff); returns their names."""
        self._check_open()
        self._pool.drain()
        self._pool.retry.clear()
        return [w.name for w in self._pool.revive(START_TIMEOUT)]

    def shutdown(self) -> None:
        """Stop every worker. The cluster cannot be used afterwards.

        From another thread while a call runs, it waits for that call to end (bounded by the
        call's ``timeout=``). In a forked child it only marks the child's copy closed: the
        workers are the parent's, and carry on serving it.
        """
        if self._ownership.forked():
            self._closed = True
            _live_clusters.discard(self)
            return
        if self._closed:
            return
        with self._ownership.turn("shutdown"):
            self._stop()

    def _stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.stop()
        if self._params_arena is not None:
            self._params_arena.close()
        _live_clusters.discard(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        alive = len(self._pool.alive())
        return f"<Cluster {alive}/{len(self.workers)} workers alive{' (shut down)' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def workers(self) -> list[WorkerHandle]:
        return self._pool.workers

    @property
    def worker_names(self) -> list[str]:
        return [w.name for w in self.workers]

    @property
    def _transports(self) -> dict:
        return self._pool.transports

    @property
    def last_call(self) -> CallRecord | None:
        """Who ran which slice, when, shipped or cached, and the totals, for the running or last call."""
        return self._recorder.last

    @property
    def calls(self) -> list[CallRecord]:
        """The records of the last calls (up to ``timeline.KEEP_CALLS``), oldest first."""
        return list(self._recorder.calls)

    def cache_info(self) -> dict[str, tuple[int, int]]:
        """Per worker: (cached slices, cached bytes)."""
        return {w.name: (len(w.cache), w.cached_bytes) for w in self.workers}

    def _check_open(self) -> None:
        self._ownership.check()  # in a forked child: before anything else (and no lock)
        if self._closed:
            raise ClusterClosedError("this cluster was shut down: start a new one (Cluster(...) or %qjam_hosts)")

    # -- map -----------------------------------------------------------------
    @one_at_a_time
    def map(
        self,
        mapfunc: Callable[[Any, Any], Any],
        params: Any = None,
        dataset: Any = None,
        reduce: Callable[[Any, Any], Any] | None = None,
        *,
        slice_size: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``mapfunc(params, slice)`` on every slice and reduce the results in slice order.

        ``dataset`` is a DataSet, or a list, tuple, numpy array or ``.npy`` path
        (cut with ``slice_size`` or the default). Without one, every worker runs
        ``mapfunc(params, [])`` once. Slices stay cached on the workers, so a
        second call over the same data ships only the function and params.
        ``timeout`` (seconds) bounds the call: past it the call is stopped on
        every worker and ``CallTimeoutError`` is raised. Calls from several
        threads take turns; in a forked child, make a new ``Cluster``.
        """
        self._check_open()
        check_signature(mapfunc)
        if reduce is not None:
            check_signature(reduce, "reduce")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        data = _as_dataset(dataset, slice_size)
        func_blob = dumps_function(mapfunc)
        params_part = dumps_params(params)
        guessed = data.guessed_keys() if data is not None else None  # a big writable array: checked later
        keyed = guessed if guessed is not None else (data.keys_and_sizes() if data is not None else [])
        for index, (_, size) in enumerate(keyed):
            if size > protocol.MAX_FRAME:
                raise DataSetError(
                    f"slice {index} is {size} bytes, more than one message may carry ({protocol.MAX_FRAME}): "
                    "use a smaller slice_size"
                )
        pool = self._pool
        pool.drain()
        pool.revive(REVIVE_TIMEOUT)  # workers that died since the last call come back first
        alive = pool.alive()
        if not alive:
            raise WorkerError("no worker is alive: " + pool.obituaries() + ". Try cluster.restart() "
                              "(or %qjam_hosts again) once the hosts are reachable.")
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
        pool.current_call = self._call
        call = _Call(self._call, data, keyed, reduce, alive, timeout)
        call.mapfunc = mapfunc  # for pointing a remote traceback back at the cell (code_spans)
        call.guessed = guessed is not None
        return self._run(call, alive, func_blob, params_part)

    def replay(self, slice: int, call: int | None = None) -> Any:
        """Run ``mapfunc`` on one slice of the last call (or of ``call``, one of the last 3) here, to debug it.

        The function and params are unpickled from the very bytes the workers
        got, and the slice must still hash to what it did then, so the result
        is bit-identical to what the worker returned (and an exception raises
        here, where ``%debug`` and breakpoints work). ``ReplayError`` says why
        a slice cannot be replayed: out of range, call forgotten, data changed.
        """
        self._ownership.check()
        return self._replays.replay(slice, call)

    def _run(self, call: _Call, alive: list[WorkerHandle], func_blob: bytes, params_part: tuple) -> Any:
        keys = [k for k, _ in call.keyed] if call.data is not None else [None] * len(alive)
        sched = Scheduler([w.name for w in alive], keys, _CacheHolders(alive), WINDOW, pinned=call.data is None)
        # The call's first events reach the observers once its first messages are out: the
        # workers start while the views catch up (~40 µs sooner for a small call).
        self.events.hold()
        try:
            self.events.emit(ev.CallStarted(call.id, len(keys), tuple(call.workers),
                                            params_hash(params_part)))
            calls = self._call_frames(call, alive, func_blob, params_part)
            for w in alive:
                w.link.hold()  # the CALL and the first slices go out together
                chunks, beside = calls[w.link.shares_memory]
                call.bytes_sent += w.link.send_chunks(chunks, Kind.CALL, call.id) + beside
                self._pool.set_state(w, states.BUSY, f"call {call.id}")
        except BaseException:
            self.events.release()
            raise
        ok = False
        live = self._liveness
        live.start()
        try:
            try:
                self._feed(call, sched)
                self._cache_news(call)
            finally:
                for w in alive:
                    w.link.release()
                self.events.release()
            # While the workers start: check guessed keys, and copy params for replay (true keys only).
            if call.guessed:
                self._check_guess(call, sched)
            self._replays.remember(call.id, func_blob, params_part, call.data, call.keyed, call.fold.n, call.mapfunc)
            if self.chaos.armed:
                self.chaos.progress(call, sched)
            inbox = self._pool.inbox
            while not call.fold.complete:
                item = self._next(call, sched)
                # Everything one read brought is handled before anything is written back, so the
                # next slices for a worker leave in one write (one wake-up), not one per result.
                for w in alive:
                    w.link.hold()
                try:
                    self._handle(item, call, sched)
                    while not call.fold.complete and (item := inbox.get_read()) is not None:
                        self._handle(item, call, sched)
                    if live.due():
                        self._check_liveness(call, sched)
                    if call.hungry:  # once for all the results of this read: one pass over the windows
                        call.hungry = False
                        self._feed(call, sched)
                    if call.cache_news:
                        self._cache_news(call)
                finally:
                    for w in alive:
                        w.link.release()
            ok = True
            return call.fold.value
        except BaseException:
            self._pool.settle(call.id, alive, CANCEL_GRACE)
            self._pool.revive(REVIVE_TIMEOUT)  # whoever had to be killed is back for the next call
            raise
        finally:
            for handle in call.shared:  # taken (and deleted) by the workers, unless one died first
                sharedmem.discard(handle)
            self._cache_news(call)
            for w in alive:
                if w.state == states.BUSY:
                    self._pool.set_state(w, states.IDLE, "")
            self.events.emit(ev.CallFinished(
                call.id, time.perf_counter() - call.started, call.bytes_sent,
                call.slice_bytes_sent, call.slice_bytes_cached, ok, call.fold.seconds,
            ))

    def _call_frames(self, call: _Call, alive: list[WorkerHandle], func_blob: bytes,
                     params_part: tuple) -> dict[bool, tuple[list, int]]:
        """The CALL frame for workers on other machines and for local ones (by ``shares_memory``),
        with the bytes each gets beside the pipe. Local workers read big params from the
        cluster's params arena, written once for all of them, and may answer through theirs."""
        func = pickle.PickleBuffer(func_blob)
        frames = {}
        local = [w for w in alive if w.link.shares_memory]
        for w in local:  # before a worker may write its arena again: is its last result still in use?
            if w.results.lent and w.results.retained():
                w.retire_arena = True
        if len(local) < len(alive):
            body = {"func": func, "params": params_part, "beat": self._liveness.beat}
            frames[False] = protocol.encode(Kind.CALL, body, call=call.id), 0
        if local:
            # "share": where the workers may put big results (our own directory), if shared memory is here.
            body = {"func": func, "params": params_part, "beat": self._liveness.beat,
                    "share": sharedmem.sharing_directory()}
            beside = 0
            views = sharedmem.byte_views(params_part[1])
            if views is not None:
                beside = sum(v.nbytes for v in views)
                try:
                    self._params_arena = sharedmem.arena_for(self._params_arena, beside, sharedmem.PARAMS_PREFIX)
                    body.update(params=(params_part[0], []), params_arena=self._params_arena.write(views))
                except OSError:  # /dev/shm full: the pipe it is
                    beside = 0
            frames[True] = protocol.encode(Kind.CALL, body, call=call.id), beside
        return frames

    def _next(self, call: _Call, sched: Scheduler) -> tuple:
        """What a worker said next; meanwhile, twice a heartbeat, who has gone silent."""
        live = self._liveness
        while True:
            now = time.monotonic()
            wait = live.next_check - now
            if call.deadline is not None:
                wait = min(wait, call.deadline - now)
            try:
                return self._pool.inbox.get(timeout=max(0.0, wait))
            except queue.Empty:
                pass
            if call.deadline is not None and time.monotonic() >= call.deadline:
                missing = call.fold.n - call.fold.next
                raise CallTimeoutError(
                    f"call {call.id} did not finish within {call.timeout:g} s: {missing} of {call.fold.n} slices "
                    "had no result yet; the call was stopped on every worker. Give map a larger timeout=, "
                    "or use smaller slices."
                ) from None
            if live.due():
                for w in call.workers.values():
                    w.link.hold()
                try:
                    self._check_liveness(call, sched)
                finally:
                    for w in call.workers.values():
                        w.link.release()

    def _check_liveness(self, call: _Call, sched: Scheduler) -> None:
        """Lose the workers with work in flight that died unseen or went silent (``liveness``).

        A death is also learnt from the exit status (a helper that mapfunc forked can
        keep the stream open after its worker died); a silent worker is marked
        unresponsive and killed with its process group, without waiting on it (a
        process in uninterruptible sleep cannot be reaped).
        """
        live = self._liveness
        for name, in_flight in list(sched.in_flight.items()):
            worker = call.workers[name]
            if not in_flight or worker.state != states.BUSY:
                continue
            link = worker.link
            if link.exit_status() is not None:
                link.detach()
                self._lost_in_call(worker, LinkClosed(None), call, sched)
                continue
            verdict = live.verdict(name, link.traffic, link.partial, link.cpu_state, link.waiting)
            if verdict is None:
                continue
            live.forget(name)
            self._pool.set_state(worker, states.UNRESPONSIVE, verdict)
            link.detach()
            link.close()
            link.kill()
            self._lost_in_call(worker, None, call, sched, reason=f"{verdict}; killed")

    def _feed(self, call: _Call, sched: Scheduler) -> None:
        """Hand out what the windows allow.

        A worker's tasks of one pass go as one TASKS frame (one pickle, and one
        frame to read, for many tasks), in the order they were handed out: its
        cached slices, and small slices of plain items it lacks, which travel in
        the frame with their task. Other slices go singly, in their DATA frame.
        """
        batches: dict[str, list] = {}  # worker -> the entries of its TASKS frame to come
        plain = call.data is not None and call.data.plain_items()
        items, step = (call.data.data, call.data.slice_size) if plain else (None, 0)
        for name, index in sched.assign():
            worker = call.workers[name]
            key, size = call.keyed[index] if call.data is not None else (None, 0)
            cached = key is None or key in worker.cache
            self.events.emit(ev.SliceAssigned(call.id, index, name, cached and key is not None, key, size))
            if self.chaos.delays or worker.retire_arena:  # a task body of its own
                if name in batches:
                    self._send_tasks(worker, call, batches.pop(name))
                if cached:
                    call.slice_bytes_cached += size
                    self._task(worker, call, index, key)
                else:
                    self._ship_and_task(worker, call, index)
                continue
            if cached:
                call.slice_bytes_cached += size
                entry: tuple = (index, key)
            elif plain and size <= BATCH_SLICE_BYTES:
                entry = (index, key, items[index * step:(index + 1) * step])
                self._shipped(worker, call, index, key, size)
            else:
                if name in batches:  # the worker runs its tasks in the order they come
                    self._send_tasks(worker, call, batches.pop(name))
                self._ship_and_task(worker, call, index)
                continue
            batch = batches.get(name)
            if batch is None:
                batches[name] = [entry]
            else:
                batch.append(entry)
        for name, batch in batches.items():
            self._send_tasks(call.workers[name], call, batch)

    def _send_tasks(self, worker: WorkerHandle, call: _Call, batch: list[tuple]) -> None:
        if len(batch) == 1 and len(batch[0]) == 2:  # one cached slice: a TASK
            self._task(worker, call, *batch[0])
        else:
            call.bytes_sent += worker.link.send(Kind.TASKS, batch, call.id, batch[0][0], dumps=pickle.dumps)

    def _check_guess(self, call: _Call, sched: Scheduler) -> None:
        """Hash the slices (the workers compute meanwhile) and redo those whose guessed key was wrong.

        A slice that changed in place since the last call was handed out under
        its old key: its worker computes on the old content. If that task is
        still queued here, it is placed again by its true key; if it went out,
        the worker's answer to it is dropped when it comes (``call.stale``) and
        the slice, reported lost, is handed out again (its new data shipped).
        """
        true = call.data.keys_and_sizes()
        for index, ((guess, _), (key, size)) in enumerate(zip(call.keyed, true, strict=True)):
            if guess == key:
                continue
            holder = next((w for w, held in sched.in_flight.items() if index in held), None)
            sched.rekey(index, key, holder)
            if holder is not None:
                call.stale[(holder, index)] = call.stale.get((holder, index), 0) + 1
                call.slice_bytes_cached -= size
                self.events.emit(ev.SliceLost(call.id, index, holder))
        call.keyed = true
        self._feed(call, sched)

    def _task(self, worker: WorkerHandle, call: _Call, index: int, key: str | None) -> None:
        call.bytes_sent += worker.link.send(Kind.TASK, self._task_body(worker, key), call.id, index, dumps=pickle.dumps)

    def _task_body(self, worker: WorkerHandle, key: str | None) -> dict:
        body = self.chaos.task_body(worker.name, key) if self.chaos.delays else {"key": key}
        if worker.retire_arena:
            body["retire"], worker.retire_arena = True, False
        return body

    def _ship_and_task(self, worker: WorkerHandle, call: _Call, index: int) -> None:
        """Send slice ``index`` with its task in one DATA frame (one frame to make and read, one wake-up)."""
        self._ship(worker, call, index, self._task_body(worker, call.keyed[index][0]))

    def _ship(self, worker: WorkerHandle, call: _Call, index: int, task: dict) -> None:
        key, size = call.keyed[index]
        data = call.data.slice(index)
        body = {"key": key, "data": data, "task": task}
        if worker.link.shares_memory:
            try:
                handle = sharedmem.export(data)
            except OSError:  # /dev/shm full or missing: the pipe it is
                handle = None
            if handle is not None:
                body = {"key": key, "shared": handle, "task": task}
                call.shared.append(handle)
        dumps = pickle.dumps if pickles_plainly(data) else cloudpickle.dumps
        nbytes = worker.link.send(Kind.DATA, body, call.id, index, dumps=dumps)
        if "shared" in body:
            nbytes += body["shared"]["nbytes"]  # shipped all the same, only faster
        call.bytes_sent += nbytes
        self._shipped(worker, call, index, key, nbytes)

    def _shipped(self, worker: WorkerHandle, call: _Call, index: int, key: str, nbytes: int) -> None:
        """Slice ``index`` is on its way to ``worker`` (``nbytes`` of it; in a TASKS frame, its pickle)."""
        call.slice_bytes_sent += nbytes
        worker.remember(key, call.keyed[index][1])
        self.events.emit(ev.SliceSent(call.id, index, worker.name, key, nbytes))
        call.cache_news[worker.name] = worker

    # -- the inbox, during a call --------------------------------------------------
    def _handle(self, item: tuple, call: _Call, sched: Scheduler) -> None:
        link, msg = item
        worker = self._pool.worker_of(link)
        if worker is not None and isinstance(msg, Frame) and msg.call == call.id and worker.state != states.DEAD:
            kind, index = msg.kind, msg.index
            if call.stale and kind in (Kind.RESULT, Kind.ERROR, Kind.NEED) and (worker.name, index) in call.stale:
                self._drop_stale(worker, kind, index, call)
                return
            if kind is Kind.STARTED:
                worker.running = (call.id, index)
                self.events.emit(ev.SliceStarted(call.id, index, worker.name))
                return
            if worker.running is not None and kind in (Kind.RESULT, Kind.ERROR) and worker.running == (call.id, index):
                worker.running = None
            if kind is Kind.RESULT:
                value, seconds = self._pool.result(worker, msg)
                if sched.done(worker.name, index):
                    self.events.emit(ev.SliceDone(call.id, index, worker.name, seconds))
                    sched.observe(seconds)
                    call.fold.add(index, value)
                    call.hungry = True
                    if self.chaos.armed:
                        self.chaos.progress(call, sched)
                return
            if kind is Kind.ERROR:
                body = self._pool.body(worker, msg, "an error report")
                err = RemoteError(worker.name, index if call.data is not None else -1, body["type"],
                                  body["message"] + _hint(body), restore(body["traceback"], code_spans(call.mapfunc)),
                                  body["where"])
                self.events.emit(ev.ErrorEvent(worker.name, call.id, err.index, str(err.args[0])))
                raise err
            if kind is Kind.NEED:
                worker.forget(self._pool.body(worker, msg, "a NEED")["key"])
                self._ship_and_task(worker, call, index)
                return
        if worker is not None and isinstance(msg, LinkClosed) and worker.state == states.BUSY:
            self._liveness.forget(worker.name)
            self._lost_in_call(worker, msg, call, sched)
            return
        self._pool.handle(item)

    def _drop_stale(self, worker: WorkerHandle, kind: Kind, index: int, call: _Call) -> None:
        """The answer to a task sent under a wrongly guessed key: of old data, so of no use."""
        left = call.stale.pop((worker.name, index)) - 1
        if left:
            call.stale[(worker.name, index)] = left
        if kind is not Kind.NEED and worker.running == (call.id, index):
            worker.running = None

    def _lost_in_call(self, worker: WorkerHandle, closed: LinkClosed | None, call: _Call, sched: Scheduler,
                      reason: str = "") -> None:
        """A worker died mid-call: blame the slice it was running, and give its slices to the others."""
        running = worker.running
        self._pool.lose(worker, closed, reason)
        if running and running[0] == call.id:
            blamed = running[1]
        else:  # no STARTED (a slice under 3 ms): it ran its tasks in order, so the oldest unfinished one
            blamed = min(sched.in_flight.get(worker.name, ()), default=None)
        what = f"{worker.name} died running slice {blamed}" if blamed is not None else f"{worker.name} died"
        call.deaths.append(f"{what}: {self._pool.obituary(worker).split(': ', 1)[1]}")
        if blamed is not None:
            call.blame[blamed] = call.blame.get(blamed, 0) + 1
            if call.blame[blamed] >= MAX_SLICE_DEATHS:
                raise WorkerError(
                    f"slice {blamed} killed {call.blame[blamed]} workers in turn, so it is not tried again: "
                    + "; ".join(d for d in call.deaths if f"running slice {blamed}:" in d)
                    + ". Dead workers are started again for the next call."
                )
        if not sched.alive - {worker.name}:
            raise WorkerError("every worker died during the call: " + "; ".join(call.deaths)
                              + ". Dead workers are started again for the next call.")
        in_flight = sorted(sched.in_flight.get(worker.name, ()))
        sched.lost(worker.name)
        for index in in_flight:  # before they are assigned again, so a timeline shows the move in order
            self.events.emit(ev.SliceLost(call.id, index, worker.name))
        self._feed(call, sched)

    def _cache_news(self, call: _Call) -> None:
        """One CacheChanged per worker whose cache grew since the last (a batch of slices, not one each)."""
        for worker in call.cache_news.values():
            self._pool.cache_changed(worker)
        call.cache_news.clear()

    def _worker(self, name: str) -> WorkerHandle:
        return next(w for w in self.workers if w.name == name)


class _Call:
    """One map call's own state: slices, the fold, deaths, byte counts and deadline."""

    def __init__(self, call_id: int, data: DataSet | None, keyed: list, reduce: Any, alive: list[WorkerHandle],
                 timeout: float | None) -> None:
        self.id = call_id
        self.data = data
        self.keyed = keyed
        self.workers = {w.name: w for w in alive}  # the call's workers, by name
        self.fold = OrderedFold(len(keyed) if data is not None else len(alive), reduce)
        self.started = time.perf_counter()
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.bytes_sent = 0
        self.slice_bytes_sent = 0
        self.slice_bytes_cached = 0
        self.mapfunc: Any = None
        self.deaths: list[str] = []
        self.blame: dict[int, int] = {}  # slice -> workers that died running it
        self.shared: list[dict] = []  # slices handed over in shared memory
        self.guessed = False  # keyed holds guessed keys until _check_guess
        self.cache_news: dict[str, WorkerHandle] = {}  # workers sent slices since the last CacheChanged
        self.stale: dict[tuple[str, int], int] = {}  # (worker, slice) -> answers to drop (guessed wrong)
        self.hungry = False  # results came in since the windows were last filled


class _CacheHolders(Mapping):
    """Slice key -> the call's workers that cache it, looked up as the scheduler places each slice:
    the cost follows the call's slices, not the size of every worker's cache."""

    def __init__(self, workers: list[WorkerHandle]) -> None:
        self._caches = [(w.name, w.cache) for w in workers]

    def get(self, key: str, default: Any = ()) -> Any:
        found = ()
        for name, cache in self._caches:  # (a loop, not a generator: this runs once a slice)
            if key in cache:
                found += (name,)
        return found or default

    def __getitem__(self, key: str) -> tuple[str, ...]:
        found = self.get(key)
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(key for _, cache in self._caches for key in cache))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _hint(error: dict) -> str:
    """What to do about the usual remote errors that are not the mapfunc's own fault."""
    if error["where"] == "pickling the result":
        return ". Results travel back pickled: return plain data (numbers, arrays, lists, dicts)"
    if error["type"] == "ModuleNotFoundError" and not error["where"].startswith("running"):
        return (". The worker cannot import that module: functions and classes from modules are shipped by "
                "reference. Install the module there, define the code in the notebook, or call "
                "cloudpickle.register_pickle_by_value(module) first")
    return ""


def _as_dataset(dataset: Any, slice_size: int | None) -> DataSet | None:
    if dataset is None:
        return None
    if isinstance(dataset, DataSet) and slice_size is None:
        return dataset
    return DataSet(dataset, slice_size)


@atexit.register
def _shutdown_all() -> None:
    """Stop this process's clusters; a forked child's copies are only marked closed (see ``shutdown``)."""
    for cluster in list(_live_clusters):
        try:
            if cluster._ownership.forked():
                cluster.shutdown()
                continue
            with cluster._ownership.turn("shutdown", EXIT_WAIT):
                cluster._stop()
        except (QjamError, TimeoutError):
            pass


def ssh_settings(ssh: SshOptions | None, start_timeout: float, **keywords: Any) -> SshOptions:
    """``Cluster``'s ssh settings, from ``ssh=`` or from the keyword arguments of each (the older form)."""
    given = [name for name, value in keywords.items() if value is not None and value is not False]
    if ssh is None:
        return SshOptions(**keywords, timeout=min(start_timeout, SshOptions.timeout))
    if not isinstance(ssh, SshOptions):
        raise TypeError(f"ssh= takes an SshOptions (from qjam_nb import SshOptions), not {type(ssh).__name__}")
    if given:
        raise TypeError(f"give ssh settings once: either ssh=SshOptions(...) or {', '.join(n + '=' for n in given)} "
                        f"on their own, not both (here: put {given[0]}= inside SshOptions)")
    return dataclasses.replace(ssh, timeout=min(start_timeout, ssh.timeout))
