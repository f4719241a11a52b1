"""qjam 2010's autoencoder cost in our own words, and a loader for modules only the master can import,
shared by the Master and the example tests."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

#: qjam 2010's examples/saecost.py, in our own words: tanh units, a sparsity penalty on the mean
#: activation of the slice it is given (so a per-worker penalty on 2 workers).
SAECOST = """
import numpy as np

VISIBLE, HIDDEN = 64, 30
LAMBDA_W, LAMBDA_P, RHO = 0.002, 4, 0.002


def mapfunc(WB, X):
    m = X.shape[0]
    n1 = HIDDEN * VISIBLE
    W1 = WB[:n1].reshape(HIDDEN, VISIBLE)
    W2 = WB[n1:2 * n1].reshape(VISIBLE, HIDDEN)
    b1 = WB[2 * n1:2 * n1 + HIDDEN].reshape(HIDDEN, 1)
    b2 = WB[2 * n1 + HIDDEN:].reshape(VISIBLE, 1)
    a1 = X.T
    a2 = np.tanh(W1 @ a1 + b1)
    a3 = np.tanh(W2 @ a2 + b2)
    p = (0.5 * (1 + a2)).sum(axis=1) / m
    kl = RHO * np.log(RHO / p) + (1 - RHO) * np.log((1 - RHO) / (1 - p))
    cost = 0.5 / m * ((a1 - a3) ** 2).sum() + 0.5 * LAMBDA_W * ((W1 ** 2).sum() + (W2 ** 2).sum()) \\
        + LAMBDA_P * kl.sum()
    d3 = -(a1 - a3) * (1 - a3 ** 2)
    d2 = (W2.T @ d3) * (1 - a2 ** 2)
    dkl = ((1 - RHO) / (1 - p) - RHO / p).reshape(HIDDEN, 1) * (0.5 / m) * (1 - a2 ** 2)
    gW1 = d2 @ a1.T / m + LAMBDA_W * W1 + LAMBDA_P * dkl @ a1.T
    gb1 = d2.sum(axis=1) / m + LAMBDA_P * dkl.sum(axis=1)
    gW2 = d3 @ a2.T / m + LAMBDA_W * W2
    gb2 = d3.sum(axis=1) / m
    return cost, np.concatenate([gW1.ravel(), gW2.ravel(), gb1, gb2])
"""


def load(tmp_path: Path, name: str, source: str):
    """Import ``source`` from a file only this process can import (the workers get it by value)."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
