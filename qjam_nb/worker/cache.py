"""A worker's slice cache, behind a small seam: get, put, drop, keys, nbytes.

Ground rules of this file: it travels (standard library only) and does no
I/O. ``WorkerCore`` is the only user. Today the cache is a dict that keeps
every slice it is given until the master drops it or the worker ends; a
memory budget and a disk tier go behind this same interface later, so the
core does not change when they come.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterator
from typing import Any


class SliceCache:
    """Slices by key, as the master shipped them (a list, a numpy array, or one over shared memory)."""

    __slots__ = ("slices",)

    def __init__(self) -> None:
        self.slices: dict[Hashable, Any] = {}

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The slice cached under ``key``, or ``default`` when it is not here (the worker then says NEED)."""
        return self.slices.get(key, default)

    def put(self, key: Hashable, data: Any) -> None:
        self.slices[key] = data

    def drop(self, key: Hashable) -> None:
        """Forget ``key`` (nothing if it is not here)."""
        self.slices.pop(key, None)

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self.slices))

    def __contains__(self, key: Hashable) -> bool:
        return key in self.slices

    def __len__(self) -> int:
        return len(self.slices)

    def nbytes(self) -> int:
        """Bytes the cached slices take, as far as they say (``nbytes`` of an array; else their
        ``sys.getsizeof``, items not counted): what a memory budget will weigh."""
        total = 0
        for data in self.slices.values():
            size = getattr(data, "nbytes", None)
            total += size if isinstance(size, int) else sys.getsizeof(data)
        return total
