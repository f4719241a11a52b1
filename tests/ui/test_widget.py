"""The cluster widget and call bar, observed in-process through their models."""

from __future__ import annotations

import time

from qjam_nb.cluster.status import CallRow, WorkerRow
from qjam_nb.ui.widget import CallProgress, ClusterWidget, Throttle, call_summary, row_cells


def test_row_cells_say_name_state_progress_and_cache():
    cells = row_cells(WorkerRow("local/1", state="busy", done=3, assigned=7, cached_slices=5, cached_bytes=3 << 20))
    assert cells["name"] == "<code>local/1</code>"
    assert ">busy<" in cells["state"]
    assert cells["progress"] == "3/7"
    assert cells["cached"] == "5 slices, 3.0 MiB"


def test_the_name_cells_title_says_the_workers_blas_threads():
    cells = row_cells(WorkerRow("local/0", threads="1 (2 cores // 2 workers)"))
    assert cells["name"] == '<code title="BLAS threads: 1 (2 cores // 2 workers)">local/0</code>'
    assert "<" not in row_cells(WorkerRow("x", threads="<2>"))["name"].split(">")[0][1:]


def test_row_cells_escape_html_in_names_and_reasons():
    cells = row_cells(WorkerRow("<b>x", state="dead", reason='exited "9" <oops>'))
    assert "<b>x" not in cells["name"]
    assert "<oops>" not in cells["state"]


def test_call_summary_reports_progress_then_totals():
    assert call_summary(CallRow()) == "no call yet"
    assert call_summary(CallRow(call=2, n_slices=10, done=4, running=True)) == "call 2: 4/10 slices"
    done = CallRow(call=2, n_slices=10, done=10, seconds=1.5, slice_bytes_sent=2 << 20, slice_bytes_cached=1 << 20)
    assert call_summary(done) == (
        "call 2: 10/10 slices, done in 1.500 s; 2.0 MiB of slices shipped, 1.0 MiB served from cache"
    )
    healed = CallRow(call=3, n_slices=10, done=10, seconds=1.0, stolen=3, copies=2, rebalanced=1)
    assert call_summary(healed).endswith("served from cache; healed: 3 stolen, 2 copies, 1 rebalanced")
    assert call_summary(CallRow(call=3, n_slices=4, done=1, running=True, copies=1)) == (
        "call 3: 1/4 slices; healed: 1 copy")


def test_throttle_lets_urgent_redraws_through_and_rate_limits_the_rest():
    now = [0.0]
    throttle = Throttle(0.1, clock=lambda: now[0])
    assert throttle(False)  # first one always draws
    assert not throttle(False)
    assert throttle(True)
    now[0] += 0.05
    assert not throttle(False)
    now[0] += 0.06
    assert throttle(False)


def test_widget_has_one_row_per_worker_with_state_and_cache(make_cluster):
    cluster = make_cluster(["local:3"])
    widget = ClusterWidget(cluster)
    host = cluster.hosts[0][0]  # "local", or the ssh alias on the ssh run
    assert sorted(widget.rows) == [f"{host}/0", f"{host}/1", f"{host}/2"]
    cluster.map(lambda p, xs: len(xs), None, list(range(30)), slice_size=2)
    widget.redraw()
    for name, row in widget.rows.items():
        assert name in row["name"].value
        assert ">idle<" in row["state"].value
        done, total = map(int, row["progress"].value.split("/"))
        assert done == total and row["bar"].value == done
    assert sum(int(r["progress"].value.split("/")[0]) for r in widget.rows.values()) == 15
    cached = sum(int(r["cached"].value.split()[0]) for r in widget.rows.values())
    assert cached == 15 + cluster.last_call.totals()["replicated"]  # (a copy run elsewhere is cached there too)
    assert widget.call.bar.value == widget.call.bar.max == 15
    cluster.shutdown()
    assert all(">stopped<" in r["state"].value for r in widget.rows.values())


def test_widget_updates_live_during_a_call_not_only_at_its_end(make_cluster):
    cluster = make_cluster(["local:2"])
    widget = ClusterWidget(cluster, min_interval=0.02)
    bar = CallProgress(cluster, min_interval=0.02)
    seen: list[int] = []
    widget.call.bar.observe(lambda change: seen.append(change["new"]), names="value")

    def slow(p, xs):
        time.sleep(0.002)
        return xs[0]

    assert cluster.map(slow, None, list(range(400)), slice_size=1) == sum(range(400))
    intermediate = [v for v in seen if 0 < v < 400]
    assert len(set(intermediate)) >= 3, seen
    assert seen[-1] == 400
    assert bar.call.bar.value == 400 and bar.redraws >= 3


def test_throttle_keeps_redraws_far_below_the_number_of_events(make_cluster):
    cluster = make_cluster(["local:2"])
    frozen = ClusterWidget(cluster, min_interval=3600.0, clock=lambda: 0.0)
    cluster.map(lambda p, xs: 0, None, list(range(2000)), slice_size=1)
    # Only urgent events (state changes, call start and end) draw: a handful, not thousands.
    assert frozen.redraws <= 12, frozen.redraws
