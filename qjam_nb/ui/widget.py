"""The cluster widget and the per-call progress bar (ipywidgets).

Both are views of the cluster's ``StatusModel`` and redraw when events
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

from ..cluster import events as ev
from ..cluster.cluster import Cluster
from ..cluster.status import CallRow, StatusModel, WorkerRow

STATE_COLOURS = {
    "starting": "#b58900",
    "idle": "#2aa198",
    "busy": "#268bd2",
    "dead": "#dc322f",
    "stopped": "#839496",
}
#: Events that redraw at once, whatever the throttle says.
URGENT = (ev.WorkerStateChanged, ev.CallStarted, ev.CallFinished, ev.ErrorEvent)


def row_cells(row: WorkerRow) -> dict[str, str]:
    """The texts of one worker's row."""
    colour = STATE_COLOURS.get(row.state, "#000")
    title = html.escape(row.reason or row.state, quote=True)
    return {
        "name": f"<code>{html.escape(row.name)}</code>",
        "state": f'<b style="color:{colour}" title="{title}">{row.state}</b>',
        "progress": f"{row.done}/{row.assigned}",
        "cached": f"{row.cached_slices} slices, {row.cached_bytes / 2**20:.1f} MiB",
    }


def call_summary(call: CallRow) -> str:
    """One line on the current or last call."""
    if not call.call:
        return "no call yet"
    sent = call.slice_bytes_sent / 2**20
    saved = call.slice_bytes_cached / 2**20
    if call.running:
        return f"call {call.call}: {call.done}/{call.n_slices} slices"
    state = "failed" if call.errors else "done"
    return (
        f"call {call.call}: {call.done}/{call.n_slices} slices, {state} in {call.seconds:.3f} s; "
        f"{sent:.1f} MiB of slices shipped, {saved:.1f} MiB served from cache"
    )


class Throttle:
    """Says whether to redraw now: always when urgent, else once per ``min_interval``."""

    def __init__(self, min_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval = min_interval
        self.clock = clock
        self.last = float("-inf")

    def __call__(self, urgent: bool) -> bool:
        now = self.clock()
        if urgent or now - self.last >= self.min_interval:
            self.last = now
            return True
        return False


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


class _View:
    """Subscribes to a cluster and redraws from its status model, throttled; displays ``box``."""

    box: widgets.Widget

    def __init__(self, cluster: Cluster, min_interval: float, clock: Callable[[], float]) -> None:
        self.cluster = cluster
        self.model: StatusModel = cluster.status
        self.throttle = Throttle(min_interval, clock)
        self.redraws = 0
        self._unsubscribe = cluster.events.subscribe(self._on_event)

    def _on_event(self, event: ev.Event) -> None:
        if self.throttle(isinstance(event, URGENT)):
            self.redraws += 1
            self.redraw()

    def redraw(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._unsubscribe()

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)


class ClusterWidget(_View):
    """One row per worker (name, state, done/total, cached slices) and a bar for the call."""

    def __init__(
        self, cluster: Cluster, min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rows: dict[str, dict[str, widgets.Widget]] = {}
        self.table = widgets.GridBox(
            layout=widgets.Layout(grid_template_columns="max-content max-content 12em max-content max-content",
                                  grid_gap="2px 12px", align_items="center")
        )
        self.call = CallBar("call")
        self.box = widgets.VBox([self.table, self.call.box])
        super().__init__(cluster, min_interval, clock)
        self.redraw()

    def _row(self, name: str) -> dict[str, widgets.Widget]:
        if name not in self.rows:
            self.rows[name] = {
                "name": widgets.HTML(),
                "state": widgets.HTML(),
                "bar": widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="12em")),
                "progress": widgets.Label(),
                "cached": widgets.Label(),
            }
            self.table.children = [cell for r in self.rows.values() for cell in r.values()]
        return self.rows[name]

    def redraw(self) -> None:
        for row in self.model.rows.values():
            cells = row_cells(row)
            w = self._row(row.name)
            w["name"].value = cells["name"]
            w["state"].value = cells["state"]
            w["bar"].max = max(1, row.assigned)
            w["bar"].value = row.done
            w["progress"].value = cells["progress"]
            w["cached"].value = cells["cached"]
        self.call.draw(self.model.call)


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
