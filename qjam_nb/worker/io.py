"""The worker process's I/O around its sans-IO core: the channel, the output pump, the readers,
the slice timer, mapfunc's run and the result arena.

Ground rules of this file: it travels (standard library, cloudpickle and its
siblings). The decisions are ``core.WorkerCore``'s; this file only reads,
writes, waits and runs. Every call into the core happens under ``Shell.lock``,
and the frames its answer asks for are written before the lock is let go: the
core's order is the wire's (a slice's STARTED never after its RESULT, a
CANCELLED after the cancelled slice's end).

Threads: the main thread runs the core's work (``step``) and mapfunc, and
reads the stream itself whenever it waits for work. While a slice runs, the
watcher thread reads instead (slices arriving meanwhile, CANCELs, the end of
the stream), sends STARTED and the ALIVEs; it sleeps until a slice has run
``WATCH_AFTER`` s, on a one-shot kernel timer (``SliceTimer``), since waking
it costs as much as a short slice. A pump thread forwards what lands on fds 1
and 2 as STREAM messages. Only the main thread unpickles user objects.
"""

from __future__ import annotations

import codecs
import os
import pickle
import select
import signal
import sys
import threading
import time
from typing import Any

from . import messages, protocol, sharedmem
from .core import HEARTBEAT, Configure, Exit, Retire, Run, Send, SharedMemory, WorkerCore, error_message
from .messages import ABSENT, Result, Stream
from .pipes import write_all

STDERR_FD = 2
#: A slice running this long (seconds) wakes the watcher, which reads the stream while it runs.
WATCH_AFTER = 0.003
#: A task does not look for CANCELs that came after it when the input was found empty this recently
#: (at the end of the slice before, usually): one system call a slice, not three.
INPUT_FRESH = 0.0005


class Channel:
    """The protocol's end of the real stdout, safe to write from any thread."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.lock = threading.Lock()

    def send(self, message: messages.Message, call: int = 0, index: int = -1) -> None:
        self.write(message, messages.encode(message, call, index), call, index)

    def write(self, message: messages.Message, chunks: list, call: int, index: int) -> None:
        with self.lock:
            if protocol.TRACING:
                protocol.trace("send", self.name, f"{message.kind.name} call={call} index={index}")
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
        self.pipes: dict = {}
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
                self.channel.send(Stream(stream, text), call, index)

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
                self.channel.send(Stream("stderr", note), call, index)
        return more


class SharedSlices(SharedMemory):
    """Shared memory with a local master (``sharedmem``): slices attached, params copied out of its arena."""

    def __init__(self) -> None:
        self.params = sharedmem.ArenaReader()

    def attach(self, handle: dict) -> Any:
        return sharedmem.attach(handle)

    def read_params(self, handle: dict) -> list:
        return self.params.read(handle)


class ResultLender:
    """Writes a RESULT's frame: a local worker's first big result of a call leaves its buffers in its
    arena, where the master reads them; the arena is written again in a later call only, unless the
    master said the last result is still in use (``Retire``): see ``sharedmem``."""

    def __init__(self) -> None:
        self.share_dir: str | None = None  # the master's shared-memory directory: big results may go there
        self.arena: sharedmem.Arena | None = None
        self.free = True  # no result of this call in it yet

    def configure(self, share: str | None) -> None:
        self.share_dir, self.free = share, True

    def chunks(self, result: Result, call: int, index: int) -> list:
        if not (self.share_dir and self.free):  # (over ssh, and after the first big result of a call)
            return messages.encode(result, call, index)
        value = result.value
        if result.pickled is ABSENT and sharedmem.may_be_big(value):
            buffers: list = []
            pickled = messages.dumps_plain_first(value, buffer_callback=buffers.append)
            views = sharedmem.byte_views(buffers)
            try:
                if views is not None:
                    self.arena = sharedmem.arena_for(self.arena, sum(v.nbytes for v in views),
                                                     f"{sharedmem.RESULT_PREFIX}{os.getpid()}-", self.share_dir)
                    result = Result(pickled=pickle.PickleBuffer(pickled), arena=self.arena.write(views),
                                    seconds=result.seconds)
                    self.free = False
            except OSError:  # /dev/shm full: the pipe it is
                pass
        return messages.encode(result, call, index)

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None


class Shell:
    """Carries out a ``WorkerCore``'s actions in a worker process: reads fd ``fd_in``, writes through
    ``channel``, runs mapfunc, keeps the watcher and the timer (see the module's rules)."""

    def __init__(self, core: WorkerCore, fd_in: int, channel: Channel) -> None:
        self.core = core
        self.name = core.name
        self.fd_in = fd_in
        self.channel = channel
        self.lock = threading.Lock()  # held for every call into the core and the writes it asks for
        self.read_lock = threading.Lock()  # whoever holds it may read fd_in
        self.input_seen = 0.0  # perf_counter() when fd_in was last found empty
        self.reads = 0  # reads of fd_in so far, by either thread
        self.computing = False  # the main thread is in mapfunc: the watcher reads
        self.running = False  # inside mapfunc: only then does SIGINT interrupt
        self.timer = SliceTimer()
        self.timer_armed = False  # set by whoever arms it (a slice finding it idle, or the watcher)
        self.slice_started = 0.0  # perf_counter() when the running slice began
        self.beat = HEARTBEAT  # seconds between ALIVEs while a slice runs (the CALL says)
        self.lender = ResultLender()
        self.pump: OutputPump | None = None

    @property
    def call(self) -> int:
        """The current call (the core's), for a mapfunc that looks (tests do, through the SIGINT handler)."""
        return self.core.call

    # -- the core's answers -------------------------------------------------------------
    def ask(self, method: Any, *args: Any) -> list:
        """Call the core under the lock, write the frames it asks for, and return its other actions."""
        with self.lock:
            actions = method(*args)
            return self.sends(actions) if actions else actions

    def sends(self, actions: list) -> list:
        """Write the frames ``actions`` ask for (holding the lock); the other actions, in order."""
        rest = []
        for action in actions:
            if type(action) is Send:
                self.send(action)
            else:
                rest.append(action)
        return rest

    def send(self, action: Send) -> None:
        message, call, index = action.message, action.call, action.index
        if type(message) is Result:
            try:
                chunks = self.lender.chunks(message, call, index)
            except BaseException as exc:
                message = error_message(exc, "pickling the result")
            else:
                self.channel.write(message, chunks, call, index)
                return
        if type(message) is messages.Error:
            self.pump.drain()  # what the slice printed goes before its error
        self.channel.send(message, call, index)

    def perform(self, actions: list) -> None:
        for action in actions:
            kind = type(action)
            if kind is Run:
                self.run(action)
            elif kind is Configure:
                self.beat = action.beat
                self.lender.configure(action.share)
            elif kind is Retire:
                self.lender.close()
            elif kind is Exit:
                self.exit(action)

    def exit(self, action: Exit) -> None:
        self.lender.close()
        if action.reason:
            fatal(action.reason, action.status)
        leave(action.status)

    # -- reading (either thread, holding read_lock) ------------------------
    def read_once(self) -> bool:
        """One read of the stream (blocking until bytes come), its frames handed to the core;
        True if it filled the buffer (more may be waiting)."""
        try:
            buf = self.core.get_buffer()
            n = os.readv(self.fd_in, [buf])
            actions = self.ask(self.core.buffer_updated, n) if n else self.ask(self.core.eof)
            self.reads += 1
            if actions:
                self.perform(actions)  # (only an Exit comes from reading)
            return n == len(buf)
        except BaseException as exc:  # a broken stream leaves nothing to do
            fatal(f"worker {self.name}: {type(exc).__name__}: {exc}")
            return False

    def read_ready(self) -> None:
        """Read what has already arrived, without waiting (CANCELs sent after a TASK count before it runs)."""
        with self.read_lock:
            while select.select([self.fd_in], [], [], 0)[0]:
                self.read_once()
        self.input_seen = time.perf_counter()

    def watch(self) -> None:
        """The reader while a long mapfunc runs (a thread): asleep the rest of the time.

        The timer is armed by a slice that finds it idle (``timer_armed``), and not
        disarmed: when it fires, the watcher looks at the slice running then. Too
        young: the timer is armed again for when it turns ``WATCH_AFTER``. None:
        the timer stays idle until the next slice arms it. So a stream of short
        slices costs a wake-up every 3 ms at most, not two system calls a slice.
        A slice that ends while the next begins at once is told from it by the
        core's ``slices``: each gets its STARTED, and its ALIVEs every ``beat`` s.
        """
        core = self.core
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
            this = core.slices
            self.ask(self.announce)
            beaten = time.perf_counter()
            while self.computing and core.slices == this:
                if poller.poll(50):  # ms: a finished slice is noticed within this, at worst
                    with self.read_lock:
                        if not self.computing:
                            break
                        # Again, holding the lock: the main thread may have read it all meanwhile,
                        # and a read that blocks here would keep it from its next TASK.
                        if poller.poll(0):
                            self.read_once()
                if time.perf_counter() - beaten >= self.beat:
                    self.ask(self.heartbeat, this)
                    beaten = time.perf_counter()
            # Look again when the slice running now (if one is) turns WATCH_AFTER, at once if it has.
            self.timer.arm(max(0.0, self.slice_started + WATCH_AFTER - time.perf_counter()) if self.computing else 0.0)

    def announce(self) -> list:
        """STARTED, unless mapfunc has returned meanwhile (the slice's end is near: no word needed)."""
        return self.core.announce() if self.computing else []

    def heartbeat(self, slice_number: int) -> list:
        return self.core.heartbeat(slice_number) if self.computing else []

    # -- main thread -----------------------------------------------------
    def serve(self) -> None:
        core, lock, inbox, entries = self.core, self.lock, self.core.inbox, self.core.entries
        while True:
            if not (inbox or entries):
                with self.read_lock:
                    if not (inbox or entries) and not self.read_once():  # a short read most likely emptied the pipe
                        self.input_seen = time.perf_counter()
                continue
            if time.perf_counter() - self.input_seen > INPUT_FRESH:  # (the last slice's end looked, usually)
                self.read_ready()
            with lock:
                actions = core.step()
                if actions and type(actions[0]) is Run:  # the usual: a slice to run, nothing to say (a Run is last)
                    run = actions[0]
                else:
                    run = None
                    actions = self.sends(actions)
            if run is not None:
                self.run(run)
            elif actions:
                self.perform(actions)

    def run(self, run: Run) -> None:
        """mapfunc on one slice, then its RESULT (or ERROR) through the core."""
        call, index = run.call, run.index
        self.pump.start_slice(call, index)
        start = self.slice_started = time.perf_counter()
        try:
            self.running = self.computing = True
            if not self.timer_armed:
                self.timer_armed = True
                self.timer.arm(WATCH_AFTER)
            try:
                if run.delay is not ABSENT:  # a straggler, made by the master's chaos: inside the slice's time
                    time.sleep(run.delay)
                value = run.func(run.params, run.data)
            finally:
                self.running = self.computing = False
        except SystemExit as exc:  # mapfunc asked the process to exit: it does, as it would anywhere
            self.pump.drain()
            code = exc.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            os.write(STDERR_FD, f"qjam worker {self.name}: sys.exit({exc.code!r}) in mapfunc, slice {index}\n".encode())
            self.lender.close()
            leave((code or 0) & 0xFF)
        except BaseException as exc:
            self.ask(self.core.failed, call, index, exc, 1)  # (the ERROR drains the pump first)
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
        with self.lock:
            actions = self.core.finished(call, index, value, seconds)  # the RESULT, and a CANCELLED owed
            try:
                chunks = self.lender.chunks(actions[0].message, call, index)
            except BaseException as exc:
                self.send(Send(error_message(exc, "pickling the result"), call, index))
            else:
                self.channel.write(actions[0].message, chunks, call, index)
            if len(actions) > 1:
                self.send(actions[1])

    def interrupt(self, signum: int, frame: object) -> None:
        """SIGINT from the master (a cancelled call): stop mapfunc, never the worker itself."""
        if self.running:
            raise KeyboardInterrupt


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


def fatal(message: str, status: int = 3) -> None:
    try:
        os.write(STDERR_FD, (message + "\n").encode(errors="replace"))
    finally:
        leave(status)


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
