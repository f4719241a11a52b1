"""The text views: the tqdm bar, the tagged echo of worker output, the status table."""

from __future__ import annotations

import io

from conftest import WITH_DASK

from qjam_nb import events as ev
from qjam_nb.cluster.echo import StreamEcho
from qjam_nb.cluster.progress import TqdmProgress
from qjam_nb.cluster.status import StatusModel

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)


def test_tqdm_bar_counts_the_slices_of_a_real_call(make_cluster):
    out = io.StringIO()
    cluster = make_cluster(["local:2"])
    bar = TqdmProgress(file=out, delay=0, mininterval=0)
    cluster.events.subscribe(bar)
    assert cluster.map(lambda p, xs: len(xs), None, list(range(12)), slice_size=1) == 12
    text = out.getvalue()
    assert "qjam call 1" in text
    assert "12/12" in text
    assert bar.bar is None  # closed at the end of the call


def test_echo_tags_every_line_and_never_splits_one(capsys):
    echo = StreamEcho()
    echo(ev.StreamOutput("local/0", "stdout", "hel", 1, 0))
    echo(ev.StreamOutput("local/1", "stdout", "other\n", 1, 1))
    echo(ev.StreamOutput("local/0", "stdout", "lo\nwor", 1, 0))
    echo(ev.StreamOutput("local/0", "stderr", "oops\n", 1, 0))
    echo(ev.CallFinished(1, 0.1, 0, 0, 0, True))  # flushes the partial "wor"
    captured = capsys.readouterr()
    assert captured.out == "[local/1] other\n[local/0] hello\n[local/0] wor\n"
    assert captured.err == "[local/0] oops\n"


def test_status_model_folds_events_into_rows_and_a_table():
    model = StatusModel()
    for event in [
        ev.WorkerStateChanged("local/0", "idle", "starting", "ready"),
        ev.CallStarted(1, 3, ("local/0",)),
        ev.SliceAssigned(1, 0, "local/0", False),
        ev.SliceAssigned(1, 1, "local/0", False),
        ev.SliceDone(1, 0, "local/0", 0.01),
        ev.CacheChanged("local/0", 2, 3 << 20),
    ]:
        model(event)
    row = model.rows["local/0"]
    assert (row.state, row.done, row.assigned, row.cached_slices) == ("idle", 1, 2, 2)
    assert model.call.running and model.call.done == 1
    table = model.text()
    assert "local/0" in table and "1/2" in table and "3.0 MiB" in table
    assert "call 1: 1/3 slices, running" in table
    model(ev.CallFinished(1, 0.5, 10, 3 << 20, 0, True))
    assert "done in 0.500 s; 3.0 MiB of slices shipped" in model.text()


def test_a_dropped_copy_is_no_longer_counted_as_its_workers_task():
    """A copy that lost its race never reports done: without this, its worker's row read 1/2 forever."""
    model = StatusModel()
    for event in [
        ev.CallStarted(1, 2, ("a", "b")),
        ev.SliceAssigned(1, 0, "a", True),
        ev.SliceAssigned(1, 1, "b", True),
        ev.SliceDone(1, 1, "b", 0.01),
        ev.SliceTaken(1, 0, "b", "speculative", "a"),
        ev.SliceAssigned(1, 0, "b", False),
        ev.SliceDone(1, 0, "b", 0.01),
        ev.SliceDropped(1, 0, "a", "b"),
        ev.CallFinished(1, 0.5, 10, 0, 0, True),
    ]:
        model(event)
    assert [(r.name, r.done, r.assigned) for r in model.rows.values()] == [("a", 0, 0), ("b", 2, 2)]
    assert model.call.done == 2
    assert (model.call.stolen, model.call.copies, model.call.rebalanced) == (0, 1, 0)
    assert "call 1: 2/2 slices, done in 0.500 s;" in model.text() and model.text().endswith("; healed: 1 copy")
    model(ev.CallStarted(2, 1, ("a", "b")))
    assert model.call.copies == 0


def test_events_held_reach_observers_in_order_once_released():
    bus = ev.EventBus()
    seen = []
    bus.subscribe(seen.append)
    bus.hold()
    bus.emit(ev.CallStarted(1, 2, ("a",)))
    bus.emit(ev.SliceAssigned(1, 0, "a", True))
    assert seen == []
    bus.release()
    assert [type(e) for e in seen] == [ev.CallStarted, ev.SliceAssigned]
    bus.release()  # nothing held: nothing again
    bus.emit(ev.SliceDone(1, 0, "a", 0.1))
    assert len(seen) == 3


def test_a_live_observer_gets_held_events_at_once_and_only_once():
    bus = ev.EventBus()
    order = []

    class Live:
        live = True
        kinds = frozenset({ev.CallStarted, ev.SliceDone})

        def __call__(self, event):
            order.append(("live", type(event)))

    bus.subscribe(Live())
    bus.subscribe(lambda e: order.append(("view", type(e))))
    bus.hold()
    bus.emit(ev.CallStarted(1, 2, ("a",)))
    bus.emit(ev.SliceAssigned(1, 0, "a", True))
    assert order == [("live", ev.CallStarted)]
    bus.release()
    bus.emit(ev.SliceDone(1, 0, "a", 0.1))
    assert order == [("live", ev.CallStarted), ("view", ev.CallStarted), ("view", ev.SliceAssigned),
                     ("live", ev.SliceDone), ("view", ev.SliceDone)]


def test_an_observer_with_kinds_gets_only_those_and_one_without_gets_all():
    bus = ev.EventBus()
    everything, calls = [], []

    class CallsOnly:
        kinds = frozenset({ev.CallStarted, ev.CallFinished})

        def __call__(self, event):
            calls.append(type(event))

    bus.subscribe(everything.append)
    stop = bus.subscribe(CallsOnly())
    bus.emit(ev.CallStarted(1, 1, ("a",)))
    bus.emit(ev.SliceDone(1, 0, "a", 0.1))
    bus.emit(ev.CallFinished(1, 0.2, 0, 0, 0, True))
    assert calls == [ev.CallStarted, ev.CallFinished]
    assert len(everything) == 3
    stop()
    bus.emit(ev.CallStarted(2, 1, ("a",)))
    assert len(calls) == 2 and len(everything) == 4  # unsubscribed: routes made again without it


def test_events_are_immutable_and_equal_only_events_of_their_own_kind():
    import pytest

    done = ev.SliceDone(1, 2, "w", 0.5)
    assert done == ev.SliceDone(1, 2, "w", 0.5) and hash(done) == hash(ev.SliceDone(1, 2, "w", 0.5))
    assert done != (1, 2, "w", 0.5) and ev.SliceStarted(1, 2, "w") != ev.SliceLost(1, 2, "w")
    assert len({ev.SliceStarted(1, 2, "w"), ev.SliceLost(1, 2, "w")}) == 2
    assert done.worker == "w" and repr(done) == "SliceDone(call=1, index=2, worker='w', seconds=0.5)"
    with pytest.raises(AttributeError):
        done.worker = "other"  # type: ignore[misc]
