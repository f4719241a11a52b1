"""The wire protocol, sans-IO: bytes in, frames out; messages in, bytes out.

Ground rules of this file:

* It travels. The master and every worker import it, so it uses the standard
  library only and imports nothing of qjam_nb.
* It does no I/O. ``FrameDecoder`` is fed bytes (or hands out the buffer the
  next bytes should land in) and returns whole frames; "need more bytes" is
  ``None`` from ``next_frame()``, never a blocking read.
* Large buffers are never copied twice. A message body is pickled with
  protocol 5 and its out-of-band buffers (numpy arrays, bytes wrapped in
  ``PickleBuffer``) become separate frame parts, written as they are and read
  straight into their own buffers.

A frame is a fixed header, a table of part lengths, then the parts::

    magic "QJ" | version u8 | kind u8 | call u32 | index i32 | nparts u32 | size u64
    nparts x u64 part lengths (they add up to size)
    part 0: the pickled body; parts 1..: its out-of-band buffers, in order

``call`` is the map call a frame belongs to (0 for none) and ``index`` the
slice (-1 for none), so a frame reads as ``RESULT call=3 index=12`` in traces
(set ``QJAM_DEBUG=1``) without unpickling anything.

Message kinds: ``Kind`` below gives each its code (never reused); what each
says, who sends it, its fields and its codec are in one table, the classes of
``messages.py`` (rendered in ``docs/design.md`` §3). Add a kind there too.
"""

from __future__ import annotations

import enum
import mmap
import os
import pickle
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"QJ"
HEADER = struct.Struct(">2sBBIiIQ")
LENGTH = struct.Struct(">Q")
_HEADER_ONE_PART = struct.Struct(">2sBBIiIQQ")  # the header and length table of a one-part frame
#: Largest frame either side accepts, in bytes (parts added up); a slice
#: bigger than this should be cut smaller. ``QJAM_MAX_FRAME`` overrides it.
MAX_FRAME = int(os.environ.get("QJAM_MAX_FRAME", 16 << 30))
MAX_PARTS = 1 << 16
#: Reads smaller than this go through the decoder's scratch buffer; a part at
#: least this large is read straight into its own buffer.
DIRECT_READ = 64 << 10
SCRATCH = 256 << 10


class QjamError(Exception):
    """Base of every error qjam_nb raises (the tree is in ``qjam_nb.errors``)."""


class ProtocolError(QjamError):
    """A frame was truncated, oversized or malformed: the stream is unusable."""


class Kind(enum.IntEnum):
    HELLO = 1
    CALL = 2
    DATA = 3
    TASK = 4
    NEED = 5
    STARTED = 6
    RESULT = 7
    ERROR = 8
    STREAM = 9
    CANCEL = 10
    DROP = 11
    BYE = 12
    TASKS = 13
    ALIVE = 14
    CANCELLED = 15


_KINDS: dict[int, Kind] = dict(Kind._value2member_map_)  # type: ignore[arg-type]  # faster than Kind(n)


class Frame:
    """One decoded frame: its kind, call, slice index and raw parts."""

    __slots__ = ("kind", "call", "index", "parts")

    def __init__(self, kind: Kind, call: int, index: int, parts: list) -> None:
        self.kind = kind
        self.call = call
        self.index = index
        self.parts = parts

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)

    def body(self, loads: Callable[..., Any] = pickle.loads) -> Any:
        """Unpickle the body, handing the out-of-band parts back as buffers."""
        parts = self.parts
        try:
            if len(parts) == 1:  # most frames: no out-of-band buffers
                return loads(parts[0])
            # Read-only views: a mapfunc that writes into its cached slice
            # would make the cache lie about the slice's content.
            return loads(parts[0], buffers=[p.toreadonly() for p in parts[1:]])
        except Exception as exc:
            raise ProtocolError(
                f"could not unpickle the body of a {self.kind.name} frame: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"<Frame {self.kind.name} call={self.call} index={self.index} "
            f"parts={len(self.parts)} bytes={self.size}>"
        )


def encode(
    kind: Kind,
    body: Any = None,
    *,
    call: int = 0,
    index: int = -1,
    dumps: Callable[..., bytes] = pickle.dumps,
) -> list:
    """Turn a message into the chunks of one frame, to be written in order.

    Out-of-band buffers are returned as memoryviews of the caller's objects,
    not copies: keep those objects unchanged until the chunks are written.
    """
    buffers: list = []
    payload = dumps(body, protocol=5, buffer_callback=buffers.append)
    if not buffers:  # most frames: the pickle is the only part
        return [header(kind, call, index, (len(payload),)), payload]
    parts = [payload]
    for buf in buffers:
        try:
            parts.append(buf.raw())
        except BufferError:  # not contiguous: pickle could not avoid a copy
            parts.append(bytes(buf))
    return [header(kind, call, index, [len(p) for p in parts]), *parts]


def header(kind: int, call: int, index: int, lengths: Sequence[int]) -> bytes:
    """The fixed header plus the part-length table for these part lengths."""
    if len(lengths) == 1:  # most frames: one pack
        return _HEADER_ONE_PART.pack(MAGIC, PROTOCOL_VERSION, int(kind), call, index, 1, lengths[0], lengths[0])
    if len(lengths) > MAX_PARTS:
        raise ProtocolError(f"a frame may have at most {MAX_PARTS} parts, not {len(lengths)}")
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), call, index, len(lengths), sum(lengths))
    return head + struct.pack(f">{len(lengths)}Q", *lengths)


def frame_size(chunks: list) -> int:
    """Bytes on the wire of one frame as ``encode`` made it (read from its header, not counted)."""
    return len(chunks[0]) + HEADER.unpack_from(chunks[0])[6]


def frame_bytes(chunks: Iterable) -> bytes:
    """Join encoded chunks into one bytes object (tests and small frames)."""
    return b"".join(bytes(c) for c in chunks)


class FrameDecoder:
    """Reassembles frames from a byte stream, without doing any I/O.

    Two ways in, mixable: ``feed(data)`` copies bytes in; or take
    ``get_buffer()``, read into it, and report ``buffer_updated(n)`` (large
    parts are then read straight into their final buffers). Whole frames come
    out of ``next_frame()``, which returns ``None`` when it needs more bytes.
    Call ``eof()`` when the stream ends: a half-read frame is an error then.
    """

    def __init__(self, max_frame: int = MAX_FRAME, max_parts: int = MAX_PARTS) -> None:
        self.max_frame = max_frame
        self.max_parts = max_parts
        self._frames: deque = deque()
        self._scratch = bytearray(SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._target = memoryview(bytearray(HEADER.size))  # what we are filling
        self._filled = 0
        self._stage = "header"
        self._head: tuple = ()
        self._lengths: list = []
        self._parts: list = []
        self._direct = False
        self._spare = SpareBuffers()  # part buffers handed out, reused once let go
        self.failed: ProtocolError | None = None

    # -- input ---------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next bytes should be read into."""
        if self.failed is not None:
            self._check_usable()
        remaining = len(self._target) - self._filled
        if self._stage == "parts" and remaining >= DIRECT_READ:
            self._direct = True
            return self._target[self._filled :]
        self._direct = False
        return self._scratch_view

    def buffer_updated(self, n: int) -> None:
        """``n`` bytes were written into the last ``get_buffer()``."""
        if self._direct:
            self._direct = False
            self._filled += n
            if self._filled == len(self._target):
                self._advance()
        else:
            self.feed(self._scratch_view[:n])

    def feed(self, data) -> None:
        """Copy ``data`` into the frame being assembled."""
        if self.failed is not None:
            self._check_usable()
        view = memoryview(data).cast("B")
        pos = 0
        try:
            if self._stage == "header" and not self._filled:
                pos = self._whole_frames(view)
            while pos < len(view):
                take = min(len(self._target) - self._filled, len(view) - pos)
                self._target[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == len(self._target):
                    self._advance()
                    if self._stage == "header":  # a frame cut by the last read is whole: back to the fast path
                        pos += self._whole_frames(view[pos:])
        except ProtocolError as exc:
            self.failed = exc
            raise

    def _whole_frames(self, view: memoryview) -> int:
        """Take the frames that lie whole in ``view`` at once (each part copied out of it); returns
        where the rest starts. Small messages come many to a read: this skips the byte-by-stage
        assembly for them (~3x less work for a TASK or a RESULT)."""
        pos, end = 0, len(view)
        kinds, frames, max_parts, max_frame = _KINDS, self._frames, self.max_parts, self.max_frame
        one_part = _HEADER_ONE_PART.size
        while end - pos >= one_part:  # (a frame has at least one part)
            magic, version, kind, call, index, nparts, size, first = _HEADER_ONE_PART.unpack_from(view, pos)
            if (magic != MAGIC or version != PROTOCOL_VERSION or kind not in kinds or not 0 < nparts <= max_parts
                    or size > max_frame):
                self._parse_header(bytes(view[pos : pos + HEADER.size]))  # raises, saying what is wrong
            start = pos + HEADER.size + LENGTH.size * nparts
            if end - start < size:
                break
            if nparts == 1:
                if first != size:
                    raise ProtocolError(f"malformed frame: part lengths add up to {first}, header says {size}")
                parts = [view[start : start + size].tobytes()]  # (bytes: loads takes them as they are)
                start += size
            else:
                lengths = struct.unpack_from(f">{nparts}Q", view, pos + HEADER.size)
                if sum(lengths) != size:
                    raise ProtocolError(f"malformed frame: part lengths add up to {sum(lengths)}, header says {size}")
                parts = []
                for n in lengths:
                    parts.append(memoryview(view[start : start + n].tobytes()))
                    start += n
            frames.append(Frame(kinds[kind], call, index, parts))
            pos = start
        return pos

    @property
    def partial(self) -> bool:
        """Part of a frame has come and the rest has not yet."""
        return self._stage != "header" or self._filled > 0

    def eof(self) -> None:
        """The stream ended; complain if it ended inside a frame."""
        self._check_usable()  # after an error, say so rather than "truncated"
        if self._stage != "header" or self._filled:
            what = f"a {Kind(self._head[2]).name} frame" if self._head else "a frame"
            raise ProtocolError(
                f"stream ended inside {what} (truncated while reading its {self._stage}, "
                f"{self._filled} of {len(self._target)} bytes)"
            )

    # -- output --------------------------------------------------------
    def next_frame(self) -> Frame | None:
        return self._frames.popleft() if self._frames else None

    # -- the state machine ---------------------------------------------
    def _check_usable(self) -> None:
        if self.failed is not None:
            raise ProtocolError(f"the stream is unusable after an earlier error: {self.failed}")

    def _expect(self, size: int) -> None:
        self._target = memoryview(self._spare.get(size) if REUSE_MIN <= size < BIG_PART else allocate(size))
        self._filled = 0

    def _advance(self) -> None:
        if self._stage == "header":
            self._head = self._parse_header(bytes(self._target))
            nparts = self._head[5]
            self._stage = "lengths"
            self._expect(LENGTH.size * nparts)
        elif self._stage == "lengths":
            size = self._head[6]
            lengths = [n for (n,) in LENGTH.iter_unpack(self._target)]
            if sum(lengths) != size:
                raise ProtocolError(
                    f"malformed frame: part lengths add up to {sum(lengths)}, header says {size}"
                )
            self._lengths, self._parts = lengths, []
            self._stage = "parts"
            self._next_part()
        else:
            self._parts.append(self._target)
            self._next_part()

    def _next_part(self) -> None:
        while len(self._parts) < len(self._lengths) and self._lengths[len(self._parts)] == 0:
            self._parts.append(memoryview(b""))
        if len(self._parts) < len(self._lengths):
            self._expect(self._lengths[len(self._parts)])
            return
        _, _, kind, call, index, _, _ = self._head
        self._frames.append(Frame(_KINDS[kind], call, index, self._parts))
        self._stage, self._head, self._lengths, self._parts = "header", (), [], []
        self._expect(HEADER.size)

    def _parse_header(self, raw: bytes) -> tuple:
        head = HEADER.unpack(raw)
        magic, version, kind, _, _, nparts, size = head
        if magic != MAGIC:
            raise ProtocolError(
                f"malformed frame: bad magic {raw[:8]!r}; something other than qjam_nb "
                "wrote to the stream (a shell greeting, or a print before the worker started?)"
            )
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"the peer speaks protocol version {version}, this side {PROTOCOL_VERSION}: "
                "master and worker come from different qjam_nb releases"
            )
        if kind not in _KINDS:
            raise ProtocolError(f"malformed frame: unknown message kind {kind}")
        if nparts < 1 or nparts > self.max_parts:
            raise ProtocolError(
                f"malformed {Kind(kind).name} frame: {nparts} parts (allowed 1 to {self.max_parts})"
            )
        if size > self.max_frame:
            raise ProtocolError(
                f"oversized {Kind(kind).name} frame: {size} bytes, the limit is {self.max_frame}; "
                "use smaller slices (slice_size=) or raise QJAM_MAX_FRAME on both sides"
            )
        return head


class SpareBuffers:
    """Buffers of a few sizes, handed out again once nothing built on them is alive.

    A 1 MiB params vector or result arrives every call; a fresh ``bytearray``
    costs zero-filling it and, in a process without tuned malloc, faulting its
    pages in again (~0.1-0.3 ms a MiB here). A buffer that only this list
    still refers to (everything built on it is gone) is overwritten instead.
    At most ``REUSE_BYTES`` are kept, the oldest let go first.
    """

    def __init__(self) -> None:
        self.buffers: list[bytearray] = []

    def get(self, size: int) -> bytearray:
        spare = self.buffers
        for buf in spare:
            if len(buf) == size and sys.getrefcount(buf) <= 3:  # spare, buf, getrefcount's argument
                return buf
        buf = bytearray(size)
        spare.append(buf)
        while sum(len(b) for b in spare) > REUSE_BYTES and len(spare) > 1:
            spare.pop(0)
        return buf


def allocate(size: int):
    """A writable buffer of ``size`` bytes for a part to be read into.

    Large parts get anonymous memory from ``mmap``, whose pages the kernel
    zeroes as they are first written: ``bytearray(size)`` would first write
    zeros over all of it, a whole extra pass over a slice of hundreds of MiB.
    """
    if size >= BIG_PART:
        return mmap.mmap(-1, size)
    return bytearray(size)


BIG_PART = 16 << 20
#: Part buffers from this size up (and below BIG_PART) are reused once let go, up to REUSE_BYTES of them.
REUSE_MIN = 256 << 10
REUSE_BYTES = 32 << 20


def trace(direction: str, who: str, frame_or_kind: Any) -> None:
    """With ``QJAM_DEBUG`` set, print one line per frame to stderr (``TRACE_FILE``)."""
    if TRACING:
        print(f"qjam {direction} {who}: {frame_or_kind!r}", file=TRACE_FILE or sys.__stderr__, flush=True)


TRACING = bool(os.environ.get("QJAM_DEBUG"))
#: Where traces go; the worker points it at its real stderr, since its fd 2 is forwarded as output.
TRACE_FILE = None
