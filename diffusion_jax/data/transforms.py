"""Image operations of the input pipeline, on numpy HWC arrays: channels, resize + crop, flips, scaling.

Images enter as uint8 (0..255) or float32 already in [-1, 1] and leave as float32 in [-1, 1].
Everything random takes an explicit ``np.random.Generator``; ``rng=None`` means deterministic
(centre crop, no flip), which is what evaluation uses.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

# ITU-R 601-2 luma, the weights PIL uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def uint8_to_float(x: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return x.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """[..., H, W, C] with C in {1, 2, 3, 4} -> C = ``channels`` (0 keeps C).

    Alpha (C = 2 or 4) is composited onto white; RGB -> gray uses ITU-R 601-2 luma; gray -> RGB repeats.
    Works for uint8 (0..255) and float in [-1, 1] (white = 1).
    """
    c = img.shape[-1]
    if channels in (0, c):
        return img
    is_uint8 = img.dtype == np.uint8
    x = img.astype(np.float32)
    white = 255.0 if is_uint8 else 1.0
    low = 0.0 if is_uint8 else -1.0
    if c in (2, 4):  # colour + alpha: composite onto white
        alpha = (x[..., -1:] - low) / (white - low)
        x = x[..., :-1] * alpha + white * (1.0 - alpha)
        c -= 1
    if c == 3 and channels == 1:
        x = x @ _LUMA[:, None]
    elif c == 1 and channels == 3:
        x = np.repeat(x, 3, axis=-1)
    if is_uint8:
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return x.astype(img.dtype)


def _shorter_side(
    size: int, crop: str, min_crop_fraction: float, rng: np.random.Generator | None
) -> int:
    if crop == "random" and rng is not None and min_crop_fraction < 1.0:
        return int(rng.integers(size, math.ceil(size / min_crop_fraction) + 1))
    return size


def _resample(method: str, scale: float) -> Image.Resampling:
    if method == "auto":
        upscale_by_integer = scale > 1 and abs(scale - round(scale)) < 1e-6
        return Image.Resampling.NEAREST if upscale_by_integer else Image.Resampling.BICUBIC
    return _PIL_RESAMPLE[method]


def _resize(img: np.ndarray, hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resizes one HWC image to ``hw`` = (H, W) with PIL (antialiased when shrinking)."""
    if img.shape[:2] == hw:
        return img
    h, w = hw
    if img.dtype == np.uint8:
        mode = "L" if img.shape[-1] == 1 else "RGB"
        pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
        out = np.asarray(pil.resize((w, h), resample))
        return out[..., None] if mode == "L" else out
    chans = [
        np.asarray(Image.fromarray(img[..., k].astype(np.float32), "F").resize((w, h), resample))
        for k in range(img.shape[-1])
    ]
    return np.clip(np.stack(chans, axis=-1), -1.0, 1.0).astype(img.dtype)


def _crop_offsets(
    h: int, w: int, size: int, crop: str, rng: np.random.Generator | None
) -> tuple[int, int]:
    if crop == "random" and rng is not None:
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return (h - size) // 2, (w - size) // 2


def _pad(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-pads H and W up to ``size`` with black (0 for uint8, -1 for float)."""
    h, w = img.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == pw == 0:
        return img
    fill = 0 if img.dtype == np.uint8 else -1.0
    widths = [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)]
    return np.pad(img, widths[: img.ndim], constant_values=fill)


def fit_image(
    img: np.ndarray,
    size: int,
    *,
    resize_method: str = "auto",
    crop: str = "center",
    min_crop_fraction: float = 0.8,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One HWC image -> [size, size, C]: resize the shorter side, then crop (centre or random).

    ``resize_method="pad"`` never scales: it pads with black up to ``size`` and crops anything larger.
    For ``crop="random"`` (and an ``rng``) the shorter side goes to a random length in
    [size, size / min_crop_fraction] before a random crop. ``size=0`` returns the image unchanged.
    """
    if size == 0:
        return img
    h, w = img.shape[:2]
    if resize_method == "pad":
        img = _pad(img, size)
    else:
        side = _shorter_side(size, crop, min_crop_fraction, rng)
        scale = side / min(h, w)
        hw = (max(side, round(h * scale)), max(side, round(w * scale)))
        img = _resize(img, hw, _resample(resize_method, scale))
    h, w = img.shape[:2]
    top, left = _crop_offsets(h, w, size, crop, rng)
    return img[top : top + size, left : left + size]


def fit_batch(
    x: np.ndarray,
    size: int,
    *,
    resize_method: str = "auto",
    crop: str = "center",
    min_crop_fraction: float = 0.8,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """[b, H, W, C] of one size -> [b, size, size, C]; vectorised for padding and integer nearest up-scaling."""
    if size == 0 or x.shape[1:3] == (size, size):
        return x
    h, w = x.shape[1:3]
    random_crop = crop == "random" and rng is not None
    scale = size / min(h, w)
    if not random_crop and resize_method == "pad":
        ph, pw = max(size - h, 0), max(size - w, 0)
        fill = 0 if x.dtype == np.uint8 else -1.0
        x = np.pad(
            x,
            [(0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)],
            constant_values=fill,
        )
        top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
        return x[:, top : top + size, left : left + size]
    integer = scale > 1 and abs(scale - round(scale)) < 1e-6
    if not random_crop and h == w and integer and resize_method in ("auto", "nearest"):
        k = round(scale)
        return np.repeat(np.repeat(x, k, axis=1), k, axis=2)
    return np.stack(
        [
            fit_image(
                im,
                size,
                resize_method=resize_method,
                crop=crop,
                min_crop_fraction=min_crop_fraction,
                rng=rng,
            )
            for im in x
        ]
    )


def random_flip_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips each NHWC image left-right with probability 1/2."""
    flip = rng.random(x.shape[0]) < 0.5
    if flip.any():
        x = x.copy()
        x[flip] = x[flip, :, ::-1]
    return x
