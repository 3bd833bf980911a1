"""Small built-in datasets that work offline: scikit-learn's 8x8 digits, the Datasaurus dino, 2-D toys.

Digits come as [N, 8, 8, 1] float32 in [-1, 1] (the raw 0..16 intensities scaled by x / 8 - 1) with
int32 labels 0..9. The split is fixed: the first 1500 images are ``"train"``, the last 297 ``"test"``.

2-D points come in their own units from the loaders here; :func:`standardize_points` maps them to
mean 0 and (by default) one common scale so that the mean per-coordinate variance is 1.
"""

from __future__ import annotations

import importlib.resources

import numpy as np

DIGITS_NUM_TRAIN = 1500  # of 1797: images [0, 1500) train, [1500, 1797) test (297 images)
TOY_DEFAULT_NUM_POINTS = 8000
# Generator noise per toy when data.noise < 0, in the generator's own units (dino: jitter, standardised units).
TOY_DEFAULT_NOISE = {
    "moons": 0.05,
    "circles": 0.05,
    "swiss_roll": 0.5,
    "gaussian_mixture": 0.1,
    "dino": 0.05,
}
TOY_NUM_CLASSES = {"moons": 2, "circles": 2}


def load_digits(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits: ([N, 8, 8, 1] float32 in [-1, 1], [N] int32 labels 0..9).

    ``split``: "train" (first 1500), "test" (last 297) or "all" (1797).
    """
    import sklearn.datasets

    d = sklearn.datasets.load_digits()
    images = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # 0..16 -> [-1, 1]
    labels = d.target.astype(np.int32)
    if split == "train":
        sl = slice(0, DIGITS_NUM_TRAIN)
    elif split == "test":
        sl = slice(DIGITS_NUM_TRAIN, None)
    elif split == "all":
        sl = slice(None)
    else:
        raise ValueError(
            f'digits split {split!r} does not exist: use "train" (1500 images), "test" (297) or "all" (1797)'
        )
    return images[sl], labels[sl]


def load_dino() -> np.ndarray:
    """The Datasaurus "dino": [142, 2] float32 (x, y) in the original units (about 20..100)."""
    ref = importlib.resources.files("diffusion_jax.data").joinpath("datasaurus_dino.csv")
    with ref.open("r") as f:
        return np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float32)


def make_toy(
    name: str,
    num_points: int = TOY_DEFAULT_NUM_POINTS,
    *,
    noise: float | None = None,
    seed: int = 0,
    num_components: int = 8,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A classic 2-D toy sample: ([num_points, 2] float32, labels int32 or None), in generator units.

    moons and circles (labels 0/1) and swiss_roll (its x-z plane, no labels) come from
    ``sklearn.datasets``; gaussian_mixture draws ``num_components`` equal-weight isotropic Gaussians of
    std ``noise`` centred on the unit circle (labels = component).
    """
    import sklearn.datasets

    noise = TOY_DEFAULT_NOISE[name] if noise is None or noise < 0 else noise
    if name == "moons":
        x, y = sklearn.datasets.make_moons(num_points, noise=noise, random_state=seed)
    elif name == "circles":
        x, y = sklearn.datasets.make_circles(num_points, noise=noise, factor=0.5, random_state=seed)
    elif name == "swiss_roll":
        x3, _ = sklearn.datasets.make_swiss_roll(num_points, noise=noise, random_state=seed)
        x, y = x3[:, [0, 2]], None
    elif name == "gaussian_mixture":
        rng = np.random.default_rng(seed)
        y = rng.integers(0, num_components, num_points)
        angle = 2 * np.pi * y / num_components
        x = np.stack([np.cos(angle), np.sin(angle)], axis=1) + noise * rng.standard_normal(
            (num_points, 2)
        )
    else:
        raise ValueError(
            f"unknown 2-D toy {name!r}: use moons, circles, swiss_roll or gaussian_mixture"
        )
    return x.astype(np.float32), (None if y is None else np.asarray(y, np.int32))


def point_stats(points: np.ndarray, mode: str = "isotropic") -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], scale [D]) for :func:`standardize_points`.

    "isotropic": one scale sqrt(mean_d var_d) for every coordinate, which keeps the picture's aspect
    ratio; "per_dim": each coordinate's own std; "none": mean 0, scale 1.
    """
    points = np.asarray(points, np.float64)
    if mode == "none":
        return np.zeros(points.shape[1], np.float32), np.ones(points.shape[1], np.float32)
    mean = points.mean(axis=0)
    var = points.var(axis=0)
    if mode == "per_dim":
        scale = np.sqrt(var)
    elif mode == "isotropic":
        scale = np.full_like(var, np.sqrt(var.mean()))
    else:
        raise ValueError(f"standardize={mode!r}: use isotropic, per_dim or none")
    scale = np.where(scale > 0, scale, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def standardize_points(points: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(points - mean) / scale, float32 [N, D]; ``stats`` from :func:`point_stats` (of the train split)."""
    mean, scale = stats
    return ((np.asarray(points, np.float32) - mean) / scale).astype(np.float32)


def load_points(
    name: str,
    split: str = "train",
    *,
    num_points: int = 0,
    noise: float = -1.0,
    seed: int = 0,
    num_components: int = 8,
    standardize: str = "isotropic",
) -> tuple[np.ndarray, np.ndarray | None]:
    """A built-in 2-D point set, standardised with the train split's statistics: ([N, 2] float32, labels).

    dino: the 142 points for every split (there is no held-out dino); ``num_points > 0`` resamples
    that many with Gaussian jitter of std ``noise`` (standardised units). Toys: ``num_points`` (0 = 8000)
    drawn with ``seed`` for "train" / "all" and with ``seed + 1`` for "test".
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f'split {split!r} does not exist for {name}: use "train", "test" or "all"')
    if name == "dino":
        raw = load_dino()
        stats = point_stats(raw, standardize)
        points = standardize_points(raw, stats)
        if num_points > 0:
            rng = np.random.default_rng([seed, 0 if split != "test" else 1])
            jitter = TOY_DEFAULT_NOISE["dino"] if noise < 0 else noise
            idx = rng.integers(0, len(points), num_points)
            points = points[idx] + jitter * rng.standard_normal((num_points, 2)).astype(np.float32)
        return points.astype(np.float32), None
    n = num_points or TOY_DEFAULT_NUM_POINTS
    kw = dict(noise=noise, num_components=num_components)
    train, train_labels = make_toy(name, n, seed=seed, **kw)
    stats = point_stats(train, standardize)
    if split == "test":
        test, test_labels = make_toy(name, n, seed=seed + 1, **kw)
        return standardize_points(test, stats), test_labels
    return standardize_points(train, stats), train_labels
