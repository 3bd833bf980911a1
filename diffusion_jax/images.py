"""Pictures of samples: image grids and 2-D scatter plots as uint8 arrays, and PNG files.

Inputs are numpy arrays: images [N, H, W, C] in [-1, 1] (C = 1 or 3), points [N, 2].
"""

from __future__ import annotations

import math

import numpy as np
from etils import epath


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 0..255 (clipped, rounded)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def image_grid(
    images: np.ndarray, *, columns: int | None = None, pad: int = 1, scale: int = 1
) -> np.ndarray:
    """Tiles images [N, H, W, C] in [-1, 1] into one uint8 picture [rows*(H+pad)+pad, ..., C].

    ``columns`` defaults to ceil(sqrt(N)); ``pad`` pixels of white separate the tiles; ``scale``
    enlarges every pixel to scale x scale (nearest neighbour), for small images.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    tiles = to_uint8(images)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = tiles[i]
    return grid


def scatter_plot(points: np.ndarray, *, size: int = 256, limit: float | None = None) -> np.ndarray:
    """A uint8 [size, size, 3] picture of 2-D points [N, 2] (dark dots on white, axes through 0).

    The view spans [-limit, limit] on both axes (default: the points' largest |coordinate| * 1.1).
    """
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be [N, 2], got shape {points.shape}.")
    finite = points[np.all(np.isfinite(points), axis=1)]
    if limit is None:
        limit = 1.1 * float(np.max(np.abs(finite))) if finite.size else 1.0
    limit = max(limit, 1e-6)
    img = np.full((size, size, 3), 255, np.uint8)
    centre = int(round((size - 1) / 2))
    img[centre, :] = img[:, centre] = 220
    cols = np.rint((finite[:, 0] / limit + 1) / 2 * (size - 1)).astype(int)
    rows = np.rint((1 - (finite[:, 1] / limit + 1) / 2) * (size - 1)).astype(int)
    keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = np.clip(rows[keep] + dr, 0, size - 1), np.clip(cols[keep] + dc, 0, size - 1)
            img[r, c] = (20, 60, 160)
    return img


def picture(samples: np.ndarray, *, columns: int | None = None) -> np.ndarray:
    """uint8 [H, W, C] picture of samples: a grid for images [N, H, W, C] (``columns`` wide, small
    images enlarged to at least 48 pixels), a scatter plot for points [N, 2]."""
    samples = np.asarray(samples)
    if samples.ndim == 4:
        scale = -(-48 // max(samples.shape[1:3]))  # ceil: 8x8 digits -> 6x, 32x32 -> 2x
        return image_grid(samples, columns=columns, scale=scale)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return scatter_plot(samples)
    raise ValueError(f"cannot draw samples of shape {samples.shape}: need [N, H, W, C] or [N, 2].")


def save_png(path: epath.PathLike, picture_uint8: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] (C = 1 or 3) picture as PNG, creating the parent folder."""
    from PIL import Image

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(picture_uint8)
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    with path.open("wb") as f:
        image.save(f, format="PNG")
