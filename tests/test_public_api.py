"""What ``import qjam_nb`` offers: pinned, so a change to it is a decision, not an accident."""

from __future__ import annotations

import qjam_nb

PUBLIC = {
    "Cluster", "DataSet", "ListDataSet", "NumpyMatrixDataSet", "Master", "RemoteWorker", "default_reduce",
    "QjamError", "ProtocolError", "DataSetError", "ShippingError", "MapFuncError", "RemoteError", "ReduceError",
    "CallTimeoutError", "WorkerError", "HostError", "HostKeyError", "VersionMismatchError", "ClusterClosedError",
    "ForkedClusterError", "ReentrantCallError", "ReplayError", "CaptureWarning",
    "WorkerStateChanged", "HostReady", "CallStarted", "SliceAssigned", "SliceSent", "SliceStarted", "SliceDone",
    "SliceLost", "SliceTaken", "SliceDropped", "CacheChanged", "StreamOutput", "ErrorEvent", "CallFinished",
    "load_ipython_extension",
    "SshOptions",
}


def test_all_is_pinned():
    assert set(qjam_nb.__all__) == PUBLIC
    assert len(qjam_nb.__all__) == len(PUBLIC)  # no duplicates


def test_every_exported_name_exists_and_errors_share_one_base():
    for name in qjam_nb.__all__:
        assert hasattr(qjam_nb, name), name
    errors = [getattr(qjam_nb, n) for n in PUBLIC if n.endswith("Error")]
    assert all(issubclass(e, qjam_nb.QjamError) for e in errors)
    assert issubclass(qjam_nb.CaptureWarning, UserWarning)


def test_version_is_a_string():
    assert isinstance(qjam_nb.__version__, str) and qjam_nb.__version__.count(".") == 2
