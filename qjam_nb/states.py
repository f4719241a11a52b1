"""Worker states and the transitions between them, in one table.

The cluster moves a worker only along these edges (``transition`` refuses any
other), and the widget and the docs read the same names.
"""

from __future__ import annotations

STARTING = "starting"
IDLE = "idle"
BUSY = "busy"
UNRESPONSIVE = "unresponsive"  # silent past the liveness bound and not using CPU: killed next
DEAD = "dead"
STOPPED = "stopped"


#: state -> the states it may move to
TRANSITIONS: dict[str, frozenset[str]] = {
    STARTING: frozenset({IDLE, DEAD, STOPPED}),
    IDLE: frozenset({BUSY, DEAD, STOPPED}),
    BUSY: frozenset({IDLE, UNRESPONSIVE, DEAD, STOPPED}),
    UNRESPONSIVE: frozenset({DEAD, STOPPED}),
    DEAD: frozenset({STARTING, STOPPED}),
    STOPPED: frozenset(),
}


def transition(current: str, new: str) -> str:
    """Return ``new`` if a worker in ``current`` may move there, else raise."""
    if new not in TRANSITIONS[current]:
        raise RuntimeError(f"a worker cannot go from {current} to {new}")
    return new
