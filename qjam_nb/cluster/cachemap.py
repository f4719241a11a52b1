"""The cache map: which slices of a call's dataset each worker holds now, as data and as text.

Rules: pure functions of a ``CallRecord`` (its slice keys) and each worker's
``cache`` (key -> bytes); nothing here holds state or draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from ..formats import format_ranges
from .callrecord import CallRecord


class _HasCache(Protocol):
    name: str
    cache: Mapping[str, int]


def cache_map(record: CallRecord | None, workers: Iterable[_HasCache]) -> dict[str, list[int]]:
    """Per worker, the slice indexes of ``record``'s dataset it holds in its cache now.

    Pure: reads the record's slice keys and each worker's ``cache`` (key -> bytes).
    A call without a dataset (or no call yet) holds no slices.
    """
    keys = record.slice_keys() if record is not None else {}
    out = {}
    for w in workers:
        out[w.name] = sorted(i for key in w.cache if key in keys for i in keys[key])
    return out


def cache_map_text(record: CallRecord | None, workers: Iterable[_HasCache]) -> str:
    """The cache map as lines of text: ``local/0  holds slices 0-12, 14 of call 3``."""
    held = cache_map(record, workers)
    if record is None or not record.has_dataset:
        return "cache map: no dataset in the last call"
    return "\n".join([f"cache map (slices of call {record.call}'s dataset, {record.n_slices} slices):"] + [
        f"  {name:<16} {format_ranges(indexes)}" for name, indexes in held.items()
    ])
