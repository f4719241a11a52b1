"""What tests of a uniform cluster may see the schedule move: nothing, unless a worker stalled.

A shared machine (CI, a laptop) now and then stops a process for half a
second. The schedule rightly takes slices away from a worker that kept the
call waiting that long (``scheduler.LATE``): that is healing, not noise. A
test of a uniform cluster therefore checks that every slice taken away from
a worker was taken from one that did stall, by the call's own record.
"""

from __future__ import annotations

from qjam_nb.cluster.callrecord import CallRecord
from qjam_nb.cluster.scheduler import LATE


def longest_wait(call: CallRecord, worker: str) -> float:
    """The longest ``worker`` kept ``call`` waiting for a result: from a slice's being handed out, or
    the worker's previous result if later, to its result (how the schedule judges a slice late)."""
    ends = sorted(
        (r.done if r.done is not None else r.ended, r.assigned or 0.0)
        for r in call.slices if r.worker == worker and (r.done is not None or r.ended is not None)
    )
    longest = previous = 0.0
    for end, assigned in ends:
        longest = max(longest, end - max(assigned, previous))
        previous = end
    return longest


def moved_without_a_stall(call: CallRecord) -> dict[str, int]:
    """Source worker -> slices taken from it in ``call`` although it never kept the call waiting
    ``LATE`` seconds: moves made over noise."""
    taken: dict[str, int] = {}
    for r in call.slices:
        if r.how is not None:
            taken[r.source] = taken.get(r.source, 0) + 1
    # (A little under LATE: the record's clock and the schedule's are read at slightly different moments.)
    return {source: n for source, n in taken.items() if longest_wait(call, source) < 0.9 * LATE}
