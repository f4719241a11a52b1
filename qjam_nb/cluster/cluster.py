"""``Cluster``: the face of qjam_nb. Start workers, run ``map`` calls over cached slices, shut down.

The face checks arguments, emits the call's events, keeps replay, the
timeline and chaos, and describes each call as a ``CallSpec`` for its
executor (``qjam_nb.executors``: today the frames executor, our workers over
byte streams). Which slice runs where, the ordered fold and blame stay here
(``call``), shared by every executor. Nothing here touches a socket, a pipe,
a frame or IPython.

Everything happens on one thread at a time: the one that calls ``map`` (or
creates the cluster); a second thread waits for the running call, and a
forked child may not use the cluster at all (``ownership``).

When a call goes wrong: a worker that dies hands its unfinished slices to the
others, and so does one that goes silent (the executor kills it); a slice
whose worker died twice is not tried a third time; a remote exception, an
interrupt or a timeout stops the other workers' slices (the executor's
``cancel``) before the error reaches the caller; and dead workers are started
again before the next call.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .. import events as ev
from ..dataset import DataSet
from ..errors import ClusterClosedError, DataSetError, HostError, QjamError, WorkerError
from ..executors.base import CallSpec, WorkerHandle
from ..executors.frames import FramesExecutor
from ..transport.registry import SshOptions
from .call import CallDriver, begin
from .chaos import Chaos
from .echo import StreamEcho
from .hosts import dask_target, parse_hosts
from .ownership import Ownership, one_at_a_time
from .progress import TqdmProgress
from .replay import ReplayLog
from .shipping import check_signature, dumps_function, dumps_params
from .speeds import SpeedBook
from .status import StatusModel
from .timeline import CallRecord, CallRecorder

DEFAULT_HOSTS = ("local:2",)
START_TIMEOUT = 60.0
#: Bounds for bringing workers back before a call, so a lost host costs seconds, not minutes.
REVIVE_TIMEOUT = 15.0
#: Seconds a running slice gets to stop after CANCEL + SIGINT before its worker is killed.
CANCEL_GRACE = 1.0
#: Seconds between a busy worker's heartbeats; silent for ``liveness.MISSES`` of them (and using no
#: CPU), it is judged unresponsive, killed and replaced.
HEARTBEAT = 1.0
#: Seconds the interpreter's exit waits for a call still running on another (daemon) thread; past
#: that its workers are left to end by themselves, as they do once this process ends (their input closes).
EXIT_WAIT = 5.0

_live_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()


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
        dask: Any = None,
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
        worker got is in ``%qjam_status`` and the widget.

        ``dask=client`` (a ``distributed.Client``), or a host entry ``dask://HOST:PORT``,
        ``dask:PATH`` (a scheduler file) or ``dask:local:N`` alone, runs the calls on the
        workers of a Dask cluster instead (``executors.dask``; ``distributed`` must be
        installed: ``pip install qjam_nb[dask]``)."""
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
        self.chaos = Chaos(self)  # kill, slow down or disconnect workers, for teaching
        self._replays = ReplayLog()
        self.speeds = SpeedBook()  # each worker's measured speed and link cost, for placing slices
        self._closed = False
        self.ssh_options = ssh_settings(ssh, start_timeout, user=user, port=port, identity=identity, python=python,
                                        accept_new_host=accept_new_host)
        dask_cluster = _dask_target(hosts, workers_per_host, dask)
        if dask_cluster is not None:
            self.hosts = []
            self._executor = _dask_executor(self.events, dask_cluster, float(heartbeat))
        else:
            self.hosts = parse_hosts(DEFAULT_HOSTS if hosts is None else hosts, workers_per_host)
            self._executor = FramesExecutor(self.events, self.hosts, self.ssh_options, blas_threads, float(heartbeat))
        _live_clusters.add(self)
        try:
            self._executor.start(start_timeout)
        except BaseException:
            self.shutdown()
            raise

    # -- lifecycle -----------------------------------------------------------
    @one_at_a_time
    def restart(self) -> list[str]:
        """Start every dead worker again now (reconnecting hosts, ignoring backoff); returns their names."""
        self._check_open()
        self._executor.drain()
        return self._revived(self._executor.revive(START_TIMEOUT, now=True))

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
        self._executor.stop()
        _live_clusters.discard(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        alive = len(self._executor.alive())
        return f"<Cluster {alive}/{len(self.workers)} workers alive{' (shut down)' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def workers(self) -> list[WorkerHandle]:
        return self._executor.workers

    @property
    def dashboard(self) -> str | None:
        """Where the executor's own view of the workers is, if it has one (a Dask cluster's dashboard)."""
        return getattr(self._executor, "dashboard", None)

    @property
    def worker_names(self) -> list[str]:
        return [w.name for w in self.workers]

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
        executor = self._executor
        limit = executor.max_slice_bytes
        for index, (_, size) in enumerate(keyed):
            if size > limit:
                raise DataSetError(
                    f"slice {index} is {size} bytes, more than one message may carry ({limit}): "
                    "use a smaller slice_size"
                )
        executor.drain()
        self._revived(executor.revive(REVIVE_TIMEOUT))  # workers that died since the last call come back first
        alive = executor.alive()
        if not alive:
            raise WorkerError("no worker is alive: " + executor.obituaries() + ". Try cluster.restart() "
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
        executor.set_call(self._call)
        spec = CallSpec(self._call, func_blob, params_part, data, keyed, timeout, self.chaos.delays)
        driver = CallDriver(spec, alive, reduce, mapfunc, self.events, self.chaos, self.speeds)
        return self._run(driver, alive, guessed is not None)

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

    def _run(self, driver: CallDriver, alive: list[WorkerHandle], guessed: bool) -> Any:
        spec = driver.spec
        # The call's first events reach the observers once its first messages are out: the
        # workers start while the views catch up (~40 µs sooner for a small call).
        self.events.hold()
        try:
            self.events.emit(ev.CallStarted(spec.id, driver.fold.n, tuple([w.name for w in alive]),
                                            spec.params.digest))
            run = begin(self._executor, driver, alive)
        finally:
            self.events.release()
        ok = False
        try:
            # While the workers start: check guessed keys, and copy params for replay (true keys only).
            if guessed:
                driver.check_keys(spec.data.keys_and_sizes())
            self._replays.remember(spec.id, spec.func, spec.params, spec.data, spec.keyed, driver.fold.n,
                                   driver.mapfunc)
            if self.chaos.armed:
                self.chaos.progress(driver)
            value = driver.drive(run)
            ok = True
            return value
        except BaseException:
            run.cancel(CANCEL_GRACE)
            self._revived(self._executor.revive(REVIVE_TIMEOUT))  # whoever had to be killed is back for the next call
            raise
        finally:
            run.close()
            driver.learn()
            driver.run = None  # no cycle with the driver: the results it folded go when the caller drops them
            self.events.emit(ev.CallFinished(
                spec.id, time.perf_counter() - driver.started_at, run.bytes_sent,
                run.slice_bytes_sent, run.slice_bytes_cached, ok, driver.fold.seconds,
            ))

    def _revived(self, workers: list[WorkerHandle]) -> list[str]:
        """Workers started again: new processes, measured afresh (a stopped or hung one was slow, not its host)."""
        names = [w.name for w in workers]
        if names:
            self.speeds.forget(names)
        return names

    def _worker(self, name: str) -> WorkerHandle:
        return next(w for w in self.workers if w.name == name)


def _dask_target(hosts: Any, workers_per_host: int, client: Any) -> tuple[str, Any] | None:
    """The Dask cluster asked for (``dask=`` or a ``dask:`` host entry), or None."""
    if client is None:
        return dask_target(hosts, workers_per_host)
    if hosts is not None:
        raise TypeError("give either hosts or dask=client, not both: the Dask client's workers are the cluster's")
    if not callable(getattr(client, "scheduler_info", None)) or not callable(getattr(client, "submit", None)):
        raise TypeError(f"dask= takes a distributed.Client, not {type(client).__name__}")
    return "client", client


def _dask_executor(events: ev.EventBus, target: tuple[str, Any], heartbeat: float) -> Any:
    """The Dask executor; ``distributed`` is imported only now, when a Dask cluster is asked for."""
    try:
        from ..executors.dask import DaskExecutor
    except ImportError as exc:
        raise HostError(f"dask:{target[1]}" if target[0] != "client" else "dask", "importing distributed",
                        f"{exc}. Install Dask's distributed here: pip install 'qjam_nb[dask]'") from exc
    return DaskExecutor(events, target, heartbeat)


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
