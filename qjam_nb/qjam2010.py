"""qjam's 2010 API, to the letter: a qjam program changes only its imports (``qjam...`` -> ``qjam_nb.qjam2010``).

``Master.run`` gives each RemoteWorker one contiguous slice; ``DataSet`` is
2010's factory (``ListDataSet``, 30 items a slice; ``NumpyMatrixDataSet``, 5 rows);
``default_reduce`` is 2010's. qjam_nb's own ``DataSet`` and ``default_reduce``
(``from qjam_nb import ...``) keep their modern meaning. The code lives in
``qjam_nb.cluster.seed``; ``qjam_nb.Master`` is this very ``Master``.
"""

from .cluster.seed import (
    BaseDataSet,
    DataSet,
    ListDataSet,
    Master,
    NumpyMatrixDataSet,
    NumpyMatrixFileDataSet,
    RemoteWorker,
    SliceIndexError,
    default_reduce,
)

__all__ = [
    "BaseDataSet",
    "DataSet",
    "ListDataSet",
    "Master",
    "NumpyMatrixDataSet",
    "NumpyMatrixFileDataSet",
    "RemoteWorker",
    "SliceIndexError",
    "default_reduce",
]
