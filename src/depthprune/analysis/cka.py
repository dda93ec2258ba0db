"""Centered kernel alignment (CKA) between layer representations.

The SLM paper (Sliding-Window Merging, arXiv 2502.19159) motivates merging
consecutive transformer layers by showing that the layer-by-layer CKA matrix of
an LLM contains "patches": runs of consecutive layers whose representations are
almost identical.  This module computes that matrix.

CKA between two representations X (n, p) and Y (n, q) of the same n examples is

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

where K, L are (n, n) kernel (Gram) matrices of X and Y.  Two HSIC estimators
are provided:

* the classic biased one, HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 with the
  centering matrix H = I - 11^T / n (``cka_full_batch``), which needs every
  example in memory at once;
* the unbiased one of Song et al. (2012), ``hsic_unbiased``, whose expectation
  does not depend on n.  Because it is unbiased, its values can be *summed over
  minibatches* and the sums still estimate the population HSIC, which is what
  makes the minibatch CKA of Nguyen et al. (2021) (``MinibatchCKA``) possible on
  representations too large to hold at once.

Everything is computed in float64: kernel entries of LLM hidden states are
large (the residual-stream norm grows with depth) while HSIC is a difference of
large sums, so float32 would lose precision to cancellation.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch


KernelName = Literal["linear", "rbf"]

_MIN_EXAMPLES = 4
_KERNELS: tuple[str, ...] = ("linear", "rbf")


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """Flatten ``x`` of shape (n, ...) to a float64 (n, d) matrix.

    Every example is treated as one point in R^d, d = prod(x.shape[1:]).
    """
    if x.dim() == 0:
        raise ValueError("a representation needs a leading example dimension, got a scalar")
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel K = X X^T of the rows of ``x`` (n, d), as (n, n) float64.

    With this kernel CKA is invariant to orthogonal transforms and isotropic
    scaling of X, but not to arbitrary invertible linear maps (Kornblith et al.
    2019), which is why it is the standard choice for comparing layers.
    """
    m = _as_matrix(x)
    return m @ m.T


def _squared_distances(m: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ||x_i - x_j||^2 of the rows of ``m``.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matmul instead of an (n, n, d) tensor),
    clamped at 0 and with an exactly zero diagonal to undo rounding.
    """
    gram = m @ m.T
    sq_norms = gram.diagonal()
    d2 = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def median_heuristic_sigma(x: torch.Tensor) -> float:
    """Bandwidth for ``rbf_kernel``: the median pairwise distance of the rows.

    Exact choice: the distances ||x_i - x_j|| over the n(n-1)/2 unordered pairs
    of *distinct indices* i < j (the zero self-distances on the diagonal are
    excluded, since they would pull the median down by a factor that depends on
    n), and the median is the usual one -- the mean of the two middle values
    when the count is even (``numpy.median`` semantics, not ``torch.median``'s
    lower median).

    Degenerate cases: if that median is 0 (more than half of the pairs are
    duplicate points, e.g. padding tokens) the median of the strictly positive
    distances is used instead; if every distance is 0 the kernel is the all-ones
    matrix for any bandwidth, and 1.0 is returned.
    """
    m = _as_matrix(x)
    n = m.shape[0]
    if n < 2:
        raise ValueError(f"the median heuristic needs at least 2 examples, got n={n}")
    rows, cols = torch.triu_indices(n, n, offset=1, device=m.device)
    distances = _squared_distances(m)[rows, cols].sqrt()
    sigma = _median(distances)
    if sigma > 0.0:
        return sigma
    positive = distances[distances > 0.0]
    return _median(positive) if positive.numel() > 0 else 1.0


def _median(values: torch.Tensor) -> float:
    """Median of a 1-D tensor, averaging the two middle values for an even count."""
    ordered = values.sort().values
    count = ordered.numel()
    return float((ordered[(count - 1) // 2] + ordered[count // 2]) / 2.0)


def rbf_kernel(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Gaussian kernel K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), (n, n) float64.

    ``sigma=None`` picks the bandwidth per call with ``median_heuristic_sigma``
    (median distance between distinct examples), so the kernel adapts to each
    layer's scale -- LLM hidden-state norms differ by orders of magnitude across
    depth, and one fixed sigma would make deep layers' kernels the identity.
    """
    m = _as_matrix(x)
    bandwidth = median_heuristic_sigma(m) if sigma is None else float(sigma)
    if not bandwidth > 0.0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return torch.exp(-_squared_distances(m) / (2.0 * bandwidth**2))


def _kernel(x: torch.Tensor, kernel: str, sigma: float | None) -> torch.Tensor:
    if kernel == "linear":
        return linear_kernel(x)
    if kernel == "rbf":
        return rbf_kernel(x, sigma)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {_KERNELS}")


def check_example_count(n: int) -> None:
    if n < _MIN_EXAMPLES:
        raise ValueError(
            f"unbiased HSIC needs at least {_MIN_EXAMPLES} examples per minibatch "
            f"(its normaliser is n(n-3)(n-2)), got n={n}"
        )


def _zero_diagonal(kernels: torch.Tensor) -> torch.Tensor:
    """Copy of (..., n, n) kernels in float64 with the diagonal set to 0 (K~)."""
    tilde = kernels.to(torch.float64).clone()
    tilde.diagonal(dim1=-2, dim2=-1).zero_()
    return tilde


def _pairwise_hsic_unbiased(kernels: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair of a stack of kernels (L, n, n) -> (L, L).

    Vectorised form of ``hsic_unbiased``: with K~_i the diagonal-zeroed kernels,

        tr(K~_i K~_j)        = <vec K~_i, vec K~_j^T>        (one (L, n^2) matmul)
        1^T K~_i 1           = total sum of K~_i
        1^T K~_i K~_j 1      = (K~_i^T 1) . (K~_j 1)          (column sums . row sums)

    so the cost is one Gram matrix of the flattened kernels, O(L^2 n^2), with
    no per-pair kernel recomputation.
    """
    count, n, _ = kernels.shape
    check_example_count(n)
    tilde = _zero_diagonal(kernels)
    flat = tilde.reshape(count, n * n)
    flat_t = tilde.transpose(1, 2).reshape(count, n * n)
    trace_term = flat @ flat_t.T
    totals = tilde.sum(dim=(1, 2))
    sums_term = torch.outer(totals, totals) / ((n - 1) * (n - 2))
    cross_term = tilde.sum(dim=1) @ tilde.sum(dim=2).T * (2.0 / (n - 2))
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC estimator of Song et al. (2012), as used by minibatch CKA.

    With K~, L~ equal to K, L with their diagonals set to zero and 1 the
    all-ones vector,

        HSIC_1(K, L) = [ tr(K~ L~)
                         + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                         - 2/(n-2) * 1^T K~ L~ 1 ] / (n(n-3)).

    It is an unbiased U-statistic of the population HSIC, which is what lets
    ``MinibatchCKA`` add it up over minibatches (Nguyen et al. 2021).  It needs
    n >= 4 (ValueError otherwise) and can be slightly negative for independent
    data.

    The result is a float64 Python float.  The released SLM code truncated
    HSIC values to integers; that was a bug -- for hidden states with small
    kernel entries every HSIC rounds to 0 and CKA becomes 0/0, and otherwise
    the truncation error distorts the similarity matrix.  Nothing here rounds.
    """
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(
            f"K and L must be square matrices of the same shape, got {tuple(K.shape)} "
            f"and {tuple(L.shape)}"
        )
    check_example_count(K.shape[0])
    pair = torch.stack([K.to(torch.float64), L.to(device=K.device, dtype=torch.float64)])
    return float(_pairwise_hsic_unbiased(pair)[0, 1])


class MinibatchCKA:
    """Layer-by-layer CKA matrix accumulated over minibatches (Nguyen et al. 2021).

    For L representations (layers) and minibatches b = 1..B,

        CKA_ij = sum_b HSIC_1(K_i^b, K_j^b)
                 / sqrt( sum_b HSIC_1(K_i^b, K_i^b) * sum_b HSIC_1(K_j^b, K_j^b) )

    where K_i^b is layer i's kernel on minibatch b and HSIC_1 is
    ``hsic_unbiased``.  Summing an unbiased estimator keeps it unbiased, so the
    result converges to the population CKA as B grows, without the O(1/n)
    bias that averaging biased per-batch CKAs would carry.

    Each ``update`` builds each layer's kernel once and gets all L^2 HSICs from
    one vectorised call; memory is L kernels of n x n float64, so n (examples
    per minibatch: tokens or sequences) should stay in the low thousands.

    An entry is NaN when a layer's summed self-HSIC is not positive (e.g. a
    constant representation): CKA is undefined there.
    """

    def __init__(self, kernel: KernelName = "linear", sigma: float | None = None) -> None:
        """``sigma`` is the RBF bandwidth; None means median heuristic per layer and batch."""
        if kernel not in _KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {_KERNELS}")
        self.kernel: str = kernel
        self.sigma = sigma
        self._hsic_sum: torch.Tensor | None = None
        self.num_batches = 0

    @property
    def num_layers(self) -> int | None:
        """Number of representations seen so far (None before the first update)."""
        return None if self._hsic_sum is None else self._hsic_sum.shape[0]

    def reset(self) -> None:
        """Forget every accumulated minibatch."""
        self._hsic_sum = None
        self.num_batches = 0

    def update(self, reps: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: ``reps[i]`` is layer i's (n, ...) output on the same n examples.

        Trailing dimensions are flattened, so (n, hidden) compares tokens and
        (n, seq, hidden) compares whole sequences.
        """
        if len(reps) == 0:
            raise ValueError("update() needs at least one representation")
        n = reps[0].shape[0] if reps[0].dim() > 0 else 0
        if any(r.dim() == 0 or r.shape[0] != n for r in reps):
            raise ValueError(
                "all representations must share the leading example dimension, got "
                f"{[tuple(r.shape) for r in reps]}"
            )
        if self.num_layers is not None and len(reps) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} representations, got {len(reps)}")
        check_example_count(n)
        device = reps[0].device
        self.update_kernels(torch.stack([self.kernel_of(r.to(device)) for r in reps]))

    def kernel_of(self, rep: torch.Tensor) -> torch.Tensor:
        """One layer's (n, n) kernel on one minibatch: what :meth:`update` builds for each representation."""
        return _kernel(rep, self.kernel, self.sigma)

    def update_kernels(self, kernels: torch.Tensor) -> None:
        """Add one minibatch given every layer's kernel, stacked (L, n, n).

        Layer streaming builds the kernels one layer at a time (layer i's for every minibatch before layer
        i+1 is loaded) and adds each minibatch here once all its kernels exist.
        """
        if self.num_layers is not None and kernels.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} kernels, got {kernels.shape[0]}")
        batch_hsic = _pairwise_hsic_unbiased(kernels).cpu()
        self._hsic_sum = batch_hsic if self._hsic_sum is None else self._hsic_sum + batch_hsic
        self.num_batches += 1

    def compute(self) -> np.ndarray:
        """The (L, L) CKA matrix as a float64 numpy array."""
        if self._hsic_sum is None:
            raise RuntimeError("compute() called before any update()")
        return _normalise_hsic(self._hsic_sum).numpy()


def _normalise_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """CKA_ij = HSIC_ij / sqrt(HSIC_ii HSIC_jj); NaN where a self-HSIC is <= 0."""
    self_hsic = hsic.diagonal()
    valid = self_hsic > 0.0
    scale = torch.where(valid, self_hsic, torch.full_like(self_hsic, math.nan)).sqrt()
    return hsic / torch.outer(scale, scale)


def _hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """HSIC_0(K, L) = tr(K H L H) / (n-1)^2 with H = I - 11^T / n."""
    n = K.shape[0]
    H = torch.eye(n, dtype=torch.float64, device=K.device) - 1.0 / n
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def cka_full_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: KernelName = "linear",
    sigma: float | None = None,
) -> float:
    """Classic (biased) CKA of Kornblith et al. (2019) on all n examples at once.

        CKA = HSIC_0(K, L) / sqrt(HSIC_0(K, K) HSIC_0(L, L)),
        HSIC_0(K, L) = tr(K H L H) / (n-1)^2,  H = I - 11^T / n.

    A direct, unoptimised reference for tests and small analyses; it is biased
    upwards for finite n (most visibly when d is large relative to n), which is
    why ``MinibatchCKA`` uses the unbiased estimator instead.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    K = _kernel(x, kernel, sigma)
    L = _kernel(y, kernel, sigma).to(K.device)
    denominator = torch.sqrt(_hsic_biased(K, K) * _hsic_biased(L, L))
    return float(_hsic_biased(K, L) / denominator)
