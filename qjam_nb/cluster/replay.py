"""Replay: run one slice of a recent call again, here, exactly as its worker ran it.

So a student can debug a mapfunc with ordinary tools (a debugger, prints,
``%debug``) on the very slice that misbehaved. Rules:

* Each call leaves a ``Recording`` as it starts (so a failed call can be
  replayed too): the mapfunc as shipped (its cloudpickle bytes), the params as
  shipped (their pickle, and a private copy of their out-of-band buffers, so
  changing ``theta`` in place afterwards changes nothing), the DataSet (a
  reference, not a copy) and every slice's content key.
* Only the last ``KEEP`` calls are remembered, so memory stays bounded: a few
  function and params pickles, and references to data the notebook has anyway.
  Params buffers over ``COPY_PARAMS_BYTES`` are not copied but hashed; replay
  then checks them.
* ``replay`` unpickles function and params from those bytes (as the worker
  did), takes the slice from the dataset, checks that it still hashes to the
  key recorded (else ``ReplayError``: the data changed since), and calls
  mapfunc on it after the same pickle round trip the worker's copy went
  through: read-only arrays, copied lists. Same bytes in, same code: the
  result is bit-identical to the worker's (same Python and libraries).
"""

from __future__ import annotations

import pickle
from collections import deque
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..codec import Pickled, digest_of
from ..dataset import DataSet
from ..errors import ReplayError
from .tracebacks import code_spans, point_back

#: Calls remembered for replay.
KEEP = 3
#: Params' out-of-band buffers up to this size (in all) are copied; above it, hashed and checked at replay.
COPY_PARAMS_BYTES = 64 << 20


@dataclass
class Recording:
    """What one call shipped, enough to run any of its slices again."""

    call: int
    func_blob: bytes
    params_pickle: bytes
    params_buffers: list  # bytes copies, or the shipped buffers themselves when too big to copy
    params_hash: str | None  # set when the buffers were not copied: the params' digest at call time
    data: DataSet | None
    keys: bytes  # every slice's content key (16 bytes of hash each): 1.6 MB for 100,000 slices, not ~15
    n_slices: int
    mapfunc: Any = None  # the function itself, only to point tracebacks back at its source


class ReplayLog:
    """The recordings of the last ``keep`` calls, newest last."""

    def __init__(self, keep: int = KEEP) -> None:
        self.recordings: deque[Recording] = deque(maxlen=keep)

    def remember(self, call: int, func_blob: bytes, params: Pickled, data: DataSet | None,
                 keyed: list, n_slices: int, mapfunc: Any = None) -> None:
        """Record a call as it starts (``params`` as ``shipping.dumps_params`` made them)."""
        pickled, buffers = params.data, params.buffers
        views = [_view(b) for b in buffers]
        total = sum(v.nbytes for v in views)
        if total <= COPY_PARAMS_BYTES:
            kept, digest = [v.tobytes() for v in views], None
        else:
            kept, digest = list(buffers), params.digest
        keys = b"".join([key for key, _ in keyed])
        self.recordings.append(Recording(call, func_blob, bytes(_view(pickled)), kept, digest, data, keys,
                                         n_slices, mapfunc))

    def find(self, call: int | None) -> Recording:
        if not self.recordings:
            raise ReplayError("there is no call to replay yet: run cluster.map(...) (or a %%qjam_map cell) first, "
                              "then replay one of its slices")
        if call is None:
            return self.recordings[-1]
        for rec in self.recordings:
            if rec.call == call:
                return rec
        kept = ", ".join(str(r.call) for r in self.recordings)
        raise ReplayError(f"call {call} is not remembered: replay keeps the last {self.recordings.maxlen} calls "
                          f"({kept}). Replay one of those, or run call {call}'s map again and replay that.")

    def replay(self, index: int, call: int | None = None) -> Any:
        """Run ``mapfunc(params, slice)`` of slice ``index`` of ``call`` (default: the last) here."""
        rec = self.find(call)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < rec.n_slices:
            what = "slices" if rec.data is not None else "tasks (one per worker: it had no dataset)"
            raise ReplayError(f"call {rec.call} has no slice {index!r}: it had {rec.n_slices} {what}, "
                              f"numbered 0..{rec.n_slices - 1}. Replay one of those.")
        if rec.params_hash is not None and digest_of(rec.params_pickle, rec.params_buffers) != rec.params_hash:
            raise ReplayError(f"the params of call {rec.call} changed in place since the call (they were too big "
                              f"to copy), so slice {index} cannot be replayed as the worker ran it: run the "
                              "call again, then replay it before changing its params")
        data = []
        if rec.data is not None:
            key, recorded = rec.data.key(index), rec.keys[16 * index:16 * index + 16]
            if key != recorded:
                raise ReplayError(f"slice {index} of call {rec.call} changed since the call (its content hash "
                                  f"was {recorded.hex()}, it is now {key.hex()}): the data was modified. Run the "
                                  "call again on the data as it is, then replay.")
            data = _as_worker_sees(rec.data.slice(index))
        func = cloudpickle.loads(rec.func_blob)
        if rec.mapfunc is not None:  # tracebacks and %debug show the cell's lines, not <dynamic-code>
            point_back(func, code_spans(rec.mapfunc))
        params = pickle.loads(rec.params_pickle, buffers=[_view(b).toreadonly() for b in rec.params_buffers])
        return func(params, data)


def _as_worker_sees(part: Any) -> Any:
    """The slice after the trip a worker's copy took: pickled, out-of-band buffers read-only."""
    buffers: list = []
    blob = cloudpickle.dumps(part, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(blob, buffers=[_view(b).toreadonly() for b in buffers])


def _view(buf: Any) -> memoryview:
    return buf.raw() if isinstance(buf, pickle.PickleBuffer) else memoryview(buf).cast("B")

