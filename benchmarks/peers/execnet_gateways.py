"""execnet: N gateways (popen or ssh), each running one loop that answers messages."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .base import System

EXECNET_WORKER = """
import numpy as np
for kind, payload in channel:
    if kind == "inc":
        channel.send([x + 1 for x in payload])
    elif kind == "plus1":
        channel.send((np.frombuffer(payload) + 1.0).tobytes())
    elif kind == "sum":
        channel.send(float(np.frombuffer(payload).sum()))
    elif kind == "tiny":
        channel.send(sum(payload))
    elif kind == "one":
        channel.send(1)
"""


class Execnet(System):
    """N gateways, each running one loop that answers messages (execnet channels carry bytes, not arrays)."""

    tiny_note = "one message per slice, all sent before the answers are read"

    def __init__(self, spec: str, name: str, n: int = 2) -> None:
        import execnet

        self.name = name
        if spec.startswith("ssh="):  # execnet always runs ``ssh -C``: zlib on the bulk data, ~10 MB/s here
            self.dataset_fraction = 10
        self.group = execnet.Group()
        try:
            self.gws = [self.group.makegateway(spec) for _ in range(n)]
            self.chans = [gw.remote_exec(EXECNET_WORKER) for gw in self.gws]
        except BaseException:
            self.group.terminate(timeout=5)
            raise

    def _each(self, kind: str, payloads: list) -> list:
        for chan, p in zip(self.chans, payloads, strict=True):
            chan.send((kind, p))
        return [chan.receive() for chan in self.chans]

    def trivial(self) -> list:
        a, b = self._each("inc", [[1], [2]])
        return a + b

    def params(self, theta: np.ndarray) -> np.ndarray:
        blob = theta.tobytes()
        a, b = self._each("plus1", [blob, blob])
        return np.frombuffer(a) + np.frombuffer(b)

    def dataset(self, x: np.ndarray, h: int) -> float:
        return sum(self._each("sum", [x[:h].tobytes(), x[h:].tobytes()]))

    def tiny(self, items: list[int]) -> int:
        n = len(self.chans)
        for i, item in enumerate(items):
            self.chans[i % n].send(("tiny", [item]))
        counts = [len(range(k, len(items), n)) for k in range(n)]
        return sum(chan.receive() for chan, c in zip(self.chans, counts, strict=True) for _ in range(c))

    def round_trip(self) -> Any:
        return self._each("one", [None] * len(self.chans))

    def close(self) -> None:
        for chan in self.chans:
            with contextlib.suppress(Exception):
                chan.close()
        self.group.terminate(timeout=5)
