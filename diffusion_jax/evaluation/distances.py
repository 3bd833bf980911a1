"""Distances between two sets of samples or features, computed in float64 numpy.

- :func:`frechet_distance`: ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}), the
  Frechet (2-Wasserstein) distance between Gaussians fitted to two feature sets (FID, Heusel et al.
  2017, when the features are Inception-v3's pool3).
- :func:`precision_recall`: improved precision and recall with k-nearest-neighbour manifolds
  (Kynkaanniemi et al. 2019).
- :func:`energy_distance`, :func:`sliced_wasserstein`: distribution distances for low-dimensional
  data such as 2-D toy points.
- :func:`split_floor`: a metric between two disjoint halves of real data, the floor a model's figure
  should be read against.

Inputs are arrays [N, D] (any float dtype); results are Python floats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values.")
    return x


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    f = _features(features, "features")
    if f.shape[0] < 2:
        raise ValueError("feature_statistics needs at least 2 samples for a covariance.")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise removed: those below the rank tolerance
    (largest * D * machine epsilon, as numpy's matrix_rank) are zero."""
    tol = max(float(np.max(np.abs(w), initial=0.0)), 0.0) * w.shape[0] * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (squared units of the features).

    The trace of (S_1 S_2)^{1/2} is the sum of the square roots of the eigenvalues of the symmetric
    PSD product S_1^{1/2} S_2 S_1^{1/2}, computed with ``eigh`` in float64; this is stable for
    singular covariances (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` may return
    complex values or fail.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"need means [D] and covariances [D, D] of one D; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}."
        )
    root1 = _sqrt_psd(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
    tr_covmean = np.sum(np.sqrt(_psd_eigenvalues(eigenvalues)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(a), len(b)] (float64, clipped at 0)."""
    sq = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def _row_blocks(n: int, row_bytes: int, max_bytes: int = 1 << 27):
    step = max(1, max_bytes // max(row_bytes, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance [N] from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = _features(features, "features")
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k must be in [1, N - 1] = [1, {f.shape[0] - 1}], got {k}.")
    radii = np.empty(f.shape[0])
    for rows in _row_blocks(f.shape[0], 8 * f.shape[0]):
        d = _pairwise_sq_dists(f[rows], f)
        # The point itself is at distance 0 (index 0 after partition); index k is the k-th other point.
        radii[rows] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of ``queries`` inside the union of balls B(manifold_i, radii_i)."""
    inside = np.zeros(queries.shape[0], bool)
    sq_radii = radii**2
    for rows in _row_blocks(queries.shape[0], 8 * manifold.shape[0]):
        inside[rows] = np.any(_pairwise_sq_dists(queries[rows], manifold) <= sq_radii[None], axis=1)
    return float(inside.mean())


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, *, k: int = 3
) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), each in [0, 1].

    The real manifold is the union of balls around each real feature with radius its distance to
    its k-th nearest real neighbour; precision is the fraction of fake features inside it. Recall is
    the fraction of real features inside the fake manifold, built the same way. Exact (brute-force)
    distances, in blocks; O(N^2 D) time.
    """
    real = _features(real_features, "real_features")
    fake = _features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}.")
    precision = _coverage(real, knn_radii(real, k), fake)
    recall = _coverage(fake, knn_radii(fake, k), real)
    return {"precision": precision, "recall": recall}


def _mean_pairwise_distance(a: np.ndarray, b: np.ndarray, *, exclude_diagonal: bool) -> float:
    total = 0.0
    for rows in _row_blocks(a.shape[0], 8 * b.shape[0]):
        total += np.sqrt(_pairwise_sq_dists(a[rows], b)).sum()
    count = a.shape[0] * b.shape[0]
    if exclude_diagonal:
        count -= a.shape[0]
    return total / count


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), same units as the data.

    The within-set means exclude the zero self-distances (U-statistics), so the estimate is unbiased
    for the population distance (which is >= 0, and 0 only for equal distributions); between two
    samples of one distribution it scatters around 0 and can be slightly negative. Needs N >= 2 each.
    """
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimensions differ: {x.shape[1]} vs {y.shape[1]}.")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy_distance needs at least 2 samples in each set.")
    xy = _mean_pairwise_distance(x, y, exclude_diagonal=False)
    xx = _mean_pairwise_distance(x, x, exclude_diagonal=True)
    yy = _mean_pairwise_distance(y, y, exclude_diagonal=True)
    return float(2.0 * xy - xx - yy)


def random_directions(dim: int, num_projections: int, seed: int = 0) -> np.ndarray:
    """``num_projections`` unit vectors [P, dim], uniform on the sphere, from a fixed seed."""
    theta = np.random.default_rng(seed).standard_normal((num_projections, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def sliced_wasserstein(
    x: np.ndarray, y: np.ndarray, *, num_projections: int = 256, p: int = 2, seed: int = 0
) -> float:
    """Sliced p-Wasserstein distance (E_theta W_p^p(theta.X, theta.Y))^{1/p}, same units as the data.

    theta runs over ``num_projections`` random unit directions (fixed ``seed``); each 1-D W_p is
    between the empirical quantile functions, evaluated on a common grid of max(N1, N2) levels
    (exact for equal sizes). For Y = X + delta it is the RMS of theta.delta, |delta| / sqrt(D) for
    p = 2 and many directions.
    """
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimensions differ: {x.shape[1]} vs {y.shape[1]}.")
    theta = random_directions(x.shape[1], num_projections, seed)
    px, py = np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0)
    n = max(px.shape[0], py.shape[0])
    if px.shape[0] != py.shape[0]:
        levels = (np.arange(n) + 0.5) / n
        quantile = lambda s: np.quantile(s, levels, axis=0, method="inverted_cdf")
        px, py = quantile(px), quantile(py)
    return float(np.mean(np.abs(px - py) ** p) ** (1.0 / p))


def split_floor(
    metric: Callable[[np.ndarray, np.ndarray], float], data: np.ndarray, *, seed: int = 0
) -> float:
    """``metric`` between two disjoint random halves of ``data`` [N, ...]: the real-vs-real floor.

    A model's figure at sample size N/2 is to be read against this value (lower is impossible to
    tell apart from data at that size).
    """
    data = np.asarray(data)
    if data.shape[0] < 4:
        raise ValueError(f"split_floor needs at least 4 examples, got {data.shape[0]}.")
    order = np.random.default_rng(seed).permutation(data.shape[0])
    half = data.shape[0] // 2
    return float(metric(data[order[:half]], data[order[half : 2 * half]]))
