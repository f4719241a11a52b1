"""Writing a whole message to a pipe: every byte, in order, whatever the pipe takes at once."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from qjam_nb.worker.pipes import IOV_MAX, write_all


def read_everything(fd: int, out: bytearray) -> None:
    while data := os.read(fd, 1 << 16):
        out += data


@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize("n_chunks", [3, IOV_MAX + 7])
def test_write_all_writes_every_byte_in_order_through_a_pipe_smaller_than_the_message(blocking, n_chunks):
    doubles = np.arange(40_000, dtype=np.float64)  # 320 KB as a memoryview of format "d": counted in bytes
    chunks = [b"head", memoryview(doubles), b""] + [bytes([i % 251]) * 100 for i in range(n_chunks - 3)]
    expected = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
    r, w = os.pipe()
    os.set_blocking(w, blocking)  # non-blocking: the writer waits for room itself
    got = bytearray()
    reader = threading.Thread(target=read_everything, args=(r, got))
    reader.start()
    try:
        write_all(w, chunks)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == expected
