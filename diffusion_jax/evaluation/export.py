"""Sample export for the standard FID tools: uint8 NHWC ``.npz`` (key ``arr_0``) and PNG files.

Protocol for published numbers (what the widely used evaluators expect, e.g. the guided-diffusion /
ADM TensorFlow evaluator and pytorch-fid / clean-fid on a folder of PNGs):

1. 50,000 samples from the EMA weights, unconditional (or with uniformly drawn labels, stated).
2. Fixed seeds: batch ``i`` uses ``fold_in(key(seed), i)`` with a stated seed and batch size
   (:func:`generate_samples`), so the same command writes the same files.
3. State the sampler and its steps (e.g. ``ddpm`` 1000 steps, ``fixed_large``; or ``ddim`` 50
   steps, eta 0), the schedule and whether x_0 was clipped; :func:`export_samples` records them in a
   JSON file beside the images.
4. Images are ``to_uint8(x)``: round((x + 1) * 127.5) clipped to [0, 255], NHWC. Grayscale data
   stay 1-channel in the files here; Inception-based tools need 3 channels (``np.repeat(a, 3, -1)``,
   see :func:`to_rgb`), and the reference statistics must come from the same conversion.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from diffusion_jax import sharding


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray:
    """Images in [-1, 1] (any shape) -> uint8 in [0, 255]: round((x + 1) * 127.5), clipped.

    Exact on the 8-bit grid: -1 + 2k/255 maps to k.
    """
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain non-finite values; cannot convert to uint8.")
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1] on the 8-bit grid (k -> k / 127.5 - 1)."""
    return (np.asarray(images, np.float64) / 127.5 - 1.0).astype(np.float32)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Grayscale NHWC [N, H, W, 1] -> [N, H, W, 3] by repetition; 3-channel input is returned as is."""
    images = _check_nhwc(images)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _check_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (use to_uint8), got {images.dtype}.")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC [N, H, W, C] with C in (1, 3), got {images.shape}.")
    return images


def save_npz(path: str | os.PathLike, images: np.ndarray) -> str:
    """Writes uint8 NHWC images [N, H, W, C] to ``path`` (local or ``gs://``) as
    ``np.savez(path, arr_0=images)``; returns the path."""
    images = _check_nhwc(images)
    path = epath.Path(path)
    if path.suffix != ".npz":
        path = path.parent / (path.name + ".npz")  # np.savez would append it anyway
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images)
    path.write_bytes(buffer.getvalue())
    return os.fspath(path)


def load_npz(path: str | os.PathLike) -> np.ndarray:
    """The ``arr_0`` array of an ``.npz`` written by :func:`save_npz` (or the standard tools)."""
    with epath.Path(path).open("rb") as f, np.load(f) as arrays:
        return arrays["arr_0"]


def save_pngs(
    directory: str | os.PathLike, images: np.ndarray, *, start_index: int = 0
) -> list[str]:
    """Writes each uint8 NHWC image as ``{index:06d}.png`` (mode L or RGB); returns the paths."""
    from PIL import Image

    images = _check_nhwc(images)
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = directory / f"{start_index + i:06d}.png"
        with path.open("wb") as f:
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")
        paths.append(os.fspath(path))
    return paths


def load_pngs(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """PNG files -> uint8 NHWC [N, H, W, C] (C = 1 for mode L)."""
    from PIL import Image

    arrays = []
    for path in paths:
        with epath.Path(path).open("rb") as f, Image.open(f) as image:
            a = np.asarray(image)
        arrays.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(arrays)


def generate_samples(
    sample_fn: Callable[..., jax.Array],
    params: Any,
    *,
    num_samples: int,
    batch_size: int,
    image_shape: tuple[int, ...],
    seed: int = 0,
    labels: np.ndarray | None = None,
    **model_kwargs: Any,
) -> np.ndarray:
    """``num_samples`` samples [N, *image_shape] (float32, as the sampler returns them).

    ``sample_fn(params, rng, shape, **model_kwargs)`` is a :func:`diffusion_jax.make_sampler` result;
    it is jitted once with the batch shape static, and batch ``i`` uses ``fold_in(key(seed), i)``
    (the last batch is full size, trimmed). The samples depend on ``seed`` and ``batch_size``, not
    on the devices: each batch is split over this process's devices when ``batch_size`` divides
    among them (every chip of a TPU VM or GPU box samples), else it runs on one.
    ``labels`` [N] (int), if given, are passed per batch as ``y=`` (class-conditional models).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}."
        )
    num_batches = -(-num_samples // batch_size)
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num_samples,):
            raise ValueError(f"labels must have shape ({num_samples},), got {labels.shape}.")
        labels = np.resize(labels, num_batches * batch_size)  # pad the last batch by repetition
    devices = jax.local_devices()
    if len(devices) > 1 and batch_size % len(devices) == 0:
        mesh = sharding.make_mesh(devices)
        params = jax.device_put(params, sharding.replicated(mesh))
        sample = jax.jit(sample_fn, static_argnums=2, out_shardings=sharding.batch_sharding(mesh))
    else:
        sample = jax.jit(sample_fn, static_argnums=2)
    key = jax.random.key(seed)
    shape = (batch_size, *image_shape)
    out = []
    for i in range(num_batches):
        kwargs = dict(model_kwargs)
        if labels is not None:
            kwargs["y"] = labels[i * batch_size : (i + 1) * batch_size]
        batch = sample(params, jax.random.fold_in(key, i), shape, **kwargs)
        out.append(np.asarray(jax.device_get(batch)))
    return np.concatenate(out)[:num_samples]


def export_samples(
    directory: str | os.PathLike,
    images: np.ndarray,
    *,
    metadata: dict[str, Any] | None = None,
    pngs: bool = True,
) -> dict[str, str]:
    """Writes samples in [-1, 1] [N, H, W, C] as ``samples_{N}x{H}x{W}x{C}.npz``, ``png/`` and ``samples.json``.

    ``metadata`` (sampler, steps, seed, checkpoint step, ...) goes into the JSON with the file layout.
    Returns the paths written (``npz``, ``png_dir``, ``json``).
    """
    uint8 = to_uint8(images)
    _check_nhwc(uint8)
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    npz = save_npz(directory / ("samples_" + "x".join(map(str, uint8.shape)) + ".npz"), uint8)
    paths = {"npz": npz}
    if pngs:
        paths["png_dir"] = os.fspath(directory / "png")
        save_pngs(paths["png_dir"], uint8)
    info = {
        "layout": "uint8 NHWC, key arr_0; value = round((x + 1) * 127.5) for x in [-1, 1]",
        "shape": list(uint8.shape),
        **(metadata or {}),
    }
    paths["json"] = os.fspath(directory / "samples.json")
    (directory / "samples.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return paths
