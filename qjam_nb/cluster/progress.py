"""A text progress bar for calls, on tqdm's plain-text core.

It lives in the cluster layer because ``tqdm.std`` is plain text (no IPython,
no ipywidgets); the notebook widgets are in ``qjam_nb.ui``. Like every view, it
only watches events.
"""

from __future__ import annotations

import sys

from tqdm.std import tqdm

from .. import events as ev


class TqdmProgress:
    """Observer: one tqdm bar per call, shown only once a call has run ``delay`` seconds."""

    kinds = frozenset({ev.CallStarted, ev.SliceDone, ev.CallFinished})

    def __init__(self, file=None, delay: float = 0.5, **tqdm_options) -> None:
        self.file = file
        self.delay = delay
        self.tqdm_options = tqdm_options
        self.bar: tqdm | None = None

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.CallStarted):
            self._close()
            self.bar = tqdm(
                total=event.n_slices, desc=f"qjam call {event.call}", unit="slice",
                file=self.file or sys.stderr, delay=self.delay, leave=False, **self.tqdm_options,
            )
        elif isinstance(event, ev.SliceDone) and self.bar is not None:
            self.bar.update(1)
        elif isinstance(event, ev.CallFinished):
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
