"""The worker's state and decisions, sans-IO: bytes in, actions out.

Ground rules of this file:

* It travels (standard library, cloudpickle and its siblings only) and does
  no I/O: no reads or writes of the stream, no threads, no signals, no clock.
  It is fed bytes (``receive``, or ``get_buffer``/``buffer_updated`` to read
  straight into the decoder's buffers) and answers with a list of actions for
  the shell to carry out (``worker/io.py`` in a worker process; a thread in
  ``transport/memory.py``; a loop in the tests). What it cannot do itself it is
  handed: a ``SliceCache`` and a ``SharedMemory`` (slices and params a local
  master put in ``/dev/shm``). The one side channel is ``protocol.trace`` when
  ``QJAM_DEBUG`` is set.
* Two entries, for two threads. ``receive`` may be called by whichever
  thread reads the stream; it decodes frames, acts at once on the urgent ones
  (CANCEL, BYE: plain data, nothing of the user's unpickled) and queues the
  rest. ``step`` handles the next queued piece of work on the thread that
  runs mapfunc (only that thread unpickles user objects: two threads
  importing numpy at once can hand one a half-initialised module). The shell
  calls the core under one lock and writes the frames an answer asks for
  before letting go of it, so the order of the core's answers is the order on
  the wire (a slice's STARTED never after its RESULT).
* One slice runs at a time. ``step`` answers a task with ``Run``; the shell
  runs mapfunc and reports back with ``finished`` (or ``failed``); the core
  holds the slice as running until then, so a CANCEL of its call is answered
  after the slice's RESULT or ERROR.

Actions: ``Send(message, call, index)`` a frame; ``Run(call, index, func,
params, data, delay)`` mapfunc on a slice; ``Configure(beat, share)`` at each
CALL (the heartbeat, and where big results may go); ``Retire()`` leave the
result arena to the master and make a new one; ``Exit(status, reason)``.
"""

from __future__ import annotations

import dis
import pickle
import sys
import traceback
from collections import deque
from typing import Any

import cloudpickle

from . import protocol
from .cache import SliceCache
from .messages import (
    ABSENT,
    Alive,
    Bye,
    Call,
    Cancel,
    Cancelled,
    Data,
    Drop,
    Error,
    Message,
    Need,
    Result,
    Started,
    Task,
    Tasks,
    decode,
    record,
)
from .protocol import Frame, FrameDecoder, ProtocolError

#: Seconds between ALIVEs while a slice runs, unless the CALL says otherwise (``Cluster(heartbeat=)``).
HEARTBEAT = 1.0


# -- actions ------------------------------------------------------------------------------------------------


@record
class Send:
    """Write ``message``'s frame (for ``call`` and slice ``index``)."""

    message: Message
    call: int = 0
    index: int = -1


@record
class Run:
    """Run ``func(params, data)`` for slice ``index`` of ``call`` (after ``delay`` s, if not ABSENT), then
    report with ``finished`` or ``failed``."""

    call: int
    index: int
    func: Any
    params: Any
    data: Any
    delay: Any = ABSENT


@record
class Configure:
    """A call began: ALIVE every ``beat`` s while a slice runs; big results may go to ``share`` (a directory
    shared with the master, or None), and the result arena is free again."""

    beat: float
    share: str | None


@record
class Retire:
    """The master still uses a result lent from the result arena: leave it that one, make a new one."""


@record
class Exit:
    """Leave now with ``status`` (0: the master said BYE or went away), ``reason`` for stderr."""

    status: int
    reason: str = ""


class SharedMemory:
    """What the core asks of shared memory (``worker/sharedmem.py`` in a local worker): a slice's
    handle attached, a params arena read. This default has none: the master never offers it then."""

    def attach(self, handle: dict) -> Any:
        raise OSError("this worker shares no memory with its master, yet a slice came through shared memory")

    def read_params(self, handle: dict) -> list:
        raise OSError("this worker shares no memory with its master, yet params came through shared memory")


# -- the core -------------------------------------------------------------------------------------------------


class WorkerCore:
    """A worker's cache, current call and cancellations, and what to do with each message."""

    def __init__(self, name: str, cache: SliceCache | None = None, shared: SharedMemory | None = None) -> None:
        self.name = name
        self.decoder = FrameDecoder()
        self.cache = cache if cache is not None else SliceCache()
        self.shared = shared if shared is not None else SharedMemory()
        self.functions = FunctionCache()
        self.inbox: deque[Frame] = deque()  # decoded frames for ``step``, in order
        self.entries: deque[tuple] = deque()  # (call, entry) of a TASKS frame being worked through
        self.call = 0
        self.func: Any = None
        self.params: Any = None
        self.call_failed = False
        self.cancelled: set[int] = set()
        self.owe_cancelled: set[int] = set()  # calls cancelled while one of their slices ran
        self.running: tuple[int, int] | None = None  # (call, slice) handed out by ``Run``, not yet reported
        self.announced = True  # the running slice's STARTED went out
        self.slices = 0  # slices handed out so far: the watcher tells one from the next by it
        self.exited: Exit | None = None
        # The handler tables, by message class; looked up by the frame's kind (the class's own ``kind``),
        # which saves reading the class first on a path every slice takes.
        urgent = {Cancel: self._on_cancel, Bye: self._on_bye}
        handlers = {Call: self._on_call, Data: self._on_data, Task: self._on_task, Tasks: self._on_tasks,
                    Drop: self._on_drop}
        self._urgent = {cls.kind: handler for cls, handler in urgent.items()}
        self._handlers = {cls.kind: (cls, handler) for cls, handler in handlers.items()}

    # -- input (any thread) ------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next bytes should be read into (then ``buffer_updated``)."""
        return self.decoder.get_buffer()

    def buffer_updated(self, n: int) -> list:
        """``n`` bytes were read into the last ``get_buffer()``."""
        try:
            self.decoder.buffer_updated(n)
        except ProtocolError as exc:
            return self._broken(exc)
        return self._frames()

    def receive(self, data: Any) -> list:
        """Bytes from the master: the urgent answers at once; the rest waits for ``step``."""
        try:
            self.decoder.feed(data)
        except ProtocolError as exc:
            return self._broken(exc)
        return self._frames()

    def eof(self) -> list:
        """The master closed the stream: so we go (an error if it ended inside a frame)."""
        try:
            self.decoder.eof()
        except ProtocolError as exc:
            return self._broken(exc)
        return self._exit(Exit(0))

    def _broken(self, exc: ProtocolError) -> list:
        return self._exit(Exit(3, f"worker {self.name}: {type(exc).__name__}: {exc}"))

    def _exit(self, action: Exit) -> list:
        if self.exited is None:
            self.exited = action
        return [self.exited]

    def _frames(self) -> list:
        actions: list = []
        urgent = self._urgent
        while (frame := self.decoder.next_frame()) is not None:
            if protocol.TRACING:
                protocol.trace("recv", self.name, frame)
            handler = urgent.get(frame.kind)
            if handler is None:
                self.inbox.append(frame)
                continue
            try:
                msg = decode(frame)
            except ProtocolError as exc:
                return self._broken(exc)
            actions += handler(msg, frame)
            if self.exited is not None:
                return actions
        return actions

    def _on_cancel(self, msg: Cancel, frame: Frame) -> list:
        call = frame.call
        self.cancelled.add(call)
        if self.running is not None and self.running[0] == call:  # answered at the slice's end
            self.owe_cancelled.add(call)
            return []
        return [Send(Cancelled(), call)]

    def _on_bye(self, msg: Bye, frame: Frame) -> list:
        return self._exit(Exit(0))

    # -- work (the thread that runs mapfunc) -----------------------------------------------------
    @property
    def pending(self) -> bool:
        """Work is queued for ``step``."""
        return bool(self.inbox or self.entries)

    def step(self) -> list:
        """Handle the next queued piece of work (a frame, or one task of a TASKS frame)."""
        if self.entries:
            call, entry = self.entries.popleft()
            if len(entry) == 3:  # a slice to cache first
                self.cache.put(entry[1], entry[2])
            if call != self.call or self.call_failed or call in self.cancelled:
                return []
            key = entry[1]  # (``_task``, inline: the usual path of a slice)
            data = [] if key is None else self.cache.get(key, ABSENT)
            if data is ABSENT:
                return [Send(Need(key), call, entry[0])]
            self.running = (call, entry[0])
            self.announced = False
            self.slices += 1
            return [Run(call, entry[0], self.func, self.params, data)]
        if not self.inbox:
            return []
        frame = self.inbox.popleft()
        entry = self._handlers.get(frame.kind)
        if entry is None:  # a message for the master, echoed back? nothing to do with it
            return []
        cls, handler = entry
        try:
            try:
                msg = cls.from_body(frame.body())  # (``decode``, inline: every slice comes this way)
            except TypeError as exc:
                raise ProtocolError(f"malformed {frame.kind.name} frame: {exc}") from None
            return handler(msg, frame)
        except Exception as exc:  # e.g. a slice of objects whose class cannot be imported here
            if isinstance(exc, ProtocolError) and exc.__cause__ is not None:
                exc = exc.__cause__
            if cls is Call:
                self.call, self.func, self.params, self.call_failed = frame.call, None, None, True
                return [Send(error_message(exc, "loading mapfunc and params"), frame.call, -1)]
            return [Send(error_message(exc, f"handling a {frame.kind.name} message"), frame.call, frame.index)]

    def _on_call(self, msg: Call, frame: Frame) -> list:
        self.call, self.func, self.params, self.call_failed = frame.call, None, None, False
        actions: list = [Configure(HEARTBEAT if msg.beat is ABSENT else msg.beat,
                                   msg.share if isinstance(msg.share, str) else None)]
        try:
            self.func = self.functions.load(msg.func)
            data, buffers = msg.params
            if msg.params_arena is not ABSENT:
                try:
                    buffers = self.shared.read_params(msg.params_arena)
                except FileNotFoundError:  # the master has moved on to a bigger arena: this call is over
                    self.call_failed = True
                    return actions
            self.params = pickle.loads(data, buffers=buffers)
        except BaseException as exc:
            self.call_failed = True
            actions.append(Send(error_message(exc, "loading mapfunc and params"), frame.call, -1))
        return actions

    def _on_data(self, msg: Data, frame: Frame) -> list:
        self.cache.put(msg.key, self.shared.attach(msg.shared) if msg.shared is not ABSENT else msg.data)
        if msg.task is ABSENT:
            return []
        task = msg.task
        return self._task(frame.call, frame.index, task["key"], task.get("delay", ABSENT), "retire" in task)

    def _on_task(self, msg: Task, frame: Frame) -> list:
        call = frame.call
        if msg.retire is not ABSENT or msg.delay is not ABSENT or call != self.call or self.call_failed:
            return self._task(call, frame.index, msg.key, msg.delay, msg.retire is not ABSENT)
        # (the usual TASK, inline: a slice costs a few microseconds of the worker's time in all)
        key = msg.key
        if call in self.cancelled:
            return []
        if key is None:
            data: Any = []
        else:
            data = self.cache.get(key, ABSENT)
            if data is ABSENT:
                return [Send(Need(key), call, frame.index)]
        self.running = (call, frame.index)
        self.announced = False
        self.slices += 1
        return [Run(call, frame.index, self.func, self.params, data)]

    def _on_tasks(self, msg: Tasks, frame: Frame) -> list:
        call = frame.call
        self.entries.extend((call, entry) for entry in msg.entries)
        return []  # each entry is a step of its own (the shell looks for a CANCEL before each)

    def _on_drop(self, msg: Drop, frame: Frame) -> list:
        for key in msg.keys:
            self.cache.drop(key)
        return []

    def _task(self, call: int, index: int, key: Any, delay: Any = ABSENT, retire: bool = False) -> list:
        actions: list = [Retire()] if retire else []
        if call != self.call or call in self.cancelled or self.call_failed:
            return actions
        if key is None:
            data: Any = []
        else:
            data = self.cache.get(key, ABSENT)
            if data is ABSENT:
                actions.append(Send(Need(key), call, index))
                return actions
        self.running = (call, index)
        self.announced = False
        self.slices += 1
        actions.append(Run(call, index, self.func, self.params, data, delay))
        return actions

    # -- reports from the shell ----------------------------------------------------------------
    def finished(self, call: int, index: int, value: Any, seconds: float) -> list:
        """The ``Run`` of slice ``index`` returned ``value`` after ``seconds``."""
        self.running = None
        actions: list = [Send(Result(value, ABSENT, ABSENT, seconds), call, index)]
        if self.owe_cancelled and call in self.owe_cancelled:
            self.owe_cancelled.discard(call)
            actions.append(Send(Cancelled(), call))
        return actions

    def failed(self, call: int, index: int, exc: BaseException, skip_frames: int = 0) -> list:
        """The ``Run`` of slice ``index`` raised ``exc`` (``KeyboardInterrupt``: the master's cancel)."""
        self.running = None
        where = "running mapfunc"
        if isinstance(exc, KeyboardInterrupt):
            # Only the master's cancel sends SIGINT, and it may outrun the CANCEL frame that the
            # reader has yet to note: skip the call's queued slices from here on.
            self.cancelled.add(call)
            where = "running mapfunc (cancelled)"
        actions: list = [Send(error_message(exc, where, skip_frames), call, index)]
        if call in self.owe_cancelled:
            self.owe_cancelled.discard(call)
            actions.append(Send(Cancelled(), call))
        return actions

    def announce(self) -> list:
        """STARTED for the running slice, once (the shell asks when it has run 3 ms)."""
        if self.running is None or self.announced:
            return []
        self.announced = True
        return [Send(Started(), *self.running)]

    def heartbeat(self, slice_number: int) -> list:
        """ALIVE, if slice number ``slice_number`` (``slices`` when it began) still runs."""
        if self.running is None or self.slices != slice_number:
            return []
        return [Send(Alive(), self.running[0], -1)]


def error_message(exc: BaseException, where: str, skip_frames: int = 0) -> Error:
    """The ERROR for ``exc`` (its first ``skip_frames`` traceback entries hidden: the worker's own)."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    return Error(type=type(exc).__name__, message=str(exc),
                 traceback="".join(traceback.format_exception(type(exc), exc, tb)), where=where)


class FunctionCache:
    """Unpickles a call's mapfunc, reusing the last one when its pickle is byte-identical and it can
    carry nothing from one call to the next.

    A mapfunc that reaches only numbers, strings, modules and builtins, has no
    closure, defaults or attributes, and never assigns a global, behaves the
    same whether loaded again or not; the master sends such a function's very
    same pickle every call, and loading it costs ~15 µs. Anything else is
    loaded afresh each call, as shipped.
    """

    ATOMS = (type(None), bool, int, float, complex, str, bytes, type(sys), type(len))

    def __init__(self) -> None:
        self.blob: bytes | None = None  # the last pickle loaded
        self.func: Any = None  # its function, if reusable (judged once per pickle, not every call)

    def load(self, blob: Any) -> Any:
        data = bytes(blob)
        if data == self.blob:
            return self.func if self.func is not None else cloudpickle.loads(data)
        func = cloudpickle.loads(data)
        self.blob, self.func = data, (func if self.reusable(func) else None)
        return func

    def reusable(self, func: Any) -> bool:
        code = getattr(func, "__code__", None)
        if code is None or func.__closure__ or func.__defaults__ or func.__kwdefaults__ or func.__dict__:
            return False
        names = func.__globals__
        for c in self.codes(code):
            if {"globals", "exec", "eval", "vars"} & set(c.co_names):
                return False
            for op in dis.get_instructions(c):
                if op.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                    return False
            if not all(isinstance(names.get(n), self.ATOMS) for n in c.co_names if n in names):
                return False
        return True

    def codes(self, code: Any) -> Any:
        yield code
        for const in code.co_consts:
            if isinstance(const, type(code)):
                yield from self.codes(const)
