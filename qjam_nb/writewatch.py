"""Which pages of a big array were written since we last looked, from the kernel (Linux 6.7+).

A writable array given as a dataset may change in place between calls, so
without help its slices are hashed again on every call: for 200 MiB, ~13 ms of
reading memory that the workers' compute needs too. Linux can say instead which
pages were written: the pages are write-protected through a userfaultfd in
*asynchronous* mode (``UFFD_FEATURE_WP_ASYNC``), so the first write to each
page after that is let through by the kernel itself (a minor fault, ~1.5 µs a
page here, nothing blocks or waits for us) and merely marks the page written;
``PAGEMAP_SCAN`` on ``/proc/self/pagemap`` lists the written ones in ~0.1 ms
for 200 MiB. Every way this process's own memory changes goes through its page
tables, so is seen: numpy, other threads, the kernel's ``read`` into the
buffer, ``MADV_DONTNEED`` (the page is gone: reported too).

Only private anonymous memory is watched: a shared mapping can be written by
another process through its own page tables, which would not be seen (such
arrays are hashed every call, as before). The ioctls are called through
ctypes because no maintained Python package wraps them; where any step fails
(an older kernel, a seccomp filter, another userfaultfd on the range) there is
no watch, and the caller hashes.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
import weakref

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine) if hasattr(os, "uname") else None
_UFFD_USER_MODE_ONLY = 1  # only faults from user mode wait for us: allowed without privileges
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # pages not yet faulted in are protected too
_UFFD_FEATURE_WP_ASYNC = 1 << 15  # the kernel resolves write faults itself and marks the page written
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages reported, in the same walk
_PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail (EPERM) on memory that is not registered as above
_PAGE_IS_WRITTEN = 1 << 1
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask",
    )]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


def _iowr(kind: int, nr: int, struct: type, direction: int = 3) -> int:
    return (direction << 30) | (ctypes.sizeof(struct) << 16) | (kind << 8) | nr


_UFFDIO_API = _iowr(_UFFD_API, 0x3F, _Api)
_UFFDIO_REGISTER = _iowr(_UFFD_API, 0x00, _Register)
_UFFDIO_UNREGISTER = _iowr(_UFFD_API, 0x01, _Range, direction=2)
_PAGEMAP_SCAN = _iowr(ord("f"), 16, _ScanArg)

#: Off switch (tests of the hashing path turn it off).
enabled = True


class _Kernel:
    """This process's userfaultfd and pagemap descriptors, opened once (again after a fork)."""

    def __init__(self) -> None:
        if _SYS_USERFAULTFD is None:
            raise OSError("userfaultfd: not known on this machine")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        self.pid = os.getpid()
        self.uffd = fd
        try:
            api = _Api(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
            fcntl.ioctl(fd, _UFFDIO_API, api)  # EINVAL where a feature is missing
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        self.regions = (_PageRegion * 256)()

    def register(self, start: int, end: int) -> None:
        fcntl.ioctl(self.uffd, _UFFDIO_REGISTER, _Register(_Range(start, end - start), _UFFDIO_REGISTER_MODE_WP, 0))

    def unregister(self, start: int, end: int) -> None:
        """Stop protecting ``[start, end)`` (its pages' write faults end): quietly, as the memory
        may be gone already."""
        if self.pid == os.getpid():
            try:
                fcntl.ioctl(self.uffd, _UFFDIO_UNREGISTER, _Range(start, end - start))
            except OSError:
                pass

    def scan(self, start: int, end: int, inverted: int, mask: int, anyof: int,
             flags: int = _PM_SCAN_CHECK_WPASYNC) -> list[tuple[int, int]]:
        """The page ranges in ``[start, end)`` whose categories match, in order."""
        found: list[tuple[int, int]] = []
        while start < end:
            arg = _ScanArg(ctypes.sizeof(_ScanArg), flags, start, end, 0,
                           ctypes.addressof(self.regions), len(self.regions), 0,
                           inverted, mask, anyof, _PAGE_IS_WRITTEN)
            n = fcntl.ioctl(self.pagemap, _PAGEMAP_SCAN, arg)
            found.extend((r.start, r.end) for r in self.regions[:n])
            if arg.walk_end <= start:
                raise OSError("PAGEMAP_SCAN made no progress")
            start = arg.walk_end
        return found

    def take_written(self, start: int, end: int) -> list[tuple[int, int]]:
        """Write-protect the written pages of ``[start, end)`` and say which they were, atomically
        (in one walk, under the page table locks): no write is lost between the two."""
        return self.scan(start, end, 0, 0, _PAGE_IS_WRITTEN, _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC)


_kernel: _Kernel | None = None
_kernel_failed_in: int | None = None  # the pid that could not open one: do not try again
#: Every live watch: protecting pages that another watch also covers hands it the writes it would miss.
_watches: weakref.WeakSet[WriteWatch] = weakref.WeakSet()
_lock = threading.RLock()  # re-entrant: a watch may be let go (finalized) while one is held


def _the_kernel() -> _Kernel | None:
    global _kernel, _kernel_failed_in
    pid = os.getpid()
    with _lock:
        if _kernel is not None and _kernel.pid == pid:
            return _kernel
        if _kernel_failed_in == pid:
            return None
        try:
            _kernel = _Kernel()
        except OSError:
            _kernel, _kernel_failed_in = None, pid
        return _kernel


def _private_anonymous(start: int, end: int) -> bool:
    """True if every byte of ``[start, end)`` is in a private mapping of no file (``/proc/self/maps``)."""
    covered = start
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if high <= covered:
                continue
            if low > covered:
                return False  # a gap
            if fields[1][3] != "p" or fields[4] != "0":
                return False  # shared, or backed by a file (memfd and /dev/shm included)
            covered = high
            if covered >= end:
                return True
    return False


def _let_go(kernel: _Kernel, start: int, end: int) -> None:
    """Unregister what of ``[start, end)`` no live watch covers still."""
    with _lock:
        others = sorted((w.start, w.end) for w in _watches if w.start < end and start < w.end)
    for low, high in others:
        if low > start:
            kernel.unregister(start, min(low, end))
        start = max(start, high)
    if start < end:
        kernel.unregister(start, end)


class WriteWatch:
    """Watches the bytes ``[address, address + nbytes)`` of this process for writes.

    ``protect(lo, hi)`` starts (again) on a byte range, relative to
    ``address``; ``written()`` lists the byte ranges with a page written since
    it was last protected, by this watch or by another that covers the page
    too. Protect *before* reading what you want to know unchanged: a write in
    between is then still seen.
    """

    def __init__(self, address: int, nbytes: int) -> None:
        """Raises OSError if this memory cannot be watched here."""
        kernel = _the_kernel() if enabled else None
        if kernel is None:
            raise OSError("no userfaultfd with asynchronous write-protection in this process")
        self.kernel = kernel
        self.address = address
        self.start = address // PAGE * PAGE
        self.end = -(-(address + nbytes) // PAGE) * PAGE
        if not _private_anonymous(self.start, self.end):
            raise OSError("the memory is shared or backed by a file: another process could write it unseen")
        kernel.register(self.start, self.end)
        # Let go with the watch (the array died, or its keys were forgotten): memory reused for other
        # data would otherwise fault once a page on its first write.
        weakref.finalize(self, _let_go, kernel, self.start, self.end)
        self.carried: list[tuple[int, int]] = []  # written pages another watch protected again
        _watches.add(self)

    def alive(self) -> bool:
        """False in a forked child: the watch belongs to its parent's memory."""
        return self.kernel.pid == os.getpid()

    def protect(self, lo: int, hi: int) -> None:
        start = max(self.start, (self.address + lo) // PAGE * PAGE)
        end = min(self.end, -(-(self.address + hi) // PAGE) * PAGE)
        if start >= end:
            return
        with _lock:
            taken = self.kernel.take_written(start, end)
            # Pages another watch covers too (two views of one array, heap neighbours): it would no
            # longer see these writes in the page tables, so it is told.
            for other in _watches:
                if other is not self and other.start < end and start < other.end:
                    other.carried += [(a, b) for a, b in taken if a < other.end and other.start < b]

    def written(self) -> list[tuple[int, int]]:
        """Byte ranges (relative, whole pages) written since protected, or gone from memory."""
        k = self.kernel
        with _lock:
            ranges = k.scan(self.start, self.end, 0, 0, _PAGE_IS_WRITTEN)
            # A page neither present nor swapped was dropped (MADV_DONTNEED: it reads as zeros now).
            gone = _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED
            ranges += k.scan(self.start, self.end, gone, gone, 0)
            ranges += self.carried
            self.carried = []
        return sorted((max(lo, self.start) - self.address, min(hi, self.end) - self.address) for lo, hi in ranges)
