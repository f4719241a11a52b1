"""DataSets: data cut into slices, each named by a hash of its content.

Slicing depends on the data only (its length and row size), never on how many
workers there are, so a call gives the same slices, and so the same reduced
result, on any cluster. A slice's key is a 128-bit XXH3 hash of its content
(and of its dtype and shape for arrays): equal data share cache entries on the
workers, and changed data does not hit a stale entry (an accidental collision
is as likely as one of SHA-256 cut to 128 bits; XXH3 is not built to resist
data crafted to collide, and needs not: the data is the user's own). XXH3
rather than SHA-256 because a writable array is hashed again on every call,
and XXH3 reads ~15 GB/s where SHA-256 reads ~1.7. A key is its 16 bytes of
digest everywhere (events, caches, the wire, the timeline); hex only when
shown to people.

The default slice size, for ``n`` items of ``b`` bytes each (``b`` known for
arrays only): ``ceil(n / 64)`` items, so at most 64 slices, but no more than
16 MiB of rows per slice; at least one item.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import xxhash

from .codec import PLAIN_TYPES, dumps_for, is_plain
from .errors import DataSetError
from .writewatch import WriteWatch

MAX_DEFAULT_SLICES = 64
MAX_DEFAULT_SLICE_BYTES = 16 << 20


def default_slice_size(n_items: int, item_nbytes: int | None = None) -> int:
    """The documented default: at most 64 slices, at most 16 MiB of rows each."""
    size = math.ceil(n_items / MAX_DEFAULT_SLICES)
    if item_nbytes:
        size = min(size, MAX_DEFAULT_SLICE_BYTES // item_nbytes)
    return max(1, size)


class DataSet:
    """A list, tuple, numpy array or ``.npy`` file, cut into slices of ``slice_size`` items.

    Array slices are row ranges, views of the array (no copies on the
    master); a ``.npy`` path is memory-mapped, so only the slices a call
    ships are ever read.
    """

    def __init__(self, data: Any, slice_size: int | None = None) -> None:
        if isinstance(data, DataSet):  # re-wrapping keeps the slicing unless told otherwise
            if slice_size is None:
                slice_size = data.slice_size
            data = data.source
        self.source = data
        self.kind, self.data = _wrap(data)
        self._plain: bool | None = None  # plain_items(), once known
        n = len(self.data)
        if n == 0:
            if self.kind == "npy":
                what = f"the file {os.fspath(data)!r} holds an array"
            else:
                what = "an array" if self.kind == "array" else f"a {self.kind}"
            raise DataSetError(
                f"the dataset is empty ({what} of length 0): "
                "give it at least one item, or call map without a dataset"
            )
        if slice_size is None:
            slice_size = default_slice_size(n, self._row_nbytes())
        elif isinstance(slice_size, bool) or not isinstance(slice_size, (int, np.integer)):
            raise DataSetError(f"slice_size must be a positive whole number, not {slice_size!r}")
        elif slice_size <= 0:
            raise DataSetError(f"slice_size must be at least 1, not {slice_size}")
        self.slice_size = int(slice_size)
        self.n_items = n
        self.n_slices = math.ceil(n / self.slice_size)

    def __len__(self) -> int:
        """The number of slices."""
        return self.n_slices

    def __repr__(self) -> str:
        return f"DataSet({self.kind}, {self.n_items} items, {len(self)} slices of {self.slice_size})"

    def bounds(self, index: int) -> tuple[int, int]:
        """The item range ``[start, stop)`` of slice ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"slice {index} out of range: this dataset has {len(self)} slices")
        start = index * self.slice_size
        return start, min(start + self.slice_size, self.n_items)

    def slice(self, index: int) -> Any:
        """Slice ``index`` as mapfunc will see it (a view for arrays)."""
        start, stop = self.bounds(index)
        part = self.data[start:stop]
        if isinstance(part, np.memmap):
            part = part.view(np.ndarray)  # ships as raw bytes, not as a file mapping
        return part

    def key(self, index: int) -> bytes:
        """The content hash naming slice ``index`` in every cache."""
        return self.key_and_size(index)[0]

    def keys_and_sizes(self) -> list[tuple[bytes, int]]:
        """``key_and_size`` of every slice, for this call.

        Data that can change in place is hashed again on every call, unless the
        kernel says which of its pages were written (``_watched_keys``). Data
        that cannot (a read-only array, read-only all the way down to its
        memory; a ``.npy`` file, while its size and modification time stay the
        same) keeps its keys from the first call: a cached call then costs no
        pass over the data at all.
        """
        token = self._frozen_token()
        if token is None:
            if not self._guessable():
                if self.plain_items():
                    return self._plain_list_keys()
                return [self.key_and_size(i) for i in range(len(self))]
            token = _ArrayToken(self.data, self.slice_size, _GUESSED_KEYS)
            known = _GUESSED_KEYS.get(token)
            keyed = self._watched_keys(known) if known is not None else None
            if keyed is None:
                keyed = self._hash_and_watch(token, known)
            return keyed
        known = _FROZEN_KEYS.get(token)
        if known is None:
            known = _FROZEN_KEYS[token] = [self.key_and_size(i) for i in range(len(self))]
        return known

    def plain_items(self) -> bool:
        """A list of numbers, strings and None (looked at once per DataSet): its slices pickle
        with ``pickle`` as with cloudpickle, and may travel many to a frame."""
        if self._plain is None:
            self._plain = type(self.data) is list and PLAIN_TYPES.issuperset(map(type, self.data))
        return self._plain

    def _plain_list_keys(self) -> list[tuple[bytes, int]]:
        """``key_and_size`` of every slice of a list of numbers, strings and None, in one loop
        (~1.5 µs a slice where a call per slice took ~4: a list is hashed again every call)."""
        data, size, dumps, digest = self.data, self.slice_size, pickle.dumps, xxhash.xxh3_128_digest
        prefix = f"{self.kind}|".encode()
        blobs = [dumps(data[start:start + size], 5) for start in range(0, self.n_items, size)]
        return [(digest(prefix + blob), len(blob)) for blob in blobs]

    def guessed_keys(self) -> list[tuple[bytes, int]] | None:
        """What ``keys_and_sizes`` gave last time for this very (writable) array, or None.

        A big writable array may have changed in place, so its slices are hashed
        again every call; but usually it has not. A call can start on these keys
        (the workers compute on their cached slices) while the slices are hashed,
        and redo the slices whose key turns out different. None too for an
        array whose writes are watched: its true keys cost less than a guess.
        """
        if not self._guessable() or self._frozen_token() is not None:
            return None
        known = _GUESSED_KEYS.get(_ArrayToken(self.data, self.slice_size, _GUESSED_KEYS))
        if known is None or (known.watch is not None and known.watch.alive()):
            return None
        return known.keys

    def _hash_and_watch(self, token: _ArrayToken, known: _KnownKeys | None) -> list[tuple[bytes, int]]:
        """Hash every slice, watching the array's pages for writes from just before (if it pays)."""
        watch = None
        # Not an array of objects: they can change without a write to the array's own memory.
        watchable = self.data.flags.c_contiguous and not self.data.dtype.hasobject
        if watchable and (known is None or known.unchanged):  # new, or left alone again since watching stopped
            try:
                watch = WriteWatch(self.data.ctypes.data, self.data.nbytes)
                watch.protect(0, self.data.nbytes)
            except OSError:
                watch = None
        keyed = [self.key_and_size(i) for i in range(len(self))]
        _GUESSED_KEYS[token] = _KnownKeys(list(keyed), watch, known is not None and known.keys == keyed)
        return keyed

    def _watched_keys(self, known: _KnownKeys) -> list[tuple[bytes, int]] | None:
        """Last call's keys with the slices the kernel saw written hashed again; None to hash all.

        Watching stops when over an eighth of the slices were written: each
        page's first write after a protect costs a fault (~1.5 µs for 4 KiB),
        more than hashing it (~0.3 µs) saves. It starts again once a full hash
        finds the array unchanged.
        """
        watch = known.watch
        if watch is None or not watch.alive() or watch.address != self.data.ctypes.data:
            return None
        keys = list(known.keys)
        try:
            written = watch.written()
            dirty = sorted({i for lo, hi in written for i in self._slices_in_bytes(lo, hi)})
            if len(dirty) * 8 > len(self):
                known.watch = None
                return None
            row = self.data.nbytes // self.n_items
            for i in dirty:  # protect first, then hash: a write in between is seen next call
                start, stop = self.bounds(i)
                watch.protect(start * row, stop * row)
            for i in dirty:
                keys[i] = self.key_and_size(i)
        except BaseException as e:  # protected but not hashed (an interrupt, say): no longer to be trusted
            known.watch = None
            if isinstance(e, OSError):
                return None
            raise
        known.keys = keys
        return list(keys)

    def _slices_in_bytes(self, lo: int, hi: int) -> range:
        """The slices holding any byte of ``[lo, hi)`` of a C-contiguous array's memory."""
        row = self.data.nbytes // self.n_items
        lo, hi = max(lo, 0), min(hi, self.data.nbytes)
        if lo >= hi:
            return range(0)
        return range(lo // row // self.slice_size, (hi - 1) // row // self.slice_size + 1)

    def _guessable(self) -> bool:
        return self.kind == "array" and self.data.nbytes >= GUESS_KEYS_FROM

    def _frozen_token(self) -> object | None:
        if self.kind == "npy":
            st = os.stat(self.source)
            return (os.path.realpath(self.source), st.st_ino, st.st_size, st.st_mtime_ns, self.slice_size)
        if self.kind == "array" and _read_only(self.data):
            return _ArrayToken(self.data, self.slice_size)
        return None

    def key_and_size(self, index: int) -> tuple[bytes, int]:
        """The slice's key and its size in bytes (raw array bytes, or pickle size)."""
        part = self.slice(index)
        if type(part) is list and is_plain(part):  # one-shot: lists of numbers are the usual tiny slices
            blob = pickle.dumps(part, protocol=5)
            return xxhash.xxh3_128_digest(f"{self.kind}|".encode() + blob), len(blob)
        digest = xxhash.xxh3_128()
        if isinstance(part, np.ndarray) and not part.dtype.hasobject:
            flat = np.ascontiguousarray(part)
            # dtype.str alone is "|V8" for every 8-byte record type: the field layout must count too.
            dtype = flat.dtype.str if flat.dtype.fields is None else repr(flat.dtype.descr)
            digest.update(f"array|{type(part).__name__}|{dtype}|{flat.shape}|".encode())
            # Bytes through a uint8 view: some dtypes (datetime64, timedelta64) export no buffer.
            digest.update(flat.reshape(-1).view(np.uint8).data if flat.size else b"")
            nbytes = flat.nbytes
        else:
            blob = dumps_for(part)(part, protocol=5)
            digest.update(f"{self.kind}|".encode())
            digest.update(blob)
            nbytes = len(blob)
        return digest.digest(), nbytes

    def _row_nbytes(self) -> int | None:
        if isinstance(self.data, np.ndarray) and self.data.ndim and len(self.data):
            return max(1, self.data.nbytes // len(self.data))
        return None




def _read_only(array: np.ndarray) -> bool:
    """True if nobody can write to ``array``'s memory: it is read-only, and so is every base
    below it that anything else refers to (``X = np.arange(n).reshape(a, b)`` leaves a
    writable base that only ``X`` knows of: ``X.setflags(write=False)`` is enough there)."""
    node = array
    while isinstance(node, np.ndarray):
        # References to a base: its view's .base, ``node`` here, and getrefcount's argument.
        if node.flags.writeable and (node is array or sys.getrefcount(node) > 3):
            return False
        node = node.base
    return True


class _ArrayToken:
    """Names an array by identity for a key cache (``store``), and lets go when the array dies."""

    def __init__(self, array: np.ndarray, slice_size: int, store: dict | None = None) -> None:
        store = _FROZEN_KEYS if store is None else store
        self.ref = weakref.ref(array, lambda _: store.pop(self, None))
        self.ident = (id(array), array.shape, array.strides, array.dtype.str, slice_size)

    def __hash__(self) -> int:
        return hash(self.ident)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ArrayToken) and self.ident == other.ident and self.ref() is other.ref()


class _KnownKeys:
    """A writable array's keys from its last call, and the watch on its pages if they are watched
    (protected before those keys were hashed); ``unchanged``: that hash found last keys again."""

    __slots__ = ("keys", "watch", "unchanged")

    def __init__(self, keys: list[tuple[bytes, int]], watch: WriteWatch | None, unchanged: bool) -> None:
        self.keys, self.watch, self.unchanged = keys, watch, unchanged


class _Bounded(OrderedDict):
    """A dict that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


#: Keys of data that cannot change, by ``DataSet._frozen_token``.
_FROZEN_KEYS = _Bounded(64)
#: The last keys of big writable arrays, by identity (``_KnownKeys``): watched, or guesses checked by hashing.
_GUESSED_KEYS = _Bounded(16)
#: Arrays from this size up are worth starting a call on guessed keys (hashing takes ~1 ms per 15 MB).
GUESS_KEYS_FROM = 4 << 20


def _wrap(data: Any) -> tuple[str, Any]:
    if isinstance(data, list):
        return "list", data
    if isinstance(data, tuple):
        return "tuple", data
    if isinstance(data, np.ndarray):
        if data.ndim == 0:
            raise DataSetError("a 0-dimensional array cannot be sliced: give an array with rows")
        return "array", data
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not path.endswith(".npy"):
            raise DataSetError(
                f"a dataset given as a path must be a .npy file, not {path!r}: "
                "load other files yourself and pass the array or list"
            )
        if not os.path.exists(path):
            raise DataSetError(
                f"the dataset file {path!r} does not exist (looked in {os.getcwd()!r} for a relative path): "
                "check the name, or save the array first with np.save"
            )
        array = np.load(path, mmap_mode="r")
        if array.ndim == 0:
            raise DataSetError(
                f"{path!r} holds a 0-dimensional array, which cannot be sliced: save an array with rows"
            )
        return "npy", array
    what = type(data).__name__
    hint = {
        "dict": "pass list(d.items()) to slice its items",
        "generator": "pass list(...) of it: a generator can be read only once",
        "set": "pass sorted(s) or list(s)",
        "range": "pass list(r) or np.arange(...)",
    }.get(what, "give a list, tuple, numpy array or .npy path")
    raise DataSetError(f"cannot slice a dataset of type {what}: {hint}")


def ListDataSet(data: list | tuple, slice_size: int = 30) -> DataSet:
    """qjam's name for a list dataset (and its default slice size)."""
    return DataSet(data, slice_size)


def NumpyMatrixDataSet(matrix: Any, slice_size: int = 5, row_major: bool = True) -> DataSet:
    """qjam's name for an array dataset; ``row_major=False`` slices columns."""
    return DataSet(matrix if row_major else matrix.T, slice_size)
