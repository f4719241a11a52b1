"""The default reduce, as qjam had it, and the ordered fold over slice results."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..errors import ReduceError


def default_reduce(a: Any, b: Any) -> Any:
    """``a + b``; element-wise for lists/tuples of equal length and for dicts by key.

    ``None`` combines with ``None`` to ``None``, so a mapfunc that only prints
    needs no reduce.
    """
    if a is None and b is None:
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            raise ValueError(
                f"cannot add a {type(a).__name__} of length {len(a)} to one of length {len(b)} element-wise"
            )
        items = [default_reduce(x, y) for x, y in zip(a, b, strict=True)]
        return a._make(items) if hasattr(a, "_make") else type(a)(items)  # namedtuples take fields, not one iterable
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = default_reduce(out[k], v) if k in out else v
        return out
    return a + b


class OrderedFold:
    """Folds results strictly in slice order, whatever order they arrive in.

    Results waiting for an earlier slice are held; everything before the
    first gap is folded at once, so memory stays bounded when results come
    back roughly in order.
    """

    def __init__(self, n: int, reduce: Callable[[Any, Any], Any] | None) -> None:
        self.n = n
        self.reduce = reduce or default_reduce
        self.custom = reduce is not None
        self.pending: dict[int, Any] = {}
        self.next = 0
        self.value: Any = None
        self.first_index = -1
        self.last_index = -1
        self.seconds = 0.0  # spent in reduce, for the call's timeline
        self.complete = n == 0  # every slice folded (an attribute: asked twice a result)

    def add(self, index: int, value: Any) -> None:
        self.pending[index] = value
        if index != self.next:  # waits for an earlier slice (the next one is never pending here)
            return
        started = time.perf_counter()
        while self.next in self.pending:
            value = self.pending.pop(self.next)
            if self.next == 0:
                self.value = value
                self.first_index = 0
            else:
                self.value = self._combine(self.value, value, self.next)
            self.last_index = self.next
            self.next += 1
        self.complete = self.next == self.n
        self.seconds += time.perf_counter() - started

    def _combine(self, acc: Any, value: Any, index: int) -> Any:
        try:
            return self.reduce(acc, value)
        except Exception as exc:
            which = "your reduce" if self.custom else "the default reduce (a + b)"
            raise ReduceError(
                f"{which} could not combine the result of slices 0..{index - 1} "
                f"({type(acc).__name__}) with the result of slice {index} "
                f"({type(value).__name__}): {type(exc).__name__}: {exc}. "
                "Return values that add up, or define reduce(a, b) in the cell."
            ) from exc
