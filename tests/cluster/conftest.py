"""Cluster-test fixtures: record the events of any cluster, not only ``cluster2``."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


def event_log_class(config: pytest.Config) -> type:
    """``EventLog`` from tests/conftest.py.

    Not ``from conftest import EventLog``: every conftest.py outside a package
    is the module ``conftest``, so which one that names depends on the order
    pytest collected directories in.
    """
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == ROOT_CONFTEST:
            return plugin.EventLog
    raise LookupError(f"{ROOT_CONFTEST} is not loaded")


@pytest.fixture
def record(request):
    """``log = record(cluster)``: an ``EventLog`` of what ``cluster`` emits during this test."""
    event_log = event_log_class(request.config)
    unsubscribes = []

    def subscribe(cluster):
        log = event_log()
        unsubscribes.append(cluster.events.subscribe(log))
        return log

    yield subscribe
    for unsubscribe in unsubscribes:
        unsubscribe()
