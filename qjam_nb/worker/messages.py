"""The wire vocabulary in one table: a small class per message kind, with its code, direction and codec.

Ground rules of this file:

* It travels, like ``protocol``: standard library and cloudpickle only.
* Every ``Kind`` has exactly one class here, registered with ``@message``;
  nothing else compares a frame's kind. Each end dispatches through the
  table: ``decode(frame)`` gives the message object, and a handler table
  keyed by message class picks what to do (``type(message)``, or
  ``message_class(frame)`` to choose before unpickling anything).
* One codec policy, chosen here by ``encode(message, call, index)``, never at a
  call site. A body of plain data (``pickle`` codec) is written with
  ``pickle``. A body that may carry user objects (``cloudpickle`` codec) is
  written with ``pickle`` when that makes the very same bytes: when it is plain
  data by type (numbers, strings, bytes, numpy arrays of numbers, and lists,
  tuples and dicts of them) or, sent by a worker, whenever ``pickle`` accepts
  it (on a worker, ``pickle`` fails exactly on the notebook's functions and
  classes, which cloudpickle then ships by value); otherwise with cloudpickle.
  ``pickle`` on the master would name a notebook class by a reference
  (``__main__.C``) the worker cannot resolve, hence the type test that way.
* The bodies on the wire are the dicts (or list, or None) they always were,
  keys in the same order: the bytes did not change when the classes came.

``render_table()`` writes the table that ``docs/design.md`` §3 shows;
``tests/protocol/test_message_table.py`` checks the two agree.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, ClassVar

import cloudpickle

from . import protocol
from .protocol import Frame, Kind, ProtocolError

M2W, W2M = "m->w", "w->m"
PICKLE, CLOUDPICKLE = "pickle", "cloudpickle"


class _Absent:
    """An optional field left out of the body (``None`` is a value a result may have)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


class Message:
    """One message of the protocol. Subclasses are ``record``s registered with ``@message``."""

    __slots__ = ()
    kind: ClassVar[Kind]
    direction: ClassVar[str]
    codec: ClassVar[str]
    #: What the message says, for the table (the class docstring's first line).
    meaning: ClassVar[str]
    #: Field names in body order, and those that may be left out.
    names: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[frozenset[str]] = frozenset()

    def body(self) -> Any:
        """The body as it travels: a dict of the fields present, in order."""
        return {n: v for n in self.names if (v := getattr(self, n)) is not ABSENT}

    @classmethod
    def from_body(cls, body: Any) -> Message:
        if not isinstance(body, dict):
            raise TypeError(f"a {cls.kind.name} body is a dict, not {type(body).__name__}")
        try:
            return cls(**{n: body[n] if n in body else ABSENT for n in cls.names})
        except KeyError as exc:  # pragma: no cover - (ABSENT covers missing keys)
            raise TypeError(f"a {cls.kind.name} body lacks {exc}") from None


class _Empty(Message):
    """A message whose body is ``None`` (all it says is its kind, call and index)."""

    __slots__ = ()

    def body(self) -> Any:
        return None

    @classmethod
    def from_body(cls, body: Any) -> Message:
        return cls()


def record(cls: type) -> type:
    """``cls`` as a small slotted record: its annotated fields (in order, defaults from the class body) get
    ``__slots__``, an ``__init__``, ``__eq__`` and ``__repr__``; ``_defaults`` keeps what each defaults to.

    What ``dataclasses.dataclass(slots=True)`` makes, in a fifth of the time: the fork server builds every
    message and action class before it forks a worker, on the path of a cluster's start."""
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    namespace = {k: v for k, v in cls.__dict__.items() if k not in defaults and k not in ("__dict__", "__weakref__")}
    namespace["__slots__"] = names
    args = ", ".join(f"{n}=_d_{n}" if n in defaults else n for n in names)
    lines = "".join(f"\n    self.{n} = {n}" for n in names) or "\n    pass"
    scope = {f"_d_{n}": v for n, v in defaults.items()}
    exec(f"def __init__(self{', ' if args else ''}{args}):{lines}", scope)  # noqa: S102 - our own field names
    namespace["__init__"] = scope["__init__"]
    namespace["__eq__"] = _record_eq
    namespace["__hash__"] = None
    namespace["__repr__"] = _record_repr
    namespace["_defaults"] = defaults
    return type(cls)(cls.__name__, cls.__bases__, namespace)


def _record_eq(self: Any, other: Any) -> bool:
    if type(other) is not type(self):
        return NotImplemented
    return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)


def _record_repr(self: Any) -> str:
    return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


#: The table: Kind -> message class, and the reverse (filled by ``@message``).
BY_KIND: dict[Kind, type[Message]] = {}
_BY_CODE: dict[int, type[Message]] = {}


def message(kind: Kind, direction: str, codec: str) -> Callable[[type], type]:
    """Register a message class for ``kind`` (once): a slotted ``record``, with its direction and codec."""
    if direction not in (M2W, W2M) or codec not in (PICKLE, CLOUDPICKLE):
        raise ValueError(f"bad direction {direction!r} or codec {codec!r} for {kind.name}")

    def register(cls: type) -> type:
        if kind in BY_KIND:
            raise ValueError(f"{kind.name} is registered twice: {BY_KIND[kind].__name__} and {cls.__name__}")
        cls = record(cls)
        cls.kind, cls.direction, cls.codec = kind, direction, codec
        cls.meaning = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
        cls.names = cls.__slots__
        cls.optional = frozenset(n for n, d in cls._defaults.items() if d is ABSENT)
        BY_KIND[kind] = cls
        _BY_CODE[int(kind)] = cls
        return cls

    return register


# -- the messages ------------------------------------------------------------------------------------------


@message(Kind.HELLO, W2M, PICKLE)
class Hello(Message):
    """The worker is ready: who it is and what it runs (the master checks the versions)."""

    worker: str
    pid: int
    host: str
    blas: Any  # what the worker did with its BLAS threads (worker/threads.py)
    python: str
    cloudpickle: str
    numpy: str | None
    protocol: int


@message(Kind.CALL, M2W, PICKLE)
class Call(Message):
    """A new call: mapfunc (its cloudpickle, out of band), params (a pickle and its buffers), the heartbeat;
    to local workers the shared-memory directory for big results and, for big params, their arena."""

    func: Any
    params: tuple
    beat: float
    share: Any = ABSENT
    params_arena: Any = ABSENT

    @classmethod
    def from_body(cls, body: Any) -> Message:  # (every call: the usual fields read directly)
        try:
            return cls(body["func"], body["params"], body.get("beat", ABSENT), body.get("share", ABSENT),
                       body.get("params_arena", ABSENT))
        except (KeyError, TypeError, AttributeError) as exc:
            raise TypeError(f"a CALL body is a dict with func and params, not {body!r:.80}") from exc


@message(Kind.DATA, M2W, CLOUDPICKLE)
class Data(Message):
    """A slice to cache under ``key`` (``data``, or a local worker's ``shared`` memory handle); with ``task``
    (a TASK's body), run it as that TASK once cached: a slice shipped for a task is one frame."""

    key: Any
    data: Any = ABSENT
    shared: Any = ABSENT
    task: Any = ABSENT


@message(Kind.TASK, M2W, PICKLE)
class Task(Message):
    """Run mapfunc on the cached slice ``key`` (None: no dataset); after ``delay`` s (a chaos straggler);
    ``retire``: the master still uses the last result lent from the worker's arena, make a new one."""

    key: Any
    delay: Any = ABSENT
    retire: Any = ABSENT

    def body(self) -> Any:  # (every slice sends one: the plain case first)
        if self.delay is ABSENT and self.retire is ABSENT:
            return {"key": self.key}
        return Message.body(self)

    @classmethod
    def from_body(cls, body: Any) -> Message:
        try:
            return cls(body["key"], body.get("delay", ABSENT), body.get("retire", ABSENT))
        except (KeyError, AttributeError) as exc:
            raise TypeError(f"a TASK body is a dict with a key, not {body!r:.80}") from exc


@message(Kind.TASKS, M2W, PICKLE)
class Tasks(Message):
    """Several TASKs in one frame, run in order, each answered for its own slice: ``entries`` are
    (slice, key), or (slice, key, data) for a slice to cache first. The body is the list itself."""

    entries: list

    def body(self) -> Any:
        return self.entries

    @classmethod
    def from_body(cls, body: Any) -> Message:
        if not isinstance(body, list):
            raise TypeError(f"a TASKS body is a list, not {type(body).__name__}")
        return cls(body)


@message(Kind.NEED, W2M, PICKLE)
class Need(Message):
    """The TASK's slice ``key`` is not cached here: send its DATA."""

    key: Any


@message(Kind.STARTED, W2M, PICKLE)
class Started(_Empty):
    """The slice has run for 3 ms (a shorter one sends none); each slice of a run sends its own."""


@message(Kind.ALIVE, W2M, PICKLE)
class Alive(_Empty):
    """The slice still runs: one every heartbeat (the CALL's ``beat``) while it does."""


@message(Kind.RESULT, W2M, CLOUDPICKLE)
class Result(Message):
    """mapfunc's ``value`` and the ``seconds`` it took; a big local result leaves ``value`` out: its
    ``pickled`` body travels, its buffers lie in the worker's ``arena``."""

    value: Any = ABSENT
    pickled: Any = ABSENT
    arena: Any = ABSENT
    seconds: float = 0.0

    def body(self) -> Any:  # (every slice sends one: the plain case first)
        if self.pickled is ABSENT:
            return {"value": self.value, "seconds": self.seconds}
        return Message.body(self)

    @classmethod
    def from_body(cls, body: Any) -> Message:
        try:
            return cls(body.get("value", ABSENT), body.get("pickled", ABSENT), body.get("arena", ABSENT),
                       body["seconds"])
        except (KeyError, AttributeError) as exc:
            raise TypeError(f"a RESULT body is a dict with seconds, not {body!r:.80}") from exc


@message(Kind.ERROR, W2M, PICKLE)
class Error(Message):
    """An exception: its ``type`` name, ``message``, formatted ``traceback``, and ``where`` it happened."""

    type: str
    message: str
    traceback: str
    where: str


@message(Kind.STREAM, W2M, PICKLE)
class Stream(Message):
    """Output the worker's fds 1 or 2 got: ``stream`` (stdout or stderr) and its ``text``."""

    stream: str
    text: str


@message(Kind.CANCEL, M2W, PICKLE)
class Cancel(_Empty):
    """Drop every queued TASK of this call (the worker answers CANCELLED)."""


@message(Kind.CANCELLED, W2M, PICKLE)
class Cancelled(_Empty):
    """No slice of this call runs here now, nor will: the answer to CANCEL (after the running slice's end)."""


@message(Kind.DROP, M2W, PICKLE)
class Drop(Message):
    """Forget these cached slices (``keys``)."""

    keys: list


@message(Kind.BYE, M2W, PICKLE)
class Bye(_Empty):
    """Exit now."""


# -- the codec policy ----------------------------------------------------------------------------------------

#: Types ``pickle`` writes exactly as cloudpickle does.
PLAIN_ATOMS = frozenset((int, float, complex, str, bytes, bool, type(None), pickle.PickleBuffer))
#: How far into lists, tuples and dicts ``plain`` looks (a slice of rows of numbers is 2 deep).
PLAIN_DEPTH = 4


def plain(value: Any, depth: int = 0) -> bool:
    """Data ``pickle`` writes exactly as cloudpickle does: numbers, strings, bytes, numpy arrays of
    numbers, and lists, tuples and dicts of them. Not functions or classes: ``pickle`` would name
    them by reference (``__main__.f``), which a worker cannot look up."""
    kind = type(value)
    if kind in PLAIN_ATOMS:
        return True
    if depth >= PLAIN_DEPTH:
        return False
    if kind is list or kind is tuple:
        atoms = PLAIN_ATOMS
        if atoms.issuperset(map(type, value)):  # the usual slice: numbers and strings, checked in C
            return True
        return all(type(v) in atoms or plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and plain(v, depth + 1) for k, v in value.items())
    # numpy without importing it (the worker package may not have it): arrays of numbers only.
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not value.dtype.hasobject


def dumps_plain_first(obj: Any, protocol: int = 5, buffer_callback: Callable | None = None) -> bytes:
    """``pickle`` if it can (~5x less work for a small result), else cloudpickle (a worker's policy)."""
    buffers: list = []
    try:
        data = pickle.dumps(obj, protocol=protocol, buffer_callback=buffers.append)
    except Exception:
        return cloudpickle.dumps(obj, protocol=protocol, buffer_callback=buffer_callback)
    if buffer_callback is not None:
        for buf in buffers:
            buffer_callback(buf)
    return data


def dumps_for_worker(obj: Any, protocol: int = 5, buffer_callback: Callable | None = None) -> bytes:
    """``pickle`` for plain data, else cloudpickle (the master's policy: see the module's rules)."""
    dumps = pickle.dumps if plain(obj) else cloudpickle.dumps
    return dumps(obj, protocol=protocol, buffer_callback=buffer_callback)


def dumps_of(cls: type[Message]) -> Callable[..., bytes]:
    """The function that pickles ``cls``'s bodies: the one codec policy."""
    if cls.codec == PICKLE:
        return pickle.dumps
    return dumps_plain_first if cls.direction == W2M else dumps_for_worker


_DUMPS: dict[type[Message], Callable[..., bytes]] = {}


def encode(msg: Message, call: int = 0, index: int = -1) -> list:
    """The chunks of ``msg``'s frame (``protocol.encode``'s), its body pickled by the table's codec."""
    cls = type(msg)
    return protocol.encode(cls.kind, msg.body(), call=call, index=index, dumps=_DUMPS[cls])


def encode_body(cls: type[Message], body: Any, call: int = 0, index: int = -1) -> list:
    """``encode`` for a body already in its wire shape (``cls(...).body()``), without making the message
    object: the master's per-call frames (CALL, TASK, TASKS), still with the table's codec."""
    return protocol.encode(cls.kind, body, call=call, index=index, dumps=_DUMPS[cls])


def message_class(frame: Frame) -> type[Message]:
    """The class of the message ``frame`` carries, read from its header (nothing unpickled)."""
    return _BY_CODE[frame.kind]


def decode(frame: Frame, loads: Callable[..., Any] = pickle.loads) -> Message:
    """The message ``frame`` carries; ``ProtocolError`` (its cause kept) if the body does not unpickle
    or is not that kind's shape."""
    cls = _BY_CODE[frame.kind]
    body = frame.body(loads)
    try:
        return cls.from_body(body)
    except TypeError as exc:
        raise ProtocolError(f"malformed {frame.kind.name} frame: {exc}") from None


def dispatch(handlers: dict[type[Message], Callable[..., Any]], frame: Frame, *args: Any,
             default: Callable[..., Any] | None = None) -> Any:
    """Decode ``frame`` and hand its message (then ``frame`` and ``args``) to its class's handler in
    ``handlers``; a class with no handler goes to ``default`` (if given) undecoded, as ``default(frame,
    *args)``. One handler table per end and state, keyed by message class: the master's way in."""
    handler = handlers.get(_BY_CODE[frame.kind])
    if handler is None:
        return default(frame, *args) if default is not None else None
    return handler(decode(frame), frame, *args)


def check_handlers(handlers: dict[type[Message], Any], direction: str) -> None:
    """Refuse a handler table with a class not in the table or one that never comes this way."""
    for cls in handlers:
        if BY_KIND.get(getattr(cls, "kind", None)) is not cls:
            raise ValueError(f"{cls!r} is not a registered message class")
        if cls.direction != direction:
            raise ValueError(f"{cls.__name__} travels {cls.direction}: it is never received here ({direction})")


def fields_text(cls: type[Message]) -> str:
    """``a, b?`` (optional fields marked), or ``—`` for a message that is only its kind."""
    if issubclass(cls, _Empty):
        return "—"
    if cls is Tasks:
        return "[entries]"
    return ", ".join(f"`{n}`" + ("?" if n in cls.optional else "") for n in cls.names)


def render_table() -> str:
    """The table as Markdown: kind, code, direction, codec, fields (``?`` optional), what it says."""
    lines = ["| kind | code | direction | codec | fields | what it says |", "|---|---|---|---|---|---|"]
    for kind in sorted(BY_KIND, key=int):
        cls = BY_KIND[kind]
        lines.append(f"| {kind.name} | {int(kind)} | {cls.direction} | {cls.codec} | {fields_text(cls)} "
                     f"| {cls.meaning} |")
    return "\n".join(lines) + "\n"


def unregistered() -> list[Kind]:
    """Kinds with no message class (the table test wants none)."""
    return [k for k in Kind if k not in BY_KIND]


for _cls in BY_KIND.values():
    _DUMPS[_cls] = dumps_of(_cls)
