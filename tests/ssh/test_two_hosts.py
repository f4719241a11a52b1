"""Two hosts (the sshds on 127.0.0.1 and 127.0.0.2), two workers each."""

from __future__ import annotations

import numpy as np
import pytest

from qjam_nb import Cluster, HostReady, SliceSent
from qjam_nb.ui.widget import ClusterWidget


@pytest.fixture(scope="module")
def two_hosts(ssh_world):
    with Cluster(["sshhost", "sshhost2"], workers_per_host=2, echo=False) as cluster:
        yield cluster


def test_four_workers_labelled_by_host(two_hosts):
    assert two_hosts.worker_names == ["sshhost/0", "sshhost/1", "sshhost2/0", "sshhost2/1"]
    hellos = {w.name: w.hello for w in two_hosts.workers}
    assert len({h["pid"] for h in hellos.values()}) == 4


def test_widget_shows_four_rows_labelled_by_host(two_hosts):
    widget = ClusterWidget(two_hosts)
    assert sorted(widget.rows) == ["sshhost/0", "sshhost/1", "sshhost2/0", "sshhost2/1"]
    assert [r["name"].value.split(">", 1)[1] for r in widget.rows.values()] == [
        "sshhost/0</code>", "sshhost/1</code>", "sshhost2/0</code>", "sshhost2/1</code>",
    ]
    # each host's two workers share its cores (the title is the BLAS threads each got)
    assert all(" // 2 workers)" in r["name"].value for r in widget.rows.values())
    assert all(">idle<" in r["state"].value for r in widget.rows.values())


def test_right_answers_and_cached_slices_are_not_resent(two_hosts, record):
    log = record(two_hosts)
    X = np.random.default_rng(4).standard_normal((4000, 64))
    first = two_hosts.map(lambda p, xs: xs.sum(axis=0) * p, 2.0, X, slice_size=100)
    np.testing.assert_allclose(first, 2.0 * X.sum(axis=0))
    sent = log.of(SliceSent)
    assert sorted(e.index for e in sent) == list(range(40))
    assert {e.worker.split("/")[0] for e in sent} == {"sshhost", "sshhost2"}  # both hosts got slices
    log.clear()
    second = two_hosts.map(lambda p, xs: xs.sum(axis=0) * p, 2.0, X, slice_size=100)
    assert second.tobytes() == first.tobytes()
    assert log.of(SliceSent) == []
    info = two_hosts.cache_info()
    assert sum(n for n, _ in info.values()) == 40
    assert all(info[name][0] > 0 for name in ("sshhost/0", "sshhost2/0"))


def test_hosts_mix_with_local_workers(ssh_world, record):
    with Cluster(["local:1", "sshhost2:1"], echo=False) as cluster:
        assert cluster.worker_names == ["local/0", "sshhost2/0"]
        assert cluster.map(lambda p, xs: [len(xs)], None, list(range(10)), slice_size=1) == [10]
        assert cluster.map(lambda p, xs: 1) == 2


def test_host_ready_events_say_how_each_host_was_reached(ssh_world, record):
    seen: list = []
    with Cluster(["sshhost", "sshhost2"], echo=False, observers=[seen.append]) as cluster:
        ready = {e.host: e for e in seen if isinstance(e, HostReady)}
        assert set(ready) == {"sshhost", "sshhost2"}
        assert "@127.0.0.1:" in ready["sshhost"].detail and "@127.0.0.2:" in ready["sshhost2"].detail
        assert all("gcm" in e.detail for e in ready.values())  # the fast cipher was negotiated
        assert cluster.status.hosts == ready
        assert "sshhost2: " in cluster.status.text()
