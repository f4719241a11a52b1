"""The master's one codec policy: plain data is pickled with ``pickle``, anything else with cloudpickle.

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
from typing import Any

import cloudpickle

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
