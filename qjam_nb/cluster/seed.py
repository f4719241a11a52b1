"""qjam's 2010 API on top of ``Cluster``: ``Master``, ``RemoteWorker``, ``master.run``.

qjam's examples run with only their imports changed. A ``Master`` starts its
cluster on the first ``run`` and keeps it (and so the cached slices) for the
next ones.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import cloudpickle

from ..errors import MapFuncError
from .cluster import Cluster


class RemoteWorker:
    """One worker on ``host``; several RemoteWorkers on one host share it."""

    def __init__(self, host: str = "local") -> None:
        self.host = host

    def __repr__(self) -> str:
        return f"RemoteWorker({self.host!r})"


class Master:
    """Divides ``master.run`` calls among its RemoteWorkers."""

    def __init__(self, workers: Sequence[RemoteWorker], **cluster_options: Any) -> None:
        counts = Counter(w.host for w in workers)
        self.hosts = [f"{host}:{n}" for host, n in counts.items()]
        self.cluster_options = cluster_options
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None or self._cluster.closed:
            self._cluster = Cluster(self.hosts, **self.cluster_options)
        return self._cluster

    def run(self, module: ModuleType | Any, params: Any = None, dataset: Any = None) -> Any:
        """Run ``module.mapfunc(params, slice)`` over ``dataset``; reduce with ``module.reduce`` if any."""
        mapfunc = getattr(module, "mapfunc", None)
        if mapfunc is None:
            raise MapFuncError(f"{getattr(module, '__name__', module)!r} has no mapfunc(params, slice) to run")
        reduce = getattr(module, "reduce", None)
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
                return self.cluster.map(mapfunc, params, dataset, reduce=reduce)
            finally:
                cloudpickle.unregister_pickle_by_value(module)
        return self.cluster.map(mapfunc, params, dataset, reduce=reduce)

    def shutdown(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()

