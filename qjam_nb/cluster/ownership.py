"""Who may use a cluster: the process that made it, and one call at a time.

The fork rule. A cluster belongs to the process that made it. A forked child
(``os.fork``, ``multiprocessing``'s fork start method) gets a copy of it, but
not its threads: a lock one of them held stays held in the child for ever,
and the workers' pipes and connections are the parent's, in the middle of
the parent's calls. So in a child every use raises ``ForkedClusterError`` (it
names the parent and says to make a new ``Cluster`` there), checked before
anything is sent or any lock taken; ``shutdown()`` and ``atexit`` only mark
the child's copy closed. The transports close the child's copies of the
workers' pipes and sockets at the fork itself (``transport.base.forget_in_children``).

The thread rule. One call at a time: ``map``, ``restart`` and ``shutdown``
take the cluster's turn, so a second thread waits for the running call to end
(bounded by that call's ``timeout=``), then runs. The thread running a call
may not start another (an observer calling ``map``: it would wait for itself):
``ReentrantCallError``. Chaos acts at once only between calls; during one it
arms itself for the call's next slice.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ..errors import ForkedClusterError, ReentrantCallError

F = TypeVar("F", bound=Callable[..., Any])


class Ownership:
    """The process a cluster belongs to, and the turn its calls take."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._turn = threading.Lock()
        self._holder: int | None = None  # the thread whose turn it is (only it sets its own ident)

    def forked(self) -> bool:
        """True in a forked child of the process that made the cluster."""
        return os.getpid() != self.pid

    def check(self) -> None:
        """Raise ``ForkedClusterError`` in a forked child; takes no lock."""
        if os.getpid() != self.pid:
            raise ForkedClusterError(
                f"this cluster belongs to process {self.pid}, which made it; this is a child forked from it "
                f"(pid {os.getpid()}: os.fork or multiprocessing), where its workers cannot be used. Make a new "
                "Cluster(...) in the child (or use the 'spawn' start method of multiprocessing)"
            )

    @contextmanager
    def turn(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the cluster for ``what``: wait (up to ``timeout`` s, then TimeoutError) while another
        thread runs a call; ``ReentrantCallError`` on the thread that runs one."""
        self.take(what, timeout)
        try:
            yield
        finally:
            self.give_back()

    def take(self, what: str, timeout: float | None = None) -> None:
        """The turn, as ``turn`` takes it (without a context manager: ``map`` takes it every call)."""
        if os.getpid() != self.pid:
            self.check()
        me = threading.get_ident()
        if self._holder == me:
            raise ReentrantCallError(
                f"{what}() was called on the thread that is running a call of this cluster (from an observer, "
                "or a callback it runs): it would wait for that call, which waits for it. Call it after the "
                "running call returns, or from another thread"
            )
        if not self._turn.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"{what}(): a call of this cluster still runs on another thread")
        self._holder = me

    def give_back(self) -> None:
        self._holder = None
        self._turn.release()

    @contextmanager
    def turn_if_free(self) -> Iterator[bool]:
        """Hold the cluster if no call runs (True), else do not wait (False): for chaos, which arms instead."""
        self.check()
        if self._holder == threading.get_ident() or not self._turn.acquire(blocking=False):
            yield False
            return
        try:
            self._holder = threading.get_ident()
            yield True
        finally:
            self._holder = None
            self._turn.release()


def one_at_a_time(method: F) -> F:
    """Run a cluster method in the cluster's turn (``self._ownership``), after the fork check."""

    name = method.__name__

    @functools.wraps(method)
    def in_turn(self: Any, *args: Any, **kwargs: Any) -> Any:
        ownership = self._ownership
        ownership.take(name)
        try:
            return method(self, *args, **kwargs)
        finally:
            ownership.give_back()

    return in_turn  # type: ignore[return-value]
