"""qjam's 2010 API on top of ``Cluster``: ``Master``, ``RemoteWorker``, the 2010 DataSets, ``default_reduce``.

Imported by users as ``qjam_nb.qjam2010``: a qjam program changes only its
imports. Rules kept from qjam 2010 (its ``master.py``, ``dataset.py``,
``reducing.py``):

- ``Master.run`` gives each RemoteWorker *given* (not each alive) one
  contiguous slice: when the dataset has more chunks (items, rows) than
  workers, it is re-cut to ``ceil(chunks / workers)`` per slice (and the
  dataset keeps that slice size), otherwise its own slicing stays (so fewer
  slices than workers leave workers idle, as in 2010). One ``mapfunc`` call
  per slice, results folded in slice order (slice i is worker i's). Without
  a dataset every worker runs ``mapfunc(params, [])`` once.
- The 2010 DataSets are views over qjam_nb's own ``DataSet``: slice hashes are
  its content keys, so the workers' caches are the same ones ``Cluster.map`` uses.

Built on ``Cluster.map``, never beside it: the scheduler may place two slices on
one worker, which changes where a call runs, never what it computes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import cloudpickle
import numpy as np
import xxhash

from ..dataset import DataSet as _CutData
from ..errors import DataSetError, MapFuncError
from .cluster import Cluster

#: qjam 2010's default slice sizes: 30 items of a list, 5 rows of a matrix, 20 lines of a matrix file.
LIST_SLICE = 30
MATRIX_SLICE = 5
FILE_SLICE = 20
#: The port a RemoteWorker names when none is given; it leaves ``~/.ssh/config``'s Port in charge.
SSH_PORT = 22

logger = logging.getLogger("Master")  # qjam 2010's logger name: its benchmark script reads "elapsed time"


# -- reduce ---------------------------------------------------------------------------


def default_reduce(result1: Any, result2: Any) -> Any:
    """qjam 2010's default reduce: two sequences (lists or tuples, mixed) add element-wise into a list;
    anything else is ``result1 + result2``. Sequences of unequal length raise ``TypeError``.

    Unlike 2010's, the elements are added out of place: the inputs are left as they were.
    """
    if isinstance(result1, (list, tuple)) and isinstance(result2, (list, tuple)):
        if len(result1) != len(result2):
            raise TypeError(
                f"input sequences must be the same length: {len(result1)} and {len(result2)} elements"
            )
        return [a + b for a, b in zip(result1, result2, strict=True)]
    return result1 + result2


# -- datasets -------------------------------------------------------------------------


class SliceIndexError(KeyError, IndexError):
    """A slice index out of range: a ``KeyError`` as in qjam 2010, and an ``IndexError`` so ``for`` loops stop."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _check_slice_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataSetError(f"slice_size must be a whole number of at least 1, not {size!r}")
    return int(size)


class BaseDataSet:
    """qjam 2010's dataset: rows (items) cut into slices of ``slice_size()``; ``len()`` is the number of slices.

    A view over qjam_nb's ``DataSet``: ``hash(i)`` is slice i's content key, the
    name it is cached under on the workers, so equal data hashes equal and changed
    data does not.
    """

    def __init__(self, slice_size: int) -> None:
        self._slice_size = _check_slice_size(slice_size)
        self._cut_cache: _CutData | None = None

    # subclasses: the rows to cut, and the dataset a slice of them is
    def _rows(self) -> Any:
        raise NotImplementedError

    def _sub(self, rows: Any) -> BaseDataSet:
        raise NotImplementedError

    def _cut(self) -> _CutData | None:
        """qjam_nb's DataSet over the rows at this slice size (None for no rows): what ``Master.run`` maps."""
        if self.chunks() == 0:
            return None
        if self._cut_cache is None or self._cut_cache.slice_size != self._slice_size:
            self._cut_cache = _CutData(self._rows(), self._slice_size)
        return self._cut_cache

    # -- sizes
    def chunks(self) -> int:
        """The number of items (rows) the data can be cut into."""
        return len(self._rows())

    def slice_size(self) -> int:
        return self._slice_size

    def slice_size_is(self, size: int) -> None:
        """Cut into slices of ``size`` items from now on (the hashes change with the slicing)."""
        self._slice_size = _check_slice_size(size)

    def __len__(self) -> int:
        """The number of slices."""
        return math.ceil(self.chunks() / self._slice_size)

    # -- data
    def raw_data(self) -> Any:
        """The data this dataset wraps (do not modify it in place while a run uses it)."""
        return self._data

    def _check(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"a slice index is a whole number, not {type(index).__name__}")
        if not 0 <= index < len(self):
            raise SliceIndexError(f"Slice index {index} is out of bounds: this dataset has {len(self)} slices.")
        return int(index)

    def slice(self, index: int) -> BaseDataSet:
        """Slice ``index`` as a dataset of its own (its ``raw_data()`` is what mapfunc gets)."""
        index = self._check(index)
        start = index * self._slice_size
        return self._sub(self._rows()[start:start + self._slice_size])

    def __getitem__(self, key: Any) -> Any:
        """``ds[i]`` is ``ds.slice(i)``; ``ds[a:b]`` a list of those slices."""
        if isinstance(key, slice):
            return [self.slice(i) for i in range(*key.indices(len(self)))]
        return self.slice(key)

    def slice_data(self, index: int) -> Any:
        return self.slice(index).raw_data()

    # -- hashes
    def hash(self, index: int | None = None) -> str:
        """Slice ``index``'s content key in hex, as qjam's were; without an index, a hash of every slice key
        (the whole cut dataset)."""
        if index is None:
            return xxhash.xxh3_128_hexdigest("|".join(self.hash_list()).encode())
        index = self._check(index)
        return self._cut().key(index).hex()

    def hash_list(self) -> list[str]:
        """Every slice's content key in hex, in slice order (hashed again each time: the data may have changed)."""
        cut = self._cut()
        return [key.hex() for key, _ in cut.keys_and_sizes()] if cut is not None else []

    def slice_from_hash(self, hash_value: str) -> BaseDataSet:
        """The slice whose content key is ``hash_value``; ``KeyError`` if none is."""
        hashes = self.hash_list()
        if hash_value not in hashes:
            raise KeyError(hash_value)
        return self.slice(hashes.index(hash_value))

    def slice_data_from_hash(self, hash_value: str) -> Any:
        return self.slice_from_hash(hash_value).raw_data()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.chunks()} chunks, {len(self)} slices of {self._slice_size})"


class ListDataSet(BaseDataSet):
    """A list (or tuple) of items, 30 to a slice by default."""

    def __init__(self, _list: list | tuple, slice_size: int = LIST_SLICE) -> None:
        if not isinstance(_list, (list, tuple)):
            raise DataSetError(f"ListDataSet takes a list or tuple, not {type(_list).__name__}")
        super().__init__(slice_size)
        self._data = _list

    def _rows(self) -> list | tuple:
        return self._data

    def _sub(self, rows: Any) -> ListDataSet:
        return ListDataSet(rows, self._slice_size)


class NumpyMatrixDataSet(BaseDataSet):
    """A numpy array cut by rows, 5 to a slice by default; ``row_major=False`` cuts it by columns."""

    def __init__(self, matrix: Any, slice_size: int = MATRIX_SLICE, row_major: bool = True) -> None:
        if not isinstance(matrix, np.ndarray) or matrix.ndim == 0:
            raise DataSetError(
                f"NumpyMatrixDataSet takes a numpy array with rows, not {type(matrix).__name__}"
                + (" of 0 dimensions" if isinstance(matrix, np.ndarray) else "")
            )
        super().__init__(slice_size)
        self._data = matrix if row_major else matrix.T

    def _rows(self) -> np.ndarray:
        return self._data

    def _sub(self, rows: Any) -> NumpyMatrixDataSet:
        return NumpyMatrixDataSet(rows, self._slice_size)


class NumpyMatrixFileDataSet(BaseDataSet):
    """A text file of a matrix, one row a line (numbers separated by spaces), 20 rows to a slice by default.

    ``raw_data()`` is the file name, as in 2010; the file is read once, on first
    use, and its slices are ``NumpyMatrixDataSet``s of float rows.
    """

    def __init__(self, filename: str, slice_size: int = FILE_SLICE, row_major: bool = True) -> None:
        super().__init__(slice_size)
        self._data = filename
        self._row_major = row_major
        self._matrix: np.ndarray | None = None
        try:
            self._filesize = _file_size(filename)
        except OSError as exc:
            raise DataSetError(
                f"cannot read the matrix file {filename!r}: {exc.strerror or exc}. Check the name "
                "(a relative path is relative to the notebook's working directory)"
            ) from exc

    def _rows(self) -> np.ndarray:
        if self._matrix is None:
            try:
                matrix = np.loadtxt(self._data, ndmin=2)
            except ValueError as exc:
                raise DataSetError(
                    f"{self._data!r} is not a matrix of numbers, one row a line with as many numbers on "
                    f"every line: {exc}"
                ) from exc
            self._matrix = matrix if self._row_major else matrix.T
        return self._matrix

    def _sub(self, rows: Any) -> NumpyMatrixDataSet:
        return NumpyMatrixDataSet(rows, self._slice_size)

    def line_count(self) -> int:
        """The number of rows (lines holding numbers) in the file."""
        return len(self._rows()) if self._row_major else self._rows().shape[1]

    def filesize(self) -> int:
        return self._filesize


def _file_size(path: str) -> int:
    return os.stat(path).st_size


def DataSet(raw_data: Any, **kwds: Any) -> BaseDataSet:
    """qjam 2010's ``DataSet(data)``: a list or tuple becomes a ``ListDataSet``, an array a
    ``NumpyMatrixDataSet``, a 2010 dataset stays itself; ``kwds`` go to the class."""
    if isinstance(raw_data, BaseDataSet):
        return raw_data
    if isinstance(raw_data, _CutData):  # qjam_nb's own: its data, cut as it was
        kwds.setdefault("slice_size", raw_data.slice_size)
        raw_data = raw_data.data
    if isinstance(raw_data, (list, tuple)):
        return ListDataSet(raw_data, **kwds)
    if isinstance(raw_data, np.ndarray):
        return NumpyMatrixDataSet(raw_data, **kwds)
    raise DataSetError(
        f"cannot make a DataSet of a {type(raw_data).__name__}: give a list, tuple or numpy array "
        "(or NumpyMatrixFileDataSet(filename) for a text matrix file)"
    )


# -- master and workers ---------------------------------------------------------------


class RemoteWorker:
    """One worker on ``host`` ("local": this machine; else a host reached over ssh on ``port``).

    Several RemoteWorkers on one host and port share its ssh connection. ``port``
    22, the default, leaves ``~/.ssh/config``'s Port in charge (as ``ssh`` without
    ``-p``); any other port is used for this worker's host alone.
    """

    def __init__(self, host: str = "local", port: int = SSH_PORT) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"port must be a whole number from 1 to 65535, not {port!r}")
        self.host = host
        self.port = port

    @property
    def entry(self) -> str:
        """This worker's host as a ``Cluster`` host entry (without its count)."""
        if self.host == "local" or self.port == SSH_PORT:
            return self.host
        return f"ssh://{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        port = "" if self.port == SSH_PORT else f", port={self.port}"
        return f"RemoteWorker({self.host!r}{port})"


class Master:
    """Runs a module's ``mapfunc`` on its RemoteWorkers, one contiguous slice each, as qjam 2010 did.

    ``cluster_options`` go to the ``Cluster`` it starts on the first ``run``
    and keeps (so the slices stay cached for the next runs).
    """

    def __init__(self, remote_workers: Sequence[RemoteWorker], **cluster_options: Any) -> None:
        if not isinstance(remote_workers, (list, tuple)):
            raise TypeError(f"remote_workers must be a list of RemoteWorker, not {type(remote_workers).__name__}")
        if not remote_workers:
            raise ValueError("the list of workers cannot be empty: give at least one RemoteWorker")
        for worker in remote_workers:
            if not isinstance(worker, RemoteWorker):
                raise TypeError(f"remote_workers must hold RemoteWorker objects, not {type(worker).__name__}")
        self.workers = list(remote_workers)
        counts: dict[str, int] = {}
        for worker in self.workers:
            counts[worker.entry] = counts.get(worker.entry, 0) + 1
        self.hosts = [f"{entry}:{n}" for entry, n in counts.items()]
        self.cluster_options = cluster_options
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None or self._cluster.closed:
            self._cluster = Cluster(self.hosts, **self.cluster_options)
        return self._cluster

    def run(self, module: ModuleType | Any, params: Any = None, dataset: Any = None) -> Any:
        """``module.mapfunc(params, slice)`` once per worker, each on one contiguous slice of ``dataset``,
        reduced in worker order with ``module.reduce`` or qjam 2010's ``default_reduce``.

        ``dataset`` is a 2010 DataSet (re-cut in place when it has more chunks than
        workers), or a list, tuple, array or qjam_nb ``DataSet`` (wrapped as one).
        """
        start = time.time()
        mapfunc = getattr(module, "mapfunc", None)
        if mapfunc is None:
            raise MapFuncError(f"{getattr(module, '__name__', module)!r} has no mapfunc(params, slice) to run")
        reduce = getattr(module, "reduce", None) or default_reduce
        n = len(self.workers)
        logger.info("%d workers in worker pool", n)
        cut = None
        if dataset is not None:
            data = DataSet(dataset)
            if data.chunks() > n:
                data.slice_size_is(math.ceil(data.chunks() / n))
            cut = data._cut()
            logger.info("slicing dataset into %d slices of size %d", len(data), data.slice_size())
        result = self._map(module, mapfunc, params, cut, reduce)
        logger.info("elapsed time: %.3fs", time.time() - start)
        return result

    def _map(self, module: Any, mapfunc: Any, params: Any, cut: _CutData | None, reduce: Any) -> Any:
        name = getattr(module, "__name__", "__main__")
        if (
            isinstance(module, ModuleType)
            and sys.modules.get(name) is module
            and name != "__main__"
            and name not in cloudpickle.list_registry_pickle_by_value()
        ):
            # The workers cannot import the user's module: ship its code by value.
            # (A module missing from sys.modules is shipped by value anyway.)
            cloudpickle.register_pickle_by_value(module)
            try:
                return self.cluster.map(mapfunc, params, cut, reduce=reduce)
            finally:
                cloudpickle.unregister_pickle_by_value(module)
        return self.cluster.map(mapfunc, params, cut, reduce=reduce)

    def shutdown(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
