"""Shared fixtures: real local worker clusters, and an event recorder."""

from __future__ import annotations

import pytest

from qjam_nb import Cluster


class EventLog:
    """Observer that keeps every event, for assertions on what the cluster did."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def clear(self) -> None:
        self.events.clear()


@pytest.fixture(scope="module")
def cluster2():
    """Two local workers, shared by a test module (slices stay cached across its tests)."""
    with Cluster(["local:2"], echo=False) as cluster:
        yield cluster


@pytest.fixture
def events(cluster2):
    """Events of ``cluster2`` emitted during one test."""
    log = EventLog()
    unsubscribe = cluster2.events.subscribe(log)
    yield log
    unsubscribe()


@pytest.fixture
def make_cluster():
    """Factory for clusters that are shut down at the end of the test."""
    made: list[Cluster] = []

    def make(hosts=("local:2",), **options) -> Cluster:
        options.setdefault("echo", False)
        cluster = Cluster(list(hosts), **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.shutdown()


@pytest.fixture
def record():
    """``log = record(cluster)``: an ``EventLog`` of what ``cluster`` emits during this test."""
    unsubscribes = []

    def subscribe(cluster: Cluster) -> EventLog:
        log = EventLog()
        unsubscribes.append(cluster.events.subscribe(log))
        return log

    yield subscribe
    for unsubscribe in unsubscribes:
        unsubscribe()
