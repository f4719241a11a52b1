"""Frames over one worker's byte stream, and the inbox that gathers what every worker says.

Reading is done by the thread that waits for it: the cluster's own thread,
in ``Inbox.get``, polls every link's streams and reads what has arrived, so
a worker's answer wakes one thread, not a reader thread and then the
cluster's (on two cores each wake-up can cost a context switch, ~30 µs
here). Between calls nobody reads; what workers say waits in their pipes.

Writing is done by one writer thread per link, which drains a queue of
encoded frames, so the caller never blocks on a slow pipe and several
workers are fed at once; to a link whose writer is idle the caller writes
itself, as far as the process takes it without blocking (``Link._deliver``).

Everything that happens to a link reaches the cluster as an inbox item:
frames, stderr text, and ``LinkClosed`` once. ``traffic`` counts the reads
and writes that moved bytes, so that a silent worker can be told from one
that talks or takes what it is sent (``qjam_nb.executors.liveness``);
``heard`` counts the reads alone (a stopped process's pipe takes writes too,
until it is full).
"""

from __future__ import annotations

import queue
import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..worker import messages, protocol
from ..worker.pipes import remainder
from ..worker.protocol import Kind, ProtocolError
from .base import CpuState, WorkerProcess

#: Reads of one link per wake-up, at most (then the others get their turn).
READS_PER_PUMP = 64
#: Seconds to wait for a worker's last stderr lines once its stream ended.
LAST_WORDS = 2.0
#: Messages up to this size may be written by the caller itself, as far as the process takes them
#: without blocking (``Link._deliver``); over ssh, only what the channel's open window takes whole
#: (``SshProcess.write_ready``).
DIRECT_WRITE = 16 << 20
#: The writer writes a bigger message in pieces of this size, so that its progress shows in ``traffic``
#: (a big slice to a worker on a slow link is not silence).
WRITE_PIECE = 8 << 20


@dataclass(frozen=True)
class LinkClosed:
    """The worker's stream ended; ``error`` says why if it was not a clean exit."""

    error: str | None


@dataclass(frozen=True)
class StderrOutput:
    """Text the worker wrote to its real stderr (crash reports, fatal errors)."""

    text: str


class Inbox:
    """What the workers said, oldest first, read from their streams by the thread that asks.

    ``get`` and ``get_nowait`` behave as ``queue.SimpleQueue``'s (``queue.Empty``
    when nothing came in time). Used by one thread only.
    """

    def __init__(self) -> None:
        self._items: deque = deque()
        self._poller = select.poll()
        self._links: dict[int, Link] = {}  # polled fd -> its link

    def register(self, link: Link) -> None:
        for fd in link.process.poll_fds():
            self._poller.register(fd, select.POLLIN)
            self._links[fd] = link

    def unregister(self, link: Link, fd: int | None = None) -> None:
        """Stop polling ``link`` (or only its ``fd``)."""
        for polled, owner in list(self._links.items()):
            if owner is link and fd in (None, polled):
                self._poller.unregister(polled)
                del self._links[polled]

    def put(self, item: tuple) -> None:
        self._items.append(item)

    def get(self, timeout: float | None = None) -> tuple:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._items:
            if deadline is None:
                if not self._links:
                    raise queue.Empty  # nothing could ever come
                self._pump(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._pump(left)
        return self._items.popleft()

    def get_read(self) -> tuple | None:
        """The oldest item already read, or None: no system call."""
        return self._items.popleft() if self._items else None

    def get_nowait(self) -> tuple:
        if not self._items:
            self._pump(0)
        if not self._items:
            raise queue.Empty
        return self._items.popleft()

    def _pump(self, seconds: float | None) -> None:
        ms = None if seconds is None else max(0, int(seconds * 1000 + 0.999))
        for fd, _ in self._poller.poll(ms):
            link = self._links.get(fd)
            if link is not None:
                link.pump(fd)


class Link:
    """One worker's frames in and out, with a bounded memory of its stderr."""

    def __init__(self, process: WorkerProcess, inbox: Inbox, max_frame: int | None = None) -> None:
        """Start the writer; everything heard goes to ``inbox`` as ``(link, item)`` when it is read."""
        self.process = process
        self.name = process.name
        self.inbox = inbox
        self.max_frame = protocol.MAX_FRAME if max_frame is None else max_frame
        self.stderr_tail: deque = deque(maxlen=40)
        self.closed = False  # no more sending
        self.ended = False  # the stream ended (LinkClosed is in the inbox)
        self.traffic = 0  # reads and writes that moved bytes so far
        self.heard = 0  # reads that moved bytes so far
        self._decoder = protocol.FrameDecoder(max_frame=self.max_frame)
        self._stderr_open = True
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # messages given to the writer and not yet written (under _lock)
        self._lock = threading.Lock()
        self._holds = 0  # hold() calls not yet released
        self._held: list = []  # chunks kept back meanwhile
        self._held_bytes = 0
        inbox.register(self)
        threading.Thread(target=self._write, name=f"qjam-writer-{self.name}", daemon=True).start()

    # -- sending ---------------------------------------------------------
    def send(self, message: messages.Message, call: int = 0, index: int = -1) -> int:
        """Queue one message, its body pickled as the message table says; returns its size on the wire."""
        return self.send_chunks(messages.encode(message, call, index), message.kind, call, index)

    def send_body(self, cls: type[messages.Message], body: Any, call: int = 0, index: int = -1) -> int:
        """``send`` for a body in its wire shape (``messages.encode_body``): the per-slice TASK and TASKS."""
        return self.send_chunks(messages.encode_body(cls, body, call, index), cls.kind, call, index)

    def send_chunks(self, chunks: list, kind: Kind, call: int = 0, index: int = -1) -> int:
        """Queue one frame's chunks, as ``protocol.encode`` made them; returns its size on the wire."""
        size = protocol.frame_size(chunks)
        if not self.closed:
            if protocol.TRACING:
                protocol.trace("send", self.name, f"{kind.name} call={call} index={index} bytes={size}")
            if self._holds:
                self._held.extend(chunks)
                self._held_bytes += size
            else:
                self._deliver(chunks, size)
        return size

    def hold(self) -> None:
        """Keep what is sent from now on until the matching ``release()``, then write it all at once.

        A call's start (CALL, then the first slices' DATA and TASKs), or a slice
        and its TASK, then wake the worker once, not once per message. Holds nest.
        """
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if not self._holds and self._held:
            held, self._held = self._held, []
            size, self._held_bytes = self._held_bytes, 0
            if not self.closed:
                self._deliver(held, size)

    def _deliver(self, chunks: list, size: int) -> None:
        """Write now, as far as the process takes it without blocking, if the writer has nothing queued;
        the writer takes the rest (and everything while it has something queued: order is kept)."""
        with self._lock:
            if not self._queued and size <= DIRECT_WRITE:
                try:
                    written = self.process.write_ready(chunks, size)
                except Exception:  # broken: the reader sees the stream end and reports it
                    written = size
                if written:
                    self.traffic += 1
                if written == size:
                    return
                chunks = remainder(chunks, written)
            self._queued += 1
        self._outbox.put(chunks)

    def join(self, timeout: float) -> bool:
        """Read until the stream ends (its items go to the inbox), at most ``timeout`` s; True if it did."""
        deadline = time.monotonic() + timeout
        while not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select(self.process.poll_fds(), [], [], left)
            self.pump()
        return True

    def waiting(self) -> bool:
        """Bytes from the worker wait unread (no system call but a zero-timeout select)."""
        return bool(select.select(self.process.poll_fds()[:1], [], [], 0)[0]) and not self.ended

    @property
    def partial(self) -> bool:
        """Part of a frame from the worker has come and the rest has not yet."""
        return self._decoder.partial

    def detach(self) -> None:
        """Stop polling this link's streams (before its process releases them: fds are reused)."""
        self.inbox.unregister(self)

    def close(self) -> None:
        """Stop sending and close the worker's stdin (it exits on EOF)."""
        if not self.closed:
            self.closed = True
            self._outbox.put(None)

    # -- the worker process: the only door to it from above (tests/test_layers.py) ------------------
    @property
    def shares_memory(self) -> bool:
        """The worker is on this machine: slices and results may go through shared memory."""
        return self.process.shares_memory

    @property
    def pid(self) -> int | None:
        """The worker's pid on its host, once known."""
        return getattr(self.process, "pid", None)

    def learn_pid(self, pid: int | None) -> None:
        """Take the pid the worker's hello gives, where the transport did not know it (ssh)."""
        if self.pid is None:
            self.process.pid = pid

    def kill(self) -> None:
        """End the worker and its process group now, without waiting."""
        self.process.kill()

    def interrupt(self) -> None:
        """SIGINT to the worker: it stops the mapfunc it runs."""
        self.process.interrupt()

    def exit_status(self) -> int | None:
        return self.process.exit_status()

    def cpu_state(self) -> CpuState | None:
        return self.process.cpu_state()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` s for the worker's end; its exit status, or None if it still runs."""
        return self.process.wait(timeout)

    def free(self) -> None:
        """Let the process's pipes or channel go, once it ended and this link is detached."""
        self.process.release()

    def drop(self) -> None:
        """Cut the connection as a failing network would (chaos): nothing more goes either way."""
        self.close()
        self.process.drop()

    # -- reading (the inbox's thread) ----------------------------------------
    def pump(self, fd: int | None = None) -> None:
        """Read what has arrived, without waiting: frames and stderr text go to the inbox.

        ``fd``, the one that polled readable, saves a system call: a local worker's
        stderr is read only when it has something (an ssh channel has one fd for both).
        """
        if self.ended:
            return
        fds = self.process.poll_fds()
        if fd is None or len(fds) == 1 or fd == fds[-1]:
            self._read_stderr()
            if fd is not None and len(fds) > 1:
                return
        decoder = self._decoder
        try:
            for _ in range(READS_PER_PUMP):
                buf = decoder.get_buffer()
                n = self.process.read_ready(buf)
                if n is None:
                    return
                if not n:
                    # A frame cut short at the end means the worker died while writing it: its exit
                    # status says why, better than "truncated frame" would.
                    self._end(None)
                    return
                decoder.buffer_updated(n)
                self.traffic += 1
                self.heard += 1
                while (frame := decoder.next_frame()) is not None:
                    if protocol.TRACING:
                        protocol.trace("recv", self.name, frame)
                    self.inbox.put((self, frame))
                if n < len(buf):  # the pipe is most likely empty now: poll says when it is not
                    return
        except ProtocolError as exc:
            self.process.kill()
            # Whole frames read in the same chunk as the bad one still count (a STARTED says which
            # slice the worker was running when it broke).
            while (frame := decoder.next_frame()) is not None:
                self.inbox.put((self, frame))
            self._end(f"protocol error from worker {self.name}: {exc}")
        except OSError as exc:
            self._end(f"lost the stream of worker {self.name}: {exc}")

    def _read_stderr(self) -> None:
        while self._stderr_open:
            try:
                data = self.process.read_stderr_ready()
            except OSError:
                data = b""
            if data is None:
                return
            if not data:
                self._stderr_open = False
                fds = self.process.poll_fds()
                if len(fds) > 1:  # its own fd would poll readable for ever
                    self.inbox.unregister(self, fds[-1])
                return
            self.traffic += 1
            self.heard += 1
            text = data.decode(errors="replace")
            self.stderr_tail.extend(text.splitlines())
            self.inbox.put((self, StderrOutput(text)))

    def _end(self, error: str | None) -> None:
        self.ended = True
        # Let the worker's last words (its stderr, until it closes) arrive before we report.
        deadline = time.monotonic() + LAST_WORDS
        fds = self.process.poll_fds()
        self._read_stderr()
        while self._stderr_open and (left := deadline - time.monotonic()) > 0:
            if len(fds) > 1:  # stderr's own fd (stdout's, at its end, would poll readable at once)
                select.select(fds[-1:], [], [], left)
            else:  # one fd for both, readable since the stream ended: look again shortly
                time.sleep(min(left, 0.01))
            self._read_stderr()
        self.inbox.unregister(self)
        self.closed = True
        self._outbox.put(None)
        self.inbox.put((self, LinkClosed(error)))

    # -- the writer thread -------------------------------------------------
    def _write(self) -> None:
        try:
            while (chunks := self._outbox.get()) is not None:
                for piece in pieces(chunks, WRITE_PIECE):
                    self.process.write(piece)
                    self.traffic += 1
                with self._lock:
                    self._queued -= 1
        except Exception:  # OSError, or the ssh library's own: the stream is broken either way
            pass  # the reader sees the stream end and reports it
        finally:
            self.closed = True
            self.process.close()


def pieces(chunks: list, size: int) -> Iterator[list]:
    """``chunks`` (a message) in runs of about ``size`` bytes, big buffers cut; one run if it is smaller."""
    if sum(memoryview(chunk).nbytes for chunk in chunks) <= size:
        yield chunks
        return
    run: list = []
    filled = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            take = min(size - filled, view.nbytes)
            run.append(view[:take])
            filled += take
            view = view[take:]
            if filled == size:
                yield run
                run, filled = [], 0
    if run:
        yield run
