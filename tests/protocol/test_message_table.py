"""The wire vocabulary is one table (``qjam_nb/worker/messages.py``), and every end goes through it.

The table rendered from the registry must appear, as is, in ``docs/design.md``;
every ``Kind`` must have its class; the bytes of each message must be what the
code sent before the classes came; and no module may dispatch on a frame's kind
outside the table: no comparison with a ``Kind`` member (``kind is Kind.X``,
``kind == Kind.X``, ``kind in (Kind.X, ...)``, ``case Kind.X:``) anywhere but in
``messages.py`` and ``protocol.py``, read from the source with ``ast``.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import cloudpickle
import pytest

from qjam_nb.worker import messages as m
from qjam_nb.worker import protocol
from qjam_nb.worker.protocol import Kind

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qjam_nb"
#: The two modules that may name kinds in comparisons: the frames, and the table itself.
TABLE_MODULES = {PACKAGE / "worker" / "protocol.py", PACKAGE / "worker" / "messages.py"}


def test_every_kind_has_one_registered_class():
    assert m.unregistered() == []
    assert sorted(m.BY_KIND, key=int) == sorted(Kind, key=int)
    for kind, cls in m.BY_KIND.items():
        assert cls.kind is kind and issubclass(cls, m.Message)
        assert cls.direction in (m.M2W, m.W2M) and cls.codec in (m.PICKLE, m.CLOUDPICKLE)
        assert cls.meaning, f"{cls.__name__} needs a docstring: it is the table's last column"


def test_design_md_shows_the_table_rendered_from_the_registry():
    design = (ROOT / "docs" / "design.md").read_text()
    table = m.render_table()
    assert table in design, (
        "docs/design.md §3 must contain the message table as rendered by "
        "qjam_nb.worker.messages.render_table(); paste this in its place:\n\n" + table
    )


def test_the_protocol_module_keeps_no_table_of_its_own():
    # the prose table drifted from the code once; the rendered one replaces it
    text = (PACKAGE / "worker" / "protocol.py").read_text()
    assert "========= =====" not in text


# -- the bytes did not change -------------------------------------------------------------------------------

def old_and_new() -> list[tuple[str, list, list]]:
    """(name, chunks as the code encoded them before the table, chunks through the table) for each kind."""
    params = (pickle.PickleBuffer(pickle.dumps([1.5, 2.5], protocol=5)), [])
    func = pickle.PickleBuffer(cloudpickle.dumps(len, protocol=5))
    hello = {"worker": "h/0", "pid": 7, "host": "h", "blas": {"threads": 1, "source": "share:2"},
             "python": "3.11.7", "cloudpickle": "3.0.0", "numpy": None, "protocol": 1}
    error = {"type": "ValueError", "message": "no", "traceback": "Traceback...", "where": "running mapfunc"}
    task = {"key": "k", "delay": 0.5}
    pairs = [
        ("HELLO", protocol.encode(Kind.HELLO, hello, dumps=cloudpickle.dumps), m.encode(m.Hello(**hello))),
        ("CALL", protocol.encode(Kind.CALL, {"func": func, "params": params, "beat": 1.0}, call=3),
         m.encode(m.Call(func=func, params=params, beat=1.0), 3)),
        ("CALL local", protocol.encode(Kind.CALL, {"func": func, "params": (params[0], []), "beat": 1.0,
                                                   "share": "/dev/shm/x", "params_arena": {"path": "p"}}, call=3),
         m.encode(m.Call(func=func, params=(params[0], []), beat=1.0, share="/dev/shm/x",
                         params_arena={"path": "p"}), 3)),
        ("DATA plain", protocol.encode(Kind.DATA, {"key": "k", "data": [1, 2.0, "x"], "task": {"key": "k"}},
                                       call=3, index=2, dumps=pickle.dumps),
         m.encode(m.Data("k", data=[1, 2.0, "x"], task={"key": "k"}), 3, 2)),
        ("DATA rows", protocol.encode(Kind.DATA, {"key": "k", "data": [(1, 2), (3, 4)], "task": {"key": "k"}},
                                      call=3, index=2, dumps=cloudpickle.dumps),
         m.encode(m.Data("k", data=[(1, 2), (3, 4)], task={"key": "k"}), 3, 2)),
        ("DATA shared", protocol.encode(Kind.DATA, {"key": "k", "shared": {"path": "s", "nbytes": 8},
                                                    "task": {"key": "k"}}, call=3, index=2, dumps=cloudpickle.dumps),
         m.encode(m.Data("k", shared={"path": "s", "nbytes": 8}, task={"key": "k"}), 3, 2)),
        ("TASK", protocol.encode(Kind.TASK, {"key": "k"}, call=3, index=1, dumps=pickle.dumps),
         m.encode(m.Task("k"), 3, 1)),
        ("TASK chaos", protocol.encode(Kind.TASK, {**task, "retire": True}, call=3, index=1, dumps=pickle.dumps),
         m.encode(m.Task("k", delay=0.5, retire=True), 3, 1)),
        ("TASKS", protocol.encode(Kind.TASKS, [(0, "a"), (1, "b", [1, 2])], call=3, index=0, dumps=pickle.dumps),
         m.encode(m.Tasks([(0, "a"), (1, "b", [1, 2])]), 3, 0)),
        ("NEED", protocol.encode(Kind.NEED, {"key": "k"}, call=3, index=1, dumps=pickle.dumps),
         m.encode(m.Need("k"), 3, 1)),
        ("STARTED", protocol.encode(Kind.STARTED, None, call=3, index=1, dumps=pickle.dumps),
         m.encode(m.Started(), 3, 1)),
        ("ALIVE", protocol.encode(Kind.ALIVE, None, call=3, index=-1, dumps=pickle.dumps),
         m.encode(m.Alive(), 3, -1)),
        ("RESULT", protocol.encode(Kind.RESULT, {"value": [1, "2"], "seconds": 0.5}, call=3, index=1,
                                   dumps=m.dumps_plain_first),
         m.encode(m.Result(value=[1, "2"], seconds=0.5), 3, 1)),
        ("RESULT lent", protocol.encode(Kind.RESULT, {"pickled": pickle.PickleBuffer(b"xy"), "arena": {"path": "a"},
                                                      "seconds": 0.5}, call=3, index=1, dumps=m.dumps_plain_first),
         m.encode(m.Result(pickled=pickle.PickleBuffer(b"xy"), arena={"path": "a"}, seconds=0.5), 3, 1)),
        ("ERROR", protocol.encode(Kind.ERROR, error, call=3, index=1, dumps=cloudpickle.dumps),
         m.encode(m.Error(**error), 3, 1)),
        ("STREAM", protocol.encode(Kind.STREAM, {"stream": "stdout", "text": "hi\n"}, call=3, index=1,
                                   dumps=cloudpickle.dumps),
         m.encode(m.Stream("stdout", "hi\n"), 3, 1)),
        ("CANCEL", protocol.encode(Kind.CANCEL, None, call=3, dumps=cloudpickle.dumps), m.encode(m.Cancel(), 3)),
        ("CANCELLED", protocol.encode(Kind.CANCELLED, None, call=3, dumps=pickle.dumps), m.encode(m.Cancelled(), 3)),
        ("DROP", protocol.encode(Kind.DROP, {"keys": ["a", "b"]}, dumps=cloudpickle.dumps),
         m.encode(m.Drop(["a", "b"]))),
        ("BYE", protocol.encode(Kind.BYE, None, dumps=cloudpickle.dumps), m.encode(m.Bye())),
    ]
    return pairs


@pytest.mark.parametrize("name, old, new", old_and_new(), ids=[p[0] for p in old_and_new()])
def test_the_bytes_on_the_wire_did_not_change(name, old, new):
    assert protocol.frame_bytes(new) == protocol.frame_bytes(old)


def test_every_kind_decodes_to_its_class_and_back():
    for name, _, chunks in old_and_new():
        decoder = protocol.FrameDecoder()
        decoder.feed(protocol.frame_bytes(chunks))
        frame = decoder.next_frame()
        msg = m.decode(frame)
        assert type(msg) is m.message_class(frame) is m.BY_KIND[frame.kind], name
        if len(frame.parts) == 1:  # (out-of-band parts come back as memoryviews, which pickle in band only)
            decoder.feed(protocol.frame_bytes(m.encode(msg, frame.call, frame.index)))
            assert m.decode(decoder.next_frame()) == msg, name


def test_user_objects_travel_by_cloudpickle_plain_data_by_pickle():
    def local(x):
        return x

    assert m.plain([1, 2.0, "x", None, (1, 2), {"a": [1]}]) and m.plain(b"xy")
    assert not m.plain([local]) and not m.plain({"f": local}) and not m.plain(object())
    body = m.Data("k", data=[local]).body()
    assert m.dumps_of(m.Data)(body, protocol=5) == cloudpickle.dumps(body, protocol=5)
    assert m.dumps_of(m.Task) is pickle.dumps
    np = pytest.importorskip("numpy")
    assert m.plain(np.arange(3)) and not m.plain(np.array([local], dtype=object))


def test_dispatch_goes_by_class_and_checks_the_handler_table():
    frame = protocol.FrameDecoder()
    frame.feed(protocol.frame_bytes(m.encode(m.Need("k"), 4, 2)))
    got = m.dispatch({m.Need: lambda msg, fr, extra: (msg.key, fr.index, extra)}, frame.next_frame(), "x")
    assert got == ("k", 2, "x")
    m.check_handlers({m.Result: None, m.Need: None}, m.W2M)
    with pytest.raises(ValueError, match="TASK|Task"):
        m.check_handlers({m.Task: None}, m.W2M)


# -- nobody dispatches outside the table -----------------------------------------------------------------------

def _kind_members(node: ast.AST) -> list[str]:
    """``Kind.X`` references in ``node`` (itself, or the items of a tuple, list or set literal)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    found = []
    for item in items:
        if isinstance(item, ast.Attribute) and item.attr in Kind.__members__:
            base = item.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            if name == "Kind":
                found.append(f"Kind.{item.attr}")
    return found


def kind_dispatch(files: list[Path], root: Path = PACKAGE) -> list[str]:
    """One line per comparison with a ``Kind`` member, or ``case Kind.X``, in ``files``."""
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            operands: list[ast.AST] = []
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):
                operands = [node.value]
            for operand in operands:
                for member in _kind_members(operand):
                    bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: dispatches on {member}")
    return sorted(set(bad))


def kind_mentions(files: list[Path], root: Path = PACKAGE) -> list[str]:
    """One line per mention of ``Kind`` at all (a stricter rule, for the worker's side)."""
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if ((isinstance(node, ast.Name) and node.id == "Kind")
                    or (isinstance(node, ast.Attribute) and node.attr == "Kind")
                    or (isinstance(node, ast.alias) and node.name.rpartition(".")[2] == "Kind")):
                bad.append(f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}: names Kind")
    return sorted(set(bad))


def sources(*parts: str, root: Path = PACKAGE) -> list[Path]:
    files = []
    for part in parts:
        files += sorted((root / part).rglob("*.py"))
    return [f for f in files if f not in TABLE_MODULES]


def test_the_worker_dispatches_through_the_table_only():
    files = sources("worker")
    assert kind_dispatch(files) == []
    assert kind_mentions(files) == [], "the worker sends and dispatches message classes, never kinds"


def test_the_master_dispatches_through_the_table_only():
    files = sorted(PACKAGE.rglob("*.py"))
    assert kind_dispatch([f for f in files if f not in TABLE_MODULES]) == []


def test_the_checker_flags_planted_dispatch(tmp_path):
    root = tmp_path / "qjam_nb"
    (root / "cluster").mkdir(parents=True)
    (root / "cluster" / "bad.py").write_text(
        "from ..worker.protocol import Kind\nfrom ..worker import protocol\n"
        "def f(msg, kind):\n"
        "    if msg.kind is Kind.RESULT:\n        return 1\n"
        "    if kind in (Kind.ERROR, Kind.NEED):\n        return 2\n"
        "    if protocol.Kind.STARTED == kind:\n        return 3\n"
        "    match kind:\n        case Kind.ALIVE:\n            return 4\n"
        "    send(Kind.BYE)\n"
    )
    (root / "cluster" / "good.py").write_text(
        "from ..worker import messages\n"
        "def f(frame):\n    return messages.dispatch({messages.Result: print}, frame)\n"
    )
    files = sorted((root / "cluster").glob("*.py"))
    assert kind_dispatch(files, root) == [  # (send(Kind.BYE), line 13, sends: it does not dispatch)
        "qjam_nb/cluster/bad.py:11: dispatches on Kind.ALIVE",
        "qjam_nb/cluster/bad.py:4: dispatches on Kind.RESULT",
        "qjam_nb/cluster/bad.py:6: dispatches on Kind.ERROR",
        "qjam_nb/cluster/bad.py:6: dispatches on Kind.NEED",
        "qjam_nb/cluster/bad.py:8: dispatches on Kind.STARTED",
    ]
    assert kind_mentions(files, root) == sorted(f"qjam_nb/cluster/bad.py:{n}: names Kind" for n in (1, 4, 6, 8, 11, 13))
