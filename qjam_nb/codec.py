"""The master's one codec policy: plain data is pickled with ``pickle``, anything else with cloudpickle;
and ``Pickled``, a value pickled once for every worker, with its digest computed once.

``pickle`` writes plain data (numbers, strings, bytes, None, numpy arrays of
them, and lists, tuples and dicts of those) exactly as cloudpickle does, ~5-7x
faster; it would name functions and classes by a reference that a worker
cannot resolve, so anything else goes through cloudpickle. Slices (for their
keys and to ship) and params follow this one rule; the worker, which cannot
afford to look, tries ``pickle`` first and falls back on cloudpickle
(``worker/main.py``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle
import xxhash

#: Types that plain ``pickle`` writes exactly as cloudpickle does (by value, no code involved).
PLAIN_TYPES = frozenset((int, float, complex, str, bytes, bool, type(None)))
#: Containers inside containers are looked into this deep, and this wide, at most: past that, cloudpickle.
DEPTH, WIDTH = 2, 64


def is_plain(value: Any, depth: int = 0) -> bool:
    """Data that ``pickle`` writes exactly as cloudpickle does.

    A list or tuple of atoms is plain at any length (slices of a list are the
    usual tiny slices, checked in C); nested containers are looked into
    ``DEPTH`` levels and ``WIDTH`` items deep, so the check costs little beside
    the pickling."""
    kind = type(value)
    if kind in PLAIN_TYPES:
        return True
    if kind is list or kind is tuple:
        if PLAIN_TYPES.issuperset(map(type, value)):
            return True
        return depth < DEPTH and len(value) <= WIDTH and all(is_plain(v, depth + 1) for v in value)
    if kind is dict:
        return (depth < DEPTH and len(value) <= WIDTH
                and all(type(k) in PLAIN_TYPES and is_plain(v, depth + 1) for k, v in value.items()))
    return kind.__module__ == "numpy" and kind.__name__ == "ndarray" and not value.dtype.hasobject


def dumps_for(value: Any) -> Callable[..., bytes]:
    """``pickle.dumps`` for plain data, else ``cloudpickle.dumps`` (same signature)."""
    return pickle.dumps if is_plain(value) else cloudpickle.dumps


class Pickled(NamedTuple):
    """A value pickled once for every worker of a call (the params): its protocol-5 pickle, its out-of-band
    buffers (numpy arrays' memory, not copied), and their XXH3-128 in hex, computed once (``digest_of``):
    the timeline tells calls' params apart by it, and replay checks big params did not change in place."""

    data: pickle.PickleBuffer
    buffers: list
    digest: str

    def wire(self) -> tuple:
        """(pickle, buffers), as the worker reads params (it knows no ``Pickled``)."""
        return self.data, self.buffers


def digest_of(data: Any, buffers: list) -> str:
    """XXH3-128 (hex) of a pickle and its out-of-band buffers, read in place (~15 GB/s, where SHA-256 cost
    0.6 ms a call for 1 MiB of params)."""
    h = xxhash.xxh3_128()
    for part in (data, *buffers):
        h.update(part.raw() if isinstance(part, pickle.PickleBuffer) else memoryview(part).cast("B"))
    return h.hexdigest()
