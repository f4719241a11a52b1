"""The cluster widget and the per-call progress bar (ipywidgets).

The cluster widget is a table (a row per worker, HBoxes carrying the CSS
class ``qjam-worker-row`` inside a box of class ``qjam-cluster``), the call's
bar, the last call's timeline (``ui.timeline``) and the chaos controls
(``ui.chaos``). Both are views of the cluster's ``StatusModel`` and redraw when events
arrive, at most every ``min_interval`` seconds (a call of 10,000 small slices
must not spend its time redrawing), and always on state changes and at the
end of a call. What a row says is decided by pure functions (``row_cells``,
``call_summary``), tested without a browser.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable

import ipywidgets as widgets

from ..cluster.cachemap import cache_map
from ..cluster.cluster import Cluster
from ..cluster.status import CallRow, WorkerRow
from ..formats import format_ranges, format_size
from .chaos import chaos_controls
from .timeline import TimelineWidget
from .views import URGENT, Throttle, _View  # noqa: F401 (Throttle and URGENT: re-exported)

STATE_COLOURS = {
    "starting": "#b58900",
    "idle": "#2aa198",
    "busy": "#268bd2",
    "unresponsive": "#cb4b16",
    "dead": "#dc322f",
    "stopped": "#839496",
}


def row_cells(row: WorkerRow) -> dict[str, str]:
    """The texts of one worker's row."""
    colour = STATE_COLOURS.get(row.state, "#000")
    title = html.escape(row.reason or row.state, quote=True)
    return {
        "name": (f'<code title="BLAS threads: {html.escape(row.threads, quote=True)}">' if row.threads else "<code>")
        + f"{html.escape(row.name)}</code>",
        "state": f'<b style="color:{colour}" title="{title}">{row.state}</b>',
        "progress": f"{row.done}/{row.assigned}",
        "cached": f"{row.cached_slices} slices, {format_size(row.cached_bytes)}",
    }


def call_summary(call: CallRow) -> str:
    """One line on the current or last call."""
    if not call.call:
        return "no call yet"
    healed = call.healing_text()
    healed = f"; healed: {healed}" if healed else ""
    if call.running:
        return f"call {call.call}: {call.done}/{call.n_slices} slices{healed}"
    state = "failed" if call.errors else "done"
    return (
        f"call {call.call}: {call.done}/{call.n_slices} slices, {state} in {call.seconds:.3f} s; "
        f"{format_size(call.slice_bytes_sent)} of slices shipped, "
        f"{format_size(call.slice_bytes_cached)} served from cache{healed}"
    )


class CallBar:
    """A progress bar and a summary line for the current or last call."""

    def __init__(self, description: str = "") -> None:
        self.bar = widgets.IntProgress(value=0, min=0, max=1, description=description,
                                       layout=widgets.Layout(width="24em"))
        self.text = widgets.HTML()
        self.box = widgets.HBox([self.bar, self.text])

    def draw(self, call: CallRow) -> None:
        self.bar.max = max(1, call.n_slices)
        self.bar.value = call.done
        self.bar.bar_style = "danger" if call.errors else ("success" if call.call and not call.running else "")
        self.text.value = html.escape(call_summary(call))


#: Column widths of the worker table (rows are HBoxes, so each can carry the ``qjam-worker-row`` class).
COLUMNS = {"name": "10em", "state": "4.5em", "bar": "12em", "progress": "5em", "cached": "10em", "holds": "auto"}
HEADINGS = {"name": "worker", "state": "state", "bar": "this call", "progress": "done", "cached": "cache",
            "holds": "holds slices (of the last call's dataset)"}


def holds_cell(indexes: list[int] | None) -> str:
    """What the row says about which slices of the last call's dataset the worker caches."""
    if indexes is None:
        return ""
    return format_ranges(indexes) if indexes else "none"


class ClusterWidget(_View):
    """One row per worker (name, state, done/total, cache, which slices it holds), a bar for the call,
    the last call's timeline and the chaos controls.

    The box carries the CSS class ``qjam-cluster`` and each worker's row
    ``qjam-worker-row``, so a browser test can find them.
    """

    def __init__(
        self, cluster: Cluster, min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rows: dict[str, dict[str, widgets.Widget]] = {}
        self.row_boxes: dict[str, widgets.HBox] = {}
        header = widgets.HBox([widgets.HTML(f"<b>{text}</b>", layout=widgets.Layout(width=COLUMNS[key]))
                               for key, text in HEADINGS.items()])
        header.add_class("qjam-header")
        self.table = widgets.VBox([header])
        self.call = CallBar("call")
        self.timeline = TimelineWidget(cluster, min_interval=max(min_interval, 0.25), clock=clock)
        self.timeline_panel = widgets.Accordion(children=[self.timeline.box], titles=("timeline of the last call",))
        self.timeline_panel.selected_index = 0 if cluster.last_call is not None else None
        self._opened = cluster.last_call is not None
        self.chaos = chaos_controls(cluster)
        self.chaos_panel = widgets.Accordion(
            children=[self.chaos], titles=("chaos, for teaching: kill, slow down or disconnect a worker",))
        self.chaos_panel.selected_index = None
        parts = [self.table, self.call.box, self.timeline_panel, self.chaos_panel]
        if cluster.dashboard:  # a Dask cluster: its own dashboard shows what Dask sees of the same workers
            link = html.escape(cluster.dashboard, quote=True)
            parts.insert(0, widgets.HTML(f'<a href="{link}" target="_blank" rel="noopener">Dask dashboard</a>: '
                                         "the Dask cluster's own view of these workers"))
        self.box = widgets.VBox(parts)
        self.box.add_class("qjam-cluster")
        super().__init__(cluster, min_interval, clock)
        self.redraw()

    def _row(self, name: str) -> dict[str, widgets.Widget]:
        if name not in self.rows:
            cells = {
                "name": widgets.HTML(),
                "state": widgets.HTML(),
                "bar": widgets.IntProgress(value=0, min=0, max=1),
                "progress": widgets.Label(),
                "cached": widgets.Label(),
                "holds": widgets.Label(),
            }
            for key, cell in cells.items():
                cell.layout.width = COLUMNS[key]
            self.rows[name] = cells
            box = widgets.HBox(list(cells.values()), layout=widgets.Layout(align_items="center"))
            box.add_class("qjam-worker-row")
            self.row_boxes[name] = box
            self.table.children = (*self.table.children, box)
        return self.rows[name]

    def redraw(self) -> None:
        call = self.model.call
        record = self.cluster.last_call
        has_data = record is not None and record.has_dataset
        held = cache_map(record, self.cluster.workers) if has_data and not call.running else None
        for row in self.model.rows.values():
            cells = row_cells(row)
            w = self._row(row.name)
            w["name"].value = cells["name"]
            w["state"].value = cells["state"]
            w["bar"].max = max(1, row.assigned)
            w["bar"].value = row.done
            w["progress"].value = cells["progress"]
            w["cached"].value = cells["cached"]
            if held is not None or not has_data:
                w["holds"].value = holds_cell(held.get(row.name) if held else None)
        self.call.draw(call)
        if call.call and not self._opened:  # the first call opens the timeline; after that the user decides
            self._opened = True
            self.timeline_panel.selected_index = 0

    def close(self) -> None:
        super().close()
        self.timeline.close()
        self.chaos.controls.close()


class CallProgress(_View):
    """A compact bar for the call in the cell that runs it."""

    def __init__(
        self, cluster: Cluster, min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.call = CallBar()
        self.box = self.call.box
        super().__init__(cluster, min_interval, clock)

    def redraw(self) -> None:
        self.call.draw(self.model.call)
