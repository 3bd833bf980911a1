"""The data configuration: every key with its default, and its one conversion to a typed object.

Trainer configs start from :func:`default_data_config` (an ``ml_collections.ConfigDict``, locked so
that a misspelt key raises) and the pipeline reads it only through :func:`to_data_config`, which
checks every value once and returns a frozen :class:`DataConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

SOURCES = (
    "digits",
    "dino",
    "moons",
    "circles",
    "swiss_roll",
    "gaussian_mixture",
    "tfds",
    "folder",
    "arrays",
)
POINT_SOURCES = ("dino", "moons", "circles", "swiss_roll", "gaussian_mixture")
RESIZE_METHODS = ("auto", "bicubic", "bilinear", "area", "nearest", "pad")
STANDARDIZE = ("isotropic", "per_dim", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Typed, validated data settings; see :func:`default_data_config` for what each key means."""

    source: str = "digits"
    name: str = ""
    split: str = "train"
    eval_split: str = "test"
    data_dir: str | None = None
    download: bool = False
    image_key: str = "image"
    label_key: str = "label"
    path: str = ""
    image_size: int = 16
    channels: int = 1
    resize_method: str = "auto"
    crop: str = "center"
    min_crop_fraction: float = 0.8
    random_flip: bool = False
    use_labels: bool = True
    num_classes: int = 0
    on_bad_file: str = "warn"
    verify_images: bool = True
    num_points: int = 0
    noise: float = -1.0
    num_components: int = 8
    standardize: str = "isotropic"
    data_seed: int = 0
    num_workers: int = 0
    num_threads: int = 4
    prefetch_batches: int = 8


DATA_CONFIG_HELP: dict[str, str] = {
    "source": f"where the data comes from: one of {SOURCES}",
    "name": 'tensorflow-datasets name, e.g. "cifar10", "mnist", "celeb_a", "oxford_flowers102"',
    "split": 'training split: tfds split string ("train", "train[:90%]"); digits "train" | "test" | "all"',
    "eval_split": "held-out split read by make_eval_iterator (same forms as split)",
    "data_dir": "tfds data_dir (local path; None = $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    "download": "tfds: download and prepare as array_record when missing (False: fail with instructions)",
    "image_key": "tfds feature holding the image",
    "label_key": 'tfds feature holding the class label ("" = no labels)',
    "path": "folder of images (source='folder') or .npz/.npy file (source='arrays')",
    "image_size": "output height = width in pixels; 0 keeps the stored size (then all images must agree)",
    "channels": "1 (grayscale) or 3 (RGB); 0 keeps the stored channels (then all images must agree)",
    "resize_method": f"{RESIZE_METHODS}; auto = nearest for integer up-scaling, else antialiased bicubic",
    "crop": '"center" or "random" (shorter side resized to a random size in [S, S/min_crop_fraction])',
    "min_crop_fraction": "smallest crop, as a fraction of the resized shorter side, for crop='random'",
    "random_flip": "random horizontal flips (training only)",
    "use_labels": 'emit "label" where the source has class labels',
    "num_classes": "expected number of classes; 0 = from the data. Labels must lie in [0, num_classes)",
    "on_bad_file": '"warn" (skip unreadable image files, warn with a count) or "error"',
    "verify_images": "decode every image file once up front (finds truncated files; False reads headers only)",
    "num_points": "2-D toys: number of points (0 = 8000); dino: 0 = the 142 points, >0 = resample with jitter",
    "noise": "2-D toys: generator noise (<0 = the source's default); dino: jitter std in standardised units",
    "num_components": "gaussian_mixture: number of Gaussians on a circle",
    "standardize": f"2-D points: {STANDARDIZE} (see diffusion_jax/data/README.md)",
    "data_seed": "seed that generates the 2-D toy points (fixed data, independent of the training seed)",
    "num_workers": "grain worker processes (0 = decode in this process)",
    "num_threads": "grain reader threads per process (0 = no background prefetch)",
    "prefetch_batches": "batches buffered ahead by the reader threads",
}


def default_data_config():
    """Every data key with its default (the 16x16 digits), as a locked ``ml_collections.ConfigDict``.

    Each key's meaning is in :data:`DATA_CONFIG_HELP`; assigning an unknown key raises.
    """
    import ml_collections

    cfg = ml_collections.ConfigDict(dataclasses.asdict(DataConfig()))
    cfg.lock()
    return cfg


def _as_dict(data_cfg: Any) -> dict[str, Any]:
    if isinstance(data_cfg, DataConfig):
        return dataclasses.asdict(data_cfg)
    if isinstance(data_cfg, dict):
        return dict(data_cfg)
    if hasattr(data_cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(data_cfg.to_dict())
    if dataclasses.is_dataclass(data_cfg):
        return dataclasses.asdict(data_cfg)
    if hasattr(data_cfg, "__dict__"):
        return {k: v for k, v in vars(data_cfg).items() if not k.startswith("_")}
    raise TypeError(
        f"data config must be an ml_collections.ConfigDict, a dict or an object with attributes; got {type(data_cfg).__name__}"
    )


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"data.{key}={value!r} is not one of {allowed}")
    return value


def to_data_config(data_cfg: Any) -> DataConfig:
    """Checks a data config (ConfigDict, dict or attribute object) and returns a frozen DataConfig.

    Missing keys take their defaults; unknown keys and bad values raise ``ValueError`` naming the key.
    """
    if isinstance(data_cfg, DataConfig):
        values = dataclasses.asdict(data_cfg)
    else:
        values = _as_dict(data_cfg)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown data config key(s) {unknown}; the known keys are {sorted(known)} "
            "(start from diffusion_jax.data.default_data_config())"
        )
    cfg = DataConfig(**values)
    if cfg.data_dir and "://" not in str(cfg.data_dir):
        cfg = dataclasses.replace(cfg, data_dir=os.path.expanduser(str(cfg.data_dir)))
    _choice("source", cfg.source, SOURCES)
    _choice("resize_method", cfg.resize_method, RESIZE_METHODS)
    _choice("crop", cfg.crop, ("center", "random"))
    _choice("on_bad_file", cfg.on_bad_file, ("warn", "error"))
    _choice("standardize", cfg.standardize, STANDARDIZE)
    if cfg.channels not in (0, 1, 3):
        raise ValueError(
            f"data.channels={cfg.channels!r}: use 1 (grayscale), 3 (RGB) or 0 (as stored)"
        )
    if not isinstance(cfg.image_size, int) or cfg.image_size < 0:
        raise ValueError(
            f"data.image_size={cfg.image_size!r}: use a positive int, or 0 to keep the stored size"
        )
    if not 0.0 < cfg.min_crop_fraction <= 1.0:
        raise ValueError(f"data.min_crop_fraction={cfg.min_crop_fraction!r} must be in (0, 1]")
    for key in ("num_classes", "num_points", "num_workers", "num_threads", "prefetch_batches"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"data.{key}={getattr(cfg, key)!r} must be >= 0")
    if cfg.num_components < 1:
        raise ValueError(f"data.num_components={cfg.num_components!r} must be >= 1")
    if cfg.source == "tfds" and not cfg.name:
        raise ValueError('data.source="tfds" needs data.name, e.g. "cifar10" or "mnist"')
    if cfg.source in ("folder",) and not cfg.path:
        raise ValueError('data.source="folder" needs data.path, the folder of images')
    return cfg
