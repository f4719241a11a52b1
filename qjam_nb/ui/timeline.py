"""The call timeline, drawn: one lane per worker, one bar per slice, totals underneath.

``timeline_svg(record)`` is a pure function from a ``CallRecord`` to an SVG
string: no browser, no plotting library, tested by parsing the XML.
``TimelineWidget`` puts it in an ``ipywidgets.HTML`` and redraws it while a
call runs (throttled, like the cluster widget). Inline SVG needs nothing in
the front end beyond ipywidgets itself, so it renders in JupyterLab, the
classic notebook and a static page with the widget state saved.

What a bar means: it runs from when the worker said it started the slice
(or, if it never did, from when the slice was sent or assigned) to when its
result arrived (or its worker was lost). The darker part at its start is
the worker's own compute time; the rest is the result travelling back. A
thin line before the bar is the time the slice waited in the worker's queue
(and, for a shipped slice, its data travelling). Orange: the slice's data
was shipped; teal: it came from the worker's cache. A red outline with a
cross: the worker died with it (a later bar on another lane finishes it).

Where the schedule healed (``SliceRecord.how``), the bar says so: hatched,
a slice stolen from another worker's queue (named on the bar when it fits,
and in its tooltip); hatched the other way, one rebalanced at the call's
start; a dashed violet outline, a speculative copy of a slice that another
worker ran slowly; a small flag, the copy that won a race; grey and struck
through, a copy that lost it (``dropped``), ending where the winner's result
came; a small green diamond, a slice shipped to its taker, which caches it
too from then on (a replica). Each has a legend entry only when the call has
one, a class on its bar (``stolen``, ``rebalanced``, ``speculative``,
``won``, ``dropped``, ``replica``; ``data-source`` names the worker it came
from) and a mark of its own class (``qjam-stolen``, ``qjam-rebalanced``,
``qjam-won``, ``qjam-struck``, ``qjam-replica``), for tests and browsers.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable

import ipywidgets as widgets

from .. import events as ev
from ..cluster.callrecord import CallRecord
from ..cluster.cluster import Cluster
from ..cluster.slicerows import CANCELLED, DONE, DROPPED, ERROR, LOST, REBALANCED, SPECULATIVE, STOLEN, SliceRecord
from ..formats import format_ranges, format_size
from .views import _View

#: (bar, compute) fills for slices whose data was shipped, and for slices served from the cache.
SHIPPED = ("#f6c39f", "#cb4b16")
CACHED = ("#a8ddd8", "#2aa198")
LOST_RED = "#dc322f"
RUNNING_BLUE = "#268bd2"
GREY = "#93a1a1"
#: How healed slices are marked: a copy's outline, a dropped copy's fill, a replica's diamond, the hatching.
COPY_VIOLET = "#6c71c4"
DROPPED_FILL = "#eee8d5"
REPLICA_GREEN = "#859900"
HATCH = "#002b36"
LANE_HEIGHT, BAR_HEIGHT = 22, 14
LABEL_WIDTH, RIGHT_MARGIN, TOP = 120, 16, 30
CSS_CLASS = "qjam-timeline"
#: Above this many records, adjacent bars of one kind on a lane are drawn as one (10,000 bars would be 4 MB).
MAX_BARS = 2000


def timeline_svg(record: CallRecord, width: int = 760, max_bars: int = MAX_BARS) -> str:
    """An SVG drawing of one call: lanes, bars (``rect.qjam-slice``, one per record), axis, legend, totals.

    A call of more than ``max_bars`` records draws each lane's runs of touching
    bars of one kind (shipped or cached, same outcome) as one ``rect.qjam-slice.qjam-merged``
    with ``data-count`` records; lost slices are always drawn one by one.
    """
    lanes = record.by_worker()
    merge = record.n_records > max_bars
    raced = {r.index for rs in lanes.values() for r in rs if r.outcome == DROPPED}  # slices whose copies raced
    hows = {r.how for rs in lanes.values() for r in rs if r.how is not None}
    span = max([record.seconds] + [_end(r, record) for rs in lanes.values() for r in rs] + [1e-6])
    plot = width - LABEL_WIDTH - RIGHT_MARGIN

    def x(t: float) -> float:
        return LABEL_WIDTH + plot * max(0.0, t) / span

    out: list[str] = []
    if hows & {STOLEN, REBALANCED}:
        out.append(_HATCHES)
    out.append(f'<text x="4" y="16" font-weight="bold">{html.escape(_title(record))}</text>')
    y = TOP
    for worker, records in lanes.items():
        out.append(f'<g class="qjam-lane" data-worker="{_attr(worker)}">')
        out.append(f'<rect class="qjam-lane-bg" x="{LABEL_WIDTH}" y="{y}" width="{plot}" '
                   f'height="{LANE_HEIGHT - 2}" fill="#f7f7f7"/>')
        out.append(f'<text x="{LABEL_WIDTH - 6}" y="{y + 14}" text-anchor="end" font-family="monospace">'
                   f'{html.escape(worker)}</text>')
        top = y + (LANE_HEIGHT - 2 - BAR_HEIGHT) / 2
        if merge:
            out.extend(_merged_bars(records, record, x, top, raced))
        else:
            for r in records:  # queue lines first, so the bars cover them where slices ran
                out.extend(_wait(r, x, top))
            for r in records:
                out.extend(_bar(r, record, x, top, raced))
        out.append("</g>")
        y += LANE_HEIGHT
    y = _axis(out, x, span, y + 4, plot)
    y = _legend(out, y + 8)
    if hows or raced:
        y = _healing_legend(out, y + 8, width, hows, bool(raced),
                            any(r.replicated for rs in lanes.values() for r in rs))
    notes = _totals(record)
    if merge:
        notes.append(f"{record.n_records} slice records: touching bars of one kind on a lane are drawn as one")
    for line in notes:
        y += 16
        out.append(f'<text class="qjam-totals" x="4" y="{y}">{html.escape(line)}</text>')
    height = y + 8
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{CSS_CLASS}-svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">' + "".join(out) + "</svg>"
    )


def _title(record: CallRecord) -> str:
    state = "running" if not record.finished else ("done" if record.ok else "failed")
    return (f"call {record.call}: {record.n_slices} slices on {len(record.workers)} workers, "
            f"{state} in {record.seconds:.3f} s")


def _end(r: SliceRecord, record: CallRecord) -> float:
    """Where a bar ends: its result, its loss, or (still running) now."""
    if r.done is not None:
        return r.done
    return r.ended if r.ended is not None else record.seconds


def _bar(r: SliceRecord, record: CallRecord, x: Callable[[float], float], top: float,
         raced: frozenset[int] | set[int] = frozenset()) -> list[str]:
    start = _start(r)
    end = max(_end(r, record), start)
    x0, x1 = x(start), x(end)
    w = max(6.0 if r.outcome in (LOST, DROPPED) else 1.5, x1 - x0)  # wide enough to show its cross or strike
    if r.outcome == DROPPED:
        x0 = x1 - w  # it ends where the winner's result came
    bar, dark = CACHED if r.cached else SHIPPED
    stroke = _STROKES.get(r.outcome, "#fff")
    if r.how == SPECULATIVE and r.outcome != DROPPED:
        stroke = COPY_VIOLET
    dash = ' stroke-dasharray="3,2"' if r.outcome in (CANCELLED, None) or r.how == SPECULATIVE else ""
    fill = {LOST: "#fde0df", ERROR: "#fde0df", DROPPED: DROPPED_FILL}.get(r.outcome, bar)
    won = r.outcome == DONE and r.index in raced
    marks = (f" {r.how}" if r.how else "") + (" replica" if r.replicated else "") + (" won" if won else "")
    source = f' data-source="{_attr(r.source)}"' if r.source is not None else ""
    where = f'data-index="{r.index}" data-worker="{_attr(r.worker)}"'
    parts = [
        f'<rect class="qjam-slice {"cached" if r.cached else "shipped"} {r.outcome or "running"}{marks}" '
        f'{where}{source} x="{x0:.1f}" y="{top}" width="{w:.1f}" '
        f'height="{BAR_HEIGHT}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}>'
        f"<title>{html.escape(_tooltip(r, won))}</title></rect>"
    ]
    if r.outcome == DONE and r.compute > 0:
        cw = min(w, x(start + r.compute) - x0)
        if cw >= 0.5:
            parts.append(f'<rect class="qjam-compute" x="{x0:.1f}" y="{top}" width="{cw:.1f}" '
                         f'height="{BAR_HEIGHT}" fill="{dark}" pointer-events="none"/>')
    if r.outcome == LOST:
        x2, y2 = x0 + w, top + BAR_HEIGHT
        parts.append(f'<path class="qjam-lost" d="M{x0:.1f},{top}L{x2:.1f},{y2}M{x0:.1f},{y2}L{x2:.1f},{top}" '
                     f'stroke="{LOST_RED}" stroke-width="1.5" pointer-events="none"/>')
    if r.how is not None or r.outcome == DROPPED or won:
        parts.extend(_healing_marks(r, x0, w, top, where, won))
    return parts


def _healing_marks(r: SliceRecord, x0: float, w: float, top: float, where: str, won: bool) -> list[str]:
    """The marks over a bar the schedule healed with (see the module's docstring)."""
    parts = []
    if r.how in (STOLEN, REBALANCED):
        parts.append(f'<rect class="qjam-{r.how}" {where} x="{x0:.1f}" y="{top}" width="{w:.1f}" '
                     f'height="{BAR_HEIGHT}" fill="url(#qjam-hatch{"" if r.how == STOLEN else "-back"})" '
                     f'pointer-events="none"/>')
        label = f"\u2190{r.source}"  # "<-local/0": where it came from, when it fits in the bar
        if w >= 6 * len(label) + 4:
            parts.append(f'<text class="qjam-from" x="{x0 + 2:.1f}" y="{top + BAR_HEIGHT - 4}" font-size="9" '
                         f'fill="#073642" pointer-events="none">{html.escape(label)}</text>')
    mid = top + BAR_HEIGHT / 2
    if r.outcome == DROPPED:
        parts.append(f'<line class="qjam-struck" {where} x1="{x0:.1f}" y1="{mid}" x2="{x0 + w:.1f}" y2="{mid}" '
                     f'stroke="#657b83" stroke-width="1.5" pointer-events="none"/>')
    if won:
        x1 = x0 + w
        parts.append(f'<path class="qjam-won" {where} d="M{x1 - 6:.1f},{top - 2}L{x1:.1f},{top - 2}'
                     f'L{x1:.1f},{top + 4}Z" fill="{COPY_VIOLET}" pointer-events="none"/>')
    if r.replicated:
        parts.append(f'<path class="qjam-replica" {where} d="M{x0:.1f},{mid - 4}l4,4l-4,4l-4,-4Z" '
                     f'fill="{REPLICA_GREEN}" stroke="#fff" stroke-width="0.5" pointer-events="none"/>')
    return parts


#: A bar's outline by its outcome (white: done).
_STROKES = {LOST: LOST_RED, ERROR: LOST_RED, CANCELLED: GREY, DROPPED: GREY, None: RUNNING_BLUE}

#: The hatching of stolen (``qjam-hatch``) and rebalanced (``qjam-hatch-back``) bars.
_HATCHES = (
    "<defs>" + "".join(
        f'<pattern id="qjam-hatch{suffix}" patternUnits="userSpaceOnUse" width="5" height="5" '
        f'patternTransform="rotate({angle})"><line x1="0" y1="0" x2="0" y2="5" stroke="{HATCH}" '
        f'stroke-width="1.5" stroke-opacity="0.6"/></pattern>' for suffix, angle in (("", 45), ("-back", -45)))
    + "</defs>"
)


def _merged_bars(records: list[SliceRecord], record: CallRecord, x: Callable[[float], float],
                 top: float, raced: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """One bar per run of touching records of one kind; the compute share shaded at its start.
    Lost records, copies and the slices they raced are drawn one by one (they are few: copies are
    made only of the last slices in flight); stolen and rebalanced ones merge with their own kind
    (same source), hatched and marked as one."""
    runs: list[list] = []  # [x0, x1, kind, records, seconds busy]
    spans = sorted(((_start(r), _end(r, record), r) for r in records), key=lambda span: span[0])
    for start, end, r in spans:
        end = max(start, end)
        x0, x1 = x(start), x(end)
        alone = r.outcome in (LOST, DROPPED) or r.how == SPECULATIVE or r.index in raced
        kind = (r.cached, r.outcome, r.how, r.source, alone)
        last = runs[-1] if runs else None
        if not alone and last is not None and last[2] == kind and x0 <= last[1] + 1.0:
            last[1] = max(last[1], x1)
            last[3].append(r)
            last[4] += end - start
        else:
            runs.append([x0, x1, kind, [r], end - start])
    parts = []
    for x0, x1, (cached, outcome, how, source, _), rs, busy in runs:
        if len(rs) == 1:
            parts.extend(_bar(rs[0], record, x, top, raced))
            continue
        w = max(1.5, x1 - x0)
        bar, dark = CACHED if cached else SHIPPED
        stroke = {ERROR: LOST_RED, CANCELLED: GREY, None: RUNNING_BLUE}.get(outcome, "#fff")
        share = min(1.0, sum(r.compute for r in rs) / busy) if busy > 0 else 0.0
        indexes = sorted(r.index for r in rs)
        which = format_ranges(indexes) if len(rs) <= 20 else f"{indexes[0]} to {indexes[-1]}"
        healed = f"; {how} from {source}" + ("" if cached else ", now cached here too") if how else ""
        title = (f"{len(rs)} slices on {rs[0].worker} ({which}): "
                 f"{'from the cache' if cached else 'shipped'}{healed}, {outcome or 'running'}; "
                 f"compute {share:.0%} of the bar")
        marks = f" {how}" + ("" if cached else " replica") if how else ""
        where = f'data-index="{rs[0].index}" data-count="{len(rs)}" data-worker="{_attr(rs[0].worker)}"'
        source_attr = f' data-source="{_attr(source)}"' if how else ""
        parts.append(
            f'<rect class="qjam-slice qjam-merged {"cached" if cached else "shipped"} {outcome or "running"}{marks}" '
            f'{where}{source_attr} '
            f'x="{x0:.1f}" y="{top}" width="{w:.1f}" height="{BAR_HEIGHT}" fill="{bar}" stroke="{stroke}" '
            f'stroke-width="1"><title>{html.escape(title)}</title></rect>'
        )
        if outcome == DONE and share * w >= 0.5:
            parts.append(f'<rect class="qjam-compute" x="{x0:.1f}" y="{top}" width="{share * w:.1f}" '
                         f'height="{BAR_HEIGHT}" fill="{dark}" pointer-events="none"/>')
        if how:
            parts.extend(_healing_marks(rs[0], x0, w, top, where, False))
    return parts


def _start(r: SliceRecord) -> float:
    """Where a bar starts: when the worker began the slice, else when it was sent or assigned (a copy
    dropped before it began: where it was dropped, so its queue line shows the wait, not a bar)."""
    if r.started is not None:
        return r.started
    if r.outcome == DROPPED and r.ended is not None:
        return r.ended
    if r.sent is not None:
        return r.sent
    return r.assigned if r.assigned is not None else 0.0


def _wait(r: SliceRecord, x: Callable[[float], float], top: float) -> list[str]:
    """A thin line for the time a slice waited in its worker's queue (and its data travelled)."""
    if r.assigned is None or x(r.assigned) >= x(_start(r)) - 0.5:
        return []
    mid = top + BAR_HEIGHT / 2
    return [f'<line class="qjam-wait" x1="{x(r.assigned):.1f}" y1="{mid}" x2="{x(_start(r)):.1f}" y2="{mid}" '
            f'stroke="{GREY}" stroke-width="1"/>']


def _tooltip(r: SliceRecord, won: bool = False) -> str:
    how = "from the cache" if r.cached else f"shipped {format_size(r.nbytes_sent)}"
    times = ", ".join(f"{name} {t:.4f} s" for name, t in (
        ("assigned", r.assigned), ("sent", r.sent), ("started", r.started), ("done", r.done)) if t is not None)
    what = {DONE: f"done, compute {r.compute:.4f} s", LOST: "lost: its worker died, it ran elsewhere",
            ERROR: "mapfunc raised", CANCELLED: "cancelled: the call stopped",
            DROPPED: "dropped: another copy finished first, its result is ignored", None: "running"}[r.outcome]
    healed = {STOLEN: f"; stolen from {r.source}'s queue", SPECULATIVE: f"; a copy of the slice {r.source} ran too",
              REBALANCED: f"; placed here for this worker's share, although {r.source} caches it"}.get(r.how, "")
    if r.replicated:
        healed += "; now cached here too"
    if won:
        healed += "; won the race"
    return f"slice {r.index} on {r.worker}: {how}{healed}; {times}; {what}"


def nice_step(span: float, ticks: int = 6) -> float:
    """A 1, 2 or 5 times a power of ten that cuts ``span`` into about ``ticks`` parts."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def _axis(out: list[str], x: Callable[[float], float], span: float, y: float, plot: float) -> float:
    step = nice_step(span)
    decimals = max(0, -math.floor(math.log10(step)))
    out.append(f'<g class="qjam-axis"><line x1="{LABEL_WIDTH}" y1="{y}" x2="{LABEL_WIDTH + plot}" y2="{y}" '
               f'stroke="#586e75"/>')
    n = int(span / step + 1e-9)
    for i in range(n + 1):
        tx = x(i * step)
        out.append(f'<line x1="{tx:.1f}" y1="{y}" x2="{tx:.1f}" y2="{y + 4}" stroke="#586e75"/>'
                   f'<text x="{tx:.1f}" y="{y + 15}" text-anchor="middle">{i * step:.{decimals}f}</text>')
    out.append(f'<text x="{LABEL_WIDTH - 18}" y="{y + 15}" text-anchor="end">seconds</text></g>')
    return y + 20


def _legend(out: list[str], y: float) -> float:
    items = [
        (f'fill="{SHIPPED[0]}"', "shipped"), (f'fill="{CACHED[0]}"', "cached"),
        (f'fill="{SHIPPED[1]}"', "compute (darker start)"),
        (f'fill="#fde0df" stroke="{LOST_RED}" stroke-width="1.5"', "lost: worker died, moved"),
    ]
    out.append('<g class="qjam-legend">')
    lx = 4
    for attrs, label in items:
        out.append(f'<rect x="{lx}" y="{y}" width="14" height="10" {attrs}/>'
                   f'<text x="{lx + 18}" y="{y + 9}">{label}</text>')
        lx += 30 + 6.5 * len(label)
    out.append(f'<line x1="{lx}" y1="{y + 5}" x2="{lx + 14}" y2="{y + 5}" stroke="{GREY}"/>'
               f'<text x="{lx + 18}" y="{y + 9}">queued</text></g>')
    return y + 10


def _healing_legend(out: list[str], y: float, width: int, hows: set, raced: bool, replicas: bool) -> float:
    """A second legend row (or more) for the marks of a schedule that healed: only those the call has."""
    items = []
    if STOLEN in hows:
        items.append(('fill="url(#qjam-hatch)"', "stolen from another queue"))
    if REBALANCED in hows:
        items.append(('fill="url(#qjam-hatch-back)"', "rebalanced at the start"))
    if SPECULATIVE in hows:
        items.append((f'fill="#fff" stroke="{COPY_VIOLET}" stroke-width="1.5" stroke-dasharray="3,2"',
                      "copy of a slow slice"))
    if raced:
        items.append((f'fill="{COPY_VIOLET}"', "won the race"))
        items.append((f'fill="{DROPPED_FILL}" stroke="{GREY}"', "dropped copy (lost the race)"))
    if replicas:
        items.append((f'fill="{REPLICA_GREEN}"', "now cached here too"))
    out.append('<g class="qjam-legend qjam-legend-healing">')
    lx = 4
    for attrs, label in items:
        step = 30 + 6.5 * len(label)
        if lx > 4 and lx + step > width:
            lx, y = 4, y + 16
        out.append(f'<rect x="{lx}" y="{y}" width="14" height="10" {attrs}/>'
                   f'<text x="{lx + 18}" y="{y + 9}">{label}</text>')
        lx += step
    out.append("</g>")
    return y + 10


def _totals(record: CallRecord) -> list[str]:
    t = record.totals()
    lines = [
        f"sent {format_size(t['bytes_sent'])} ({format_size(t['slice_bytes_sent'])} of slice data, "
        f"{t['shipped']} slices shipped); saved by the cache {format_size(t['bytes_saved'])} "
        f"({t['cached']} slices cached)",
        f"time: compute {t['compute_seconds']:.3f} s, transfer {t['transfer_seconds']:.3f} s, "
        f"reduce {t['reduce_seconds']:.3f} s (summed over workers), call {t['seconds']:.3f} s",
    ]
    if t["moved"]:
        lines.append(f"moved after a worker died: slices {format_ranges(record.moved())}")
    healing = record.healing_text()
    if healing:
        lines.append(f"the schedule healed: {healing}")
    return lines


def _attr(text: str) -> str:
    return html.escape(text, quote=True)


class TimelineWidget(_View):
    """The last call's timeline, as a widget; with ``live``, it redraws while a call runs.

    Redraws are throttled to one per ``min_interval`` seconds (longer for calls
    of thousands of slices, whose drawing is larger), and always at a call's
    start and end. Without ``live`` it draws once and follows nothing;
    ``call`` draws that call (one of ``cluster.calls``) instead of the last.
    Its DOM carries the CSS class ``qjam-timeline``.
    """

    #: Only the end of a call must draw at once: worker state changes do not show on a timeline.
    urgent = (ev.CallFinished,)

    def __init__(self, cluster: Cluster, min_interval: float = 0.25, clock: Callable[[], float] = time.monotonic,
                 live: bool = True, call: int | None = None) -> None:
        self.box = widgets.HTML()
        self.box.add_class(CSS_CLASS)
        self.min_interval = min_interval
        self.call = call
        if call is not None and not any(c.call == call for c in cluster.calls):
            remembered = ", ".join(str(c.call) for c in cluster.calls) or "none yet"
            raise ValueError(f"call {call} is not remembered: the cluster keeps its last calls ({remembered})")
        super().__init__(cluster, min_interval, clock)
        if not live or call is not None:
            self.close()
        self.redraw()

    @property
    def record(self) -> CallRecord | None:
        """The call drawn: the one asked for, else the running or last one."""
        if self.call is None:
            return self.cluster.last_call
        return next((c for c in self.cluster.calls if c.call == self.call), None)

    def _on_event(self, event: ev.Event) -> None:
        record = self.cluster.last_call
        n = record.n_records if record is not None else 0
        self.throttle.min_interval = max(self.min_interval, n / 10_000)  # 10,000 bars: once a second
        super()._on_event(event)

    def redraw(self) -> None:
        record = self.record
        if record is None:
            self.box.value = "<i>no call yet: the timeline appears after a %%qjam_map cell or cluster.map(...)</i>"
        else:
            self.box.value = timeline_svg(record)
