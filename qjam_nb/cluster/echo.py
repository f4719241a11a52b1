"""Prints what workers print, each line tagged with the worker's name."""

from __future__ import annotations

import sys

from .. import events as ev


class StreamEcho:
    """Observer: writes worker output to this process's stdout/stderr, line by line.

    Partial lines wait for their newline (or for the end of the call), so two
    workers' output never interleaves inside a line.
    """

    kinds = frozenset({ev.StreamOutput, ev.CallFinished})

    def __init__(self) -> None:
        self.partial: dict[tuple[str, str], str] = {}

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamOutput):
            key = (event.worker, event.stream)
            text = self.partial.pop(key, "") + event.text
            *lines, rest = text.split("\n")
            if rest:
                self.partial[key] = rest
            if lines:
                self._write(event.stream, "".join(f"[{event.worker}] {line}\n" for line in lines))
        elif isinstance(event, ev.CallFinished):
            for (worker, stream), rest in sorted(self.partial.items()):
                self._write(stream, f"[{worker}] {rest}\n")
            self.partial.clear()

    @staticmethod
    def _write(stream: str, text: str) -> None:
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write(text)
        out.flush()
