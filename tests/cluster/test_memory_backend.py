"""The in-memory backend (``memory:N``): the whole master, and the worker core on threads, no process.

The same face as ``local`` and ssh: map, the cache, the reduce order, errors
and events; and the verbs a thread cannot honour do the honest thing
(``qjam_nb/transport/memory.py``). The worker threads are found through
their own processes (``link.process.thread``), never by name.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from qjam_nb import Cluster, DataSet
from qjam_nb import events as ev
from qjam_nb.errors import RemoteError
from qjam_nb.transport.registry import SshOptions, open_host


def square_sum(params, xs):
    return params * sum(x * x for x in xs)


def concat(a, b):
    return a + b


def as_list(params, xs):
    return [xs[0]]


def boom(params, xs):
    if xs[0] == 3:
        raise ValueError(f"no threes (got {xs[0]})")
    return xs[0]


def nap(params, xs):
    time.sleep(params)
    return len(xs)


def memory_threads(cluster: Cluster) -> list[threading.Thread]:
    """The threads of this cluster's workers (each the thread its transport started for it)."""
    return [w.link.process.thread for w in cluster.workers if w.link.process.thread.is_alive()]


@pytest.fixture(scope="module")
def cluster():
    with Cluster(["memory:2"], echo=False, heartbeat=0.2) as c:
        yield c


def test_no_process_is_started(cluster):
    assert cluster.worker_names == ["memory/0", "memory/1"]
    assert len(memory_threads(cluster)) == 2
    assert all(w.link.pid is None and not w.link.shares_memory for w in cluster.workers)
    assert open_host("memory", SshOptions()).describe().startswith("in-memory workers")


def test_map_cache_and_reduce_order(cluster):
    log = []
    unsubscribe = cluster.events.subscribe(log.append)
    try:
        data = DataSet(list(range(40)), slice_size=5)
        assert cluster.map(square_sum, 2, data) == 2 * sum(x * x for x in range(40))
        first = [e for e in log if isinstance(e, ev.CallFinished)][-1]
        assert cluster.map(square_sum, 3, data) == 3 * sum(x * x for x in range(40))
        second = [e for e in log if isinstance(e, ev.CallFinished)][-1]
        # The order of the fold is the order of the slices, whoever computed them.
        assert cluster.map(as_list, None, data, reduce=concat) == list(range(0, 40, 5))
    finally:
        unsubscribe()
    assert first.slice_bytes_sent > 0 and second.slice_bytes_sent == 0  # the second call: all cached
    slices = sum(n for n, _ in cluster.cache_info().values())
    assert slices == 8


def test_numpy_slices_and_params_travel_through_the_pipe(cluster):
    np = pytest.importorskip("numpy")
    x = np.arange(200_000, dtype=float).reshape(-1, 4)
    x.setflags(write=False)
    theta = np.ones(4)
    got = cluster.map(lambda t, xs: xs @ t, theta, DataSet(x, slice_size=10_000), reduce=lambda a, b: a + b)
    assert got.shape == (10_000,) and float(got.sum()) == float((x @ theta).sum())


def test_a_remote_error_names_worker_and_slice(cluster):
    with pytest.raises(RemoteError) as info:
        cluster.map(boom, None, list(range(6)), slice_size=1)
    assert info.value.index == 3 and "no threes (got 3)" in str(info.value)
    assert cluster.map(boom, None, [1, 2], slice_size=1) == 3  # and the cluster goes on


def test_a_timeout_cancels_and_the_next_call_runs(cluster):
    from qjam_nb.errors import CallTimeoutError

    with pytest.raises(CallTimeoutError):
        cluster.map(nap, 0.4, list(range(8)), slice_size=1, timeout=0.3)
    # interrupt() cannot stop a thread: the running slices end on their own, the queued ones are dropped.
    assert cluster.map(nap, 0.0, list(range(4)), slice_size=1) == 4


def test_shutdown_ends_the_threads():
    c = Cluster(["memory:3"], echo=False)
    threads = memory_threads(c)
    assert len(threads) == 3 and c.map(square_sum, 1, [1, 2, 3], slice_size=1) == 14
    c.shutdown()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)


def test_kill_cuts_the_streams_and_abandons_the_thread():
    c = Cluster(["memory:1"], echo=False)
    try:
        (worker,) = c.workers
        link = worker.link
        before = os.getpid()
        link.kill()
        assert link.wait(5) == -9 and link.exit_status() == -9 and link.cpu_state() is None
        assert os.getpid() == before  # (nothing was signalled: we are still here)
        link.interrupt()  # a no-op, by design
    finally:
        c.shutdown()
