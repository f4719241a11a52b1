"""The record and the drawing of a call that healed, on a real cluster: a slowed worker's cached slices
are stolen (and so replicated) or copied by the others, and ``cluster.last_call`` and the SVG say so.

Three local workers on 2 cores, so the mapfunc sleeps; the drawing does not depend on the transport
(``test_healing`` runs the schedule itself over ssh too).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections import Counter

from qjam_nb import events as ev
from qjam_nb.ui.timeline import timeline_svg

BACKENDS = ("local",)
WORK = 0.05
DATA = [i * 0.1 for i in range(60)]  # 30 slices of 2
SVG = "{http://www.w3.org/2000/svg}"


def sleepy(params, xs):
    time.sleep(WORK)
    return sum(x * 1.7 for x in xs)


def add(a, b):
    return a + b


def marks(svg: str, tag: str, css: str) -> list:
    return [e for e in ET.fromstring(svg).iter(SVG + tag) if css in e.get("class", "").split()]


def test_a_slowed_workers_stolen_and_copied_slices_are_recorded_and_drawn(make_cluster, record):
    cluster = make_cluster(["local:3"])
    for _ in range(2):  # cached, and the workers measured
        expected = cluster.map(sleepy, None, DATA, add, slice_size=2)
    slow = cluster.worker_names[0]
    cluster.chaos.slow(slow, 9 * WORK)
    log = record(cluster)
    assert cluster.map(sleepy, None, DATA, add, slice_size=2) == expected
    call = cluster.last_call
    slices = call.slices
    taken = log.of(ev.SliceTaken)
    # The record holds what the events said: each taken slice with how and from whom, each dropped copy.
    assert sorted((r.index, r.worker, r.how, r.source) for r in slices if r.how) == sorted(
        (t.index, t.worker, t.how, t.source) for t in taken)
    assert sorted((r.index, r.worker) for r in slices if r.outcome == "dropped") == sorted(
        (d.index, d.worker) for d in log.of(ev.SliceDropped))
    assert [r.index for r in call.done_slices()] == list(range(30))  # still one finished record per slice
    assert call.moved() == []  # nobody died
    t = call.totals()
    how = Counter(r.how for r in slices)
    assert (t["stolen"], t["speculative"], t["rebalanced"]) == (how["stolen"], how["speculative"], how["rebalanced"])
    assert t["stolen"] >= 1 and all(r.source == slow for r in slices if r.how == "stolen"), taken
    assert t["speculative"] + t["replicated"] >= 1
    replicas = [r for r in slices if r.replicated]
    assert all(r.how and not r.cached and r.nbytes_sent > 0 for r in replicas)
    for r in replicas:  # a replica: the taker caches it now, as well as its first holder
        assert r.key in cluster.workers[cluster.worker_names.index(r.worker)].cache
    assert f"{t['stolen']} stolen from {slow}" in call.summary()
    # The drawing marks the same slices.
    svg = timeline_svg(call)
    bars = marks(svg, "rect", "qjam-slice")
    assert sorted(int(b.get("data-index")) for b in bars if "stolen" in b.get("class").split()) == sorted(
        r.index for r in slices if r.how == "stolen")
    assert all(b.get("data-source") == slow for b in bars if "stolen" in b.get("class").split())
    assert len(marks(svg, "rect", "qjam-stolen")) == t["stolen"]
    assert len(marks(svg, "path", "qjam-replica")) == t["replicated"]
    assert len(marks(svg, "line", "qjam-struck")) == t["dropped"]
    assert sum("speculative" in b.get("class").split() for b in bars) == t["speculative"]
    text = "\n".join(e.text or "" for e in ET.fromstring(svg).iter(SVG + "text"))
    assert f"{t['stolen']} stolen from {slow}" in text
