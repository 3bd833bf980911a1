"""Offline feature extractor for the default dataset: a small CNN trained on the scikit-learn digits.

The default dataset is ``sklearn.datasets.load_digits()`` (1797 images, 8x8, values 0..16): the
first :data:`NUM_TRAIN` = 1500 images are the training split, the last 297 the held-out split. The
diffusion model sees them as [N, 16, 16, 1] float32 in [-1, 1] (:func:`digits_to_images`: x / 16 * 2
- 1, then nearest-neighbour 2x upsampling), and its samples come out in that format, which is what
this classifier reads.

Its penultimate activations (``FEATURE_DIM`` = 64, after ReLU) are the features of the "digits FD"
(Frechet distance, as FID with Inception features) and of precision/recall. The classifier is
trained deterministically (fixed seed, fixed steps; a few seconds on 2 CPU cores) and cached in
memory per process, optionally on disk. Its held-out accuracy is 0.949 (the last 297 digits are the
hard ones: an RBF SVM on the raw pixels gets 0.953).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN = 1500  # the first 1500 digits train; the last 297 are held out
NUM_CLASSES = 10
FEATURE_DIM = 64
IMAGE_SHAPE = (16, 16, 1)


def upsample_digits(images: np.ndarray) -> np.ndarray:
    """8x8 digits [N, 8, 8, 1] in [-1, 1] -> [N, 16, 16, 1] by nearest-neighbour 2x upsampling.

    What the data pipeline does for ``image_size=16`` (``resize_method="auto"``); use it on samples
    of a model trained at ``image_size=8`` before computing digits features.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
        raise ValueError(f"images must be [N, 8, 8, 1], got shape {images.shape}.")
    return np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)


def digits_to_images(raw: np.ndarray) -> np.ndarray:
    """Raw digits [N, 64] or [N, 8, 8] (0..16) -> model-space images [N, 16, 16, 1] float32 in [-1, 1].

    x / 16 * 2 - 1 (= x / 8 - 1), then nearest-neighbour 2x upsampling (each pixel a 2x2 block):
    the default config's data (``diffusion_jax.data``, source "digits", image_size 16).
    """
    raw = np.asarray(raw, np.float32)
    if raw.ndim == 2 and raw.shape[1] == 64:
        raw = raw.reshape(-1, 8, 8)
    if raw.ndim != 3 or raw.shape[1:] != (8, 8):
        raise ValueError(f"raw digits must be [N, 64] or [N, 8, 8], got shape {raw.shape}.")
    return upsample_digits((raw / 16.0 * 2.0 - 1.0)[..., None])


@functools.lru_cache(maxsize=2)
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
    from diffusion_jax.data import load_digits

    images, labels = load_digits(split)
    return upsample_digits(images), labels


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 16, 16, 1] float32 in [-1, 1] and labels [N] int32 of ``"train"`` (1500) or ``"test"`` (297).

    The data pipeline's split and scaling (``diffusion_jax.data.load_digits``), upsampled 2x.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'.")
    images, labels = _split(split)
    return images.copy(), labels.copy()


class DigitsClassifier(nn.Module):
    """``images [B, 16, 16, 1] in [-1, 1] -> (logits [B, 10], features [B, FEATURE_DIM])``.

    An MLP: 256 -> ``hidden`` ReLU -> ``feature_dim`` ReLU (the features) -> 10 logits. No
    normalisation layers, so features do not depend on the batch. (An MLP rather than a CNN because
    XLA's CPU convolution gradients are slow: this one trains in seconds on 2 cores.)
    """

    hidden: int = 256
    feature_dim: int = FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images must be [B, 16, 16, 1], got shape {x.shape}.")
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        features = nn.relu(nn.Dense(self.feature_dim, name="features")(h))
        return nn.Dense(NUM_CLASSES, name="logits")(features), features


def _random_shift(images: jax.Array, key: jax.Array) -> jax.Array:
    """Shifts each image by -1, 0 or 1 original pixel (2 model pixels) per axis, filling with -1."""
    shifts = 2 * jax.random.randint(key, (images.shape[0], 2), -1, 2)

    def one(image, shift):
        padded = jnp.pad(image, ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        return jax.lax.dynamic_slice(padded, (2 - shift[0], 2 - shift[1], 0), IMAGE_SHAPE)

    return jax.vmap(one)(images, shifts)


# Training recipe: AdamW with cosine decay; minibatches, random 1-pixel shifts and Gaussian input
# noise (which makes the features vary smoothly off the data, where imperfect samples lie), all
# drawn from keys fixed by the seed.
_RECIPE = dict(seed=0, steps=2000, batch_size=128, learning_rate=3e-3, weight_decay=0.1, noise=0.3)


def _train(
    seed: int, steps: int, batch_size: int, learning_rate: float, weight_decay: float, noise: float
) -> Any:
    import optax  # lazy, like the trainer's dependencies

    images, labels = load_digits_split("train")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    model = DigitsClassifier()
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, images[:1])["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)

    def step(i, carry):
        params, opt_state = carry
        idx_key, shift_key, eps_key = jax.random.split(jax.random.fold_in(data_key, i), 3)
        idx = jax.random.choice(idx_key, NUM_TRAIN, (batch_size,), replace=False)
        x = _random_shift(images[idx], shift_key)
        x = x + noise * jax.random.normal(eps_key, x.shape)

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    run = jax.jit(lambda p, o: jax.lax.fori_loop(0, steps, step, (p, o)))
    params, _ = run(params, tx.init(params))
    return jax.device_get(params)


@functools.lru_cache(maxsize=4)
def _train_cached(**recipe: Any) -> Any:
    return _train(**recipe)


def train_digits_classifier(*, cache_dir: str | None = None, **overrides: Any) -> Any:
    """Trains (or loads) the digits classifier; returns its params (a pytree of numpy arrays).

    Deterministic: the same recipe gives bit-identical params in one process. The result is cached
    in memory per recipe; with ``cache_dir`` (e.g. ``~/.cache/diffusion_jax``) also on disk, keyed by
    a hash of the recipe. ``overrides`` change the recipe (seed, steps, batch_size, learning_rate,
    weight_decay, noise).
    """
    unknown = set(overrides) - set(_RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe options {sorted(unknown)}; known: {sorted(_RECIPE)}.")
    recipe = {**_RECIPE, **overrides}
    if cache_dir is None:
        return _train_cached(**recipe)
    tag = hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cache_dir), f"digits_classifier_{tag}.msgpack")
    model = DigitsClassifier()
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    )
    if os.path.exists(path):
        with open(path, "rb") as f:
            return jax.device_get(flax.serialization.from_bytes(template, f.read()))
    params = _train_cached(**recipe)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    os.replace(tmp, path)
    return params


@functools.lru_cache(maxsize=1)
def _apply_fn() -> Callable[..., tuple[jax.Array, jax.Array]]:
    return jax.jit(lambda params, x: DigitsClassifier().apply({"params": params}, x))


def _batched(params: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"images must be [N, 16, 16, 1] in [-1, 1] (raw 8x8 digits: use digits_to_images), got {images.shape}."
        )
    logits, features = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:  # pad to one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *IMAGE_SHAPE), np.float32)])
        out_logits, out_features = jax.device_get(_apply_fn()(params, chunk))
        logits.append(out_logits[:n])
        features.append(out_features[:n])
    return np.concatenate(logits), np.concatenate(features)


def digits_logits_and_features(
    images: np.ndarray, params: Any = None, *, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, 10] and features [N, 64] (float32 numpy) of images [N, 16, 16, 1] in [-1, 1].

    ``params`` defaults to :func:`train_digits_classifier`'s (trained on first use, then cached).
    """
    if params is None:
        params = train_digits_classifier()
    return _batched(params, images, batch_size)


def digits_features(images: np.ndarray, params: Any = None, *, batch_size: int = 500) -> np.ndarray:
    """Penultimate features [N, 64] (float32) of images [N, 16, 16, 1] in [-1, 1]: the digits FD's features."""
    return digits_logits_and_features(images, params, batch_size=batch_size)[1]


def digits_accuracy(params: Any = None, split: str = "test") -> float:
    """The classifier's accuracy on a split (default: the 297 held-out digits)."""
    images, labels = load_digits_split(split)
    logits, _ = digits_logits_and_features(images, params)
    return float(np.mean(np.argmax(logits, axis=-1) == labels))
