"""Tests for depthprune.analysis.cka (CKA layer-similarity analysis)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from depthprune.analysis.cka import (
    MinibatchCKA,
    cka_full_batch,
    hsic_unbiased,
    linear_kernel,
    median_heuristic_sigma,
    rbf_kernel,
)
from depthprune.report import plot_cka_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def slow_hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. (2012) formula written out element by element, no vectorisation."""
    k, l = K.tolist(), L.tolist()
    n = len(k)
    kt = [[0.0 if i == j else k[i][j] for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else l[i][j] for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(kt[i][j] for i in range(n) for j in range(n))
    sum_l = sum(lt[i][j] for i in range(n) for j in range(n))
    cross = sum(kt[i][j] * lt[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def u_statistic_hsic(K: torch.Tensor, L: torch.Tensor) -> float:
    """HSIC as the U-statistic over ordered 4-tuples of distinct indices.

    E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq]: the population quantity
    the unbiased estimator targets, estimated without any closed form.
    """
    k, l = K.tolist(), L.tolist()
    n = len(k)
    tuples = list(itertools.permutations(range(n), 4))
    total = sum(k[i][j] * (l[i][j] + l[q][r] - 2.0 * l[i][q]) for i, j, q, r in tuples)
    return total / len(tuples)


def correlated_pair(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a noisy non-linear function of x: CKA clearly between 0 and 1."""
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d, d, dtype=torch.float64)) + 0.5 * torch.randn(n, d, dtype=torch.float64)
    return x, y


def random_orthogonal(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q


def assert_close(actual: float, expected: float, rel: float = 1e-10) -> None:
    assert abs(actual - expected) <= rel * max(1.0, abs(expected)), (actual, expected)


# --- kernels -----------------------------------------------------------------


def test_kernels_are_float64_square() -> None:
    x = torch.randn(6, 2, 3)
    for kernel in (linear_kernel(x), rbf_kernel(x)):
        assert kernel.dtype == torch.float64
        assert kernel.shape == (6, 6)
        assert torch.allclose(kernel, kernel.T)
    assert torch.allclose(linear_kernel(x), x.reshape(6, -1).double() @ x.reshape(6, -1).double().T)


def test_rbf_median_heuristic_uses_distinct_pairs_and_true_median() -> None:
    three = torch.tensor([[0.0], [1.0], [3.0]])
    # distances 1, 2, 3 -> sigma 2 (including the zero self-distances would give 1)
    assert median_heuristic_sigma(three) == 2.0
    K = rbf_kernel(three)
    assert_close(K[0, 1].item(), math.exp(-1.0 / 8.0))
    assert_close(K[0, 2].item(), math.exp(-9.0 / 8.0))
    assert torch.all(K.diagonal() == 1.0)
    four = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    # distances 1, 2, 3, 4, 6, 7 -> mean of the middle two, not torch's lower median 3
    assert median_heuristic_sigma(four) == 3.5


def test_rbf_median_heuristic_degenerate_cases() -> None:
    mostly_duplicates = torch.tensor([[0.0], [0.0], [0.0], [0.0], [2.0]])
    assert median_heuristic_sigma(mostly_duplicates) == 2.0
    identical = torch.ones(5, 3)
    assert median_heuristic_sigma(identical) == 1.0
    assert torch.all(rbf_kernel(identical) == 1.0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        rbf_kernel(identical, sigma=0.0)


# --- unbiased HSIC -----------------------------------------------------------


@pytest.mark.parametrize("kernel", ["linear", "rbf", "asymmetric"])
def test_hsic_unbiased_matches_slow_elementwise_reference(kernel: str) -> None:
    x, y = correlated_pair(11, 4)
    if kernel == "linear":
        K, L = linear_kernel(x), linear_kernel(y)
    elif kernel == "rbf":
        K, L = rbf_kernel(x), rbf_kernel(y)
    else:
        K, L = torch.randn(11, 11, dtype=torch.float64), torch.randn(11, 11, dtype=torch.float64)
    assert_close(hsic_unbiased(K, L), slow_hsic_unbiased(K, L))
    assert_close(hsic_unbiased(K, K), slow_hsic_unbiased(K, K))


def test_hsic_unbiased_equals_u_statistic() -> None:
    x, y = correlated_pair(7, 3)
    K, L = linear_kernel(x), rbf_kernel(y)
    assert_close(hsic_unbiased(K, L), u_statistic_hsic(K, L))


def test_fewer_than_four_examples_raise() -> None:
    K = linear_kernel(torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 4 examples"):
        hsic_unbiased(K, K)
    with pytest.raises(ValueError, match="at least 4 examples"):
        MinibatchCKA().update([torch.randn(3, 5), torch.randn(3, 5)])
    four = linear_kernel(torch.randn(4, 2))
    assert math.isfinite(hsic_unbiased(four, four))


def test_hsic_unbiased_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        hsic_unbiased(torch.eye(5), torch.eye(6))


def test_small_hsic_values_stay_fractional() -> None:
    # kernel entries ~1e-2: the true HSIC values are in (0, 1), so truncating
    # them to integers (the released SLM code's bug) would give 0 and CKA 0/0.
    x, y = correlated_pair(64, 4)
    x, y = 0.05 * x, 0.05 * y
    K, L = linear_kernel(x), linear_kernel(y)
    for value in (hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)):
        assert isinstance(value, float)
        assert 0.0 < value < 1.0
    tracker = MinibatchCKA()
    tracker.update([x, y])
    matrix = tracker.compute()
    assert matrix.dtype == np.float64
    assert 0.05 < matrix[0, 1] < 0.95
    assert matrix[0, 1] != round(matrix[0, 1])


# --- minibatch CKA -------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_self_cka_is_one(kernel: str) -> None:
    tracker = MinibatchCKA(kernel=kernel)
    for _ in range(3):
        x = torch.randn(16, 4, 5)
        tracker.update([x, x.clone(), torch.randn(16, 20)])
    matrix = tracker.compute()
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrix[0, 1], 1.0, atol=1e-12)
    assert abs(matrix[0, 2]) < 0.5
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)


def test_minibatch_matches_slow_reference_exactly() -> None:
    batches = [[torch.randn(9, 3), torch.randn(9, 2, 2), torch.randn(9, 5)] for _ in range(2)]
    for kernel, make in (("linear", linear_kernel), ("rbf", rbf_kernel)):
        tracker = MinibatchCKA(kernel=kernel)
        sums = np.zeros((3, 3))
        for reps in batches:
            tracker.update(reps)
            kernels = [make(r) for r in reps]
            for i, j in itertools.product(range(3), repeat=2):
                sums[i, j] += slow_hsic_unbiased(kernels[i], kernels[j])
        expected = sums / np.sqrt(np.outer(np.diag(sums), np.diag(sums)))
        np.testing.assert_allclose(tracker.compute(), expected, rtol=1e-10, atol=1e-12)


def test_one_big_minibatch_approaches_full_batch() -> None:
    # Biased and unbiased linear CKA differ by the O(1/n) bias of HSIC_0; for
    # isotropic-ish features its relative size per HSIC term is about d/n
    # (= 3e-3 here; the observed gap is ~1e-3 over seeds 0-4), so 0.01 leaves
    # a wide margin while a wrong constant or sign in the estimator moves CKA
    # by far more.
    x, y = correlated_pair(1000, 3)
    x, y = x + 3.0, y - 2.0  # off-centre, so a reference that skipped H would disagree
    tracker = MinibatchCKA()
    tracker.update([x, y])
    minibatch = tracker.compute()[0, 1]
    full = cka_full_batch(x, y)
    assert 0.2 < full < 0.8
    assert abs(minibatch - full) < 0.01


def test_linear_cka_invariant_to_orthogonal_transform_scaling_and_translation() -> None:
    x, y = correlated_pair(40, 6)
    rotated, scaled, shifted = x @ random_orthogonal(6), 3.7 * x, x + 5.0
    reference = cka_full_batch(x, y)
    assert 0.1 < reference < 0.9
    assert_close(cka_full_batch(rotated, y), reference)
    assert_close(cka_full_batch(scaled, y), reference)
    assert_close(cka_full_batch(shifted, y), reference)
    assert_close(cka_full_batch(x, 0.01 * y @ random_orthogonal(6)), reference)

    tracker = MinibatchCKA()
    tracker.update([x, y, rotated, scaled, shifted])
    matrix = tracker.compute()
    assert 0.1 < matrix[0, 1] < 0.9
    np.testing.assert_allclose(matrix[2:, 1], matrix[0, 1], rtol=1e-10)
    np.testing.assert_allclose(matrix[0, 2:], 1.0, atol=1e-12)


def test_full_batch_self_cka_is_one() -> None:
    x = torch.randn(30, 4)
    assert_close(cka_full_batch(x, x), 1.0)
    assert_close(cka_full_batch(x, x, kernel="rbf"), 1.0)


def test_minibatch_validation_and_degenerate_layers() -> None:
    tracker = MinibatchCKA()
    with pytest.raises(RuntimeError):
        tracker.compute()
    tracker.update([torch.randn(8, 3), torch.ones(8, 3)])
    with pytest.raises(ValueError, match="expected 2"):
        tracker.update([torch.randn(8, 3)])
    with pytest.raises(ValueError, match="leading example dimension"):
        tracker.update([torch.randn(8, 3), torch.randn(7, 3)])
    matrix = tracker.compute()
    assert matrix[0, 0] == pytest.approx(1.0)
    assert np.isnan(matrix[1, 1]) and np.isnan(matrix[0, 1])
    tracker.reset()
    assert tracker.num_layers is None and tracker.num_batches == 0
    with pytest.raises(ValueError, match="unknown kernel"):
        MinibatchCKA(kernel="cosine")  # type: ignore[arg-type]


# --- heatmap -------------------------------------------------------------------


def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_heatmap_writes_valid_png(tmp_path: Path) -> None:
    tracker = MinibatchCKA()
    base = torch.randn(12, 6)
    tracker.update([base, base + 0.1 * torch.randn(12, 6), torch.randn(12, 6), torch.randn(12, 6)])
    matrix = tracker.compute()

    plain = plot_cka_heatmap(matrix, tmp_path / "plain.png", title="CKA")
    outlined = plot_cka_heatmap(
        torch.from_numpy(matrix), tmp_path / "sub" / "outlined.png", merged_windows=[(0, 1), (2, 3)]
    )
    for path in (plain, outlined):
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["outlined.png", "plain.png"]

    no_title = plot_cka_heatmap(matrix, tmp_path / "no_title.png")
    assert _png_pixels(no_title).shape == _png_pixels(outlined).shape
    assert not np.array_equal(_png_pixels(no_title), _png_pixels(outlined))


def test_heatmap_overwrites_atomically_and_validates(tmp_path: Path) -> None:
    target = tmp_path / "cka.png"
    target.write_bytes(b"stale")
    plot_cka_heatmap(np.eye(3), target)
    assert target.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="merged window"):
        plot_cka_heatmap(np.eye(3), tmp_path / "bad.png", merged_windows=[(1, 3)])
    with pytest.raises(ValueError, match="square"):
        plot_cka_heatmap(np.ones((2, 3)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
