"""qjam's paper workload: a sparse autoencoder trained with L-BFGS, one ``cluster.map`` per evaluation.

The model of the qjam report (2010, Table II): 8x8 image patches, one patch
per row, through a 64 -> 30 -> 64 network with tanh on both layers::

    a2 = tanh(X W1^T + b1)        (N, 30)
    a3 = tanh(a2 W2^T + b2)       (N, 64)

and the cost::

    J = (0.5/N) sum ||x - a3||^2  +  0.5 lamW (||W1||^2 + ||W2||^2)  +  lamP sum_j KL(rho || p_j)

with ``lamW = 0.002``, ``lamP = 4``, ``rho = 0.002``. tanh units live in
(-1, 1), so a unit's mean activation is mapped to (0, 1) before the
Kullback-Leibler penalty: ``p_j = mean_n (a2[n, j] + 1) / 2``, the fraction of
the way from "off" (-1) to "on" (+1). ``KL(rho || p) = rho log(rho/p) + (1 - rho)
log((1 - rho)/(1 - p))``. theta packs W1 (30x64), W2 (64x30), b1 (30) and b2
(64), row-major, in that order: 3,934 parameters.

How one evaluation is cut up. The sparsity term couples every patch through
the global ``p``, so a slice cannot finish its share of the gradient alone.
But backpropagation through that term is linear in a per-unit coefficient
``s_j = lamP * dKL/dp_j`` that depends on ``p`` only::

    delta2 = (delta3 W2 + s / 2) * (1 - a2^2)
    dJ/dW1 = (1/N) [ ((delta3 W2) * (1 - a2^2))^T X  +  diag(s / 2) (1 - a2^2)^T X ] + lamW W1

so ``slice_sums`` returns, for its rows, the sums that do not involve ``s``
(squared error, hidden activations, the reconstruction part of every
gradient block, and ``(1 - a2^2)^T X`` with its column sums), and ``combine``
on the master forms ``p``, then ``s``, then the exact whole-dataset cost and
gradient. The slices are fixed by the data size alone (``slice_size_for``: 2 to
8 slices, an even number) and qjam_nb reduces
results in slice order, so the objective, and L-BFGS's path, are bit-for-bit
the same on 1 worker or on 2.

``cost_and_grad`` is the plain one-process textbook version (it forms
``delta2`` with ``s`` directly); ``measure`` times it against 1 and 2 workers.

Run ``python benchmarks/sparse_autoencoder.py [SIZES...] [--evals N] [--json PATH]``
for the table (default 1k, 10k and 100k patches; about a minute). Importing this
module frees one 16 MiB block (``raise_malloc_thresholds``): see there why.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

VISIBLE, HIDDEN = 64, 30
LAMBDA_W, LAMBDA_P, RHO = 0.002, 4.0, 0.002
N_PARAMS = 2 * HIDDEN * VISIBLE + HIDDEN + VISIBLE  # 3,934

#: Slicing (``slice_size_for``): an even number of slices of at least ``MIN_SLICE_ROWS`` rows,
#: 2 to ``MAX_SLICES`` of them. Each slice costs the master a message and a result of 47 KB,
#: so few are better, but qjam_nb places a slice for good on the worker that takes it first,
#: and its first call hands out 4 slices per worker at once: up to 8 slices are split evenly
#: over 2 workers (16 slices of 6,250 rows came out 9/7: 66 ms per evaluation against 54).
MIN_SLICE_ROWS = 5000
MAX_SLICES = 8

#: Rows ``slice_sums`` works on at a time, whatever the slice's size: their temporaries
#: (about 2 KiB a row) stay in a core's 1 MiB L2 cache.
BLOCK_ROWS = 500

#: qjam's report, seconds per function evaluation: {patches: (1 worker, 2 workers)}.
QJAM_REPORTED = {1000: (0.146, 0.175), 10000: (0.731, 0.332), 100000: (10.03, 4.68)}

#: Environment that keeps BLAS (OpenBLAS, MKL, OpenMP, BLIS, Accelerate) to one thread in a worker.
ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                  "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

#: Where the last ``make_patches`` call took its images from ("sklearn" or "synthetic").
LAST_SOURCE: str | None = None

SKLEARN_IMAGES = ("china.jpg", "flower.jpg")


def raise_malloc_thresholds() -> None:
    """Free one 16 MiB block, so glibc's malloc keeps temporaries up to 16 MiB in its heap.

    A fresh process (a new worker) starts at glibc's defaults: every block of 128 KiB or more
    is mmap'ed and given back when freed, and the heap is trimmed past 256 KiB, so each of
    ``slice_sums``' temporaries (250 KiB at 500 rows) costs its page faults again on every
    call: a 500-row slice took 0.79 ms in a new worker against 0.48 ms in a process that had
    already freed a large block. Freeing an mmap'ed block raises glibc's dynamic thresholds
    to its size (mmap) and twice that (trim). Run at import, in the master and in every
    worker alike; elsewhere than glibc it costs one allocation and does nothing else.
    """
    block = np.empty(2 << 20)
    del block


raise_malloc_thresholds()

# -- theta -------------------------------------------------------------------------------------

_S1 = HIDDEN * VISIBLE
_S2 = 2 * HIDDEN * VISIBLE
_S3 = _S2 + HIDDEN


def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Views ``W1`` (30x64), ``W2`` (64x30), ``b1`` (30), ``b2`` (64) of a flat theta."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (N_PARAMS,):
        raise ValueError(f"theta must be a vector of {N_PARAMS} float64s, not shape {theta.shape}")
    return (theta[:_S1].reshape(HIDDEN, VISIBLE), theta[_S1:_S2].reshape(VISIBLE, HIDDEN),
            theta[_S2:_S3], theta[_S3:])


def pack(W1: np.ndarray, W2: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ravel(W1), np.ravel(W2), np.ravel(b1), np.ravel(b2)]).astype(np.float64)


def init_theta(seed: int = 0) -> np.ndarray:
    """The classic initialisation: weights uniform in +-sqrt(6 / (64 + 30 + 1)), biases 0."""
    r = math.sqrt(6.0 / (VISIBLE + HIDDEN + 1))
    rng = np.random.default_rng(seed)
    W1 = rng.uniform(-r, r, (HIDDEN, VISIBLE))
    W2 = rng.uniform(-r, r, (VISIBLE, HIDDEN))
    return pack(W1, W2, np.zeros(HIDDEN), np.zeros(VISIBLE))


# -- patches -----------------------------------------------------------------------------------

def sklearn_image_paths() -> list[Path] | None:
    """The two JPEGs scikit-learn ships (what ``load_sample_images()`` reads), if they and pillow
    are installed; found without importing scikit-learn (that import alone takes about a second)."""
    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations or find_spec("PIL") is None:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
    paths = [folder / name for name in SKLEARN_IMAGES]
    return paths if all(p.is_file() for p in paths) else None


def synthetic_images(seed: int = 0, count: int = 2, size: int = 256) -> list[np.ndarray]:
    """Smooth random gray images in [0, 1]: sums of random oriented sinusoids with a 1/f spectrum,
    random gaussian blobs and a few soft-edged bars, so patches hold edges and gradients."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = []
    for _ in range(count):
        img = np.zeros((size, size))
        for _ in range(40):
            freq = rng.uniform(0.01, 0.25)
            angle = rng.uniform(0, np.pi)
            phase = rng.uniform(0, 2 * np.pi)
            img += (0.02 / freq) * np.cos(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        for _ in range(30):
            cy, cx = rng.uniform(0, size, 2)
            sigma = rng.uniform(3, 25)
            img += rng.normal(0, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
        for _ in range(12):
            angle = rng.uniform(0, np.pi)
            offset = rng.uniform(-size / 2, size / 2)
            dist = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle) - offset
            img += rng.normal(0, 1.0) / (1 + np.exp(-dist / rng.uniform(0.5, 3)))
        img -= img.min()
        images.append(img / img.max())
    return images


def load_images(source: str = "auto") -> tuple[list[np.ndarray], str]:
    """Gray images in [0, 1] and the name of their source: ``"sklearn"`` (scikit-learn's china.jpg
    and flower.jpg, read with pillow) or ``"synthetic"``. ``source="auto"`` takes sklearn's when
    installed, else the synthetic set."""
    if source not in ("auto", "sklearn", "synthetic"):
        raise ValueError(f"source must be 'auto', 'sklearn' or 'synthetic', not {source!r}")
    paths = sklearn_image_paths() if source != "synthetic" else None
    if paths is None:
        if source == "sklearn":
            raise RuntimeError("scikit-learn's sample images need scikit-learn and pillow: "
                               "pip install scikit-learn pillow")
        return synthetic_images(), "synthetic"
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("L"), dtype=np.float64) / 255.0)
    return images, "sklearn"


def make_patches(n: int, seed: int = 0, source: str = "auto") -> np.ndarray:
    """``n`` 8x8 patches, one per row, shape (n, 64) float64, normalised as the classic exercise does.

    Patches are cut at random places (fixed ``seed``) from scikit-learn's two sample photographs
    (china.jpg, flower.jpg, in gray) when scikit-learn and pillow are installed, else from
    ``synthetic_images()`` (fixed seed); ``source`` forces one ("sklearn" or "synthetic"), and the
    module attribute ``LAST_SOURCE`` tells which was used. Normalisation: each patch loses its
    mean (brightness), values are clipped to +-3 standard deviations of all the patches and
    rescaled to [-0.9, 0.9], inside tanh's output range.
    """
    global LAST_SOURCE
    images, LAST_SOURCE = load_images(source)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(images), n)
    patches = np.empty((n, VISIBLE))
    for k, img in enumerate(images):
        rows = np.flatnonzero(which == k)
        ys = rng.integers(0, img.shape[0] - 8 + 1, rows.size)
        xs = rng.integers(0, img.shape[1] - 8 + 1, rows.size)
        windows = np.lib.stride_tricks.sliding_window_view(img, (8, 8))
        patches[rows] = windows[ys, xs].reshape(rows.size, VISIBLE)
    patches -= patches.mean(axis=1, keepdims=True)
    limit = 3 * patches.std()
    np.clip(patches, -limit, limit, out=patches)
    patches *= 0.9 / limit
    return patches


# -- the model, in one process -----------------------------------------------------------------

def kl(rho: float, p: np.ndarray) -> np.ndarray:
    return rho * np.log(rho / p) + (1 - rho) * np.log((1 - rho) / (1 - p))


def cost_and_grad(theta: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """The whole-dataset cost and its analytic gradient, textbook backpropagation in plain numpy."""
    W1, W2, b1, b2 = unpack(theta)
    n = X.shape[0]
    a2 = np.tanh(X @ W1.T + b1)
    a3 = np.tanh(a2 @ W2.T + b2)
    p = 0.5 * (a2.mean(axis=0) + 1.0)
    err = a3 - X
    cost = (0.5 / n) * np.vdot(err, err) + 0.5 * LAMBDA_W * (np.vdot(W1, W1) + np.vdot(W2, W2)) \
        + LAMBDA_P * kl(RHO, p).sum()
    s = LAMBDA_P * (-RHO / p + (1 - RHO) / (1 - p))   # lamP dKL/dp, per hidden unit
    d3 = err * (1.0 - a3 * a3)
    d2 = (d3 @ W2 + 0.5 * s) * (1.0 - a2 * a2)      # dp/da2 = 1/(2N)
    grad = pack(d2.T @ X / n + LAMBDA_W * W1, d3.T @ a2 / n + LAMBDA_W * W2,
                d2.sum(axis=0) / n, d3.sum(axis=0) / n)
    return float(cost), grad


def numerical_gradient(fun: Callable[[np.ndarray], float], theta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Central differences, one parameter at a time."""
    grad = np.empty_like(theta)
    probe = theta.copy()
    for i in range(theta.size):
        probe[i] = theta[i] + eps
        up = fun(probe)
        probe[i] = theta[i] - eps
        down = fun(probe)
        probe[i] = theta[i]
        grad[i] = (up - down) / (2 * eps)
    return grad


def check_gradient(n: int = 20, seed: int = 0, fun: Callable | None = None) -> float:
    """Relative difference ``||g - g_num|| / ||g + g_num||`` between the analytic gradient of
    ``fun`` (default ``cost_and_grad``) and central differences, on ``n`` patches and a random
    theta (about 1e-10 when the gradient is right)."""
    fun = fun or cost_and_grad
    X = make_patches(n, seed=seed)
    theta = init_theta(seed) + np.random.default_rng(seed + 1).normal(0, 0.05, N_PARAMS)
    _, grad = fun(theta, X)
    num = numerical_gradient(lambda t: fun(t, X)[0], theta)
    return float(np.linalg.norm(grad - num) / np.linalg.norm(grad + num))


# -- the model, cut into slices ----------------------------------------------------------------

# Layout of the vector that slice_sums returns (and qjam_nb adds up, slice by slice).
_SSE = 0                                    # sum ||a3 - x||^2
_A2 = slice(1, 1 + HIDDEN)                  # sum of a2, per hidden unit
_D2 = slice(_A2.stop, _A2.stop + HIDDEN)    # sum of (delta3 W2) * g2           (g2 = 1 - a2^2)
_G2 = slice(_D2.stop, _D2.stop + HIDDEN)    # sum of g2
_HX = slice(_G2.stop, _G2.stop + 2 * _S1)   # [(delta3 W2) * g2 ; g2]^T X       (60 x 64)
_W2 = slice(_HX.stop, _HX.stop + _S1)       # delta3^T a2                       (64 x 30)
_B2 = slice(_W2.stop, _W2.stop + VISIBLE)   # sum of delta3
SUMS_SIZE = _B2.stop


def slice_sums(theta: np.ndarray, xs: np.ndarray, block: int | None = None) -> np.ndarray:
    """The mapfunc: one slice's sums, a float64 vector of ``SUMS_SIZE``; ``combine`` finishes them.

    Everything here is a sum over the slice's rows, so the sums of all the slices are the sums
    over the whole dataset; nothing depends on the global mean activation ``p``. The slice is
    worked through in blocks of ``block`` rows (default ``BLOCK_ROWS``), whose temporaries stay
    in the core's cache, and the blocks' sums are added in order: the result depends on the
    slice alone.
    """
    W1, W2, b1, b2 = unpack(theta)
    block = block or BLOCK_ROWS
    out = _block_sums(W1, W2, b1, b2, xs[:block])
    for start in range(block, xs.shape[0], block):
        out += _block_sums(W1, W2, b1, b2, xs[start:start + block])
    return out


def _block_sums(W1: np.ndarray, W2: np.ndarray, b1: np.ndarray, b2: np.ndarray, xs: np.ndarray) -> np.ndarray:
    n = xs.shape[0]
    out = np.empty(SUMS_SIZE)
    a2 = xs @ W1.T
    a2 += b1
    np.tanh(a2, out=a2)
    a3 = a2 @ W2.T
    a3 += b2
    np.tanh(a3, out=a3)
    err = a3 - xs
    out[_SSE] = np.vdot(err, err)
    np.multiply(a3, a3, out=a3)
    np.subtract(1.0, a3, out=a3)
    d3 = np.multiply(err, a3, out=err)                     # delta3 = (a3 - x) * (1 - a3^2)
    h = np.empty((n, 2 * HIDDEN))                           # [ (delta3 W2) * g2 | g2 ]
    g2 = h[:, HIDDEN:]
    np.multiply(a2, a2, out=g2)
    np.subtract(1.0, g2, out=g2)
    np.matmul(d3, W2, out=h[:, :HIDDEN])
    h[:, :HIDDEN] *= g2
    np.matmul(h.T, xs, out=out[_HX].reshape(2 * HIDDEN, VISIBLE))
    np.matmul(d3.T, a2, out=out[_W2].reshape(VISIBLE, HIDDEN))
    h.sum(axis=0, out=out[_D2.start:_G2.stop])
    a2.sum(axis=0, out=out[_A2])
    d3.sum(axis=0, out=out[_B2])
    return out


def combine(sums: np.ndarray, theta: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """The exact whole-dataset cost and gradient from the sums of every slice's ``slice_sums``."""
    W1, W2, _, _ = unpack(theta)
    p = 0.5 * (sums[_A2] / n + 1.0)
    cost = (0.5 / n) * sums[_SSE] + 0.5 * LAMBDA_W * (np.vdot(W1, W1) + np.vdot(W2, W2)) \
        + LAMBDA_P * kl(RHO, p).sum()
    half_s = 0.5 * LAMBDA_P * (-RHO / p + (1 - RHO) / (1 - p))
    hx = sums[_HX].reshape(2 * HIDDEN, VISIBLE)
    gW1 = (hx[:HIDDEN] + half_s[:, None] * hx[HIDDEN:]) / n + LAMBDA_W * W1
    gb1 = (sums[_D2] + half_s * sums[_G2]) / n
    gW2 = sums[_W2].reshape(VISIBLE, HIDDEN) / n + LAMBDA_W * W2
    return float(cost), pack(gW1, gW2, gb1, sums[_B2] / n)


def sliced_cost_and_grad(theta: np.ndarray, X: np.ndarray, slice_size: int | None = None) -> tuple[float, np.ndarray]:
    """What the cluster computes, in this process: ``slice_sums`` per slice, added in slice order."""
    size = slice_size or slice_size_for(len(X))
    total = None
    for start in range(0, len(X), size):
        part = slice_sums(theta, X[start:start + size])
        total = part if total is None else total + part
    return combine(total, theta, len(X))


def slice_size_for(n: int) -> int:
    """Rows per slice for ``n`` rows, from ``n`` alone, never from the workers: an even number
    of slices (2 at least, so that two workers both work; at most ``MAX_SLICES``) of at least
    ``MIN_SLICE_ROWS`` rows. 1,000 rows -> 2 slices of 500; 10,000 -> 2 of 5,000; 30,000 -> 6
    of 5,000; 100,000 -> 8 of 12,500. Within a slice, ``slice_sums`` works in cache-sized blocks."""
    n_slices = max(2, min(MAX_SLICES, 2 * (n // (2 * MIN_SLICE_ROWS))))
    return max(1, math.ceil(n / n_slices))


def evaluate_with(cluster: Any, X: np.ndarray, slice_size: int | None = None) -> Callable[[np.ndarray], tuple]:
    """``theta -> (cost, grad)``: one ``cluster.map(slice_sums, theta, X)`` per evaluation.

    The map runs over a read-only copy of ``X`` (``X`` itself when it is already a read-only
    float64 array), so qjam_nb hashes its slices on the first call only instead of on every one.
    ``slice_sums`` travels by reference (a few dozen bytes): the workers import this module.
    Local workers can, since they get the master's ``sys.path``; ssh workers would need this file
    on their path too.
    """
    X = np.asarray(X)
    if X.flags.writeable or X.dtype != np.float64 or not X.flags.c_contiguous:
        X = np.array(X, dtype=np.float64, order="C")
        X.setflags(write=False)
    size = slice_size or slice_size_for(len(X))

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        sums = cluster.map(slice_sums, theta, X, slice_size=size)
        return combine(sums, theta, len(X))

    return fun


def train(fun: Callable[[np.ndarray], tuple], theta0: np.ndarray, maxiter: int = 400,
          callback: Callable | None = None) -> Any:
    """Minimise with L-BFGS-B (``jac=True``: ``fun`` returns cost and gradient); a scipy OptimizeResult."""
    from scipy.optimize import minimize

    return minimize(fun, np.asarray(theta0, dtype=np.float64), jac=True, method="L-BFGS-B",
                    options={"maxiter": maxiter}, callback=callback)


# -- the floor: the same work in two processes, bytes over pipes, no framework ---------------------

_RAW_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import sparse_autoencoder as sa

def read(n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(0, [view[got:]])
        if not k:
            sys.exit(0)
        got += k
    return buf

rows, size = np.frombuffer(read(16), dtype=np.int64)
xs = np.frombuffer(read(int(rows) * sa.VISIBLE * 8)).reshape(-1, sa.VISIBLE).copy()
slices = [xs[i:i + int(size)] for i in range(0, int(rows), int(size))]
while True:
    theta = np.frombuffer(read(sa.N_PARAMS * 8))
    os.write(1, b"".join(sa.slice_sums(theta, part).tobytes() for part in slices))
"""


class RawPipeWorkers:
    """``slice_sums`` in ``n`` child processes fed raw bytes over pipes: the floor of any design with
    separate worker processes (what ``cluster.map`` costs above it is framing, bookkeeping and
    Python on both sides). Each child holds a run of whole slices (the same slices as the clusters',
    one BLAS thread); theta goes to each as 31 KB of bytes, each slice's sums come back as bytes,
    and they are added in slice order, as qjam_nb reduces: bit-identical to the clusters."""

    def __init__(self, X: np.ndarray, n: int = 2, slice_size: int | None = None) -> None:
        size = slice_size or slice_size_for(len(X))
        starts = list(range(0, len(X), size))
        per = math.ceil(len(starts) / n)
        env = dict(os.environ, **{name: "1" for name in ONE_THREAD_ENV})
        self.children = []
        self.counts = []
        for k in range(n):
            mine = starts[k * per:(k + 1) * per]
            if not mine:
                continue
            rows = np.ascontiguousarray(X[mine[0]:min(len(X), mine[-1] + size)], dtype=np.float64)
            child = subprocess.Popen([sys.executable, "-c", _RAW_CHILD, str(Path(__file__).resolve().parent)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)
            child.stdin.write(np.array([len(rows), size], dtype=np.int64).tobytes() + rows.tobytes())
            self.children.append(child)
            self.counts.append(len(mine))
        self.n_rows = len(X)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        data = theta.tobytes()
        for child in self.children:
            child.stdin.write(data)
        total = None
        for child, count in zip(self.children, self.counts, strict=True):
            parts = np.frombuffer(_read_exactly(child.stdout, count * SUMS_SIZE * 8)).reshape(count, SUMS_SIZE)
            for part in parts:
                total = part.copy() if total is None else total + part
        return combine(total, theta, self.n_rows)

    def close(self) -> None:
        for child in self.children:
            child.stdin.close()
            child.wait(10)


def _read_exactly(stream: Any, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise RuntimeError("a raw-pipe child died: see its stderr above")
        got += k
    return buf


# -- timing ------------------------------------------------------------------------------------

@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Set every BLAS/OpenMP thread-count variable to 1 for processes started inside the block
    (local workers copy the master's environment when they start), and restore them after.
    This process's own numpy keeps its threads: its BLAS read the variables when it loaded."""
    saved = {name: os.environ.get(name) for name in ONE_THREAD_ENV}
    os.environ.update({name: "1" for name in ONE_THREAD_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_cluster(n_workers: int) -> Any:
    """``Cluster(["local:N"])``, quiet: the default ``cluster_factory`` of ``measure``."""
    from qjam_nb import Cluster

    return Cluster([f"local:{n_workers}"], echo=False, progress=False)


def _stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


#: The variants ``measure`` times, in the order it runs them within a round.
ONE_PROCESS, ONE_THREAD, ONE_PROCESS_SLICED = "one process", "one process, 1 thread", "one process, sliced"
RAW_PIPES = "raw pipes, 2 processes"


def measure(cluster_factory: Callable[[int], Any] | None = None, sizes: Sequence[int] = (1000, 10000, 100000),
            evals: int = 15, workers: Sequence[int] = (1, 2), seed: int = 0, settle: float = 0.2,
            bursts: int = 3, verbose: bool = True, raw: bool = True) -> dict:
    """Seconds per function evaluation: one process versus 1 and 2 workers, at each size.

    Variants, each a function theta -> (cost, grad) on the same patches:

    * ``"one process"``: ``cost_and_grad`` here, numpy's default threading (the baseline);
    * ``"one process, 1 thread"``: the same with BLAS held to one thread (``threadpoolctl``; left
      out when it is not installed): what one worker's core can do, and a baseline that does
      not suffer when another program keeps the second core busy (a BLAS call on two threads
      then waits for the slower one);
    * ``"one process, sliced"``: ``sliced_cost_and_grad`` here, the workers' code and slices
      run one after the other (shows what slicing alone does to the time, e.g. cache effects);
    * ``"1 worker"``, ``"2 workers"``: ``evaluate_with(cluster, X)``, one ``cluster.map`` each.
    * ``"raw pipes, 2 processes"`` (``raw=True``): ``RawPipeWorkers``, the same slices in two child
      processes fed bytes over pipes, no framework: the floor of any multi-process design.

    ``cluster_factory(n)`` returns a started cluster of ``n`` workers (default ``local_cluster``:
    ``Cluster(["local:n"], echo=False)``). It is called inside ``one_blas_thread()``, so local
    workers keep BLAS to one thread each and two workers do not fight over two cores; the
    environment is restored afterwards. Both clusters stay up for the whole run.

    At each size every variant runs in ``bursts`` bursts of back-to-back evaluations, as in an
    L-BFGS run, ``evals`` timed evaluations in all (each burst starts with one untimed, so the
    first burst ships and caches the clusters' slices), at a new theta each time (the initial
    one slightly perturbed; the same thetas for every variant). The variants take turns burst
    by burst, in a rotating order, so a drift in the machine's speed hits them all. Timing
    single evaluations in turn instead would find every process idle and its caches cold at
    each call, and more than double the clusters' time at 1k patches. After a one-process
    variant it sleeps ``settle`` seconds: OpenBLAS's idle threads spin for about 0.1 s after
    a call and would otherwise take a core from the workers. The variants must agree (relative
    1e-9) and the clusters' (and the raw pipes') costs and gradients must be bit-identical, on the first and the
    last evaluation of every burst.

    Returns ``{"sizes": [...], "rows": {N: {variant: {"median", "min", "max", "samples"}}},
    "slices": {N: [number, rows each]}, "qjam": QJAM_REPORTED, "patches": "sklearn" or
    "synthetic", "evals": evals, "blas": str, "bit_identical": True}``, times in seconds;
    ``verbose`` prints each size as it is done, then the table.
    """
    factory = cluster_factory or local_cluster
    try:
        from threadpoolctl import threadpool_limits as limit_blas
    except ImportError:
        limit_blas = None
    labels = {k: f"{k} worker{'s' if k > 1 else ''}" for k in workers}
    clusters: dict[int, Any] = {}
    raw_workers: RawPipeWorkers | None = None
    result: dict = {"sizes": list(sizes), "rows": {}, "slices": {}, "qjam": QJAM_REPORTED, "evals": evals,
                    "blas": _blas_summary(), "bit_identical": True, "cpus": os.cpu_count(),
                    "busy_before": _busy_cores(), "others_busy": {}}
    try:
        with one_blas_thread():
            for k in workers:
                clusters[k] = factory(k)
        for n in sizes:
            X = make_patches(n, seed=seed)
            result["patches"] = LAST_SOURCE
            size = slice_size_for(n)
            result["slices"][n] = [math.ceil(n / size), size]
            variants: dict[str, Callable] = {ONE_PROCESS: lambda t, X=X: cost_and_grad(t, X)}
            if limit_blas is not None:
                variants[ONE_THREAD] = lambda t, X=X: _one_thread(limit_blas, cost_and_grad, t, X)
            variants[ONE_PROCESS_SLICED] = lambda t, X=X: sliced_cost_and_grad(t, X)
            for k in workers:
                variants[labels[k]] = evaluate_with(clusters[k], X)
            if raw:
                with one_blas_thread():
                    raw_workers = RawPipeWorkers(X, 2)
                variants[RAW_PIPES] = raw_workers
            times: dict[str, list[float]] = {name: [] for name in variants}
            rng = np.random.default_rng(seed)
            thetas = [init_theta(seed) + rng.normal(0, 0.01, N_PARAMS) for _ in range(evals + bursts)]
            meter = OthersMeter(list(clusters.values()))
            names = list(variants)
            answers: dict[str, list] = {name: [] for name in names}
            per_burst = [evals // bursts + (b < evals % bursts) for b in range(bursts)]
            for b in range(bursts):
                order = names[b % len(names):] + names[:b % len(names)]
                start = sum(per_burst[:b]) + b
                for name in order:
                    fun = variants[name]
                    for j in range(start, start + per_burst[b] + 1):  # the first one of a burst is not timed
                        t0 = time.perf_counter()
                        answer = fun(thetas[j])
                        elapsed = time.perf_counter() - t0
                        if j > start:
                            times[name].append(elapsed)
                        if b == 0 and j == start or j == start + per_burst[b]:
                            answers[name].append(answer)
                    if name in (ONE_PROCESS, ONE_THREAD, ONE_PROCESS_SLICED):
                        time.sleep(settle)
            for k in range(len(answers[names[0]])):
                _check_agreement(n, {name: answers[name][k] for name in names}, [labels[w] for w in workers])
            if raw:
                raw_workers.close()
                raw_workers = None
            result["rows"][n] = {name: _stats(samples) for name, samples in times.items()}
            result["others_busy"][n] = meter.read()
            if verbose:
                print(format_row(n, result["rows"][n]), flush=True)
    finally:
        for cluster in clusters.values():
            cluster.shutdown()
        if raw_workers is not None:
            raw_workers.close()
    if verbose:
        print(format_table(result))
    return result


def _one_thread(limit_blas: Callable, fun: Callable, theta: np.ndarray, X: np.ndarray) -> tuple:
    with limit_blas(1, user_api="blas"):
        return fun(theta, X)


class OthersMeter:
    """Cores kept busy by other programs while a block runs (Linux ``/proc``; None elsewhere):
    the whole machine's busy CPU time minus this process's and its workers' (their pids from
    the workers' hellos; local workers only), over the block's wall time. The numbers of a
    size measured while it is well above 0 are not worth much on a 2-core machine."""

    def __init__(self, clusters: Sequence[Any]) -> None:
        self.pids = [os.getpid()] + [w.hello.get("pid") for c in clusters for w in getattr(c, "workers", ())
                                     if w.hello.get("pid") and str(getattr(w, "host", "local")) == "local"]
        self.start = self._snapshot()

    @staticmethod
    def _machine_busy() -> int:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait, steal included, in ticks

    def _ours(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (ticks)
        return total

    def _snapshot(self) -> tuple[float, int, int] | None:
        try:
            return time.perf_counter(), self._machine_busy(), self._ours()
        except (OSError, ValueError, IndexError):
            return None

    def read(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return round(max(0.0, others / ticks / max(1e-9, end[0] - self.start[0])), 2)


def _busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other programs kept busy over ``seconds`` (Linux ``/proc/stat``), else None:
    this benchmark's numbers are only worth reading when it is near 0."""
    def ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait
    try:
        total0, idle0 = ticks()
        time.sleep(seconds)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    return round((os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0)), 2)


def _check_agreement(n: int, answers: dict, cluster_labels: list[str]) -> None:
    ref_cost, ref_grad = answers[ONE_PROCESS]
    for name, (cost, grad) in answers.items():
        if not (np.isclose(cost, ref_cost, rtol=1e-9, atol=0) and np.allclose(grad, ref_grad, rtol=1e-7, atol=1e-12)):
            raise AssertionError(f"N={n}: {name} disagrees with the one-process reference ({cost} vs {ref_cost})")
    first = answers[cluster_labels[0]]
    for name in cluster_labels[1:] + ([RAW_PIPES] if RAW_PIPES in answers else []):
        cost, grad = answers[name]
        if cost != first[0] or not np.array_equal(grad, first[1]):
            raise AssertionError(f"N={n}: {name} and {cluster_labels[0]} are not bit-identical")


def _blas_summary() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
                     f"x{i.get('num_threads')}" for i in threadpool_info() if i.get("user_api") == "blas")


def format_row(n: int, row: dict) -> str:
    return f"N={n}: " + ", ".join(f"{name} {stats['median'] * 1e3:.1f} ms" for name, stats in row.items())


def format_table(result: dict) -> str:
    """The measured medians (min-max), in seconds, next to qjam's reported seconds per evaluation."""
    names = list(next(iter(result["rows"].values())).keys()) if result["rows"] else []
    head = f"{'N':>7} | {'slices':>9} | " + " | ".join(f"{name:>21}" for name in names) \
        + f" | {'speed-up':>8} | {'2w/raw':>6} | {'others':>6} | {'qjam 1w':>7} | {'qjam 2w':>7} | {'qjam x':>6}"
    lines = [f"Sparse autoencoder 64-30-64, seconds per L-BFGS function evaluation, median (min-max) of "
             f"{result['evals']}; patches: {result.get('patches')}; BLAS here: {result.get('blas')}; "
             f"cores busy with other programs just before: {result.get('busy_before')}",
             head, "-" * len(head)]
    for n, row in result["rows"].items():
        count, size = result["slices"][n]
        cells = [f"{row[name]['median']:.4f} ({row[name]['min']:.4f}-{row[name]['max']:.4f})" for name in names]
        two = row.get("2 workers")
        speedup = f"{row[ONE_PROCESS]['median'] / two['median']:.2f}x" if two else "-"
        floor = row.get(RAW_PIPES)
        above = f"{two['median'] / floor['median']:.2f}x" if two and floor else "-"
        q1, q2 = result["qjam"].get(n, (None, None))
        lines.append(f"{n:>7} | {f'{count}x{size}':>9} | " + " | ".join(f"{c:>21}" for c in cells)
                     + f" | {speedup:>8} | {above:>6} | {str(result.get('others_busy', {}).get(n, '-')):>6} | "
                     + f"{q1 or '-':>7} | {q2 or '-':>7} | "
                     + (f"{q1 / q2:.2f}x" if q1 else "-").rjust(6))
    lines.append("speed-up = one process / 2 workers (targets: >= 1.7x at 100k, >= 1.5x at 10k, >= 1x at 1k); "
                 "2w/raw = 2 workers / the raw-pipes floor (same slices, bytes over pipes, no framework); "
                 "others = cores other programs kept busy meanwhile (read the row only when near 0); "
                 "qjam x = qjam's 1 worker / its 2 workers (its report, 2010 hardware)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="qjam's paper benchmark: seconds per L-BFGS evaluation "
                                                 "of a sparse autoencoder, one process vs 1 and 2 local workers")
    parser.add_argument("sizes", nargs="*", type=int, default=[1000, 10000, 100000], help="numbers of patches")
    parser.add_argument("--evals", type=int, default=15, help="timed evaluations per size and variant")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = measure(sizes=args.sizes, evals=args.evals)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    # Run as a script, this file is __main__, whose functions cloudpickle ships by value: the
    # workers would never import the module (nor run its import-time malloc setting, which
    # alone doubles their time). Import it by name and run that.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sparse_autoencoder

    sparse_autoencoder.main()
