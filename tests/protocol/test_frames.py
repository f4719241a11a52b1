"""The frame codec, sans-IO: bytes in, frames out, no processes and no sockets.

Every stream is decoded several ways (whole, one byte at a time, in random
chunks, through ``get_buffer()``/``buffer_updated()``) and must give the same
frames, as h11's tests do for HTTP.
"""

from __future__ import annotations

import pickle
import random
import struct

import numpy as np
import pytest

from qjam_nb.worker import protocol
from qjam_nb.worker.protocol import HEADER, LENGTH, MAGIC, PROTOCOL_VERSION, FrameDecoder, Kind, ProtocolError

# -- helpers -------------------------------------------------------------


def assert_same(a, b, path="body"):
    """Deep equality that understands numpy arrays (dtype, shape and values)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{path}: {type(b).__name__} is not an ndarray"
        assert a.dtype == b.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
        assert a.shape == b.shape, f"{path}: shape {b.shape} != {a.shape}"
        if a.dtype.hasobject:
            assert np.array_equal(a, b), f"{path}: values differ"
        else:  # bit for bit, so NaNs and structured dtypes compare too
            assert a.tobytes() == b.tobytes(), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {list(b)} != {list(a)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(b).__name__} is not {type(a).__name__}"
        assert len(a) == len(b), f"{path}: length {len(b)} != {len(a)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, pickle.PickleBuffer):
        assert bytes(a.raw()) == bytes(b), f"{path}: buffer contents differ"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {b!r} != {a!r}"


def encoded(kind, body=None, call=0, index=-1) -> bytes:
    return protocol.frame_bytes(protocol.encode(kind, body, call=call, index=index))


def raw_frame(kind=Kind.DATA, parts=(b"",), *, magic=MAGIC, version=PROTOCOL_VERSION, nparts=None, size=None,
              lengths=None, call=0, index=-1) -> bytes:
    """A frame built by hand, so that any header field can be wrong."""
    lengths = [len(p) for p in parts] if lengths is None else lengths
    nparts = len(lengths) if nparts is None else nparts
    size = sum(lengths) if size is None else size
    head = HEADER.pack(magic, version, int(kind), call, index, nparts, size)
    return head + b"".join(LENGTH.pack(n) for n in lengths) + b"".join(parts)


def decode_whole(stream: bytes, **kw) -> list:
    d = FrameDecoder(**kw)
    d.feed(stream)
    d.eof()
    return drain(d)


def decode_bytewise(stream: bytes, **kw) -> list:
    d = FrameDecoder(**kw)
    frames = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        frames += drain(d)
    d.eof()
    return frames


def decode_chunks(stream: bytes, seed: int, max_chunk: int = 5000, **kw) -> list:
    rng = random.Random(seed)
    d = FrameDecoder(**kw)
    frames, pos = [], 0
    while pos < len(stream):
        n = rng.randint(1, max_chunk)
        d.feed(memoryview(stream)[pos : pos + n])  # memoryviews are fed too, not just bytes
        pos += n
        frames += drain(d)
    d.eof()
    return frames


def decode_via_buffer(stream: bytes, seed: int, max_read: int = 300_000, seen: list | None = None, **kw) -> list:
    """Like a socket reader: take get_buffer(), write up to n bytes in, report buffer_updated(n)."""
    rng = random.Random(seed)
    d = FrameDecoder(**kw)
    frames, pos = [], 0
    while pos < len(stream):
        buf = d.get_buffer()
        assert len(buf) > 0
        if seen is not None:
            seen.append(buf)
        n = min(len(buf), rng.randint(1, max_read), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        d.buffer_updated(n)
        pos += n
        frames += drain(d)
    d.eof()
    return frames


def drain(d: FrameDecoder) -> list:
    out = []
    while (f := d.next_frame()) is not None:
        out.append(f)
    return out


def summary(frames) -> list:
    return [(f.kind, f.call, f.index, len(f.parts)) for f in frames]


def assert_frames_equal(got, want_frames):
    """``want_frames``: list of (kind, call, index, body)."""
    assert [(f.kind, f.call, f.index) for f in got] == [(k, c, i) for k, c, i, _ in want_frames]
    for f, (_, _, _, body) in zip(got, want_frames, strict=True):
        assert_same(body, f.body())


# -- bodies ----------------------------------------------------------------


def nested_body():
    rng = np.random.default_rng(0)
    structured = np.zeros(4, dtype=[("x", "<f8"), ("n", "<i4")])
    structured["x"] = [1.5, 2.5, -1, np.nan]
    structured["n"] = [1, 2, 3, 4]
    return {
        "f64": rng.standard_normal((30, 7)),
        "f32_fortran": np.asfortranarray(rng.standard_normal((5, 9)).astype(np.float32)),
        "lists": [
            np.arange(100, dtype=np.int8),
            np.arange(12, dtype=np.uint16).reshape(3, 4),
            (np.array([True, False, True]), np.array([1 + 2j, 3 - 4j], dtype=np.complex128)),
        ],
        "empty": (np.zeros((0,), dtype=np.float64), np.empty((0, 5), dtype=np.int32), np.empty((3, 0, 2))),
        "scalar_array": np.array(3.25),
        "strided": np.arange(40, dtype=np.int64)[::3],  # not contiguous: travels in band
        "structured": structured,
        "datetimes": np.array(["2010-06-01", "2024-02-29"], dtype="datetime64[D]"),
        "objects": np.array([1, "two", None], dtype=object),
        "text": "héllo ✓",
        "raw": b"\x00\x01bytes\xff",
        "nothing": None,
        "numbers": (1, -2.5, 2**70, 3j),
        "deep": {"a": [{"b": (None, [np.full((2, 2), 7, dtype=np.uint64)])}]},
    }


SMALL_FRAMES = [
    (Kind.HELLO, 0, -1, {"worker": "w/0", "pid": 123, "python": "3.11.7", "numpy": None, "protocol": 1}),
    (Kind.DATA, 1, 0, {"key": "abc", "data": [np.arange(6, dtype=np.float32).reshape(2, 3), "x", None]}),
    (Kind.TASK, 1, 0, {"key": "abc"}),
    (Kind.STARTED, 1, 0, None),
    (Kind.STREAM, 1, 0, {"stream": "stdout", "text": "hi\n"}),
    (Kind.RESULT, 1, 0, {"value": (np.zeros(0), b"", ""), "seconds": 0.5}),
    (Kind.CANCEL, 2**32 - 1, -(2**31), None),
    (Kind.BYE, 0, 2**31 - 1, None),
]


def stream_of(frames) -> bytes:
    return b"".join(encoded(kind, body, call, index) for kind, call, index, body in frames)


# -- round trips -----------------------------------------------------------


def test_round_trip_nested_body_with_arrays():
    body = nested_body()
    frames = decode_whole(encoded(Kind.RESULT, body, call=3, index=12))
    assert len(frames) == 1
    frame = frames[0]
    assert (frame.kind, frame.call, frame.index) == (Kind.RESULT, 3, 12)
    assert_same(body, frame.body())


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    (frame,) = decode_whole(encoded(kind, {"kind": kind.name}, call=7, index=-1))
    assert frame.kind is kind
    assert frame.body() == {"kind": kind.name}


def test_arrays_travel_out_of_band():
    big = np.arange(50_000, dtype=np.float64)  # 400 kB
    other = np.ones((100, 100), dtype=np.int16)
    body = {"big": big, "other": other, "pair": [big[:10].copy(), None]}
    chunks = protocol.encode(Kind.DATA, body, call=1, index=2)
    # header chunk + pickle + one part per array
    assert len(chunks) == 1 + 1 + 3
    pickle_part = chunks[1]
    array_bytes = big.nbytes + other.nbytes
    assert len(pickle_part) < 1000 < array_bytes // 100
    # the out-of-band chunks are the arrays' own memory, not copies
    assert np.shares_memory(np.frombuffer(chunks[2], dtype=big.dtype), big)

    (frame,) = decode_whole(protocol.frame_bytes(chunks))
    assert len(frame.parts) == 4
    assert len(frame.parts[0]) == len(pickle_part)
    assert frame.size == sum(len(c) for c in chunks[1:])
    out = frame.body()
    assert_same(body, out)


def test_decoded_arrays_are_read_only_views_of_the_frame():
    arr = np.arange(1000, dtype=np.int32)
    (frame,) = decode_whole(encoded(Kind.DATA, {"data": arr}))
    out = frame.body()["data"]
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 5
    # a view of the received part, not a copy of it
    assert np.shares_memory(out, np.frombuffer(frame.parts[1], dtype=np.int32))


def test_pickle_buffer_travels_out_of_band_and_comes_back_read_only():
    payload = bytearray(range(256)) * 100
    (frame,) = decode_whole(encoded(Kind.CALL, {"func": pickle.PickleBuffer(payload)}))
    assert len(frame.parts) == 2
    assert len(frame.parts[1]) == len(payload)
    func = frame.body()["func"]
    assert bytes(func) == bytes(payload)
    assert memoryview(func).readonly


def test_zero_size_parts_decode():
    body = [np.empty(0, dtype=np.float64), np.empty((0, 3), dtype=np.uint8)]
    chunks = protocol.encode(Kind.RESULT, body)
    (frame,) = decode_whole(protocol.frame_bytes(chunks))
    assert len(frame.parts) == len(chunks) - 1
    assert_same(body, frame.body())
    # a hand-made frame whose every out-of-band part is empty
    (frame,) = decode_whole(raw_frame(Kind.DATA, [pickle.dumps(None), b"", b"", b""]))
    assert len(frame.parts) == 4 and frame.size == len(pickle.dumps(None))
    assert [len(p) for p in frame.parts[1:]] == [0, 0, 0]


# -- the same stream, fed every way ----------------------------------------


def test_small_stream_same_frames_every_way():
    stream = stream_of(SMALL_FRAMES)
    results = {
        "whole": decode_whole(stream),
        "bytewise": decode_bytewise(stream),
        **{f"chunks{seed}": decode_chunks(stream, seed, max_chunk=40) for seed in range(5)},
        **{f"buffer{seed}": decode_via_buffer(stream, seed, max_read=60) for seed in range(5)},
    }
    for how, frames in results.items():
        assert len(frames) == len(SMALL_FRAMES), how
        assert_frames_equal(frames, SMALL_FRAMES)
        assert summary(frames) == summary(results["whole"]), how


def test_large_stream_same_frames_every_way():
    rng = np.random.default_rng(1)
    frames_in = [
        (Kind.CALL, 1, -1, {"params": rng.standard_normal(20_000)}),  # 160 kB: read directly
        (Kind.DATA, 1, 0, nested_body()),
        (Kind.DATA, 1, 1, {"key": "k1", "data": [rng.integers(0, 9, (300, 300)), rng.standard_normal((70_000,))]}),
        (Kind.TASK, 1, 1, {"key": "k1"}),
        (Kind.RESULT, 1, 1, {"value": np.zeros((0, 0)), "seconds": 1.0}),
    ]
    stream = stream_of(frames_in)
    seen: list = []
    results = {
        "whole": decode_whole(stream),
        **{f"chunks{seed}": decode_chunks(stream, seed, max_chunk=70_000) for seed in range(3)},
        **{f"buffer{seed}": decode_via_buffer(stream, seed, seen=seen if seed == 0 else None) for seed in range(4)},
        "buffer-small-reads": decode_via_buffer(stream, 9, max_read=4096),
    }
    for how, frames in results.items():
        assert summary(frames) == summary(results["whole"]), how
        assert_frames_equal(frames, frames_in)
    # big parts were handed out as their own buffers (not the scratch buffer)
    assert any(len(b) != protocol.SCRATCH for b in seen)


def test_large_part_is_read_straight_into_its_own_buffer():
    arr = np.arange(100_000, dtype=np.float64)  # 800 kB, well over DIRECT_READ
    stream = encoded(Kind.DATA, {"data": arr})
    d = FrameDecoder()
    handed_out = []
    pos = 0
    while pos < len(stream):
        buf = d.get_buffer()
        handed_out.append(buf)
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        d.buffer_updated(n)
        pos += n
    (frame,) = drain(d)
    direct = [b for b in handed_out if len(b) >= protocol.DIRECT_READ and b.obj is frame.parts[1].obj]
    assert direct, "the array part was copied through the scratch buffer"
    assert_same({"data": arr}, frame.body())


@pytest.mark.parametrize("short", [1, 2, 7])
def test_reads_that_stop_just_short_of_the_buffer_end(short):
    # every read leaves the last few bytes of the offered buffer for the next read
    arr = np.arange(150_000, dtype=np.int32)
    frames_in = [(Kind.DATA, 1, 0, {"data": arr, "tail": arr[:100].copy()}), SMALL_FRAMES[2]]
    stream = stream_of(frames_in)
    d = FrameDecoder()
    frames, pos, sizes = [], 0, set()
    while pos < len(stream):
        buf = d.get_buffer()
        sizes.add(len(buf))
        n = min(max(1, len(buf) - short), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        d.buffer_updated(n)
        pos += n
        frames += drain(d)
    d.eof()
    assert any(s != protocol.SCRATCH for s in sizes if s >= protocol.DIRECT_READ)  # the direct path ran
    assert_frames_equal(frames, frames_in)


def test_mixing_feed_and_get_buffer():
    stream = stream_of(SMALL_FRAMES) + encoded(Kind.DATA, {"x": np.arange(30_000.0)}) + stream_of(SMALL_FRAMES)
    rng = random.Random(4)
    d = FrameDecoder()
    frames, pos = [], 0
    while pos < len(stream):
        n = rng.randint(1, 20_000)
        if rng.random() < 0.5:
            d.feed(stream[pos : pos + n])
            pos += len(stream[pos : pos + n])
        else:
            buf = d.get_buffer()
            n = min(n, len(buf), len(stream) - pos)
            buf[:n] = stream[pos : pos + n]
            d.buffer_updated(n)
            pos += n
        frames += drain(d)
    d.eof()
    assert len(frames) == 2 * len(SMALL_FRAMES) + 1
    assert_frames_equal(frames[: len(SMALL_FRAMES)], SMALL_FRAMES)
    assert_frames_equal(frames[-len(SMALL_FRAMES) :], SMALL_FRAMES)
    assert np.array_equal(frames[len(SMALL_FRAMES)].body()["x"], np.arange(30_000.0))


def test_next_frame_is_none_until_a_frame_is_whole():
    stream = encoded(Kind.TASK, {"key": "k"}, call=5, index=2)
    d = FrameDecoder()
    for i in range(len(stream) - 1):
        d.feed(stream[i : i + 1])
        assert d.next_frame() is None, f"a frame came out after {i + 1} of {len(stream)} bytes"
    d.feed(stream[-1:])
    frame = d.next_frame()
    assert frame is not None and frame.kind is Kind.TASK
    assert d.next_frame() is None


def test_back_to_back_frames_in_one_feed():
    frames_in = [(Kind.TASK, 1, i, {"key": f"k{i}"}) for i in range(50)]
    d = FrameDecoder()
    d.feed(stream_of(frames_in))
    frames = drain(d)
    assert_frames_equal(frames, frames_in)


# -- end of stream ---------------------------------------------------------


def test_eof_at_frame_boundary_is_fine():
    d = FrameDecoder()
    d.eof()  # nothing at all
    stream = stream_of(SMALL_FRAMES)
    d.feed(stream)
    d.eof()
    assert len(drain(d)) == len(SMALL_FRAMES)


def cut_points(chunks) -> dict:
    """Offsets inside each region of one frame: header, lengths table, pickle, a buffer."""
    head = HEADER.size
    table = len(chunks[0])
    pickle_end = table + len(chunks[1])
    total = sum(len(c) for c in chunks)
    return {
        "header": [1, 2, head // 2, head - 1],
        "lengths": [head, head + 1, table - 1],
        "pickle": [table, table + 1, pickle_end - 1],
        "buffer": [pickle_end, pickle_end + 1, total - 1],
    }


@pytest.mark.parametrize("region", ["header", "lengths", "pickle", "buffer"])
def test_truncated_stream_raises_on_eof(region):
    chunks = protocol.encode(Kind.RESULT, {"value": np.arange(500)}, call=2, index=4)
    stream = protocol.frame_bytes(chunks)
    prefix = encoded(Kind.STARTED, None, call=2, index=4)  # a whole frame before the cut one
    for cut in cut_points(chunks)[region]:
        d = FrameDecoder()
        d.feed(prefix + stream[:cut])
        assert [f.kind for f in drain(d)] == [Kind.STARTED]
        with pytest.raises(ProtocolError) as info:
            d.eof()
        message = str(info.value)
        assert "truncated" in message and "ended" in message, message
        stage = {"header": "header", "lengths": "lengths", "pickle": "parts", "buffer": "parts"}[region]
        assert f"reading its {stage}" in message, message
        assert "frame frame" not in message, message
        if region != "header":  # once the header is in, the message names the frame
            assert "RESULT" in message, message


def test_eof_after_an_error_repeats_the_error_not_truncation():
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match="magic"):
        d.feed(b"Last login: yesterday from somewhere\n")
    with pytest.raises(ProtocolError) as info:
        d.eof()
    assert "magic" in str(info.value) and "truncated" not in str(info.value)


def test_truncated_stream_via_buffer_path_raises_on_eof():
    stream = encoded(Kind.DATA, {"data": np.zeros(200_000)})
    d = FrameDecoder()
    pos = 0
    while pos < len(stream) - 1000:
        buf = d.get_buffer()
        n = min(len(buf), len(stream) - 1000 - pos)
        buf[:n] = stream[pos : pos + n]
        d.buffer_updated(n)
        pos += n
    assert d.next_frame() is None
    with pytest.raises(ProtocolError, match="truncated"):
        d.eof()


# -- limits ------------------------------------------------------------------


def test_oversized_frame_is_rejected_from_its_header():
    stream = encoded(Kind.DATA, {"data": np.zeros(10_000, dtype=np.uint8)}, call=1, index=3)
    d = FrameDecoder(max_frame=1000)
    with pytest.raises(ProtocolError) as info:
        d.feed(stream[: HEADER.size])  # the header alone is enough to refuse it
    message = str(info.value)
    assert "oversized" in message and "1000" in message and "DATA" in message, message
    with pytest.raises(ProtocolError):
        d.feed(b"")


def test_frame_exactly_at_the_limit_is_accepted():
    parts = [pickle.dumps(b"x" * 100, protocol=5)]
    limit = len(parts[0])
    (frame,) = decode_whole(raw_frame(Kind.DATA, parts), max_frame=limit)
    assert frame.body() == b"x" * 100
    with pytest.raises(ProtocolError, match="oversized"):
        decode_whole(raw_frame(Kind.DATA, parts), max_frame=limit - 1)


def test_encode_refuses_too_many_parts():
    with pytest.raises(ProtocolError, match="parts"):
        protocol.header(Kind.DATA, 0, -1, [0] * (protocol.MAX_PARTS + 1))


# -- garbage -----------------------------------------------------------------


def random_garbage() -> bytes:
    rng = random.Random(1234)
    data = bytes(rng.randrange(256) for _ in range(200))
    assert data[:2] != MAGIC
    return data


GARBAGE = {
    "random bytes": (random_garbage(), "magic"),
    "shell greeting": (b"Welcome to Ubuntu 22.04 LTS\n" * 3, "magic"),
    "wrong magic": (raw_frame(magic=b"QK"), "magic"),
    "wrong version": (raw_frame(version=PROTOCOL_VERSION + 1), "version"),
    "version zero": (raw_frame(version=0), "version"),
    "unknown kind 0": (raw_frame(kind=0), "unknown message kind 0"),
    "unknown kind 200": (raw_frame(kind=200), "unknown message kind 200"),
    "lengths exceed size": (raw_frame(parts=[b"ab", b"cd"], size=3), "add up"),
    "lengths below size": (raw_frame(parts=[b"ab", b"cd"], size=10), "add up"),
    "zero parts": (raw_frame(nparts=0, lengths=[], size=0), "parts"),
    "too many parts": (raw_frame(nparts=protocol.MAX_PARTS + 1, lengths=[], size=0), "parts"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
@pytest.mark.parametrize("how", ["whole", "bytewise", "buffer"])
def test_garbage_is_refused_and_poisons_the_decoder(name, how):
    data, expected = GARBAGE[name]
    d = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        if how == "whole":
            d.feed(data)
        elif how == "bytewise":
            for i in range(len(data)):
                d.feed(data[i : i + 1])
        else:
            pos = 0
            while pos < len(data):
                buf = d.get_buffer()
                n = min(len(buf), 7, len(data) - pos)
                buf[:n] = data[pos : pos + n]
                d.buffer_updated(n)
                pos += n
    assert expected in str(info.value), str(info.value)
    assert d.failed is info.value
    assert d.next_frame() is None
    # afterwards every way in refuses, even a perfectly good frame
    for attempt in (lambda: d.feed(encoded(Kind.BYE)), lambda: d.feed(b""), d.get_buffer):
        with pytest.raises(ProtocolError, match="unusable"):
            attempt()


def test_too_many_parts_respects_the_decoders_own_limit():
    frame = raw_frame(Kind.DATA, [pickle.dumps(None)] + [b""] * 10)
    (ok,) = decode_whole(frame, max_parts=11)
    assert len(ok.parts) == 11
    with pytest.raises(ProtocolError, match="11 parts"):
        decode_whole(frame, max_parts=10)


def test_good_frames_before_garbage_are_still_delivered():
    stream = stream_of(SMALL_FRAMES[:3]) + b"garbage that is long enough for a header"
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match="magic"):
        d.feed(stream)
    assert [f.kind for f in drain(d)] == [k for k, *_ in SMALL_FRAMES[:3]]


# -- frames as values --------------------------------------------------------


def test_frame_repr_names_the_kind():
    (frame,) = decode_whole(encoded(Kind.RESULT, {"value": 1}, call=3, index=12))
    text = repr(frame)
    assert "RESULT" in text and "call=3" in text and "index=12" in text, text
    (frame,) = decode_whole(encoded(Kind.NEED, {"key": "k"}))
    assert "NEED" in repr(frame) and "index=-1" in repr(frame)


def test_kind_values_are_stable():
    # the wire numbers are part of the protocol: renumbering breaks old workers
    assert {k.name: k.value for k in Kind} == {
        "HELLO": 1, "CALL": 2, "DATA": 3, "TASK": 4, "NEED": 5, "STARTED": 6,
        "RESULT": 7, "ERROR": 8, "STREAM": 9, "CANCEL": 10, "DROP": 11, "BYE": 12, "TASKS": 13,
        "ALIVE": 14, "CANCELLED": 15,
    }


def test_header_layout():
    stream = encoded(Kind.TASK, {"key": "k"}, call=0x01020304, index=-2)
    magic, version, kind, call, index, nparts, size = HEADER.unpack_from(stream)
    assert (magic, version, kind, call, index, nparts) == (b"QJ", PROTOCOL_VERSION, 4, 0x01020304, -2, 1)
    (length,) = struct.unpack_from(">Q", stream, HEADER.size)
    assert size == length == len(stream) - HEADER.size - LENGTH.size


@pytest.mark.parametrize("kind", [Kind.RESULT, Kind.DATA])
def test_body_that_cannot_be_unpickled_names_the_kind(kind):
    (frame,) = decode_whole(raw_frame(kind, [b"this is not a pickle"]))
    with pytest.raises(ProtocolError) as info:
        frame.body()
    assert kind.name in str(info.value) and "unpickle" in str(info.value)


def test_body_missing_its_out_of_band_buffers_is_a_protocol_error():
    chunks = protocol.encode(Kind.DATA, {"data": np.arange(10)})
    assert len(chunks) == 3
    stream = raw_frame(Kind.DATA, [bytes(chunks[1])])  # pickle without its buffer part
    (frame,) = decode_whole(stream)
    with pytest.raises(ProtocolError, match="DATA"):
        frame.body()


def test_body_can_be_decoded_twice():
    arr = np.arange(6.0)
    (frame,) = decode_whole(encoded(Kind.DATA, {"data": arr}))
    a, b = frame.body()["data"], frame.body()["data"]
    assert np.array_equal(a, arr) and np.array_equal(b, arr)


def test_a_part_buffer_is_reused_once_nothing_built_on_it_is_left_and_never_before():
    """A 1 MiB result each call lands in the buffer of an earlier one only when that one is gone."""
    d = FrameDecoder()
    first, second = np.arange(1 << 17, dtype=np.float64), -np.arange(1 << 17, dtype=np.float64)

    def receive(array):
        d.feed(protocol.frame_bytes(protocol.encode(Kind.RESULT, {"value": array}, call=1, index=0)))
        return d.next_frame().body()["value"]

    kept = receive(first)
    other = receive(second)  # the first is still alive: a buffer of its own
    assert np.array_equal(kept, first) and np.array_equal(other, second)
    assert not np.shares_memory(kept, other)
    address = other.__array_interface__["data"][0]
    del other
    again = receive(first)  # the second's buffer is free now: written over, not allocated
    assert again.__array_interface__["data"][0] == address
    assert np.array_equal(again, first) and np.array_equal(kept, first)
