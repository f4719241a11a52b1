"""Slices, big params and big results handed between the master and local workers in shared memory.

A worker on this machine does not need a slice's bytes pushed through a pipe
(about 1 GB/s here): the master writes the slice once into a file in
``/dev/shm`` (memory, at memory speed) and sends only its name; the worker
maps the file read-only, deletes its name at once (the mapping keeps the
memory alive for as long as the slice stays cached, and nothing is left
behind if the worker dies), and keeps the mapped array in its cache.

It travels with the worker and uses the standard library only: the array's
pickle (protocol 5) goes in the message and its one out-of-band buffer, the
data, goes in the file; the worker unpickles with the mapped file as that
buffer, so numpy rebuilds the array around the shared memory by itself.

Big params and big results go through ``Arena``s instead: shared-memory files
written again on every call (a pickle's out-of-band buffers, one after the
other), since a fresh file costs the kernel a zeroed page per 4 KiB written.
Through the pipe, a 1 MiB vector to each of two workers and one back from each
costs the master four kernel copies (~0.15 ms each here) while the workers wait
on it; this way it makes one copy into its params arena for all workers (each
worker copies its params out: they are its own for the call) and reads each
result where it lies, in the worker's arena (``LentResults``). Reuse is safe by
the order of calls: the master writes call N+1's params only after call N has
ended, and a worker writes at most one result a call into its arena, which the
master reads while that call runs (an answer that comes after its call ended is
dropped unread); if something still uses it when the next call starts, the
worker is told to leave it and make a new one.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import pickle
import sys
import tempfile

from .protocol import SpareBuffers

#: Slices smaller than this go through the pipe: a file costs more than it saves.
MIN_BYTES = 1 << 20
DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else None
#: Params and results whose buffers are smaller than this take the pipe.
MESSAGE_MIN_BYTES = 1 << 20
#: ... and bigger than this too: an arena keeps its memory for the next call.
MESSAGE_MAX_BYTES = 64 << 20
RESULT_PREFIX = "qjam-result-"
#: Arenas need /dev/shm and posix_fallocate (Linux); elsewhere big params and results take the pipe.
ARENAS = DIRECTORY is not None and hasattr(os, "posix_fallocate")


def export(array: object) -> dict | None:
    """Write a big contiguous array's data into a new shared-memory file; returns what the
    worker needs to map it, or None when the slice should take the pipe instead."""
    if type(array).__module__ != "numpy" or type(array).__name__ != "ndarray" or array.nbytes < MIN_BYTES:
        return None
    buffers: list = []
    recipe = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
    if len(buffers) != 1:  # not contiguous, or object dtype: pickled in-band, no buffer to share
        return None
    fd, path = tempfile.mkstemp(prefix="qjam-slice-", dir=DIRECTORY)
    try:
        view = buffers[0].raw()
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return {"path": path, "nbytes": buffers[0].raw().nbytes, "pickle": recipe}


def attach(handle: dict) -> object:
    """Map an exported slice read-only and delete its name; returns the array."""
    fd = os.open(handle["path"], os.O_RDONLY)
    try:
        memory = mmap.mmap(fd, handle["nbytes"], prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(handle["path"])
    return pickle.loads(handle["pickle"], buffers=[memoryview(memory)])


def discard(handle: dict) -> None:
    """Delete an exported slice's file if the worker never took it (it died, the call was cut)."""
    try:
        os.unlink(handle["path"])
    except FileNotFoundError:
        pass


class Arena:
    """A shared-memory file that its owner writes messages' buffers into, call after call.

    Its pages are allocated once: a fresh file costs the kernel a zeroed page
    for every 4 KiB written (slower than the pipe), a reused one only the copy.
    Peers map it by name: ``ArenaReader`` copies out, ``LentResults`` reads in place.
    """

    def __init__(self, nbytes: int, prefix: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix=prefix, dir=DIRECTORY)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the pages now, or ENOSPC now: never SIGBUS on a full /dev/shm
            self.memory = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.size = nbytes
        self.view = memoryview(self.memory)

    def write(self, views: list) -> dict:
        """Copy byte views one after the other from the start; returns what a reader needs."""
        start = 0
        for v in views:
            self.view[start : start + v.nbytes] = v
            start += v.nbytes
        return {"path": self.path, "sizes": [v.nbytes for v in views]}

    def close(self) -> None:
        """Delete its name (if the reader has not) and let its mapping go."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.view.release()
        self.memory.close()


def arena_for(arena: Arena | None, nbytes: int, prefix: str) -> Arena:
    """``arena`` if ``nbytes`` fit in it, else a new one with room to grow (the old one closed once
    the new one exists: if making it fails, ``arena`` is still good)."""
    if arena is not None and nbytes <= arena.size:
        return arena
    new = Arena(max(nbytes + nbytes // 4, MESSAGE_MIN_BYTES), prefix)
    if arena is not None:
        arena.close()
    return new


def byte_views(buffers: list) -> list | None:
    """The raw bytes of a pickle's out-of-band buffers, if they are for an arena (between
    ``MESSAGE_MIN_BYTES`` and ``MESSAGE_MAX_BYTES`` together, all contiguous, /dev/shm there);
    else None: they take the pipe."""
    if not ARENAS or not buffers:
        return None
    try:
        views = [b.raw() for b in buffers]
    except BufferError:
        return None
    return views if MESSAGE_MIN_BYTES <= sum(v.nbytes for v in views) <= MESSAGE_MAX_BYTES else None


def may_be_big(value: object) -> bool:
    """Whether ``value`` may carry ``MESSAGE_MIN_BYTES`` of buffers: an array (anything with an int
    ``nbytes``) that big, or such arrays in a list, tuple or dict. Only then is it worth pickling
    a result once just to see; the rest goes through the pipe as always."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes >= MESSAGE_MIN_BYTES
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    total = 0
    for item in items:
        size = getattr(item, "nbytes", 0)
        total += size if isinstance(size, int) else 0
        if total >= MESSAGE_MIN_BYTES:
            return True
    return False


class ArenaReader:
    """Copies messages' buffers out of the master's params arena (the worker's own copy: the master
    writes the next call's params there). Only the latest arena stays mapped: a master that
    outgrew one has moved on."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.view: memoryview | None = None
        self.spare = SpareBuffers()  # what is copied out goes into these, once let go

    def read(self, handle: dict) -> list:
        path = handle["path"]
        if path != self.path:
            self._map(path)
        out, start = [], 0
        for size in handle["sizes"]:
            buf = self.spare.get(size)
            buf[:] = self.view[start : start + size]
            out.append(memoryview(buf).toreadonly())  # as read-only as what comes through the pipe
            start += size
        return out

    def _map(self, path: str) -> None:
        self.path, self.view = path, memoryview(map_whole(path, writable=False))


class LentResults:
    """A local worker's big results, handed out where they lie: in its arena, mapped here once.

    No copy: the arrays the master reduces are built on the worker's pages.
    The worker writes its arena again in a later call; before that, at each
    call's start, ``retained`` says whether anything built on the last result
    still lives (the user kept it, a reduce held on to it). Then the worker is
    told to leave that arena to this mapping and make a new one. Each buffer
    is lent through its own ctypes array over the mapping: whatever is built
    on it holds a reference to that array, so its reference count tells.
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self.memory: mmap.mmap | None = None
        self.lent: list = []  # this call's ctypes arrays

    def read(self, handle: dict) -> list:
        path, sizes = handle["path"], handle["sizes"]
        if path != self.path:
            try:
                self.memory = map_whole(path, writable=True)  # ctypes lends writable memory only; it is lent read-only
            finally:
                os.unlink(path)  # the master is its only reader: nothing is left behind if either dies
            self.path = path
        out, start = [], 0
        for size in sizes:
            exporter = (ctypes.c_char * size).from_buffer(self.memory, start)
            self.lent.append(exporter)
            out.append(memoryview(exporter).cast("B").toreadonly())
            start += size
        return out

    def retained(self) -> bool:
        """True if something built on a result handed out since the last call is still alive."""
        lent, self.lent = self.lent, []
        for exporter in lent:
            if sys.getrefcount(exporter) > 3:  # lent, exporter, getrefcount's argument
                return True
        return False

    def close(self) -> None:
        """Forget the mapping (what is still built on it keeps it)."""
        self.path = self.memory = None


def map_whole(path: str, writable: bool) -> mmap.mmap:
    """All of a shared-memory file, mapped (the mapping outlives the fd and the name)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)


def discard_results_of(pid: int) -> None:
    """Delete the result arena a dead local worker (process ``pid``) left behind, if the master never mapped it."""
    if DIRECTORY is not None:
        for path in glob.glob(os.path.join(DIRECTORY, f"{RESULT_PREFIX}{pid}-*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
