"""Numbers written for people: sizes and runs of slice indexes.

One formatter per kind of number, so the widget, the status table, the
timeline, the warnings and the errors say a size the same way. Rules: this
module imports nothing of qjam_nb (every layer above the worker may use it;
``qjam_nb/worker/`` travels alone and writes its one size itself).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["format_ranges", "format_size"]


_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_size(nbytes: int) -> str:
    """Bytes for people: ``"512 B"``, then one decimal in the largest binary unit that keeps the number
    under 1024 once rounded (``2**20 - 1`` is ``"1.0 MiB"``, not ``"1024.0 KiB"``), up to TiB."""
    if nbytes < 0:
        return "-" + format_size(-nbytes)
    if nbytes < 2**10:
        return f"{nbytes} B"
    value = nbytes / 2**10
    for unit in _UNITS[:-1]:
        if round(value, 1) < 2**10:
            return f"{value:.1f} {unit}"
        value /= 2**10
    return f"{value:.1f} {_UNITS[-1]}"


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
