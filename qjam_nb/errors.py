"""Every error qjam_nb raises, as one tree; each message names what is at fault and the fix.

::

    QjamError
     ├── ProtocolError        a frame from a worker was truncated, oversized or malformed
     ├── DataSetError         the dataset cannot be sliced (wrong type, empty, bad slice_size)
     ├── ShippingError        mapfunc, its closure or params cannot be pickled to travel
     ├── MapFuncError         mapfunc is missing or cannot take (params, slice)
     ├── RemoteError          mapfunc raised on a worker (carries worker, slice, traceback)
     ├── ReduceError          two results could not be combined (names both slices; also a TypeError)
     ├── CallTimeoutError     a map call ran past its timeout (also a TimeoutError)
     ├── ReplayError          a slice cannot be replayed (out of range, forgotten, or its data changed)
     ├── WorkerError          a worker could not start, or died, or every worker is gone
     │    ├── HostError        a host could not be reached, logged into or bootstrapped
     │    │    └── HostKeyError    its host key is unknown or changed
     │    └── VersionMismatchError  worker and notebook would not understand each other's pickles
     ├── ClusterClosedError   the cluster was shut down
     ├── ForkedClusterError   a cluster used in a forked child of the process that made it
     └── ReentrantCallError   map (restart, shutdown) called from inside a running call, on its thread

    UserWarning
     └── CaptureWarning       mapfunc captures big variables, shipped to every worker on every call
"""

from __future__ import annotations

from .worker.protocol import ProtocolError, QjamError

__all__ = [
    "QjamError",
    "ProtocolError",
    "DataSetError",
    "ShippingError",
    "MapFuncError",
    "RemoteError",
    "ReduceError",
    "CallTimeoutError",
    "WorkerError",
    "HostError",
    "HostKeyError",
    "VersionMismatchError",
    "ClusterClosedError",
    "ForkedClusterError",
    "ReentrantCallError",
    "ReplayError",
    "CaptureWarning",
]


class _Said:
    """In IPython, show just the message: these errors are about what the user gave, not a bug to trace."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class DataSetError(_Said, QjamError, ValueError):
    """Raised before any worker runs when the dataset cannot be sliced."""


class ShippingError(_Said, QjamError):
    """Raised before any worker runs when something the call needs cannot be pickled."""


class MapFuncError(_Said, QjamError, TypeError):
    """Raised before any worker runs when mapfunc is missing or has the wrong signature."""


class ReduceError(_Said, QjamError, TypeError):
    """Raised when the reduce cannot combine two results; names both slices and types.

    Also a ``TypeError``, as qjam 2010's ``Master.run`` raised for results that do not add up."""


class CallTimeoutError(_Said, QjamError, TimeoutError):
    """Raised when ``map(..., timeout=)`` runs out; the call was stopped on every worker."""


class WorkerError(_Said, QjamError):
    """Raised when a worker cannot start or dies, or no worker is left."""


class HostError(WorkerError):
    """A host could not be reached, logged into or bootstrapped; says which stage and the fix."""

    def __init__(self, host: str, stage: str, message: str) -> None:
        self.host = host
        self.stage = stage
        super().__init__(f"host {host!r}, {stage}: {message}")


class HostKeyError(HostError):
    """The host's key is not in known_hosts, or differs from the key recorded there."""


class VersionMismatchError(WorkerError):
    """A worker's Python, cloudpickle or numpy cannot exchange pickles with the notebook's."""


class ClusterClosedError(_Said, QjamError):
    """Raised when a cluster is used after ``shutdown()``."""


class ForkedClusterError(_Said, QjamError):
    """Raised when a cluster is used in a forked child (``os.fork``, ``multiprocessing``): its workers
    belong to the process that made it. Raised before anything is sent or any lock taken."""


class ReentrantCallError(_Said, QjamError, RuntimeError):
    """Raised when ``map`` (or ``restart``, ``shutdown``) is called on the thread that is running a
    call of the same cluster, e.g. by an observer: waiting for that call would wait for ever."""


class ReplayError(_Said, QjamError, LookupError):
    """Raised by ``replay`` when a slice cannot be run again as its worker ran it; says what to do."""


class CaptureWarning(UserWarning):
    """mapfunc captures big variables (named, with sizes): they travel to every worker on every call."""


class RemoteError(QjamError):
    """mapfunc raised an exception on a worker.

    ``worker``, ``index`` (the slice; -1 when no slice was involved),
    ``remote_type`` and ``remote_traceback`` tell what happened where. In
    IPython the remote traceback is what the notebook shows.
    """

    def __init__(
        self,
        worker: str,
        index: int,
        remote_type: str,
        message: str,
        remote_traceback: str,
        where: str = "running mapfunc",
    ) -> None:
        self.worker = worker
        self.index = index
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        self.where = where
        on = f"slice {index}" if index >= 0 else "no slice"
        super().__init__(f"{remote_type}: {message} (on worker {worker}, {on}, while {where})")

    def __str__(self) -> str:
        return f"{self.args[0]}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the local traceback, which says nothing useful."""
        on = f"slice {self.index}" if self.index >= 0 else "no slice"
        head = f"RemoteError: {self.remote_type} on worker {self.worker}, {on}, while {self.where}"
        return [head, "", *self.remote_traceback.rstrip().splitlines()]
