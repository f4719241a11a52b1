"""The timeline drawn and shown: a lane per worker, a bar per record, the classes a browser looks for."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from qjam_nb import Cluster
from qjam_nb.cluster.timeline import CallRecord, SliceRecord, cache_map, cache_map_text, format_ranges
from qjam_nb.ui.timeline import TimelineWidget, nice_step, timeline_svg
from qjam_nb.ui.widget import ClusterWidget, holds_cell

SVG = "{http://www.w3.org/2000/svg}"
DATA = list(range(90))


def slow_sum(params, xs):
    import time

    time.sleep(0.004)
    return sum(xs)


@pytest.fixture(scope="module")
def cluster3():
    """Three local workers (the drawing does not depend on the transport, so no ssh twin)."""
    with Cluster(["local:3"], echo=False) as cluster:
        yield cluster


def classes(element) -> set[str]:
    return set(element.get("class", "").split())


def elements(root, tag: str, css: str) -> list:
    return [e for e in root.iter(SVG + tag) if css in classes(e)]


def drawn_bars(svg: str) -> list[tuple]:
    """(index, worker, lane's worker, classes) of every slice bar in the drawing."""
    root = ET.fromstring(svg)
    return [(int(rect.get("data-index")), rect.get("data-worker"), lane.get("data-worker"),
             frozenset(classes(rect) - {"qjam-slice"}))
            for lane in elements(root, "g", "qjam-lane") for rect in elements(lane, "rect", "qjam-slice")]


def expected_bars(record: CallRecord) -> list[tuple]:
    slices = record.slices
    raced = {r.index for r in slices if r.outcome == "dropped"}

    def marks(r) -> set[str]:
        return (({r.how} if r.how else set()) | ({"replica"} if r.replicated else set())
                | ({"won"} if r.outcome == "done" and r.index in raced else set()))

    return [(r.index, r.worker, r.worker, frozenset({"cached" if r.cached else "shipped", r.outcome} | marks(r)))
            for r in slices]


def all_text(svg: str) -> str:
    return "\n".join(t.text or "" for t in ET.fromstring(svg).iter(SVG + "text"))


def test_shipped_then_cached_then_moved_slices_are_drawn_one_bar_per_record_in_their_lanes(cluster3):
    widget = ClusterWidget(cluster3)
    timeline = TimelineWidget(cluster3)
    assert "qjam-cluster" in widget.box._dom_classes and "qjam-timeline" in timeline.box._dom_classes
    assert cluster3.map(slow_sum, None, DATA, slice_size=3) == sum(DATA)
    first = cluster3.last_call
    svg = timeline_svg(first)
    root = ET.fromstring(svg)
    assert [g.get("data-worker") for g in elements(root, "g", "qjam-lane")] == list(first.workers)
    assert sorted(drawn_bars(svg)) == sorted(expected_bars(first)) and len(first.done_slices()) == 30
    assert "30 slices shipped" in all_text(svg) and "(0 slices cached)" in all_text(svg)

    victim = cluster3.worker_names[1]
    cluster3.chaos.kill(victim, after_slices=6)
    assert cluster3.map(slow_sum, None, DATA, slice_size=3) == sum(DATA)
    second = cluster3.last_call
    svg = timeline_svg(second)
    bars = drawn_bars(svg)
    assert sorted(bars) == sorted(expected_bars(second)) and len(bars) == len(second.slices) > 30
    lost = [b for b in bars if "lost" in b[3]]
    assert lost and {b[1] for b in lost} == {victim}
    assert sorted(b[0] for b in lost) == second.moved()
    assert len(elements(ET.fromstring(svg), "path", "qjam-lost")) == len(lost)  # each crossed out
    assert any({"cached", "done"} <= b[3] for b in bars) and any({"shipped", "done"} <= b[3] for b in bars)
    assert f"moved after a worker died: slices {format_ranges(second.moved())}" in all_text(svg)

    # The live views drew the finished call; the widget's rows say which slices each worker holds.
    assert timeline.box.value == svg
    assert widget.timeline.box.value == svg and widget.timeline_panel.selected_index == 0
    widget.redraw()
    held = cache_map(second, cluster3.workers)
    assert held[victim] == []  # its cache died with it
    for name, cells in widget.rows.items():
        assert cells["holds"].value == holds_cell(held[name])
        assert cells["holds"].value in cache_map_text(second, cluster3.workers)
    for name in cluster3.worker_names:  # each survivor holds what it ran; what the victim ran is held nowhere
        ran_there = {r.index for r in second.done_slices() if r.worker == name}
        # ... and what reached it in either call: a slice stolen from it, a copy of it that lost a race
        reached = {r.index for call in (first, second) for r in call.slices if r.worker == name and r.outcome != "lost"}
        assert held[name] == [] if name == victim else ran_there <= set(held[name]) <= reached
    rows = [b for b in widget.table.children if "qjam-worker-row" in b._dom_classes]
    assert len(rows) == len(widget.table.children) - 1 == 3  # and one header row
    assert [row.children[0].value.split(">", 1)[1] for row in rows] == [f"{n}</code>" for n in cluster3.worker_names]
    widget.close()
    timeline.close()


def test_the_timeline_redraws_while_a_call_runs_and_a_still_one_does_not(cluster3):
    live = TimelineWidget(cluster3, min_interval=0.01)
    still = TimelineWidget(cluster3, live=False)
    before = still.box.value
    seen: list[str] = []
    live.box.observe(lambda change: seen.append(change["new"]), names="value")
    assert cluster3.map(slow_sum, None, list(range(60)), slice_size=1) == sum(range(60))
    running = [svg for svg in seen if "running in" in all_text(svg)]
    assert len(running) >= 3
    assert len({len(drawn_bars(svg)) for svg in running}) >= 2  # bars appear as slices are assigned
    assert seen[-1] == timeline_svg(cluster3.last_call) and "done in" in all_text(seen[-1])
    assert still.box.value == before
    pinned = TimelineWidget(cluster3, call=cluster3.calls[0].call)
    assert pinned.box.value == timeline_svg(cluster3.calls[0])
    with pytest.raises(ValueError, match="call 999 is not remembered"):
        TimelineWidget(cluster3, call=999)
    live.close()


def test_a_running_record_draws_open_bars_and_an_error_and_a_cancel():
    record = CallRecord(4, 3, ("a", "b"), time.time(), seconds=2.0, slices=[
        SliceRecord(4, 0, "a", False, "k0", 10, 10, assigned=0.0, sent=0.1, started=0.5, done=1.5, ended=1.5,
                    compute=0.8, outcome="done"),
        SliceRecord(4, 1, "b", True, "k1", 10, assigned=0.0, started=0.2),
        SliceRecord(4, 2, "b", True, "k2", 10, assigned=0.0, ended=0.3, outcome="error"),
        SliceRecord(4, 2, "a", True, "k2", 10, assigned=0.0, ended=0.3, outcome="cancelled"),
    ])
    svg = timeline_svg(record, width=600)
    root = ET.fromstring(svg)
    assert root.get("width") == "600"
    assert "running in 2.000 s" in all_text(svg)
    bars = {(int(r.get("data-index")), r.get("data-worker")): r for r in elements(root, "rect", "qjam-slice")}
    assert len(bars) == 4
    assert {"running", "cached"} <= classes(bars[1, "b"]) and bars[1, "b"].get("stroke-dasharray")
    assert "error" in classes(bars[2, "b"]) and "cancelled" in classes(bars[2, "a"])
    done = bars[0, "a"]
    compute = elements(root, "rect", "qjam-compute")
    assert len(compute) == 1 and compute[0].get("x") == done.get("x")
    assert 0 < float(compute[0].get("width")) < float(done.get("width"))
    assert "slice 0 on a: shipped 10 B" in done.find(SVG + "title").text
    assert len(elements(root, "line", "qjam-wait")) == 2  # slices 0 and 1 waited before they started
    assert "seconds" in all_text(svg) and "lost: worker died, moved" in all_text(svg)


def test_names_are_escaped_in_the_drawing():
    record = CallRecord(1, 1, ("<evil>&",), time.time(), slices=[
        SliceRecord(1, 0, "<evil>&", False, assigned=0.0, started=0.0, done=1.0, ended=1.0, outcome="done")])
    root = ET.fromstring(timeline_svg(record))  # parses: nothing unescaped
    assert elements(root, "g", "qjam-lane")[0].get("data-worker") == "<evil>&"


def test_axis_steps_are_one_two_or_five_times_a_power_of_ten():
    assert nice_step(0.291) == pytest.approx(0.05)
    assert nice_step(12) == 2
    assert nice_step(1.0) == pytest.approx(0.2)
    assert nice_step(3e-5) == pytest.approx(5e-6)


def test_holds_cell():
    assert holds_cell(None) == ""
    assert holds_cell([]) == "none"
    assert holds_cell([0, 1, 2, 5]) == "0-2, 5"


# -- the magics, in an in-process IPython (no kernel: they print text) ------------------------------


def usage_error(ip, cell: str) -> str:
    from IPython.core.error import UsageError

    error = ip.run_cell(cell).error_in_exec
    assert isinstance(error, UsageError), error
    return str(error)


def test_timeline_and_status_magics_say_what_to_type_then_show_the_call_and_cache_map(ip, capsys):
    assert "start one with %qjam_hosts local:2" in usage_error(ip, "%qjam_timeline")
    assert ip.run_cell("%qjam_hosts local:2").success
    assert "run a %%qjam_map cell" in usage_error(ip, "%qjam_timeline")
    capsys.readouterr()
    result = ip.run_cell("%%qjam_map -d list(range(40)) --slice-size 4 --timeline\n"
                         "def mapfunc(p, xs):\n    return sum(xs)\n")
    assert result.success and result.result == sum(range(40))
    cluster = ip.magics_manager.registry["QjamMagics"].cluster
    summary = cluster.last_call.summary()
    assert summary in capsys.readouterr().out and "10 slices on 2 workers, done" in summary
    assert ip.run_cell("%qjam_timeline").success
    assert summary in capsys.readouterr().out
    assert ip.run_cell(f"%qjam_timeline {cluster.last_call.call}").success
    assert "call 99 is not remembered" in usage_error(ip, "%qjam_timeline 99")
    assert "takes a call number" in usage_error(ip, "%qjam_timeline last")
    capsys.readouterr()
    assert ip.run_cell("%qjam_status").success
    out = capsys.readouterr().out
    assert cache_map_text(cluster.last_call, cluster.workers) in out
    held = cache_map(cluster.last_call, cluster.workers)
    assert sorted({i for indexes in held.values() for i in indexes}) == list(range(10))  # (copies: on two)


def test_in_a_kernel_the_magics_display_timeline_widgets(ip, monkeypatch):
    from qjam_nb.ui import magics

    shown: list = []
    monkeypatch.setattr(ip, "kernel", object(), raising=False)
    monkeypatch.setattr(magics, "display", shown.append)
    if ip.magics_manager.registry["QjamMagics"].cluster is None:
        assert ip.run_cell("%qjam_hosts local:2").success
    shown.clear()
    result = ip.run_cell("%%qjam_map -d list(range(12)) --slice-size 3 --timeline\n"
                         "def mapfunc(p, xs):\n    return len(xs)\n")
    assert result.success and result.result == 12
    cluster = ip.magics_manager.registry["QjamMagics"].cluster
    timelines = [v for v in shown if isinstance(v, TimelineWidget)]
    assert len(timelines) == 1 and timelines[0].box.value == timeline_svg(cluster.last_call)
    shown.clear()
    assert ip.run_cell("%qjam_timeline").success and ip.run_cell("%qjam_status").success
    assert isinstance(shown[0], TimelineWidget) and "qjam-timeline" in shown[0].box._dom_classes
    assert isinstance(shown[1], ClusterWidget) and "qjam-cluster" in shown[1].box._dom_classes
    shown[1].close()


def test_a_call_of_thousands_of_slices_draws_touching_bars_of_one_kind_as_one():
    slices = []
    for i in range(3000):
        worker, t = ("a", "b")[i % 2], (i // 2) * 0.001
        slices.append(SliceRecord(1, i, worker, i >= 1500, assigned=0.0, started=t, done=t + 0.001, ended=t + 0.001,
                                  compute=0.0005, outcome="done"))
    slices.append(SliceRecord(1, 7, "a", False, assigned=0.0, started=0.5, ended=0.6, outcome="lost"))
    slices.append(SliceRecord(1, 8, "b", True, assigned=0.0, started=0.0, done=0.001, ended=0.001, outcome="done"))
    record = CallRecord(1, 3000, ("a", "b"), time.time(), seconds=1.5, ok=True, slices=slices)
    svg = timeline_svg(record)
    root = ET.fromstring(svg)
    bars = elements(root, "rect", "qjam-slice")
    assert sum(int(b.get("data-count", "1")) for b in bars) == len(slices)
    assert len(bars) < 20 and len(svg) < 20_000
    assert [b.get("data-index") for b in bars if "lost" in classes(b)] == ["7"]  # never merged
    kinds = {(b.get("data-worker"), frozenset(classes(b) & {"cached", "shipped"})) for b in bars}
    assert len(kinds) == 4  # shipped then cached, on both lanes
    assert "3002 slice records: touching bars of one kind on a lane are drawn as one" in all_text(svg)
    assert len(elements(ET.fromstring(timeline_svg(record, max_bars=5000)), "rect", "qjam-slice")) == 3002


def healed_record() -> CallRecord:
    """Slice 0: a copy on b, dropped before it started (a's original won). Slice 1: a copy on b that won
    (a's original dropped). Slices 2 and 3 stolen by c from a (2 shipped, 3 cached on c already).
    Slice 4 rebalanced from c to b at the call's start (shipped)."""
    return CallRecord(5, 5, ("a", "b", "c"), time.time(), seconds=1.3, ok=True, slices=[
        SliceRecord(5, 0, "a", True, b"0" * 16, 10, assigned=0.0, started=0.0, done=1.0, ended=1.0, compute=0.9,
                    outcome="done"),
        SliceRecord(5, 1, "a", True, b"1" * 16, 10, assigned=0.0, started=1.0, ended=1.2, outcome="dropped"),
        SliceRecord(5, 4, "b", False, b"4" * 16, 10, 12, assigned=0.0, sent=0.0, started=0.0, done=0.4, ended=0.4,
                    compute=0.4, outcome="done", how="rebalanced", source="c"),
        SliceRecord(5, 2, "c", False, b"2" * 16, 10, 12, assigned=0.1, sent=0.1, started=0.1, done=0.6, ended=0.6,
                    compute=0.5, outcome="done", how="stolen", source="a"),
        SliceRecord(5, 1, "b", False, b"1" * 16, 10, 12, assigned=0.5, sent=0.5, started=0.55, done=1.2, ended=1.2,
                    compute=0.6, outcome="done", how="speculative", source="a"),
        SliceRecord(5, 3, "c", True, b"3" * 16, 10, assigned=0.6, started=0.6, done=1.1, ended=1.1, compute=0.5,
                    outcome="done", how="stolen", source="a"),
        SliceRecord(5, 0, "b", False, b"0" * 16, 10, 12, assigned=0.9, sent=0.9, ended=1.0, outcome="dropped",
                    how="speculative", source="a"),
    ])


def right_edge(rect) -> float:
    return float(rect.get("x")) + float(rect.get("width"))


@pytest.mark.parametrize("max_bars", [2000, 1])  # 1: the merging drawing, which never merges these
def test_stolen_copied_dropped_and_replicated_slices_are_marked_each_their_own_way(max_bars):
    record = healed_record()
    svg = timeline_svg(record, max_bars=max_bars)
    root = ET.fromstring(svg)
    assert sorted(drawn_bars(svg)) == sorted(expected_bars(record))
    bars = {(int(r.get("data-index")), r.get("data-worker")): r for r in elements(root, "rect", "qjam-slice")}
    assert len(bars) == 7
    # Stolen: hatched, and the bar names where it came from.
    stolen = [k for k, r in bars.items() if "stolen" in classes(r)]
    assert sorted(stolen) == [(2, "c"), (3, "c")] and {bars[k].get("data-source") for k in stolen} == {"a"}
    hatches = elements(root, "rect", "qjam-stolen")
    assert sorted(int(h.get("data-index")) for h in hatches) == [2, 3]
    assert all(h.get("fill") == "url(#qjam-hatch)" for h in hatches) and root.find(f".//{SVG}pattern") is not None
    assert "stolen from a" in bars[2, "c"].find(SVG + "title").text
    # Copies: dashed; the winner of each race marked; the loser greyed and struck, ending where the winner did.
    for key in ((1, "b"), (0, "b")):
        assert "speculative" in classes(bars[key]) and bars[key].get("stroke-dasharray")
        assert bars[key].get("data-source") == "a"
    assert {k for k, r in bars.items() if "won" in classes(r)} == {(0, "a"), (1, "b")}
    assert sorted(int(m.get("data-index")) for m in elements(root, "path", "qjam-won")) == [0, 1]
    dropped = {k for k, r in bars.items() if "dropped" in classes(r)}
    assert dropped == {(0, "b"), (1, "a")}
    struck = elements(root, "line", "qjam-struck")
    assert sorted((int(s.get("data-index")), s.get("data-worker")) for s in struck) == sorted(dropped)
    for index, loser in dropped:
        winner = next(w for (i, w) in bars if i == index and w != loser)
        assert right_edge(bars[index, loser]) == pytest.approx(right_edge(bars[index, winner]), abs=0.2)
        assert bars[index, loser].get("fill") == "#eee8d5"
    # Replicas: a marker on each bar whose slice travelled to a taker, which caches it from then on.
    replicas = elements(root, "path", "qjam-replica")
    assert sorted((int(m.get("data-index")), m.get("data-worker")) for m in replicas) == [
        (0, "b"), (1, "b"), (2, "c"), (4, "b")] == sorted((r.index, r.worker) for r in record.slices if r.replicated)
    assert "rebalanced" in classes(bars[4, "b"]) and bars[4, "b"].get("data-source") == "c"
    # The legend has an entry for each, and the totals count them.
    legend = "\n".join(t.text or "" for g in elements(root, "g", "qjam-legend") for t in g.iter(SVG + "text"))
    for words in ("stolen", "copy", "won the race", "dropped copy", "now cached here too", "rebalanced"):
        assert words in legend, words
    text = all_text(svg)
    assert "2 stolen from a" in text and "2 copies (1 won)" in text and "2 dropped" in text
    assert "4 now cached on two workers" in text and "1 rebalanced from c" in text


def test_a_call_that_healed_nothing_has_no_such_marks_nor_legend_entries():
    record = CallRecord(4, 2, ("a", "b"), time.time(), seconds=1.0, ok=True, slices=[
        SliceRecord(4, 0, "a", True, b"0" * 16, 10, assigned=0.0, started=0.0, done=1.0, ended=1.0, outcome="done"),
        SliceRecord(4, 1, "b", False, b"1" * 16, 10, 12, assigned=0.0, sent=0.0, started=0.0, done=1.0, ended=1.0,
                    outcome="done"),
    ])
    svg = timeline_svg(record)
    root = ET.fromstring(svg)
    for tag, css in (("rect", "qjam-stolen"), ("path", "qjam-won"), ("line", "qjam-struck"),
                     ("path", "qjam-replica")):
        assert elements(root, tag, css) == []
    assert root.find(f".//{SVG}pattern") is None
    text = all_text(svg)
    assert not any(w in text for w in ("stolen", "copy", "copies", "dropped", "won", "cached here too",
                                       "rebalanced"))


def test_in_a_call_of_thousands_of_slices_stolen_ones_merge_with_their_own_kind_and_stay_marked():
    slices = []
    for i in range(3000):
        worker, t = ("a", "b")[i % 2], (i // 2) * 0.001
        stolen = worker == "b" and i >= 2000  # b's last 500 slices were taken from a's queue, and shipped
        slices.append(SliceRecord(1, i, worker, not stolen, assigned=0.0, started=t, done=t + 0.001,
                                  ended=t + 0.001, compute=0.0005, outcome="done",
                                  how="stolen" if stolen else None, source="a" if stolen else None))
    record = CallRecord(1, 3000, ("a", "b"), time.time(), seconds=1.5, ok=True, slices=slices)
    root = ET.fromstring(timeline_svg(record))
    bars = elements(root, "rect", "qjam-slice")
    assert len(bars) < 20
    stolen = [b for b in bars if "stolen" in classes(b)]
    assert sum(int(b.get("data-count", "1")) for b in stolen) == 500
    assert all("replica" in classes(b) and b.get("data-source") == "a" and b.get("data-worker") == "b" for b in stolen)
    hatches = elements(root, "rect", "qjam-stolen")
    assert sum(int(h.get("data-count", "1")) for h in hatches) == 500
    assert sum(int(m.get("data-count", "1")) for m in elements(root, "path", "qjam-replica")) == 500
