"""qjam's paper workload (benchmarks/sparse_autoencoder.py): the gradient is right, and one
evaluation on the cluster is the exact whole-dataset cost and gradient, bit for bit the same on
1 worker and on 2 (issue 6, point 3).

The module lives in benchmarks/, which is put on ``sys.path`` here, before any cluster starts:
local workers get the master's ``sys.path``, so ``slice_sums`` travels by reference (by name,
a few dozen bytes) and each worker imports the very same file, as the benchmark does. Shipping
it by value would test a different path from the one the benchmark times.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from qjam_nb import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sparse_autoencoder as sae  # noqa: E402

N = 2000


@pytest.fixture(scope="module")
def patches():
    return sae.make_patches(N)


@pytest.fixture(scope="module")
def clusters():
    """A 1-worker and a 2-worker local cluster, each worker's BLAS held to one thread."""
    with sae.one_blas_thread():
        one = Cluster(["local:1"], echo=False, progress=False)
        try:
            two = Cluster(["local:2"], echo=False, progress=False)
        except BaseException:
            one.shutdown()
            raise
    try:
        yield one, two
    finally:
        one.shutdown()
        two.shutdown()


def some_theta(seed: int = 1) -> np.ndarray:
    return sae.init_theta(seed) + np.random.default_rng(seed).normal(0, 0.05, sae.N_PARAMS)


def test_theta_has_3934_parameters_and_packs_back():
    theta = some_theta()
    assert sae.N_PARAMS == 3934 == theta.size
    W1, W2, b1, b2 = sae.unpack(theta)
    assert (W1.shape, W2.shape, b1.shape, b2.shape) == ((30, 64), (64, 30), (30,), (64,))
    assert np.array_equal(sae.pack(W1, W2, b1, b2), theta)


def test_analytic_gradient_matches_finite_differences():
    assert sae.check_gradient(n=20) < 1e-8


def test_sliced_gradient_matches_finite_differences():
    """combine(sum of slice_sums) over uneven slices of 7 rows, against central differences."""
    assert sae.check_gradient(n=20, fun=lambda t, X: sae.sliced_cost_and_grad(t, X, slice_size=7)) < 1e-8


def test_sliced_sums_are_the_textbook_cost_and_gradient(patches):
    theta = some_theta()
    cost, grad = sae.cost_and_grad(theta, patches)
    for size in (N, 1000, 333):
        c, g = sae.sliced_cost_and_grad(theta, patches, slice_size=size)
        assert c == pytest.approx(cost, rel=1e-12)
        np.testing.assert_allclose(g, grad, rtol=1e-9, atol=1e-13)


def test_sparsity_term_uses_mean_activation_mapped_to_0_1():
    """p = mean((a2 + 1) / 2): with W = 0 and b1 = 0 every unit sits at a2 = 0, so p = 1/2."""
    X = sae.make_patches(10)
    theta = np.zeros(sae.N_PARAMS)
    cost, _ = sae.cost_and_grad(theta, X)
    expected = 0.5 / 10 * np.sum(X ** 2) + sae.LAMBDA_P * 30 * sae.kl(sae.RHO, np.array(0.5))
    assert cost == pytest.approx(float(expected), rel=1e-12)


def test_slicing_depends_on_the_number_of_patches_only():
    assert sae.slice_size_for(1000) == 500
    assert sae.slice_size_for(10000) == 5000
    assert sae.slice_size_for(30000) == 5000
    assert sae.slice_size_for(100000) == 12500
    assert sae.slice_size_for(1) == 1


def test_blocks_within_a_slice_change_nothing_but_rounding():
    X = sae.make_patches(1234)
    theta = some_theta()
    whole = sae.slice_sums(theta, X, block=len(X))
    for block in (1, 100, 500):
        np.testing.assert_allclose(sae.slice_sums(theta, X, block=block), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("source", ["synthetic", "auto"])
def test_patches_are_normalised_into_tanh_range(source):
    X = sae.make_patches(500, seed=3, source=source)
    assert X.shape == (500, 64) and X.dtype == np.float64
    assert X.min() >= -0.9 - 1e-12 and X.max() <= 0.9 + 1e-12
    assert X.min() == pytest.approx(-0.9) or X.max() == pytest.approx(0.9)  # clipped at +-3 std
    np.testing.assert_allclose(X.mean(axis=1), 0, atol=0.9 / 3 * 1.01)  # mean removed before clipping
    assert np.array_equal(X, sae.make_patches(500, seed=3, source=source))  # fixed seed
    expected = "synthetic" if source == "synthetic" or sae.sklearn_image_paths() is None else "sklearn"
    assert sae.LAST_SOURCE == expected


def test_sklearn_source_is_refused_clearly_when_missing(monkeypatch):
    monkeypatch.setattr(sae, "sklearn_image_paths", lambda: None)
    with pytest.raises(RuntimeError, match="pip install scikit-learn pillow"):
        sae.make_patches(10, source="sklearn")
    sae.make_patches(10)
    assert sae.LAST_SOURCE == "synthetic"


@pytest.mark.parametrize("slice_size", [None, 250], ids=["2 slices", "8 slices"])
def test_cluster_evaluation_is_exact_and_bit_identical_on_1_and_2_workers(clusters, patches, slice_size):
    one, two = clusters
    theta = some_theta()
    ref_cost, ref_grad = sae.cost_and_grad(theta, patches)
    on_one = sae.evaluate_with(one, patches, slice_size)(theta)
    on_two = sae.evaluate_with(two, patches, slice_size)(theta)
    again = sae.evaluate_with(two, patches, slice_size)(theta)
    assert on_one[0] == pytest.approx(ref_cost, rel=1e-12)
    np.testing.assert_allclose(on_one[1], ref_grad, rtol=1e-9, atol=1e-13)
    for cost, grad in (on_two, again):
        assert cost == on_one[0]
        assert np.array_equal(grad, on_one[1])
    # the two workers really shared the work
    assert all(slices > 0 for slices, _ in two.cache_info().values())


@pytest.mark.parametrize("slice_size", [None, 250], ids=["2 slices", "8 slices"])
def test_the_raw_pipe_floor_computes_what_the_cluster_does(clusters, patches, slice_size):
    """The benchmark's floor does the clusters' very work (so its time is a fair floor): bit-identical."""
    _, two = clusters
    theta = some_theta()
    raw = sae.RawPipeWorkers(patches, 2, slice_size)
    try:
        assert len(raw.children) == 2
        cost, grad = raw(theta)
        again = raw(theta + 1e-3)
    finally:
        raw.close()
    on_two = sae.evaluate_with(two, patches, slice_size)(theta)
    assert cost == on_two[0] and np.array_equal(grad, on_two[1])
    assert again[0] == sae.evaluate_with(two, patches, slice_size)(theta + 1e-3)[0]
    assert all(child.returncode == 0 for child in raw.children)


def test_lbfgs_path_is_bit_identical_on_1_and_2_workers(clusters, patches):
    one, two = clusters
    theta0 = sae.init_theta(0)
    results = [sae.train(sae.evaluate_with(c, patches), theta0, maxiter=5) for c in (one, two, one)]
    first = results[0]
    assert first.nit == 5 and first.fun < sae.cost_and_grad(theta0, patches)[0]
    for res in results[1:]:
        assert res.nfev == first.nfev
        assert res.fun == first.fun
        assert np.array_equal(res.x, first.x)


def test_one_blas_thread_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    import os

    with sae.one_blas_thread():
        assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_measure_reports_every_variant_per_size(clusters):
    """A tiny run of measure() on the module's clusters: its structure, not its times."""
    one, two = clusters
    result = sae.measure(lambda k: {1: _Borrowed(one), 2: _Borrowed(two)}[k], sizes=(200,), evals=2,
                         settle=0, verbose=False)
    row = result["rows"][200]
    assert {sae.ONE_PROCESS, sae.ONE_PROCESS_SLICED, "1 worker", "2 workers", sae.RAW_PIPES} <= set(row)
    assert all(len(stats["samples"]) == 2 and stats["min"] <= stats["median"] <= stats["max"]
               for stats in row.values())
    assert result["slices"][200] == [2, 100] and result["bit_identical"]
    assert "qjam 2w" in sae.format_table(result) and "2w/raw" in sae.format_table(result)


class _Borrowed:
    """A fixture's cluster lent to measure(), which shuts down what its factory gave it."""

    def __init__(self, cluster):
        self.cluster = cluster

    def map(self, *args, **kwargs):
        return self.cluster.map(*args, **kwargs)

    def shutdown(self):
        pass
