"""The worker: reads frames on stdin, runs mapfunc on slices, writes frames on stdout.

Ground rules of this file: it travels to machines that have nothing but a
Python, so it imports the standard library, cloudpickle and its sibling
``protocol`` only, never anything of the master. The master loads this
package under the name ``qjam_worker`` (see ``qjam_nb.transport.base``).

Threads: a reader decodes frames as they arrive and notes CANCELs at once;
the main thread handles DATA, CALL and TASK in order; a pump forwards
whatever lands on fds 1 and 2. Only the main thread unpickles user objects:
two threads importing numpy at once (one for a slice, one for mapfunc) can
hand one of them a half-initialised module.

fd 1 is moved aside before anything else runs: the protocol keeps a private
copy of the real stdout, and fds 1 and 2 become pipes whose contents travel to
the master as STREAM messages. A ``print`` in mapfunc or a C library writing
to fd 1 can therefore never corrupt the stream. The real stderr is kept for
what must survive a crash (faulthandler's report, a fatal protocol error).
"""

from __future__ import annotations

import codecs
import dis
import faulthandler
import importlib.util
import os
import pickle
import platform
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque

import cloudpickle

from . import protocol, sharedmem, threads
from .pipes import write_all
from .protocol import Kind


class Channel:
    """The protocol's end of the real stdout, safe to write from any thread."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.lock = threading.Lock()

    def send(self, kind: Kind, body=None, call: int = 0, index: int = -1, dumps=cloudpickle.dumps) -> None:
        chunks = protocol.encode(kind, body, call=call, index=index, dumps=dumps)
        self.write(kind, chunks, call, index)

    def write(self, kind: Kind, chunks: list, call: int, index: int) -> None:
        with self.lock:
            if protocol.TRACING:
                protocol.trace("send", self.name, f"{kind.name} call={call} index={index}")
            write_all(self.fd, chunks)



class OutputPump:
    """Forwards bytes written to fds 1 and 2 as STREAM messages.

    ``drain()`` is called before every RESULT/ERROR so that a slice's output
    reaches the master before its result does. Each call may forward
    ``budget`` bytes; past that the pipes are still emptied (a chatty
    mapfunc never blocks) but the bytes are only counted, and one note at the
    end of each slice says how many were dropped.
    """

    def __init__(self, channel: Channel, budget: int = 1 << 20) -> None:
        self.channel = channel
        self.lock = threading.Lock()
        self.where = (0, -1)  # (call, index) the output belongs to
        self.budget = budget
        self.sent = 0  # bytes forwarded in the current call
        self.dropped = 0  # bytes dropped since the last note
        self.pipes = {}
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self.pipes[r] = (stream, codecs.getincrementaldecoder("utf-8")("replace"))
        for f in (sys.stdout, sys.stderr):
            if f is not None:
                f.reconfigure(line_buffering=True)
        threading.Thread(target=self._run, name="qjam-output", daemon=True).start()

    def _run(self) -> None:
        while self.pipes:
            ready, _, _ = select.select(list(self.pipes), [], [])
            with self.lock:
                for fd in ready:
                    self._forward(fd)

    def _forward(self, fd: int) -> None:
        stream, decoder = self.pipes[fd]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:  # mapfunc closed fd 1 or 2: nothing more will come from it
                del self.pipes[fd]
                os.close(fd)
                return
            if self.sent >= self.budget:
                self.dropped += len(data)
                continue
            self.sent += len(data)
            text = decoder.decode(data)
            if text:
                call, index = self.where
                self.channel.send(Kind.STREAM, {"stream": stream, "text": text}, call, index)

    def start_slice(self, call: int, index: int) -> None:
        if call != self.where[0]:
            self.sent = 0
        self.where = (call, index)

    def drain(self, also: int = -1) -> bool:
        """Forward what the slice printed; True if ``also`` (the input stream) has bytes too."""
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        more = False
        with self.lock:
            # One system call to learn which pipe has anything (usually neither), not a read of each,
            # and whether the input has something (it saves the next slice a call of its own).
            fds = [*self.pipes, also] if also >= 0 else list(self.pipes)
            for fd in select.select(fds, [], [], 0)[0] if fds else ():
                if fd == also:
                    more = True
                else:
                    self._forward(fd)
            if self.dropped:
                note = (f"\n[qjam_nb: {self.dropped / 2**20:.1f} MiB more output dropped; "
                        f"each call forwards the first {self.budget / 2**20:.0f} MiB of a worker's output]\n")
                self.dropped = 0
                call, index = self.where
                self.channel.send(Kind.STREAM, {"stream": "stderr", "text": note}, call, index)
        return more


class Worker:
    """The worker's state: its cache, the current call, and what was cancelled.

    Input is read by whichever thread is free, so that a message from an idle
    worker's master wakes one thread, not two: the main thread reads the
    stream itself whenever it waits for work; while mapfunc runs, the
    ``watch`` thread reads instead (slices arriving meanwhile are read during
    the computation, CANCELs are noted, and the end of the stream ends the
    process at once). Decoded frames wait in ``frames`` for the main thread.

    Waking the watcher costs as much as a short slice, so it sleeps until a
    slice has run for ``WATCH_AFTER`` seconds, on a one-shot kernel timer
    (``SliceTimer``) that a slice arms when it finds it idle (see ``watch``).
    The watcher then also sends the slice's STARTED (``announce``), and an
    ALIVE every ``beat`` seconds for as long as the slice runs: the master
    judges a silent worker hung (``qjam_nb.executors.liveness``).
    """

    def __init__(self, name: str, fd_in: int, channel: Channel) -> None:
        self.name = name
        self.fd_in = fd_in
        self.channel = channel
        self.cache: dict = {}
        self.cancelled: set = set()
        self.frames: deque = deque()  # decoded, for the main thread, in order
        self.decoder = protocol.FrameDecoder()
        self.read_lock = threading.Lock()  # whoever holds it may read fd_in
        self.input_seen = 0.0  # perf_counter() when fd_in was last found empty
        self.reads = 0  # reads of fd_in so far, by either thread
        self.computing = False  # the main thread is in mapfunc: the watcher reads
        self.timer = SliceTimer()
        self.timer_armed = False  # set by whoever arms it (a slice finding it idle, or the watcher)
        self.slice_started = 0.0  # perf_counter() when the running slice began
        self.slices = 0  # slices begun so far: the watcher tells one slice from the next by it
        self.beat = HEARTBEAT  # seconds between ALIVEs while a slice runs (the CALL says)
        self.unannounced: tuple | None = None  # (call, slice) running, its STARTED not sent yet
        self.running_call = 0  # the call whose slice runs now (0: none); cleared under announce_lock
        self.owe_cancelled: set = set()  # calls cancelled while one of their slices ran: answer at its end
        self.announce_lock = threading.Lock()
        self.call = 0
        self.func = None
        self.params = None
        self.call_failed = False
        self.share_dir: str | None = None  # the master's shared-memory directory: big results may go there
        self.params_reader = sharedmem.ArenaReader()  # the master's params arena
        self.result_arena: sharedmem.Arena | None = None
        self.result_arena_free = True  # no result of this call in it yet
        self.running = False  # inside mapfunc: only then does SIGINT interrupt
        self.pump: OutputPump | None = None
        self.functions = FunctionCache()

    # -- reading (either thread, holding read_lock) ------------------------
    def read_once(self) -> bool:
        """One read of the stream (blocking until bytes come), its whole frames dispatched;
        True if it filled the buffer (more may be waiting)."""
        try:
            buf = self.decoder.get_buffer()
            n = os.readv(self.fd_in, [buf])
            if n == 0:
                self.drop_result_arena()
                self.decoder.eof()
                leave(0)  # the master is gone: so are we
            self.decoder.buffer_updated(n)
            self.reads += 1
            while (frame := self.decoder.next_frame()) is not None:
                self.dispatch(frame)
            return n == len(buf)
        except BaseException as exc:  # a broken stream leaves nothing to do
            fatal(f"worker {self.name}: {type(exc).__name__}: {exc}")

    def read_ready(self) -> None:
        """Read what has already arrived, without waiting (CANCELs sent after a TASK count before it runs)."""
        with self.read_lock:
            while select.select([self.fd_in], [], [], 0)[0]:
                self.read_once()
        self.input_seen = time.perf_counter()

    def dispatch(self, frame: protocol.Frame) -> None:
        if protocol.TRACING:
            protocol.trace("recv", self.name, frame)
        kind = frame.kind
        if kind is Kind.CANCEL:
            self.cancelled.add(frame.call)
            with self.announce_lock:  # the answer waits for the end of a slice of that call
                if self.running_call == frame.call:
                    self.owe_cancelled.add(frame.call)
                    return
            self.channel.send(Kind.CANCELLED, None, frame.call, dumps=pickle.dumps)
        elif kind is Kind.BYE:
            self.drop_result_arena()
            leave(0)
        else:
            self.frames.append(frame)

    def next_frame(self) -> protocol.Frame:
        while not self.frames:
            with self.read_lock:
                if not self.frames and not self.read_once():  # a short read most likely emptied the pipe
                    self.input_seen = time.perf_counter()
        return self.frames.popleft()

    def watch(self) -> None:
        """The reader while a long mapfunc runs (a thread): asleep the rest of the time.

        The timer is armed by a slice that finds it idle (``timer_armed``), and not
        disarmed: when it fires, the watcher looks at the slice running then. Too
        young: the timer is armed again for when it turns ``WATCH_AFTER``. None:
        the timer stays idle until the next slice arms it. So a stream of short
        slices costs a wake-up every 3 ms at most, not two system calls a slice.
        A slice that ends while the next begins at once is told from it by
        ``slices``: each gets its STARTED, and its ALIVEs every ``beat`` s.
        """
        poller = select.poll()
        poller.register(self.fd_in, select.POLLIN)
        while True:
            self.timer.wait()
            if not self.computing:
                self.timer_armed = False
                if not self.computing:
                    continue  # the next slice arms it
                self.timer_armed = True  # a slice began meanwhile and may have seen it armed
            left = self.slice_started + WATCH_AFTER - time.perf_counter()
            if left > 0:
                self.timer.arm(left)
                continue
            this = self.slices
            self.announce()
            beaten = time.perf_counter()
            while self.computing and self.slices == this:
                if poller.poll(50):  # ms: a finished slice is noticed within this, at worst
                    with self.read_lock:
                        if not self.computing:
                            break
                        # Again, holding the lock: the main thread may have read it all meanwhile,
                        # and a read that blocks here would keep it from its next TASK.
                        if poller.poll(0):
                            self.read_once()
                if time.perf_counter() - beaten >= self.beat:
                    self.heartbeat(this)
                    beaten = time.perf_counter()
            # Look again when the slice running now (if one is) turns WATCH_AFTER, at once if it has.
            self.timer.arm(max(0.0, self.slice_started + WATCH_AFTER - time.perf_counter()) if self.computing else 0.0)

    def announce(self) -> None:
        """STARTED for the running slice, once it has run ``WATCH_AFTER`` s (the watcher, then).

        The master learns which slice a worker runs, to blame it if the worker
        dies and to interrupt it on cancel; a slice shorter than that is over
        before it matters, and skipping its STARTED spares a message each way.
        """
        with self.announce_lock:
            if self.unannounced is not None:
                call, index = self.unannounced
                self.unannounced = None
                self.channel.send(Kind.STARTED, None, call, index, dumps=pickle.dumps)  # plain data

    def heartbeat(self, slice_number: int) -> None:
        """ALIVE for the running slice, if it is still ``slice_number`` (the watcher, every ``beat`` s)."""
        with self.announce_lock:
            if self.slices == slice_number and self.running_call:
                self.channel.send(Kind.ALIVE, None, self.running_call, -1, dumps=pickle.dumps)

    # -- main thread -----------------------------------------------------
    def serve(self) -> None:
        while True:
            frame = self.next_frame()
            try:
                self.handle(frame)
            except Exception as exc:  # e.g. a slice of objects whose class cannot be imported here
                if isinstance(exc, protocol.ProtocolError) and exc.__cause__ is not None:
                    exc = exc.__cause__
                self.pump.drain()
                self.report(exc, frame.call, frame.index, f"handling a {frame.kind.name} message")

    def handle(self, frame: protocol.Frame) -> None:
        if frame.kind is Kind.DATA:
            body = frame.body()
            self.cache[body["key"]] = sharedmem.attach(body["shared"]) if "shared" in body else body["data"]
            if "task" in body:  # the slice's TASK came with it
                self.run_task(frame, body["task"])
        elif frame.kind is Kind.CALL:
            self.start_call(frame)
        elif frame.kind is Kind.TASK:
            self.run_task(frame)
        elif frame.kind is Kind.TASKS:  # several TASKs in one frame, run in order: (slice, key) each,
            call, cache = frame.call, self.cache  # or (slice, key, data) for a slice to cache first
            for entry in frame.body():
                if len(entry) == 3:
                    cache[entry[1]] = entry[2]
                self.run_task(protocol.Frame(Kind.TASK, call, entry[0], []), {"key": entry[1]})
        elif frame.kind is Kind.DROP:
            for key in frame.body()["keys"]:
                self.cache.pop(key, None)

    def start_call(self, frame: protocol.Frame) -> None:
        self.call, self.func, self.params, self.call_failed = frame.call, None, None, False
        self.result_arena_free = True
        try:
            body = frame.body()
            share = body.get("share")
            self.share_dir = share if isinstance(share, str) else None
            self.beat = body.get("beat", HEARTBEAT)
            self.func = self.functions.load(body["func"])
            data, buffers = body["params"]
            if "params_arena" in body:
                try:
                    buffers = self.params_reader.read(body["params_arena"])
                except FileNotFoundError:  # the master has moved on to a bigger arena: this call is over
                    self.call_failed = True
                    return
            self.params = pickle.loads(data, buffers=buffers)
        except BaseException as exc:
            self.call_failed = True
            self.report(exc, frame.call, -1, "loading mapfunc and params")

    def result_chunks(self, value, seconds: float, call: int, index: int) -> list:
        """A RESULT frame. A local worker's first big result of a call leaves its buffers in its
        arena, where the master reads them; it is written again in a later call only, unless the
        master said the last result is still in use (``retire``): see ``sharedmem``."""
        body = {"value": value, "seconds": seconds}
        if self.share_dir and self.result_arena_free and sharedmem.may_be_big(value):
            buffers: list = []
            pickled = dumps_plain_first(value, buffer_callback=buffers.append)
            views = sharedmem.byte_views(buffers)
            try:
                if views is not None:
                    self.result_arena = sharedmem.arena_for(self.result_arena, sum(v.nbytes for v in views),
                                                            f"{sharedmem.RESULT_PREFIX}{os.getpid()}-", self.share_dir)
                    body = {"pickled": pickle.PickleBuffer(pickled), "arena": self.result_arena.write(views),
                            "seconds": seconds}
                    self.result_arena_free = False
            except OSError:  # /dev/shm full: the pipe it is
                pass
        return protocol.encode(Kind.RESULT, body, call=call, index=index, dumps=dumps_plain_first)

    def drop_result_arena(self) -> None:
        if self.result_arena is not None:
            self.result_arena.close()
            self.result_arena = None

    def run_task(self, frame: protocol.Frame, task: dict | None = None) -> None:
        """Run the TASK ``frame`` (or the ``task`` a DATA frame carried)."""
        call, index = frame.call, frame.index
        if time.perf_counter() - self.input_seen > INPUT_FRESH:  # (the last slice's end looked, usually)
            self.read_ready()
        if task is None:
            task = frame.body()
        if "retire" in task:  # the master still uses a result in our arena: leave it that one
            self.drop_result_arena()
        if call != self.call or call in self.cancelled or self.call_failed:
            return
        key = task["key"]
        if key is None:
            data = []
        elif key in self.cache:
            data = self.cache[key]
        else:
            self.channel.send(Kind.NEED, {"key": key}, call, index, dumps=pickle.dumps)
            return
        self.pump.start_slice(call, index)
        # Set before looking at ``cancelled`` again: a CANCEL noted meanwhile (the watcher reads) either
        # sees this slice running and leaves its CANCELLED to the slice's end, or is seen here.
        self.running_call = call
        if call in self.cancelled:
            self.running_call = 0
            self.answer_cancel(call)
            return
        self.unannounced = (call, index)
        self.slices += 1
        start = self.slice_started = time.perf_counter()
        try:
            self.running = self.computing = True
            if not self.timer_armed:
                self.timer_armed = True
                self.timer.arm(WATCH_AFTER)
            try:
                if "delay" in task:  # a straggler, made by the master's chaos: inside the slice's time
                    time.sleep(task["delay"])
                value = self.func(self.params, data)
            finally:
                self.running = self.computing = False
                with self.announce_lock:  # a STARTED the watcher sends goes before what follows
                    self.unannounced, self.running_call = None, 0
        except SystemExit as exc:  # mapfunc asked the process to exit: it does, as it would anywhere
            self.pump.drain()
            code = exc.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            os.write(STDERR_FD, f"qjam worker {self.name}: sys.exit({exc.code!r}) in mapfunc, slice {index}\n".encode())
            leave((code or 0) & 0xFF)
        except BaseException as exc:
            self.pump.drain()
            where = "running mapfunc"
            if isinstance(exc, KeyboardInterrupt):
                # Only the master's cancel sends SIGINT, and it may outrun the CANCEL frame that
                # the reader has yet to note: skip the call's queued slices from here on.
                self.cancelled.add(call)
                where = "running mapfunc (cancelled)"
            self.report(exc, call, index, where, skip_frames=1)
            self.answer_cancel(call)
            return
        seconds = time.perf_counter() - start
        reads = self.reads
        if not self.pump.drain(self.fd_in):
            self.input_seen = time.perf_counter()
        else:  # readable: one read, and a short one most likely emptied the pipe
            with self.read_lock:
                # Unless the watcher read it between the select and the lock: a read would then
                # block, with the master waiting for this result (so look again first).
                waiting = reads == self.reads or select.select([self.fd_in], [], [], 0)[0]
                if not (waiting and self.read_once()):
                    self.input_seen = time.perf_counter()
        try:
            chunks = self.result_chunks(value, seconds, call, index)
        except BaseException as exc:
            self.report(exc, call, index, "pickling the result")
        else:
            self.channel.write(Kind.RESULT, chunks, call, index)
        if self.owe_cancelled:
            self.answer_cancel(call)

    def answer_cancel(self, call: int) -> None:
        """CANCELLED for ``call``, if its CANCEL came while its slice ran (after what the slice sent)."""
        with self.announce_lock:
            owed = call in self.owe_cancelled
            self.owe_cancelled.discard(call)
        if owed:
            self.channel.send(Kind.CANCELLED, None, call, dumps=pickle.dumps)

    def interrupt(self, signum: int, frame: object) -> None:
        """SIGINT from the master (a cancelled call): stop mapfunc, never the worker itself."""
        if self.running:
            raise KeyboardInterrupt

    def report(self, exc: BaseException, call: int, index: int, where: str, skip_frames: int = 0) -> None:
        tb = exc.__traceback__
        for _ in range(skip_frames):  # hide the worker's own frame
            tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
        body = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
            "where": where,
        }
        self.channel.send(Kind.ERROR, body, call, index)


class SliceTimer:
    """A one-shot timer that one thread arms and another waits on.

    On Linux a ``timerfd`` (through ctypes): arming is one system call, and
    nothing wakes before the time is up. Elsewhere an ``Event`` and a sleep.
    """

    def __init__(self) -> None:
        self.fd = -1
        self.event = threading.Event()
        self.deadline = 0.0
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            self._spec = ctypes.c_long * 4  # struct itimerspec: interval (sec, nsec), value (sec, nsec)
            self._settime = libc.timerfd_settime
            fd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
            if fd < 0 or self._settime(fd, 0, self._spec(0, 0, 0, 0), None) != 0:
                raise OSError(ctypes.get_errno(), "timerfd")
            self.fd = fd
        except (OSError, AttributeError, ImportError):
            self.fd = -1

    def arm(self, seconds: float) -> None:
        """Fire in ``seconds`` (0: at once)."""
        if self.fd >= 0:
            nanos = max(1, int(seconds * 1e9))  # 0 would disarm it
            self._settime(self.fd, 0, self._spec(0, 0, nanos // 1_000_000_000, nanos % 1_000_000_000), None)
        else:
            self.deadline = time.monotonic() + seconds
            self.event.set()

    def wait(self) -> None:
        """Until the timer fires."""
        if self.fd < 0:
            self.event.wait()
            self.event.clear()
            time.sleep(max(0.0, self.deadline - time.monotonic()))
            return
        select.select([self.fd], [], [])
        try:
            os.read(self.fd, 8)
        except BlockingIOError:  # armed again after it fired, before we read it
            pass


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
        self.func = None  # its function, if reusable (judged once per pickle, not every call)

    def load(self, blob) -> object:
        data = bytes(blob)
        if data == self.blob:
            return self.func if self.func is not None else cloudpickle.loads(data)
        func = cloudpickle.loads(data)
        self.blob, self.func = data, (func if self.reusable(func) else None)
        return func

    def reusable(self, func) -> bool:
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

    def codes(self, code):
        yield code
        for const in code.co_consts:
            if isinstance(const, type(code)):
                yield from self.codes(const)


def dumps_plain_first(obj, protocol: int = 5, buffer_callback=None) -> bytes:
    """``pickle`` if it can (~5x less work for a small result), else cloudpickle.

    Both write what they can both write the same way; ``pickle`` fails (and
    cloudpickle then ships by value) on what only cloudpickle can carry: the
    functions and classes of a notebook, which ``pickle`` would name by a
    reference this worker cannot resolve.
    """
    buffers: list = []
    try:
        data = pickle.dumps(obj, protocol=protocol, buffer_callback=buffers.append)
    except Exception:
        return cloudpickle.dumps(obj, protocol=protocol, buffer_callback=buffer_callback)
    if buffer_callback is not None:
        for buf in buffers:
            buffer_callback(buf)
    return data


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "numpy": numpy_version(),
        "protocol": protocol.PROTOCOL_VERSION,
    }


def numpy_version() -> str | None:
    """numpy's version without importing it: from its ``version.py`` (~1 ms), or else from its
    installed metadata (``importlib.metadata`` alone takes ~60 ms to import: a worker's HELLO waited on it)."""
    try:
        spec = importlib.util.find_spec("numpy")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for place in spec.submodule_search_locations or ():
        try:
            with open(os.path.join(place, "version.py")) as f:
                found = re.search(r"""^version(?:\s*:\s*str)?\s*=\s*['"]([^'"]+)['"]""", f.read(), re.M)
        except OSError:
            continue
        if found:
            return found.group(1)
    try:
        from importlib.metadata import version

        return version("numpy")
    except Exception:
        return None


def keep_temporaries_in_heap() -> None:
    """Let glibc's malloc reuse freed blocks of up to 32 MiB instead of unmapping them.

    A fresh process mmaps every block of 128 KiB or more and gives it back when
    freed, so a mapfunc's numpy temporaries cost their page faults again on every
    slice (a 500-row slice of the sparse autoencoder took 0.79 ms in a new process,
    0.48 ms with these settings). Workers are long-lived compute processes: keeping
    up to 64 MiB of freed heap is the better trade. Elsewhere than glibc: nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError, ImportError):
        pass


def fatal(message: str) -> None:
    try:
        os.write(STDERR_FD, (message + "\n").encode(errors="replace"))
    finally:
        leave(3)


def leave(status: int) -> None:
    """Exit now, and take the processes mapfunc started with us (our process group: a helper
    that holds our stream open would otherwise keep the master from seeing us gone)."""
    me = os.getpid()
    try:
        if os.getpgrp() == me:
            try:
                entries = os.listdir("/proc")
            except OSError:  # no /proc: signal the whole group, ourselves with it
                os.killpg(me, signal.SIGKILL)
                entries = []
            for entry in entries:
                if entry.isdigit() and int(entry) != me:
                    try:
                        with open(f"/proc/{entry}/stat", "rb") as f:
                            if int(f.read().rsplit(b")", 1)[1].split()[2]) == me:  # in our process group
                                os.kill(int(entry), signal.SIGKILL)
                    except (OSError, ValueError, IndexError):
                        continue
    finally:
        os._exit(status)


STDERR_FD = 2
#: A slice running this long (seconds) wakes the watcher, which reads the stream while it runs.
WATCH_AFTER = 0.003
#: Seconds between ALIVEs while a slice runs, unless the CALL says otherwise (``Cluster(heartbeat=)``).
HEARTBEAT = 1.0
#: A TASK does not look for CANCELs that came after it when the input was found empty this recently
#: (at the end of the slice before, usually): one system call a slice, not three.
INPUT_FRESH = 0.0005


def main(name: str | None = None) -> None:
    """Take over this process's stdio and serve the master until stdin closes."""
    global STDERR_FD
    name = name or os.environ.get("QJAM_WORKER_NAME") or f"{socket.gethostname()}/{os.getpid()}"
    blas = threads.apply()  # before anything loads numpy here (see threads)
    for entry in os.environ.get("QJAM_EXTRA_PATH", "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)
    keep_temporaries_in_heap()
    try:  # a process group of our own: the master kills it whole (mapfunc's helpers too)
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)
    except OSError:
        pass
    fd_in, fd_out = os.dup(0), os.dup(1)
    STDERR_FD = os.dup(2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    faulthandler.enable(file=STDERR_FD)
    if protocol.TRACING:
        protocol.TRACE_FILE = os.fdopen(os.dup(STDERR_FD), "w", buffering=1)
    channel = Channel(fd_out, name)
    worker = Worker(name, fd_in, channel)
    worker.pump = OutputPump(channel)
    signal.signal(signal.SIGINT, worker.interrupt)
    hello = {"worker": name, "pid": os.getpid(), "host": socket.gethostname(), "blas": blas, **versions()}
    channel.send(Kind.HELLO, hello)
    threading.Thread(target=worker.watch, name="qjam-watch", daemon=True).start()
    worker.serve()
