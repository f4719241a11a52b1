"""qjam_nb: distributed map-reduce for people who work in Jupyter.

``Cluster(["local:2"]).map(mapfunc, params, dataset)`` runs ``mapfunc`` over
slices of ``dataset`` that stay cached on the workers; ``%load_ext qjam_nb``
adds the notebook magics. ``qjam_nb.qjam2010`` is qjam's 2010 API (``Master`` and
``RemoteWorker`` are also here, the same classes).
"""

from ._version import __version__ as __version__
from .cluster.cluster import Cluster
from .cluster.reduce import default_reduce
from .cluster.seed import Master, RemoteWorker
from .dataset import DataSet, ListDataSet, NumpyMatrixDataSet
from .errors import (
    CallTimeoutError,
    CaptureWarning,
    ClusterClosedError,
    DataSetError,
    ForkedClusterError,
    HostError,
    HostKeyError,
    MapFuncError,
    ProtocolError,
    QjamError,
    ReduceError,
    ReentrantCallError,
    RemoteError,
    ReplayError,
    ShippingError,
    VersionMismatchError,
    WorkerError,
)
from .events import (
    CacheChanged,
    CallFinished,
    CallStarted,
    ErrorEvent,
    HostReady,
    SliceAssigned,
    SliceDone,
    SliceDropped,
    SliceLost,
    SliceSent,
    SliceStarted,
    SliceTaken,
    StreamOutput,
    WorkerStateChanged,
)
from .transport.registry import SshOptions

__all__ = [
    "Cluster",
    "SshOptions",
    "DataSet",
    "ListDataSet",
    "NumpyMatrixDataSet",
    "Master",
    "RemoteWorker",
    "default_reduce",
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
    "WorkerStateChanged",
    "CallStarted",
    "SliceAssigned",
    "SliceSent",
    "SliceStarted",
    "SliceDone",
    "SliceLost",
    "SliceTaken",
    "SliceDropped",
    "CacheChanged",
    "StreamOutput",
    "ErrorEvent",
    "HostReady",
    "CallFinished",
    "load_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext qjam_nb``: register the magics."""
    from .ui.magics import load_ipython_extension as load

    load(ipython)
