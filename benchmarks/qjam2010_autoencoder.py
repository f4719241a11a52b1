"""qjam's own sparse autoencoder through qjam 2010's API: ``Master.run`` on ``local:2``, per evaluation.

qjam 2010 ran its paper workload as ``master.run(module, theta, dataset)``:
each worker computed the cost and gradient of its contiguous half of the
patches (the sparsity penalty over its half), and the master added them up.
This row times that call against one process computing the cost and gradient
of all the patches with numpy's default threads, in the same run, twice over:
with the workers' BLAS threads set by qjam_nb (one core's share each) and
with them left alone (every worker's BLAS as many threads as the machine has
cores: on 2 cores, 4 threads fighting over them).

Run ``python benchmarks/qjam2010_autoencoder.py [SIZES...] [--evals N]`` for
the table (default 1k, 10k and 100k patches); ``run.py``'s ``qjam2010``
group runs ``measure`` and prints it beside the targets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sparse_autoencoder as sa  # noqa: E402

ONE_PROCESS = "one process, numpy (default threads)"
SET = "Master.run, 2 workers, BLAS threads set by qjam_nb"
LEFT = "Master.run, 2 workers, BLAS threads left alone"


def qjam_module() -> types.ModuleType:
    """What qjam 2010 was handed: a module with ``mapfunc`` (and the default reduce: an element-wise sum)."""
    module = types.ModuleType("qjam_sparse_autoencoder")

    def mapfunc(theta, xs):
        import sparse_autoencoder

        cost, grad = sparse_autoencoder.cost_and_grad(theta, xs)
        return [cost, grad]

    module.mapfunc = mapfunc
    return module


def _time(fn, evals: int) -> list[float]:
    samples = []
    for _ in range(evals):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def _stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def measure(sizes: Sequence[int] = (1000, 10000, 100000), evals: int | None = None, verbose: bool = False) -> dict:
    """{"rows": {n: {system: stats}}, "blas": {system: what each worker got}} for each size."""
    from qjam_nb.qjam2010 import Master, NumpyMatrixDataSet, RemoteWorker

    theta = sa.init_theta()
    module = qjam_module()
    rows: dict[int, dict] = {}
    blas: dict[str, list] = {}
    masters = {SET: Master([RemoteWorker("local")] * 2, echo=False),
               LEFT: Master([RemoteWorker("local")] * 2, echo=False, blas_threads=False)}
    try:
        for n in sizes:
            X = sa.make_patches(n)
            X.setflags(write=False)
            k = evals or (20 if n <= 10000 else 8)
            cells = {ONE_PROCESS: _stats(_time(lambda X=X: sa.cost_and_grad(theta, X), k))}
            for name, master in masters.items():
                dataset = NumpyMatrixDataSet(X)
                master.run(module, theta, dataset)  # ships the halves; later runs find them cached
                cells[name] = _stats(_time(lambda master=master, dataset=dataset: master.run(module, theta, dataset),
                                           k))
                blas[name] = [(w.hello.get("blas") or {}).get("threads") for w in master.cluster.workers]
            rows[n] = cells
            if verbose:
                print(format_row(n, cells), flush=True)
    finally:
        for master in masters.values():
            master.shutdown()
    return {"rows": rows, "blas": blas}


def format_row(n: int, cells: dict) -> str:
    one = cells[ONE_PROCESS]["median"]
    parts = [f"{n:>7} patches: one process {one * 1e3:8.2f} ms"]
    for name in (SET, LEFT):
        if name in cells:
            t = cells[name]["median"]
            parts.append(f"{name.split(', ', 2)[2]} {t * 1e3:8.2f} ms ({one / t:.2f}x)")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--evals", type=int, default=None, help="evaluations timed per size and system")
    args = parser.parse_args(argv)
    return measure(args.sizes, args.evals, verbose=True)


if __name__ == "__main__":
    main()
