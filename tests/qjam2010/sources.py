"""qjam 2010's examples and its autoencoder cost, in our own words, and a loader for modules only the
master can import: shared by the Master and the example tests (tests/qjam2010, tests/ssh)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
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


#: qjam 2010's examples (its ``examples/`` and ``bin/qjam-run.py`` runs), each a module with a ``mapfunc``.
EXAMPLES = {
    "newton_sqrt": """
        def mapfunc(n, x):
            x = x[0]
            return x - (x * x - n) / (2 * x)
    """,
    "sum_dataset": """
        def mapfunc(params, dataset):
            return dataset.sum()
    """,
    "char_count": """
        def charcount(params, txtlines):
            counts = [0] * 26
            for c in "".join(txtlines).lower():
                if "a" <= c <= "z":
                    counts[ord(c) - ord("a")] += 1
            return counts

        mapfunc = charcount
    """,
    "multiply_sum": """
        def multiply_sum(theta, xs):
            return sum([theta * x for x in xs])

        mapfunc = multiply_sum
    """,
    "numpy_inner_prod": """
        import numpy

        def inner_prod(theta, xs):
            return sum([numpy.dot(numpy.transpose(theta), xi) for xi in xs])

        x = numpy.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]])
        theta = numpy.array([2, 4])
        mapfunc = inner_prod
    """,
    "sequences": """
        three = 3
        onetoten = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    """,
}


@contextmanager
def imported_examples(root: Path, prefix: str) -> Iterator[dict]:
    """EXAMPLES written to files under ``root`` as modules ``<prefix><name>``, imported (only here: the
    workers get their code by value), and forgotten afterwards."""
    for name, source in EXAMPLES.items():
        (root / f"{prefix}{name}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(root))
    try:
        yield {name: importlib.import_module(f"{prefix}{name}") for name in EXAMPLES}
    finally:
        sys.path.remove(str(root))
        for name in EXAMPLES:
            sys.modules.pop(f"{prefix}{name}", None)
