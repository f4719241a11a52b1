"""The frames executor: our own workers over byte streams (local pipes, ssh channels, memory).

Its rules, beside the seam's (``executors.base``):

* The pool (``executors.pool``) owns the workers and their links; a call
  (``FramesCall``) reads the pool's inbox on the call's thread, and writes
  frames to the workers' links.
* A worker's tasks of one pass leave as one TASKS frame, in the order the face
  handed them out: its cached slices, and small slices of plain items it
  lacks, which travel in the frame with their task; other slices go singly,
  in their DATA frame. Writes are held while one read's worth of messages is
  handled and the face feeds the windows, so they leave in one write
  (``flush``).
* Local workers get big params and slices through shared memory (the
  cluster's params arena, ``sharedmem.export``), and may answer with big
  results through their own arena (``sharedmem.LentResults``).
* Twice a heartbeat, a busy worker with work in flight that died unseen or
  went silent is lost (``liveness``).
"""

from __future__ import annotations

import pickle
import queue
import time
from collections.abc import Sequence

from .. import events as ev
from .. import states
from ..errors import WorkerError
from ..transport.link import LinkClosed
from ..transport.registry import SshOptions
from ..worker import messages as m
from ..worker import protocol, sharedmem
from ..worker.protocol import Frame
from .base import CallReports, CallRunBase, CallSpec
from .liveness import Liveness
from .pool import FramesWorker, WorkerPool

#: A slice of plain items up to this size (pickled) may travel in a TASKS frame, with its task.
BATCH_SLICE_BYTES = 64 << 10
#: How chaos ends a worker: SIGKILL, or its stream closed as a failing network would.
KILL, DROP = "kill", "drop"


class FramesExecutor:
    """``executors.base.Executor`` over the transports' byte streams."""

    def __init__(self, events: ev.EventBus, plan: Sequence[tuple[str, int]], ssh_options: SshOptions,
                 blas_threads: int | bool | None, heartbeat: float) -> None:
        self.events = events
        self.pool = WorkerPool(events, plan, ssh_options, blas_threads)
        self.liveness = Liveness(heartbeat)
        self.params_arena: sharedmem.Arena | None = None  # big params for local workers (see _call_frames)
        # Workers that ended a call with work in flight and have not been heard from since: name -> their
        # link's ``heard`` count then (``Liveness.start``, ``FramesCall._check_liveness``).
        self.owing: dict[str, int] = {}
        sharedmem.sweep()  # what masters that were killed left in /dev/shm (see sharedmem)

    @property
    def max_slice_bytes(self) -> int:
        return protocol.MAX_FRAME  # read when asked: QJAM_MAX_FRAME (and tests) may change it

    @property
    def workers(self) -> list[FramesWorker]:
        return self.pool.workers

    def start(self, timeout: float) -> None:
        self.pool.start(timeout)

    def revive(self, timeout: float, now: bool = False) -> list[FramesWorker]:
        if now:
            self.pool.retry.clear()
        return self.pool.revive(timeout)

    def drain(self) -> None:
        self.pool.drain()

    def alive(self) -> list[FramesWorker]:
        return self.pool.alive()

    def obituaries(self) -> str:
        return self.pool.obituaries()

    def set_call(self, call: int) -> None:
        self.pool.current_call = call

    def begin(self, spec: CallSpec, workers: list[FramesWorker], reports: CallReports) -> FramesCall:
        return FramesCall(self, spec, workers, reports)

    def lose(self, worker: str, how: str, reason: str) -> None:
        handle = next(w for w in self.pool.workers if w.name == worker)
        end_link(handle, how)
        self.pool.lose(handle, reason=reason)

    def stop(self) -> None:
        self.pool.stop()
        if self.params_arena is not None:
            self.params_arena.close()


class FramesCall(CallRunBase):
    """One call on the frames executor: ``executors.base.CallRun``."""

    def __init__(self, executor: FramesExecutor, spec: CallSpec, workers: list[FramesWorker],
                 reports: CallReports) -> None:
        super().__init__(spec, workers, reports)
        self.executor = executor
        self.pool = executor.pool
        self.alive = list(workers)
        self.shared: list[dict] = []  # slices handed over in shared memory
        self.cache_news: dict[str, FramesWorker] = {}  # workers sent slices since the last CacheChanged
        self.in_flight: dict[str, set[int]] = {w.name: set() for w in workers}  # sent, not answered
        self.held = False
        self.cancelled = False
        self.live = executor.liveness
        self.owing = executor.owing
        self.live.start(self.owing)
        calls = self._call_frames(spec)
        self._hold()  # the CALL and the first slices go out together
        for w in workers:
            chunks, beside = calls[w in self.local]
            self.bytes_sent += w.link.send_chunks(chunks, m.Call.kind, spec.id) + beside
            self.pool.set_state(w, states.BUSY, f"call {spec.id}")

    def _call_frames(self, spec: CallSpec) -> dict[bool, tuple[list, int]]:
        """The CALL frame for workers on other machines and for local ones (by ``shares_memory``),
        with the bytes each gets beside the pipe. Local workers read big params from the
        executor's params arena, written once for all of them, and may answer through theirs."""
        func = pickle.PickleBuffer(spec.func)
        frames = {}
        local = self.local = [w for w in self.alive if w.link.shares_memory]
        for w in local:  # before a worker may write its arena again: is its last result still in use?
            if w.results.lent and w.results.retained():
                w.retire_arena = True
        beat = self.live.beat
        if len(local) < len(self.alive):
            frames[False] = m.encode_body(m.Call, {"func": func, "params": spec.params.wire(), "beat": beat},
                                          spec.id), 0
        if local:
            # "share": where the workers may put big results (our own directory), if shared memory is here.
            call = {"func": func, "params": spec.params.wire(), "beat": beat, "share": sharedmem.sharing_directory()}
            beside = 0
            views = sharedmem.byte_views(spec.params.buffers)
            if views is not None:
                beside = sum(v.nbytes for v in views)
                ex = self.executor
                try:
                    ex.params_arena = sharedmem.arena_for(ex.params_arena, beside, sharedmem.PARAMS_PREFIX)
                    call["params"], call["params_arena"] = (spec.params.data, []), ex.params_arena.write(views)
                except OSError:  # /dev/shm full: the pipe it is
                    beside = 0
            frames[True] = m.encode_body(m.Call, call, spec.id), beside
        return frames

    # -- writing ---------------------------------------------------------------------------
    def _hold(self) -> None:
        if not self.held:
            self.held = True
            for w in self.alive:
                w.link.hold()

    def flush(self) -> None:
        if self.held:
            self.held = False
            for w in self.alive:
                w.link.release()
        if self.cache_news:
            self._cache_news()

    def assign(self, tasks: Sequence[tuple[str, int]]) -> None:
        spec = self.spec
        batches: dict[str, list] = {}  # worker -> the entries of its TASKS frame to come
        data = spec.data
        plain = data is not None and data.plain_items()
        items, step = (data.data, data.slice_size) if plain else (None, 0)
        delays = spec.delays
        emit = self.executor.events.emit
        for name, index in tasks:
            worker = self.workers[name]
            self.in_flight[name].add(index)
            key, size = spec.keyed[index] if data is not None else (None, 0)
            cached = key is None or key in worker.cache
            emit(ev.SliceAssigned(self.id, index, name, cached and key is not None, key, size))
            if delays or worker.retire_arena:  # a task body of its own
                if name in batches:
                    self._send_tasks(worker, batches.pop(name))
                if cached:
                    self.slice_bytes_cached += size
                    self._task(worker, index, key)
                else:
                    self._ship_and_task(worker, index)
                continue
            if cached:
                self.slice_bytes_cached += size
                entry: tuple = (index, key)
            elif plain and size <= BATCH_SLICE_BYTES:
                entry = (index, key, items[index * step:(index + 1) * step])
                self._shipped(worker, index, key, size)
            else:
                if name in batches:  # the worker runs its tasks in the order they come
                    self._send_tasks(worker, batches.pop(name))
                self._ship_and_task(worker, index)
                continue
            batch = batches.get(name)
            if batch is None:
                batches[name] = [entry]
            else:
                batch.append(entry)
        for name, batch in batches.items():
            self._send_tasks(self.workers[name], batch)

    def _send_tasks(self, worker: FramesWorker, batch: list[tuple]) -> None:
        if len(batch) == 1 and len(batch[0]) == 2:  # one cached slice: a TASK
            self._task(worker, *batch[0])
        else:
            self.bytes_sent += worker.link.send_body(m.Tasks, batch, self.id, batch[0][0])

    def _task(self, worker: FramesWorker, index: int, key: bytes | None) -> None:
        self.bytes_sent += worker.link.send_body(m.Task, self._task_body(worker, key), self.id, index)

    def _task_body(self, worker: FramesWorker, key: bytes | None) -> dict:
        """A TASK's body (``messages.Task``'s wire shape): the key, a straggler's delay, ``retire``."""
        delay = self.spec.delays.get(worker.name) if self.spec.delays else None
        body = {"key": key, "delay": delay} if delay else {"key": key}
        if worker.retire_arena:
            body["retire"], worker.retire_arena = True, False
        return body

    def _ship_and_task(self, worker: FramesWorker, index: int) -> None:
        """Send slice ``index`` with its task in one DATA frame (one frame to make and read, one wake-up)."""
        key, _ = self.spec.keyed[index]
        data = self.spec.data.slice(index)
        task = self._task_body(worker, key)
        handle = None
        if worker.link.shares_memory:
            try:
                handle = sharedmem.export(data)
            except OSError:  # /dev/shm full or missing: the pipe it is
                handle = None
        if handle is not None:
            self.shared.append(handle)
            nbytes = worker.link.send(m.Data(key, shared=handle, task=task), self.id, index)
            nbytes += handle["nbytes"]  # shipped all the same, only faster
        else:
            nbytes = worker.link.send(m.Data(key, data=data, task=task), self.id, index)
        self.bytes_sent += nbytes
        self._shipped(worker, index, key, nbytes)

    def _shipped(self, worker: FramesWorker, index: int, key: bytes, nbytes: int) -> None:
        """Slice ``index`` is on its way to ``worker`` (``nbytes`` of it; in a TASKS frame, its pickle)."""
        self.slice_bytes_sent += nbytes
        worker.remember(key, self.spec.keyed[index][1])
        self.executor.events.emit(ev.SliceSent(self.id, index, worker.name, key, nbytes))
        self.cache_news[worker.name] = worker

    def _cache_news(self) -> None:
        """One CacheChanged per worker whose cache grew since the last (a batch of slices, not one each)."""
        for worker in self.cache_news.values():
            self.pool.cache_changed(worker)
        self.cache_news.clear()

    def rekeyed(self, keyed: list) -> None:
        self.spec.keyed = keyed

    # -- reading ---------------------------------------------------------------------------
    def wait(self, deadline: float | None) -> bool:
        """What the workers said next, all of one read handled before anything is written back
        (the writes wait for ``flush``); meanwhile, twice a heartbeat, who has gone silent."""
        live = self.live
        inbox = self.pool.inbox
        while True:
            now = time.monotonic()
            wait = live.next_check - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            try:
                item = inbox.get(timeout=max(0.0, wait))
            except queue.Empty:
                item = None
            if item is not None:
                self._hold()
                self._handle(item)
                while (item := inbox.get_read()) is not None:
                    self._handle(item)
                if live.due():
                    self._check_liveness()
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if live.due():
                self._hold()
                self._check_liveness()
                self.flush()

    def _handle(self, item: tuple) -> None:
        link, msg = item
        worker = self.pool.worker_of(link)
        if worker is not None and isinstance(msg, Frame) and msg.call == self.id and worker.state != states.DEAD:
            handler = HANDLERS_BY_KIND.get(msg.kind)
            if handler is not None:
                handler(self, worker, msg)
                return
        elif worker is not None and isinstance(msg, LinkClosed) and worker.state == states.BUSY:
            self.live.forget(worker.name)
            self._lost(worker, msg)
            return
        self.pool.handle(item)

    # The call's handlers (``HANDLERS``, by message class).
    def _on_started(self, worker: FramesWorker, frame: Frame) -> None:
        worker.running = (self.id, frame.index)
        self.reports.started(worker.name, frame.index)

    def _on_result(self, worker: FramesWorker, frame: Frame) -> None:
        index = frame.index
        if worker.running == (self.id, index):
            worker.running = None
        if self.stale and self._stale(worker, index):
            return
        value, seconds = self.pool.result(worker, frame)
        self.in_flight[worker.name].discard(index)
        self.reports.finished(worker.name, index, value, seconds)

    def _on_error(self, worker: FramesWorker, frame: Frame) -> None:
        if worker.running == (self.id, frame.index):
            worker.running = None
        if self.stale and self._stale(worker, frame.index):
            return
        error = self.pool.decode(worker, frame, "an error report")
        self.reports.failed(worker.name, frame.index, error.body())

    def _on_need(self, worker: FramesWorker, frame: Frame) -> None:
        if self.stale and self._stale(worker, frame.index):
            return
        worker.forget(self.pool.decode(worker, frame, "a NEED").key)
        self._ship_and_task(worker, frame.index)

    def _check_liveness(self) -> None:
        """Lose the workers with work in flight that died unseen or went silent (``liveness``).

        A death is also learnt from the exit status (a helper that mapfunc forked can
        keep the stream open after its worker died); a silent worker is marked
        unresponsive and killed with its process group, without waiting on it (a
        process in uninterruptible sleep cannot be reaped).
        """
        live = self.live
        for name, in_flight in list(self.in_flight.items()):
            worker = self.workers[name]
            if not (in_flight or name in self.owing) or worker.state != states.BUSY:
                continue
            link = worker.link
            if link.exit_status() is not None:
                link.detach()
                self._lost(worker, LinkClosed(None))
                continue
            # A worker that still owes answers to the last call must be heard: writes into its pipe
            # prove nothing (a stopped process's pipe takes them until it is full).
            traffic = link.heard if name in self.owing else link.traffic
            verdict = live.verdict(name, traffic, link.partial, link.cpu_state, link.waiting)
            if verdict is None:
                continue
            live.forget(name)
            self.pool.set_state(worker, states.UNRESPONSIVE, verdict)
            link.detach()
            link.close()
            link.kill()
            self._lost(worker, None, reason=f"{verdict}; killed")

    def _lost(self, worker: FramesWorker, closed: LinkClosed | None, reason: str = "") -> None:
        running = worker.running
        self.pool.lose(worker, closed, reason)
        self.in_flight[worker.name] = set()
        self.reports.lost(worker.name, running[1] if running and running[0] == self.id else None,
                          self.pool.obituary(worker).split(": ", 1)[1])

    def lose(self, worker: str, how: str, reason: str) -> None:
        handle = self.workers[worker]
        end_link(handle, how)
        handle.running = None  # chaos killed it, not the slice it was running: no blame on that slice
        # As if its link had closed: dead now. Frames still on their way from it are dropped
        # (``_handle`` ignores dead workers' frames).
        self._lost(handle, LinkClosed(reason))

    # -- ending ------------------------------------------------------------------------------
    def cancel(self, grace: float) -> None:
        self.cancelled = True
        self.flush()
        self.pool.settle(self.id, self.alive, grace)

    def close(self) -> None:
        if not self.cancelled:
            # Copies that lost the race (``SliceDropped``) may still be queued or running there: CANCEL
            # skips the queued ones; a running one ends by itself, its answer dropped as a past call's.
            owing = self.executor.owing = {}
            for w in self.alive:
                if w.state != states.BUSY:
                    continue
                if self.in_flight[w.name]:
                    w.link.send(m.Cancel(), call=self.id)
                    owing[w.name] = w.link.heard
                elif self.owing.get(w.name) == w.link.heard:  # still not a word from it
                    owing[w.name] = w.link.heard
        self.flush()
        for handle in self.shared:  # taken (and deleted) by the workers, unless one died first
            sharedmem.discard(handle)
        self._cache_news()
        for w in self.alive:
            if w.state == states.BUSY:
                self.pool.set_state(w, states.IDLE, "")


#: What the workers say of the running call, by message class (through the table); a class without a
#: handler here (output, a hello, an ALIVE, a finished call's answers) goes to the pool.
HANDLERS = {m.Started: FramesCall._on_started, m.Result: FramesCall._on_result, m.Error: FramesCall._on_error,
            m.Need: FramesCall._on_need}
m.check_handlers(HANDLERS, m.W2M)  # only registered messages that come from workers
HANDLERS_BY_KIND = {cls.kind: handler for cls, handler in HANDLERS.items()}  # (the same table, read by the header)


def end_link(worker: FramesWorker, how: str) -> None:
    """SIGKILL the worker (before its stdin closes: it would exit on that by itself), or close its
    connection as a failing network would (its stdin pipe here, its ssh channel over ssh)."""
    if how == KILL:
        worker.link.kill()
        worker.link.close()
    elif how == DROP:
        worker.link.drop()
    else:
        raise WorkerError(f"cannot end worker {worker.name} by {how!r}: say {KILL!r} or {DROP!r}")
