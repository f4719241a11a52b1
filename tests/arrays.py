"""Arrays laid out for tests that watch which pages are written."""

from __future__ import annotations

import mmap

import numpy as np


def page_aligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` on pages of its own (its size a whole number of pages).

    A big array from malloc shares its first and last page with other objects,
    whose writes mark those pages written and so have the first or last slice
    hashed again: right, but not what a test counting hashes means to count.
    """
    assert array.nbytes % mmap.PAGESIZE == 0
    room = np.empty(array.nbytes + mmap.PAGESIZE, np.uint8)
    skip = -room.ctypes.data % mmap.PAGESIZE
    copy = room[skip : skip + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy
