"""The worker's sans-IO core: fed bytes, it answers with actions, however the bytes are cut.

No process, no thread: the tests play the shell (``worker/io.py``) by hand,
running each ``Run`` at once and reporting it back. Every scenario is fed
whole, then one byte at a time, and must give the very same actions.
"""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

from qjam_nb.worker import messages as m
from qjam_nb.worker import protocol
from qjam_nb.worker.cache import SliceCache
from qjam_nb.worker.core import Configure, Exit, Retire, Run, Send, WorkerCore


def wire(*frames: tuple) -> bytes:
    """Frames as the master writes them: (message, call, index) each."""
    return b"".join(protocol.frame_bytes(m.encode(msg, call, index)) for msg, call, index in frames)


def call_frame(func, params=None, call: int = 1, beat: float = 0.5) -> tuple:
    buffers: list = []
    data = pickle.dumps(params, protocol=5, buffer_callback=buffers.append)
    return m.Call(func=pickle.PickleBuffer(cloudpickle.dumps(func, protocol=5)),
                  params=(pickle.PickleBuffer(data), buffers), beat=beat), call, -1


def add(params, xs):
    return sum(xs) + (params or 0)


def seen(action) -> tuple:
    """An action as comparable data (functions loaded twice are not the same object)."""
    if isinstance(action, Send):
        msg = action.message
        body = msg.body()
        if isinstance(msg, m.Error):  # the traceback names this file's lines: keep its gist
            body = {k: v for k, v in body.items() if k != "traceback"}
        return ("Send", msg.kind.name, action.call, action.index, repr(body))
    if isinstance(action, Run):
        return ("Run", action.call, action.index, repr(action.params), repr(action.data), repr(action.delay))
    return (type(action).__name__, repr(action))


def play(chunks, *, eager: bool = False, raising: BaseException | None = None, core: WorkerCore | None = None):
    """Feed ``chunks``; step the queued work (after each chunk if ``eager``, else after all of them),
    running each Run at once. Returns every action, in order, made comparable."""
    core = core or WorkerCore("w/0")
    out: list = []

    def work() -> None:
        while core.pending and core.exited is None:
            for action in core.step():
                out.append(seen(action))
                if isinstance(action, Run):
                    for a in core.announce():  # as the watcher would, for a long slice
                        out.append(seen(a))
                    try:
                        if raising is not None:
                            raise raising
                        value = action.func(action.params, action.data)
                    except BaseException as exc:
                        out.extend(seen(a) for a in core.failed(action.call, action.index, exc))
                    else:
                        out.extend(seen(a) for a in core.finished(action.call, action.index, value, 0.25))

    for chunk in chunks:
        out.extend(seen(a) for a in core.receive(chunk))
        if core.exited is not None:
            return out
        if eager:
            work()
    work()
    return out


def both_ways(data: bytes, **kw) -> list:
    """The actions for ``data`` fed whole and fed one byte at a time: they must agree."""
    whole = play([data], **kw)
    bytewise = play([data[i:i + 1] for i in range(len(data))], **kw)
    assert bytewise == whole
    return whole


def framewise(*frames: tuple, **kw) -> list:
    """Frame by frame (stepping after each) and byte by byte (stepping whenever a frame completed)."""
    each = play([wire(f) for f in frames], eager=True, **kw)
    data = wire(*frames)
    assert play([data[i:i + 1] for i in range(len(data))], eager=True, **kw) == each
    return each


def test_a_call_a_missing_slice_then_its_data_with_the_task():
    data = wire(call_frame(add, 10), (m.Task("k1"), 1, 0), (m.Data("k1", data=[1, 2], task={"key": "k1"}), 1, 0))
    actions = both_ways(data)
    assert actions == [
        ("Configure", repr(Configure(0.5, None))),
        ("Send", "NEED", 1, 0, repr({"key": "k1"})),
        ("Run", 1, 0, "10", "[1, 2]", "ABSENT"),
        ("Send", "STARTED", 1, 0, "None"),
        ("Send", "RESULT", 1, 0, repr({"value": 13, "seconds": 0.25})),
    ]


def test_tasks_cache_their_data_and_run_in_order():
    data = wire(call_frame(add), (m.Data("a", data=[5]), 1, -1),
                (m.Tasks([(0, "a"), (1, "b", [1, 1]), (2, "b"), (3, None)]), 1, 0))
    actions = both_ways(data)
    runs = [a for a in actions if a[0] == "Run"]
    results = [(a[3], a[4]) for a in actions if a[:2] == ("Send", "RESULT")]
    assert [r[2] for r in runs] == [0, 1, 2, 3]
    assert results == [(0, repr({"value": 5, "seconds": 0.25})), (1, repr({"value": 2, "seconds": 0.25})),
                       (2, repr({"value": 2, "seconds": 0.25})), (3, repr({"value": 0, "seconds": 0.25}))]


def test_a_cancel_before_the_tasks_run_skips_them_and_is_answered_at_once():
    data = wire(call_frame(add), (m.Data("a", data=[1]), 1, -1), (m.Task("a"), 1, 0),
                (m.Cancel(), 1, -1), (m.Task("a"), 1, 1))
    actions = both_ways(data)
    # Fed before anything ran: the CANCEL is seen first, and no slice of call 1 runs.
    assert actions == [("Send", "CANCELLED", 1, -1, "None"), ("Configure", repr(Configure(0.5, None)))]


def test_a_cancel_while_a_slice_runs_is_answered_after_its_result():
    core = WorkerCore("w/0")
    assert core.receive(wire(call_frame(add), (m.Data("a", data=[1]), 1, -1), (m.Task("a"), 1, 0),
                             (m.Task("a"), 1, 1))) == []
    assert [type(a) for a in core.step()] == [Configure]
    assert core.step() == []  # the DATA
    (run,) = core.step()
    assert isinstance(run, Run) and run.index == 0
    for chunk in [bytes([b]) for b in wire((m.Cancel(), 1, -1))]:  # the watcher reads it meanwhile
        assert core.receive(chunk) == []  # owed: the slice still runs
    after = core.finished(1, 0, 1, 0.1)
    assert [(type(a.message).__name__, a.call, a.index) for a in after] == [("Result", 1, 0), ("Cancelled", 1, -1)]
    assert core.step() == []  # the queued TASK of the cancelled call: skipped
    assert not core.pending


def test_sigint_in_mapfunc_cancels_the_rest_of_the_call():
    data = wire(call_frame(add), (m.Tasks([(0, None), (1, None)]), 1, 0))
    actions = both_ways(data, raising=KeyboardInterrupt())
    assert [a[:4] for a in actions if a[0] == "Send"] == [("Send", "STARTED", 1, 0), ("Send", "ERROR", 1, 0)]
    assert "running mapfunc (cancelled)" in actions[-1][4]


def test_drop_forgets_slices():
    data = wire(call_frame(add), (m.Data("a", data=[1]), 1, -1), (m.Data("b", data=[2]), 1, -1),
                (m.Drop(["a", "nope"]), 0, -1), (m.Task("a"), 1, 0), (m.Task("b"), 1, 1))
    actions = both_ways(data)
    assert ("Send", "NEED", 1, 0, repr({"key": "a"})) in actions
    assert ("Send", "RESULT", 1, 1, repr({"value": 2, "seconds": 0.25})) in actions


def test_bye_exits_and_nothing_after_it_counts():
    data = wire(call_frame(add), (m.Bye(), 0, -1), (m.Task(None), 1, 0))
    assert both_ways(data) == [("Exit", repr(Exit(0)))]


def test_the_end_of_the_stream_exits_and_a_cut_frame_is_an_error():
    core = WorkerCore("w/0")
    assert core.eof() == [Exit(0)]
    core = WorkerCore("w/0")
    data = wire((m.Task("k"), 1, 0))
    assert core.receive(data[:-3]) == []
    (leave,) = core.eof()
    assert leave.status == 3 and "stream ended inside a TASK frame" in leave.reason and "w/0" in leave.reason


@pytest.mark.parametrize("garbage", [b"garbage!" * 4, b"QJ\x07" + bytes(40)])
def test_malformed_input_exits_saying_what_is_wrong(garbage):
    actions = both_ways(wire(call_frame(add)) + garbage)
    assert actions[-1][0] == "Exit"
    leave = actions[-1][1]
    assert "status=3" in leave and "w/0" in leave
    assert ("bad magic" in leave) if garbage.startswith(b"garbage") else ("protocol version 7" in leave)


def test_a_body_that_does_not_unpickle_is_an_error_report_not_an_exit():
    data = protocol.frame_bytes(protocol.encode(protocol.Kind.DATA, [1, 2]))  # a DATA body must be a dict
    actions = both_ways(data)
    assert actions == [("Send", "ERROR", 0, -1, repr({"type": "ProtocolError",
                                                      "message": "malformed DATA frame: a DATA body is a dict, "
                                                                 "not list",
                                                      "where": "handling a DATA message"}))]


def test_a_mapfunc_that_cannot_be_loaded_fails_its_call_only():
    bad = m.Call(func=pickle.PickleBuffer(b"not a pickle"), params=(pickle.PickleBuffer(pickle.dumps(None)), []),
                 beat=1.0)
    data = wire((bad, 1, -1), (m.Task(None), 1, 0), call_frame(add, call=2), (m.Task(None), 2, 0))
    actions = both_ways(data)
    kinds = [(a[1], a[2]) if a[0] == "Send" else a[0] for a in actions]
    assert kinds == ["Configure", ("ERROR", 1), "Configure", "Run", ("STARTED", 2), ("RESULT", 2)]
    assert "loading mapfunc and params" in actions[1][4]


def test_retire_and_the_straggler_delay_reach_the_shell():
    data = wire(call_frame(add), (m.Task(None, delay=0.5, retire=True), 1, 0))
    actions = both_ways(data)
    assert actions[1] == ("Retire", repr(Retire()))
    assert actions[2] == ("Run", 1, 0, "None", "[]", "0.5")


def test_a_task_of_another_call_is_ignored():
    data = wire(call_frame(add, call=2), (m.Task(None), 1, 0))
    assert both_ways(data) == [("Configure", repr(Configure(0.5, None)))]


def test_frame_by_frame_and_byte_by_byte_with_work_in_between():
    frames = (call_frame(add, 1), (m.Task("x"), 1, 0), (m.Data("x", data=[2], task={"key": "x"}), 1, 0),
              (m.Tasks([(1, "x"), (2, "y", [3])]), 1, 1), (m.Cancel(), 1, -1), (m.Task("x"), 1, 3),
              (m.Drop(["x"]), 0, -1), (m.Bye(), 0, -1))
    actions = framewise(*frames)
    assert [a[1] if a[0] == "Send" else a[0] for a in actions] == [
        "Configure", "NEED", "Run", "STARTED", "RESULT", "Run", "STARTED", "RESULT", "Run", "STARTED", "RESULT",
        "CANCELLED", "Exit"]


def test_heartbeats_are_for_the_running_slice_only():
    core = WorkerCore("w/0")
    core.receive(wire(call_frame(add), (m.Task(None), 1, 4)))
    core.step()
    (run,) = core.step()
    number = core.slices
    assert core.heartbeat(number) == [Send(m.Alive(), 1, -1)]
    assert core.announce() == [Send(m.Started(), 1, 4)] and core.announce() == []
    core.finished(1, 4, 0, 0.0)
    assert core.heartbeat(number) == [] and core.announce() == []


def test_the_cache_seam():
    cache = SliceCache()
    core = WorkerCore("w/0", cache=cache)
    core.receive(wire(call_frame(add), (m.Data("a", data=[1, 2, 3]), 1, -1)))
    while core.pending:
        core.step()
    assert list(cache.keys()) == ["a"] and cache.get("a") == [1, 2, 3] and cache.nbytes() > 0
    cache.drop("a")
    assert cache.get("a") is None and len(cache) == 0


def test_reading_straight_into_the_decoders_buffer():
    core = WorkerCore("w/0")
    data = wire(call_frame(add, 2), (m.Data("a", data=list(range(50_000))), 1, -1), (m.Task("a"), 1, 0))
    pos = 0
    while pos < len(data):
        buf = core.get_buffer()
        n = min(len(buf), len(data) - pos, 40_000)
        buf[:n] = data[pos:pos + n]
        assert core.buffer_updated(n) == []
        pos += n
    out = []
    while core.pending:
        for action in core.step():
            if isinstance(action, Run):
                out += core.finished(action.call, action.index, action.func(action.params, action.data), 0.0)
    assert out == [Send(m.Result(value=sum(range(50_000)) + 2, seconds=0.0), 1, 0)]


def test_a_small_map_by_hand_master_and_worker_joined_in_memory():
    """The master's encoders (``shipping``, ``DataSet``, ``messages.encode``) and its fold on one side,
    the worker core on the other, bytes handed across in memory: two calls, the second from the cache."""
    from qjam_nb.cluster.reduce import OrderedFold
    from qjam_nb.cluster.shipping import dumps_function, dumps_params
    from qjam_nb.dataset import DataSet

    numbers = DataSet(list(range(100)), slice_size=30)
    keyed = numbers.keys_and_sizes()
    worker = WorkerCore("memory/0")
    replies = protocol.FrameDecoder()

    def scaled_sum(params, xs):
        return params["scale"] * sum(xs)

    def serve(data: bytes) -> None:
        """The worker's side: take the bytes, do the work, hand its frames back as bytes."""
        actions = list(worker.receive(data))
        while worker.pending:
            actions += worker.step()
            while any(isinstance(a, Run) for a in actions):
                i = next(i for i, a in enumerate(actions) if isinstance(a, Run))
                run = actions.pop(i)
                actions[i:i] = worker.finished(run.call, run.index, run.func(run.params, run.data), 0.0)
        for action in actions:
            if isinstance(action, Send):
                replies.feed(protocol.frame_bytes(m.encode(action.message, action.call, action.index)))

    def map_call(call: int, scale: int, cached: set) -> tuple[int, int]:
        params = dumps_params({"scale": scale}).wire()
        frames = [m.encode(m.Call(func=pickle.PickleBuffer(dumps_function(scaled_sum)), params=params,
                                  beat=1.0), call)]
        for index, (key, _) in enumerate(keyed):
            if key in cached:
                frames.append(m.encode(m.Task(key), call, index))
            else:
                frames.append(m.encode(m.Data(key, data=numbers.slice(index), task={"key": key}), call, index))
        serve(b"".join(protocol.frame_bytes(f) for f in frames))
        fold = OrderedFold(len(keyed), None)
        shipped = sum(1 for key, _ in keyed if key not in cached)
        while (frame := replies.next_frame()) is not None:
            reply = m.decode(frame)
            assert type(reply) is m.Result, reply
            fold.add(frame.index, reply.value)
        assert fold.complete
        cached.update(key for key, _ in keyed)
        return fold.value, shipped

    cached: set = set()
    assert map_call(1, 1, cached) == (sum(range(100)), 4)
    assert map_call(2, 3, cached) == (3 * sum(range(100)), 0)  # every slice from the worker's cache
    assert set(worker.cache.keys()) == {k for k, _ in keyed}
