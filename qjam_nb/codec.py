"""The master's one codec policy: plain data is pickled with ``pickle``, anything else with cloudpickle;
and ``Pickled``, a value pickled once for every worker, with its digest computed once.

``pickle`` writes plain data (numbers, strings, bytes, None, numpy arrays of
them, and lists, tuples and dicts of those) exactly as cloudpickle does, ~5-7x
faster; it would name functions and classes by a reference that a worker
cannot resolve, so anything else goes through cloudpickle. Slices (for their
keys and to ship) and params follow this one rule, which is the message
table's (``worker/messages.py``: a body that may carry user objects is
written with ``pickle`` when it is plain); the worker, which cannot afford to
look, tries ``pickle`` first and falls back on cloudpickle.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle
import xxhash

from .worker.messages import PLAIN_ATOMS, plain

#: Types that plain ``pickle`` writes exactly as cloudpickle does (by value, no code involved): the message
#: table's atoms, less the out-of-band buffer that only bodies carry.
PLAIN_TYPES = PLAIN_ATOMS - {pickle.PickleBuffer}
#: Data that ``pickle`` writes exactly as cloudpickle does: the rule the message table uses for what the
#: master sends (``worker.messages.plain``), the one rule for slices and params too.
is_plain = plain


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
