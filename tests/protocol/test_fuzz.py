"""Property tests: whatever bytes arrive, the decoder yields frames or raises ProtocolError.

A worker's stdout can carry anything (a shell greeting, a crashed peer, a
flipped bit in transit); the master must turn all of it into one clear error,
never an IndexError or a MemoryError from deep inside the codec.
"""

from __future__ import annotations

import os
from itertools import pairwise

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qjam_nb.worker import protocol
from qjam_nb.worker.protocol import HEADER, FrameDecoder, Kind, ProtocolError

MAX_FRAME = 1 << 20
#: ``QJAM_FUZZ_EXAMPLES=5000`` for a longer hunt; the default keeps the suite fast.
EXAMPLES = int(os.environ.get("QJAM_FUZZ_EXAMPLES", 200))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_all(data: bytes, cuts: list[int]) -> tuple[list, ProtocolError | None]:
    """Feed ``data`` split at ``cuts`` then signal eof; return frames and the error, if any.

    Any exception other than ProtocolError propagates and fails the test.
    """
    d = FrameDecoder(max_frame=MAX_FRAME)
    frames: list = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    try:
        for a, b in pairwise(bounds):
            d.feed(data[a:b])
            while (f := d.next_frame()) is not None:
                frames.append(f)
        d.eof()
    except ProtocolError as exc:
        while (f := d.next_frame()) is not None:
            frames.append(f)
        return frames, exc
    return frames, None


def check_bodies(frames: list) -> None:
    for frame in frames:
        assert isinstance(frame.kind, Kind)
        assert frame.size <= MAX_FRAME
        try:
            frame.body()
        except ProtocolError as exc:
            assert frame.kind.name in str(exc)


cuts = st.lists(st.integers(min_value=0, max_value=4096), max_size=8)


@FUZZ
@given(data=st.binary(max_size=2048), cuts=cuts)
def test_arbitrary_bytes_yield_frames_or_protocol_error(data, cuts):
    whole, whole_err = decode_all(data, [])
    chunked, chunked_err = decode_all(data, cuts)
    # how the bytes were split never changes the outcome
    assert [(f.kind, f.call, f.index, [bytes(p) for p in f.parts]) for f in whole] == [
        (f.kind, f.call, f.index, [bytes(p) for p in f.parts]) for f in chunked
    ]
    assert (whole_err is None) == (chunked_err is None)
    if data and whole_err is None:
        assert whole, "bytes were accepted without a frame or an error"
    check_bodies(whole)


headers = st.builds(
    lambda kind, call, index, nparts, size, magic, version: HEADER.pack(
        magic, version, kind, call, index, nparts, size
    ),
    kind=st.integers(0, 255),
    call=st.integers(0, 2**32 - 1),
    index=st.integers(-(2**31), 2**31 - 1),
    nparts=st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
    size=st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
    magic=st.sampled_from([b"QJ", b"QJ", b"QJ", b"JQ"]),
    version=st.sampled_from([protocol.PROTOCOL_VERSION] * 3 + [0, 2, 255]),
)


@FUZZ
@given(head=headers, rest=st.binary(max_size=512), cuts=cuts)
def test_plausible_headers_with_random_tails(head, rest, cuts):
    # random bytes rarely get past the magic; these start with a near-valid header
    frames, _ = decode_all(head + rest, cuts)
    check_bodies(frames)


# -- mutated valid frames ------------------------------------------------------

small_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.int32, np.uint8, np.complex64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6),
)
leaves = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10), st.binary(max_size=20), small_arrays
)
bodies = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
    ),
    max_leaves=8,
)
messages = st.tuples(st.sampled_from(list(Kind)), bodies, st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1))

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
)


def mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for op, where, arg in mutations:
        if not buf:
            break
        i = where % len(buf)
        if op == "flip":
            buf[i] ^= arg
        elif op == "insert":
            buf[i:i] = arg
        else:
            del buf[i : i + arg]
    return bytes(buf)


@FUZZ
@given(msgs=st.lists(messages, min_size=1, max_size=3), mutations=st.lists(mutation, min_size=1, max_size=4), cuts=cuts)
def test_mutated_frames_yield_frames_or_protocol_error(msgs, mutations, cuts):
    stream = b"".join(
        protocol.frame_bytes(protocol.encode(kind, body, call=call, index=index)) for kind, body, call, index in msgs
    )
    data = mutate(stream, mutations)
    frames, _ = decode_all(data, cuts)
    check_bodies(frames)


@FUZZ
@given(msgs=st.lists(messages, min_size=1, max_size=3), cuts=cuts)
def test_unmutated_messages_round_trip(msgs, cuts):
    stream = b"".join(
        protocol.frame_bytes(protocol.encode(kind, body, call=call, index=index)) for kind, body, call, index in msgs
    )
    frames, err = decode_all(stream, cuts)
    assert err is None
    assert [(f.kind, f.call, f.index) for f in frames] == [(k, c, i) for k, _, c, i in msgs]
    for frame, (_, body, _, _) in zip(frames, msgs, strict=True):
        assert_equal_body(body, frame.body())


def assert_equal_body(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_body(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_equal_body(a[k], b[k])
    else:
        assert type(a) is type(b) and a == b
