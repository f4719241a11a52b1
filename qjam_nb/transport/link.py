"""Frames over one worker's byte stream.

A ``Link`` owns three threads per worker: a reader that decodes frames and
puts them in the cluster's inbox, a writer that drains a queue of encoded
frames (so the caller never blocks on a slow pipe, and several workers are fed
at once), and a stderr reader that keeps the last lines for error messages.
Everything that happens to the link reaches the cluster as an inbox item, on
the cluster's own thread: frames, stderr text, and ``LinkClosed`` once.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..worker import protocol
from ..worker.protocol import Kind, ProtocolError
from .base import WorkerProcess


@dataclass(frozen=True)
class LinkClosed:
    """The worker's stream ended; ``error`` says why if it was not a clean exit."""

    error: str | None


@dataclass(frozen=True)
class StderrOutput:
    """Text the worker wrote to its real stderr (crash reports, fatal errors)."""

    text: str


class Link:
    """One worker's frames in and out, with a bounded memory of its stderr."""

    def __init__(self, process: WorkerProcess, inbox: queue.SimpleQueue, max_frame: int | None = None) -> None:
        """Start the threads; everything heard goes to ``inbox`` as ``(link, item)``."""
        self.process = process
        self.name = process.name
        self.inbox = inbox
        self.max_frame = protocol.MAX_FRAME if max_frame is None else max_frame
        self.stderr_tail: deque = deque(maxlen=40)
        self.closed = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._holds = 0  # hold() calls not yet released
        self._held: list = []  # chunks kept back meanwhile
        self._reader_done = threading.Event()
        self._stderr_done = threading.Event()
        for target, label in ((self._read, "reader"), (self._write, "writer"), (self._read_stderr, "stderr")):
            threading.Thread(target=target, name=f"qjam-{label}-{self.name}", daemon=True).start()

    # -- sending ---------------------------------------------------------
    def send(
        self,
        kind: Kind,
        body: Any = None,
        call: int = 0,
        index: int = -1,
        dumps: Callable[..., bytes] = cloudpickle.dumps,
    ) -> int:
        """Queue one message; returns its size in bytes on the wire."""
        return self.send_chunks(protocol.encode(kind, body, call=call, index=index, dumps=dumps), kind, call, index)

    def send_chunks(self, chunks: list, kind: Kind, call: int = 0, index: int = -1) -> int:
        size = sum(memoryview(c).nbytes for c in chunks)
        if not self.closed:
            protocol.trace("send", self.name, f"{kind.name} call={call} index={index} bytes={size}")
            if self._holds:
                self._held.extend(chunks)
            else:
                self._outbox.put(chunks)
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
            if not self.closed:
                self._outbox.put(held)

    def join(self, timeout: float) -> bool:
        """Wait for the reader to see the end of the stream; True if it did."""
        return self._reader_done.wait(timeout)

    def close(self) -> None:
        """Stop sending and close the worker's stdin (it exits on EOF)."""
        if not self.closed:
            self.closed = True
            self._outbox.put(None)

    # -- threads ---------------------------------------------------------
    def _write(self) -> None:
        try:
            while (chunks := self._outbox.get()) is not None:
                self.process.write(chunks)
        except Exception:  # OSError, or the ssh library's own: the stream is broken either way
            pass  # the reader sees the stream end and reports it
        finally:
            self.closed = True
            self.process.close()

    def _read(self) -> None:
        decoder = protocol.FrameDecoder(max_frame=self.max_frame)
        error = None
        try:
            while True:
                buf = decoder.get_buffer()
                n = self.process.readinto(buf)
                if not n:
                    # A frame cut short at the end means the worker died while writing it: its exit
                    # status says why, better than "truncated frame" would.
                    break
                decoder.buffer_updated(n)
                while (frame := decoder.next_frame()) is not None:
                    protocol.trace("recv", self.name, frame)
                    self.inbox.put((self, frame))
        except ProtocolError as exc:
            error = f"protocol error from worker {self.name}: {exc}"
            self.process.kill()
            # Whole frames read in the same chunk as the bad one still count (a STARTED says which
            # slice the worker was running when it broke).
            while (frame := decoder.next_frame()) is not None:
                self.inbox.put((self, frame))
        except OSError as exc:
            error = f"lost the stream of worker {self.name}: {exc}"
        self._reader_done.set()
        # Let the stderr reader catch the worker's last words before we report.
        self._stderr_done.wait(2.0)
        self.closed = True
        self._outbox.put(None)
        self.inbox.put((self, LinkClosed(error)))

    def _read_stderr(self) -> None:
        try:
            while data := self.process.read_stderr():
                text = data.decode(errors="replace")
                self.stderr_tail.extend(text.splitlines())
                self.inbox.put((self, StderrOutput(text)))
        except OSError:
            pass
        finally:
            self._stderr_done.set()
