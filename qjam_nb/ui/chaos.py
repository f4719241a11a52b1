"""Chaos buttons for the cluster widget: kill a worker, slow it down or drop its connection.

A running cell blocks the kernel, so a button cannot act in the middle of a
call: with "after N slices" above 0 the buttons arm the action for the next
call (the map loop fires it once N slices are done), and the status line says
so. With 0 they act at once. Everything is ``cluster.chaos``; this is only a
view of it.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from .. import events as ev
from ..cluster.cluster import Cluster


class ChaosControls:
    """The widgets of ``chaos_controls``, kept together so tests can click them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        names = cluster.worker_names
        self.worker = widgets.Dropdown(options=names, value=names[0] if names else None, description="worker",
                                       layout=widgets.Layout(width="16em"))
        self.after = widgets.BoundedIntText(value=0, description="after", min=0, max=10**9,
                                     tooltip="slices of the next call before it happens (0 = now)",
                                     layout=widgets.Layout(width="10em"))
        self.after_label = widgets.Label("slices (0 = now)")
        self.seconds = widgets.BoundedFloatText(value=0.5, description="delay s", min=0, max=3600,
                                         layout=widgets.Layout(width="10em"))
        self.kill_button = widgets.Button(description="kill", button_style="danger",
                                          tooltip="SIGKILL the worker (now, or after N slices of the next call)")
        self.slow_button = widgets.Button(description="slow down", button_style="warning",
                                          tooltip="the worker sleeps this many seconds before each slice (0 ends it)")
        self.drop_button = widgets.Button(description="drop connection", button_style="warning",
                                          tooltip="close the worker's connection, as if the network failed")
        self.clear_button = widgets.Button(description="clear",
                                           tooltip="disarm everything and end every slowdown")
        self.status = widgets.HTML()
        self.kill_button.on_click(lambda _: self._do(lambda: self.cluster.chaos.kill(self.worker.value,
                                                                                     self._after())))
        self.drop_button.on_click(lambda _: self._do(lambda: self.cluster.chaos.drop(self.worker.value,
                                                                                     self._after())))
        self.slow_button.on_click(lambda _: self._do(lambda: self.cluster.chaos.slow(self.worker.value,
                                                                                     self.seconds.value)))
        self.clear_button.on_click(lambda _: self._do(self.cluster.chaos.clear))
        self.box = widgets.VBox([
            widgets.HBox([self.worker, self.after, self.after_label]),
            widgets.HBox([self.kill_button, self.drop_button, self.seconds, self.slow_button, self.clear_button]),
            self.status,
        ])
        self.box.add_class("qjam-chaos")
        self.message = ""
        self._unsubscribe = cluster.events.subscribe(self._on_event)
        self.refresh()

    def _after(self) -> int | None:
        return self.after.value if self.after.value > 0 else None

    def _do(self, action: Any) -> None:
        try:
            action()
            self.message = ""
        except Exception as exc:  # a dead worker, a closed cluster: say so where the user looks
            self.message = f"{type(exc).__name__}: {exc}"
        self.refresh()

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, (ev.WorkerStateChanged, ev.CallFinished)):
            self.refresh()

    def refresh(self) -> None:
        """Redraw the status line: what is armed, who is slow, what chaos did last."""
        chaos = self.cluster.chaos
        lines = [html.escape(chaos.describe())]
        if chaos.armed:
            lines[0] += " (a running cell blocks these buttons, so armed actions fire during the next call)"
        if chaos.log:
            lines.append(f"last: {html.escape(chaos.log[-1])}")
        if self.message:
            lines.append(f'<span style="color:#dc322f">{html.escape(self.message)}</span>')
        self.status.value = "<br>".join(lines)

    def close(self) -> None:
        self._unsubscribe()


def chaos_controls(cluster: Cluster) -> widgets.Widget:
    """A worker dropdown, "after N slices", and kill / slow down / drop connection / clear buttons.

    The returned VBox carries its ``ChaosControls`` as ``.controls`` (tests click its buttons).
    """
    controls = ChaosControls(cluster)
    box = controls.box
    box.controls = controls
    return box
