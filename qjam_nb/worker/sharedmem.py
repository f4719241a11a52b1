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

Ground rules (files no one else can touch; see design.md §2):

* Every file lives in its master's own directory, ``/dev/shm/qjam-<pid>-<start>-<random>``
  (``own_directory``): made with ``mkdir`` (which fails if the name exists), mode 0700,
  so no other user can see, plant, replace or open anything in it. ``pid`` and
  ``start`` (field 22 of ``/proc/PID/stat``) say which process made it; the master
  holds an ``flock`` on it for as long as it lives. Local workers make their result
  arenas in their master's directory (the CALL's ``share`` names it).
* Files are made with ``O_CREAT | O_EXCL | O_NOFOLLOW``, 0600, under a random name;
  files and directories are opened with ``O_NOFOLLOW`` and used only if they are
  this user's (regular files, not symbolic links).
* A name is deleted by who made it or who was handed it (the worker that takes a
  slice, the master that maps a result arena), and by nothing that guesses: a dead
  worker's result arenas are looked for in the master's own directory only, and a
  file there is deleted only if it is a regular file of this user's. Deleting never
  raises: nothing a file does can stop a recovery.
* What a dead master left is swept by the next one (``sweep``, at ``Cluster``
  start): a directory of this user's (not a symbolic link), named as above, whose
  process is gone (no process with that pid and start time) and whose lock is free.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import mmap
import os
import pickle
import re
import secrets
import stat
import sys
import threading

from .protocol import SpareBuffers

#: Slices smaller than this go through the pipe: a file costs more than it saves.
MIN_BYTES = 1 << 20
DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else None
#: Params and results whose buffers are smaller than this take the pipe.
MESSAGE_MIN_BYTES = 1 << 20
#: ... and bigger than this too: an arena keeps its memory for the next call.
MESSAGE_MAX_BYTES = 64 << 20
#: Names in a master's own directory: a slice, its params arena, a worker's result arena
#: (``result-<worker pid>-``); each followed by 16 random hex digits.
SLICE_PREFIX, PARAMS_PREFIX, RESULT_PREFIX = "slice-", "params-", "result-"
#: Arenas need /dev/shm and posix_fallocate (Linux); elsewhere big params and results take the pipe.
ARENAS = DIRECTORY is not None and hasattr(os, "posix_fallocate")

_DIR_NAME = re.compile(r"qjam-(\d+)-(\d+)-[0-9a-f]{16}")  # a master's own directory: pid, start, random
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- this process's own directory ------------------------------------------------


class _Own:
    """This process's directory in ``DIRECTORY``, once made: its path, and the fd whose flock says it lives."""

    lock = threading.Lock()
    pid = 0  # the process that made it (a forked child has none until it makes its own)
    path: str | None = None
    fd = -1
    closed = False  # the interpreter is exiting: no new directory


def own_directory() -> str:
    """This process's private directory for shared memory, made on first use (OSError if it cannot
    be: no /dev/shm, or full). Everything this master and its local workers put in shared memory
    goes there; it is removed when the process exits, or swept by the next master if it is killed."""
    with _Own.lock:
        if _Own.pid != os.getpid() or _Own.path is None:
            if _Own.closed or DIRECTORY is None:
                raise OSError(errno.ENOENT, "no shared-memory directory here (no /dev/shm, or exiting)")
            _Own.path, _Own.fd = _make_own_directory()
            _Own.pid = os.getpid()
        return _Own.path


def sharing_directory() -> str | None:
    """``own_directory()``, or None where there can be none: then everything takes the pipe."""
    try:
        return own_directory()
    except OSError:
        return None


def _make_own_directory() -> tuple[str, int]:
    """``qjam-<pid>-<start>-<random>``, 0700, flock-ed. A sweeper that took the lock of a name
    just made (it cannot, while our pid lives, but a sweeper in another pid namespace could)
    has removed it by the time we hold the lock: checked, and then another name is tried."""
    start = _starttime(os.getpid()) or "0"
    for _ in range(100):
        path = os.path.join(DIRECTORY, f"qjam-{os.getpid()}-{start}-{secrets.token_hex(8)}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        fd = os.open(path, _OPEN_DIR)
        try:
            os.fchmod(fd, 0o700)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if os.lstat(path).st_ino == st.st_ino:
                return path, fd
        except OSError:
            pass
        os.close(fd)
    raise OSError(errno.EEXIST, f"could not make a directory of our own in {DIRECTORY}")


def _forget_in_child() -> None:
    """A forked child makes a directory of its own if it needs one; the parent's stays locked by the parent."""
    _Own.lock = threading.Lock()
    if _Own.fd >= 0:
        try:
            os.close(_Own.fd)
        except OSError:
            pass
    _Own.pid, _Own.path, _Own.fd = 0, None, -1


def _remove_own_directory() -> None:
    """At exit: this process's directory and whatever is still in it (a slice no worker took,
    a dead worker's arena), if this process made it."""
    with _Own.lock:
        _Own.closed = True
        if _Own.pid != os.getpid() or _Own.path is None:
            return
        path, fd = _Own.path, _Own.fd
        _Own.pid, _Own.path, _Own.fd = 0, None, -1
    _empty(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass
    os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_remove_own_directory)  # registered on import: it runs after the clusters' shutdown


def _create(prefix: str, directory: str | None) -> tuple[int, str]:
    """A new file of ours alone (0600), under a random name no file had: ``O_EXCL``, never
    through a symbolic link. In ``directory`` (a worker: its master's), else our own."""
    where = directory if directory is not None else own_directory()
    for _ in range(100):
        path = os.path.join(where, f"{prefix}{secrets.token_hex(8)}")
        try:
            return os.open(path, _NEW_FILE, 0o600), path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"could not make a new file in {where}")


def _open_ours(path: str, flags: int) -> int:
    """``path`` opened, if it is a regular file of this user's (never through a symbolic link)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} is not a file qjam_nb made (another user's, or not a regular file)")
    return fd


def _unlink(path: str) -> None:
    """Delete a name we made or were handed; never raises (it may be gone already)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _unlink_ours(name: str, dir_fd: int) -> None:
    """Delete ``name`` in ``dir_fd`` if it is a regular file of this user's; never raises."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _empty(dir_fd: int) -> None:
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return
    for name in names:
        _unlink_ours(name, dir_fd)


def export(array: object) -> dict | None:
    """Write a big contiguous array's data into a new shared-memory file; returns what the
    worker needs to map it, or None when the slice should take the pipe instead."""
    if type(array).__module__ != "numpy" or type(array).__name__ != "ndarray" or array.nbytes < MIN_BYTES:
        return None
    buffers: list = []
    recipe = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
    if len(buffers) != 1:  # not contiguous, or object dtype: pickled in-band, no buffer to share
        return None
    fd, path = _create(SLICE_PREFIX, None)
    try:
        view = buffers[0].raw()
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        _unlink(path)
        raise
    finally:
        os.close(fd)
    return {"path": path, "nbytes": buffers[0].raw().nbytes, "pickle": recipe}


def attach(handle: dict) -> object:
    """Map an exported slice read-only and delete its name; returns the array."""
    try:
        fd = _open_ours(handle["path"], os.O_RDONLY)
        try:
            memory = mmap.mmap(fd, handle["nbytes"], prot=mmap.PROT_READ)
        finally:
            os.close(fd)
    finally:
        _unlink(handle["path"])
    return pickle.loads(handle["pickle"], buffers=[memoryview(memory)])


def discard(handle: dict) -> None:
    """Delete an exported slice's file if the worker never took it (it died, the call was cut)."""
    _unlink(handle["path"])


class Arena:
    """A shared-memory file that its owner writes messages' buffers into, call after call.

    Its pages are allocated once: a fresh file costs the kernel a zeroed page
    for every 4 KiB written (slower than the pipe), a reused one only the copy.
    Peers map it by name: ``ArenaReader`` copies out, ``LentResults`` reads in place.
    """

    def __init__(self, nbytes: int, prefix: str, directory: str | None = None) -> None:
        fd, self.path = _create(prefix, directory)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the pages now, or ENOSPC now: never SIGBUS on a full /dev/shm
            self.memory = mmap.mmap(fd, nbytes)
        except BaseException:
            _unlink(self.path)
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
        _unlink(self.path)
        self.view.release()
        self.memory.close()


def arena_for(arena: Arena | None, nbytes: int, prefix: str, directory: str | None = None) -> Arena:
    """``arena`` if ``nbytes`` fit in it, else a new one with room to grow (the old one closed once
    the new one exists: if making it fails, ``arena`` is still good)."""
    if arena is not None and nbytes <= arena.size:
        return arena
    new = Arena(max(nbytes + nbytes // 4, MESSAGE_MIN_BYTES), prefix, directory)
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
                _unlink(path)  # the master is its only reader: nothing is left behind if either dies
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
    """All of a shared-memory file of ours, mapped (the mapping outlives the fd and the name)."""
    fd = _open_ours(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)


def discard_results_of(pid: int) -> None:
    """Delete the result arenas a dead local worker (process ``pid``) left in this master's own
    directory, where the master never mapped them (a result dropped unread, or never sent).
    Only regular files of this user's there; never raises: the worker is marked dead whatever it left."""
    with _Own.lock:
        fd = _Own.fd if _Own.pid == os.getpid() else -1
        if fd < 0:
            return
        try:
            names = os.listdir(fd)
        except OSError:
            return
        prefix = f"{RESULT_PREFIX}{pid}-"
        for name in names:
            if name.startswith(prefix):
                _unlink_ours(name, fd)


# -- what dead masters left ----------------------------------------------------------


def sweep() -> list[str]:
    """Remove what masters of this user that are gone left in ``DIRECTORY`` (SIGKILLed, or a kernel
    restarted at once); returns the directories removed. Never raises; touches only directories
    named as ``own_directory`` names them, of this user's, not symbolic links, whose process is gone
    and whose lock is free. (Files of qjam_nb before it had directories are left alone: their names
    do not say who is gone.)"""
    if DIRECTORY is None:
        return []
    try:
        entries = list(os.scandir(DIRECTORY))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _DIR_NAME.fullmatch(entry.name)
        if match is None or entry.path == _Own.path:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue  # a symbolic link, a file, another user's
        if _alive(int(match[1]), match[2]) or not _sweep_one(entry.path, st):
            continue
        removed.append(entry.path)
    return removed


def _sweep_one(path: str, st: os.stat_result) -> bool:
    """Empty and remove a dead master's directory, holding its lock (no other sweeper is in it)."""
    try:
        fd = os.open(path, _OPEN_DIR)
    except OSError:
        return False
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or now.st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: its master lives (in another pid namespace, say), or another sweeper is at it
        _empty(fd)
        try:
            os.rmdir(path)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


def _alive(pid: int, start: str) -> bool:
    """Whether the process that made a directory may still live: one with its pid and start time.
    (Another process with that pid, started since, is not it. Unsure: alive.)"""
    if pid <= 0:
        return True
    now = _starttime(pid)
    if now is not None:
        return start == "0" or now == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
        return stat_line[stat_line.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None
