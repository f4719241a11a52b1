"""What runs on a Dask worker for the Dask executor (``executors.dask``): a batch of slices, the versions,
the cancel flag.

Rules of this module:

* It travels by value: ``executors.dask`` runs its code again in a module
  that is in no ``sys.modules`` (``TRAVEL``), whose functions cloudpickle
  ships by value, so nothing of qjam_nb needs to be installed on the Dask
  workers. It imports only the standard library and
  cloudpickle at the top; ``distributed`` (there on every Dask worker) is
  imported inside the functions that run there.
* A batch runs the slices the face assigned one worker in one pass, in order,
  and says where it is through the worker's event log (``log_event`` on the
  executor's topic): one ``("slice", call, who, started, finished, seconds)`` as
  each slice begins (``finished``: the slice before it, or None), and
  ``("idle", call, who, finished, seconds)`` after the last. Values travel back
  in the batch's result, pickled here (protocol 5, big buffers out of band),
  so a value that cannot be pickled is reported as such, naming its slice.
* A mapfunc error ends the batch: its error is the last entry, shaped as our
  own workers' (type, message, traceback, where).
* What mapfunc prints, on a worker of one thread, is caught per slice and
  sent as ``("output", call, who, index, stream, text)`` (up to
  ``OUTPUT_LIMIT`` characters a slice and stream).
* The cancel flag (``cancel``) is a set on the worker object, checked before
  each slice: a cancelled call's batches end at the next slice boundary.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import platform
import time
import traceback

import cloudpickle

#: Where a worker keeps the call it last loaded (its key, mapfunc, params) and the calls cancelled.
MEMO, CANCELLED = "_qjam_call", "_qjam_cancelled"
#: How many cancelled calls a worker remembers.
KEEP_CANCELLED = 16
#: Characters of one slice's output on one stream sent back (the scheduler keeps the last events).
OUTPUT_LIMIT = 16 << 10


def versions() -> dict:
    """What the handshake compares (``executors.handshake``), as a frames worker's hello says it."""
    try:
        from importlib.metadata import version

        numpy_version: str | None = version("numpy")
    except Exception:
        numpy_version = None
    import os

    # BLAS threads are the Dask worker's own (its nanny sets OMP_NUM_THREADS and friends, 1 by default):
    # said as a frames worker's hello says them, for the widget.
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    blas = {"threads": int(threads) if threads and threads.isdigit() else None,
            "source": "environment" if threads else "off", "cores": os.cpu_count()}
    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__, "numpy": numpy_version,
            "pid": os.getpid(), "blas": blas}


async def cancel(call_key: str, dask_worker: object) -> None:
    """Mark ``call_key`` cancelled on this worker (run by ``Client.run`` on the worker's event loop, not
    waited for: a coroutine, as Dask asks of that)."""
    cancelled = dask_worker.__dict__.setdefault(CANCELLED, [])
    cancelled.append(call_key)
    del cancelled[:-KEEP_CANCELLED]


def error_dict(exc: BaseException, where: str, skip: int = 0) -> dict:
    """``exc`` as our workers report an error (``worker.core.error_message``'s fields), the first
    ``skip`` traceback entries (this module's) hidden."""
    tb = exc.__traceback__
    for _ in range(skip):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, tb)), "where": where}


def _load(worker: object, call_key: str, payload: tuple) -> tuple:
    """The call's (mapfunc, params), loaded once per worker and call."""
    memo = worker.__dict__.get(MEMO)
    if memo is not None and memo[0] == call_key:
        return memo[1], memo[2]
    func_blob, params_blob, buffers = payload
    func = cloudpickle.loads(func_blob)
    params = pickle.loads(params_blob, buffers=buffers)
    worker.__dict__[MEMO] = (call_key, func, params)
    return func, params


#: Bytes an array's start is aligned to on our own workers, and so here: numpy sums an array off that
#: boundary in another order, with other last bits.
ALIGN = 64


def _aligned(worker: object, key: str | None, data: object) -> object:
    """``data``, or a copy of it that starts on an ``ALIGN`` boundary. Dask hands a task a scattered
    array wherever it sat in its message (2 bytes past a boundary, say); the copy replaces it in the
    worker's store, so it is made once per slice and worker, and the memory is not doubled."""
    ctypes = getattr(data, "ctypes", None)
    if ctypes is None or ctypes.data % ALIGN == 0 or not data.flags.c_contiguous:
        return data
    import numpy

    room = numpy.empty(data.nbytes + ALIGN, numpy.uint8)
    skip = -room.ctypes.data % ALIGN
    copy = room[skip:skip + data.nbytes].view(data.dtype).reshape(data.shape)
    copy[...] = data
    store = getattr(worker, "data", None)
    if key is not None and store is not None:
        try:
            if key in store:
                store[key] = copy
        except Exception:  # (a store that refuses: the copy serves this slice only)
            pass
    return copy


def _forward(log: object, topic: str, call: int, who: str, index: int, printed: tuple | None) -> None:
    """What slice ``index`` printed, as ``("output", call, who, index, stream, text)`` events."""
    if printed is None:
        return
    for stream, buffer in zip(("stdout", "stderr"), printed, strict=True):
        text = buffer.getvalue()
        if len(text) > OUTPUT_LIMIT:
            text = text[:OUTPUT_LIMIT] + f"\n[{len(text) - OUTPUT_LIMIT} more characters not shown]\n"
        if text:
            log(topic, ("output", call, who, index, stream, text))


def run_batch(call_key: str, call: int, who: str, payload: tuple, items: list, topic: str,
              delay: float | None) -> list:
    """Run mapfunc over ``items`` ((slice index, slice or None, its Dask key or None), in order) on this
    worker (``who``, as the executor names it).

    Returns ``[("ok", index, pickled, buffers, seconds) | ("error", index, error) | ("cancelled", index)]``.
    """
    from distributed import get_worker

    worker = get_worker()
    log = worker.log_event
    out: list = []
    try:
        func, params = _load(worker, call_key, payload)
    except BaseException as exc:
        return [("error", items[0][0], error_dict(exc, "loading mapfunc and params"))]
    state = worker.__dict__
    # What mapfunc prints comes back as events, where this worker runs one task at a time (redirecting
    # sys.stdout would catch its other threads' tasks' output too).
    capture = getattr(getattr(worker, "state", None), "nthreads", None) == 1
    finished, seconds = None, 0.0
    for index, data, key in items:
        if call_key in state.get(CANCELLED, ()):
            out.append(("cancelled", index))
            continue
        log(topic, ("slice", call, who, index, finished, seconds))
        start = time.perf_counter()  # (a chaos straggler's delay counts in its slice's time, as on our workers)
        if delay:
            time.sleep(delay)
        if data is None:
            data = []
        elif hasattr(data, "flags") and hasattr(data, "view"):  # a numpy array: read-only, as our workers' are
            data = _aligned(worker, key, data).view()
            data.flags.writeable = False
        printed = (io.StringIO(), io.StringIO()) if capture else None
        try:
            if printed is None:
                value = func(params, data)
            else:
                with contextlib.redirect_stdout(printed[0]), contextlib.redirect_stderr(printed[1]):
                    value = func(params, data)
        except BaseException as exc:
            _forward(log, topic, call, who, index, printed)
            out.append(("error", index, error_dict(exc, "running mapfunc", skip=1)))
            log(topic, ("idle", call, who, None, 0.0))
            return out
        seconds = time.perf_counter() - start
        _forward(log, topic, call, who, index, printed)
        finished = index
        buffers: list = []
        try:
            pickled = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        except BaseException as exc:
            out.append(("error", index, error_dict(exc, "pickling the result")))
            log(topic, ("idle", call, who, None, 0.0))
            return out
        # (memoryviews: Dask ships them as they are; a PickleBuffer in a result it cannot ship)
        out.append(("ok", index, pickled, [b.raw() for b in buffers], seconds))
    log(topic, ("idle", call, who, finished, seconds))
    return out
