"""Who ran what, when: the call timeline's names, where they have always been imported from.

The timeline is four small modules, one job each (``docs/design.md``, "The
call timeline"):

* ``slicerows``  -- the store: ``SliceRecord`` and a call's records as columns;
* ``callrecord`` -- the record API: ``CallRecord``, folded from its call's events;
* ``recorder``   -- the observer: ``CallRecorder`` keeps the last calls' records;
* ``cachemap``   -- which slices each worker holds now, as data and as text;

with ``params.params_hash`` (the params' digest, shown per call) and
``qjam_nb.formats`` (sizes and index ranges for people) beside them. This
module only re-exports: import from here or from the module itself.
"""

from __future__ import annotations

from ..formats import format_ranges, format_size
from .cachemap import cache_map, cache_map_text
from .callrecord import CallRecord
from .params import params_hash
from .recorder import FOLD_EVERY, KEEP_CALLS, KEEP_PENDING, KEEP_RECORDS, CallRecorder
from .slicerows import CANCELLED, DONE, DROPPED, ERROR, LOST, OUTCOMES, TIMES, SliceRecord

__all__ = [
    "CANCELLED", "DONE", "DROPPED", "ERROR", "FOLD_EVERY", "KEEP_CALLS", "KEEP_PENDING", "KEEP_RECORDS", "LOST",
    "OUTCOMES", "TIMES", "CallRecord", "CallRecorder", "SliceRecord", "cache_map", "cache_map_text", "format_ranges",
    "format_size", "params_hash",
]
