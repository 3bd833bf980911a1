"""Input pipelines: tensorflow-datasets, image folders, in-memory arrays and small built-in datasets.

Every pipeline yields dicts ``{"x": float32, "label": int32}`` ("label" only when the data have
labels): images NHWC in [-1, 1], points [b, D]. Training iterators are endless, reshuffled every
epoch, sharded per process, deterministic for a seed and process layout, and resumable through
grain's iterator state. See ``diffusion_jax/data/README.md``.

    from diffusion_jax import data
    cfg = data.default_data_config()            # the 16x16 digits; cfg.source = "folder", ...
    it = data.make_train_iterator(cfg, batch_size=64, seed=0)
    batch = next(it)                            # {"x": [64, 16, 16, 1], "label": [64]}
"""

from diffusion_jax.data.builtin import (
    load_digits,
    load_dino,
    load_points,
    make_toy,
    point_stats,
    standardize_points,
)
from diffusion_jax.data.config import (
    DATA_CONFIG_HELP,
    DataConfig,
    default_data_config,
    to_data_config,
)
from diffusion_jax.data.pipeline import (
    DatasetInfo,
    array_dataset_info,
    dataset_info,
    make_array_iterator,
    make_eval_iterator,
    make_train_iterator,
)

__all__ = [
    "DATA_CONFIG_HELP",
    "DataConfig",
    "DatasetInfo",
    "array_dataset_info",
    "dataset_info",
    "default_data_config",
    "load_digits",
    "load_dino",
    "load_points",
    "make_array_iterator",
    "make_eval_iterator",
    "make_toy",
    "make_train_iterator",
    "point_stats",
    "standardize_points",
    "to_data_config",
]
