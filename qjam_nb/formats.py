"""Numbers written for people: sizes and runs of slice indexes.

One formatter per kind of number, so the widget, the status table, the
timeline, the warnings and the errors say a size the same way. Rules: this
module imports nothing of qjam_nb (every layer above the worker may use it;
``qjam_nb/worker/`` travels alone and writes its one size itself).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["format_ranges", "format_size"]


def format_size(nbytes: int) -> str:
    """Bytes as B, KiB or MiB, for people."""
    if nbytes < 2**10:
        return f"{nbytes} B"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB"


def format_ranges(indexes: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 7, 8]`` -> ``"0-3, 5, 7-8"``; empty -> ``"none"``."""
    items = sorted(set(indexes))
    if not items:
        return "none"
    parts = []
    start = prev = items[0]
    for i in items[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)
